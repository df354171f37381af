"""The commands of `edge-fleet`, the operator's side (keygen, pack, verify;
edge_slm/cli.py groups them), and `edge-slm install` on the board itself."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from ..errors import EdgeSlmError
from ..options import Size

PID_FILE = "serve.pid"  # in the fleet folder: the running service, told to reload after an install


def fleet_dir(path: Path | None) -> Path:
    from ..paths import home

    return path or home() / "fleet"


def trusted_dir(path: Path | None) -> Path:
    from ..paths import home

    return path or home() / "trusted-keys"


@contextlib.contextmanager
def progress_bar(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A byte counter: a bar on a terminal, a line at the end otherwise."""
    if sys.stderr.isatty():
        with click.progressbar(length=total, label=label, file=sys.stderr) as bar:
            yield bar.update
    else:
        yield lambda n: None
        click.echo(f"{label}: {total >> 20} MiB done", err=True)


@click.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Folder for fleet.key (keep it secret) and fleet.pub (give it to the boards).")
def keygen(out: Path) -> None:
    """Make an Ed25519 key pair for signing bundles."""
    from .keys import generate

    private, public = generate(out)
    click.echo(f"private key {private} (keep it off the boards)\npublic key  {public} "
               "(copy it into each board's trusted-keys folder)")


@click.command()
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--name", required=True, help="The model's name in the fleet.")
@click.option("--version", type=click.IntRange(1, 2**53 - 1), required=True,
              help="Whole number, higher than any version of this name before.")
@click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The private key (fleet.key from keygen).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True, help="The bundle to write.")
@click.option("--golden", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help='JSON list of {"question": ..., "must_contain": [...]} the board must pass '
                   "(default: four plain facts).")
@click.option("--expires", "expires_days", type=click.FloatRange(0.01, 3650), default=365, show_default=True,
              help="Days until boards refuse to install it.")
@click.option("--rollback", is_flag=True, help="Allow boards to go back to this version from a newer one.")
def pack(model, name, version, key, out, golden, expires_days, rollback) -> None:
    """Sign MODEL (a GGUF) into one bundle file for boards."""
    from .bundle import load_golden
    from .bundle import pack as pack_bundle
    from .keys import load_private

    private = load_private(key)
    with progress_bar(model.stat().st_size, "hashing") as progress:
        m = pack_bundle(model, out, name=name, version=version, private_key=private,
                        golden=load_golden(golden) if golden else None, expires_days=expires_days,
                        rollback=rollback, progress=progress)
    click.echo(f"{out}: {m.name} v{m.version}, {m.size >> 20} MiB, sha256 {m.sha256[:16]}..., "
               f"needs {m.memory_bytes >> 20} MiB, {len(m.golden)} golden prompts")


@click.command()
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", "keys", type=click.Path(exists=True, path_type=Path), multiple=True, required=True,
              help="A public key file, or a folder of them (*.pub), to trust.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def verify(bundle, keys, as_json) -> None:
    """Check BUNDLE's signature and model without flashing it."""
    from dataclasses import asdict

    from .bundle import open_bundle, verify_model

    opened = open_bundle(bundle, _trusted(keys))
    with progress_bar(opened.model_size, "verifying") as progress:
        verify_model(opened, progress)
    m = opened.manifest
    if as_json:
        click.echo(json.dumps(asdict(m)))
    else:
        click.echo(f"{bundle}: good. {m.name} v{m.version}, {m.architecture}, {m.size >> 20} MiB, "
                   f"signed by {m.key_id}, expires {_day(m.expires)}")


def _trusted(paths) -> dict[str, object]:
    from .keys import key_id, load_public, raw_public, trusted_keys

    keys: dict[str, object] = {}
    for path in paths:
        if path.is_dir():
            keys.update(trusted_keys(path))
        else:
            k = load_public(path)
            keys[key_id(raw_public(k))] = k
    return keys


def _day(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d", time.gmtime(t))


@click.command("install")
@click.argument("bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--trusted-keys", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of public keys to trust (default: $EDGE_SLM_HOME/trusted-keys).")
@click.option("--fleet-dir", "slots_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The board's model slots (default: $EDGE_SLM_HOME/fleet).")
@click.option("--memory-budget", type=Size(), default=None,
              help="The board's budget (default: the configured one): the model must fit it.")
def install(bundle, trusted_keys, slots_dir, memory_budget) -> None:
    """Verify BUNDLE and swap it in, from a local file (a USB stick, say).

    The running service, if any, restarts on it; if it does not come back
    healthy, the board returns to the previous model by itself."""
    from ..config import load_engine_config
    from .board import Board
    from .board import install as install_bundle
    from .keys import trusted_keys as load_trusted

    budget = memory_budget or load_engine_config().memory_budget
    board = Board(fleet_dir(slots_dir))
    try:
        trusted = load_trusted(trusted_dir(trusted_keys))
        size = bundle.stat().st_size if bundle.is_file() else 0
        with progress_bar(size, "verifying") as progress:
            m = install_bundle(board, bundle, trusted, budget, progress)
        click.echo(f"{m.name} v{m.version} is in slot {board.pointer().active}, on trial")
        if not _tell_service(board.root):
            click.echo("no service is running here: the next `edge-slm serve` starts on it")
    finally:
        board.close()


def _tell_service(root: Path) -> bool:
    """Ask the service running on these slots to restart on the new model (SIGHUP)."""
    try:
        pid = int((root / PID_FILE).read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError):
        return False
    click.echo(f"told the service (pid {pid}) to restart on it")
    return True



def _connection(f):
    from firmware_bridge.commands import connection_options

    return connection_options(f)


def _service_config(broker, ca, cert, key, username, password_file):
    from firmware_bridge.commands import password
    from firmware_bridge.service import ServiceConfig

    return ServiceConfig(broker=broker or "mqtt://127.0.0.1:1883", ca=ca, cert=cert, key=key,
                         username=username, password=password(password_file))


def _boards(cfg, to: tuple[str, ...], group: str | None) -> list[str]:
    from .flash import group_members

    if bool(to) == bool(group):
        raise click.UsageError("name the boards with --to, or a group with --group (one of them)")
    if to:
        return list(dict.fromkeys(to))
    boards, offline = group_members(cfg, group)
    if offline:
        click.echo(f"offline, not flashed: {', '.join(offline)}", err=True)
    if not boards:
        raise EdgeSlmError(f"no board of group {group!r} is online on {cfg.broker}")
    return boards


class Canary(click.ParamType):
    """N boards, or P% of them, for the first wave."""

    name = "n|p%"

    def convert(self, value, param, ctx):
        text = str(value).strip()
        try:
            number = float(text[:-1]) if text.endswith("%") else int(text)
        except ValueError:
            self.fail(f"{value!r}: a number of boards or a percentage (10%)", param, ctx)
        if number < 0 or text.endswith("%") and number > 100:
            self.fail(f"{value!r}: out of range", param, ctx)
        return text


def _canary_count(canary: str | None, n: int) -> int:
    if canary is None:
        return 0
    if canary.endswith("%"):
        return max(1, round(n * float(canary[:-1]) / 100))
    return int(canary)


@click.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--to", multiple=True, help="A board (its device id); repeat for more.")
@click.option("--group", default=None, help="Every board of this group (from their retained state).")
@click.option("--canary", type=Canary(), default=None,
              help="First wave: N boards or P% (the rest only once these are healthy).")
@click.option("--max-failures", type=click.IntRange(0), default=0, show_default=True,
              help="Stop the rollout when more boards than this have failed.")
@click.option("--timeout", type=click.FloatRange(10), default=1800, show_default=True,
              help="Seconds a wave may take.")
@click.option("--json", "as_json", is_flag=True, help="Print each board's result as JSON.")
@_connection
def flash(bundle, to, group, canary, max_failures, timeout, as_json, broker, ca, cert, key, username,
          password_file) -> None:
    """Deliver BUNDLE over MQTT to boards, which verify, check and switch to it."""
    from .flash import Flasher, rollout

    cfg = _service_config(broker, ca, cert, key, username, password_file)
    boards = _boards(cfg, to, group)
    with _progress(boards) as on_update:
        flasher = Flasher(cfg, bundle, on_update)
        try:
            runs, finished = rollout(flasher, boards, _canary_count(canary, len(boards)), max_failures,
                                     timeout, lambda line: click.echo(line, err=True))
        finally:
            flasher.close()
    if as_json:
        click.echo(json.dumps({b: {"state": r.state, "reason": r.reason} for b, r in runs.items()}))
    else:
        for r in runs.values():
            click.echo(f"{r.board}\t{r.state}\t{r.reason}")
    failed = [r.board for r in runs.values() if not r.ok]
    if failed or not finished:
        raise EdgeSlmError(f"{len(failed)} of {len(boards)} board(s) not updated: {', '.join(failed) or '-'}")


@contextlib.contextmanager
def _progress(boards: list[str]) -> Iterator[Callable]:
    """Per board: a bar on a terminal, a line per change of state otherwise."""
    if not sys.stderr.isatty():
        last: dict[str, str] = {}

        def line(run) -> None:
            if last.get(run.board) != run.state or run.state != "receiving":
                click.echo(f"{run.board}: {run.state}"
                           + (f" {run.received}/{run.chunks}" if run.state == "receiving" else "")
                           + (f": {run.reason}" if run.reason else ""), err=True)
            last[run.board] = run.state

        yield line
        return
    from tqdm import tqdm

    bars = {b: tqdm(total=1, desc=b, position=i, unit="chunk", leave=True, file=sys.stderr)
            for i, b in enumerate(boards)}

    def update(run) -> None:
        bar = bars[run.board]
        if run.chunks and bar.total != run.chunks:
            bar.reset(total=run.chunks)
        bar.n = run.received
        bar.set_postfix_str(run.state if not run.reason or run.state == "receiving" else
                            f"{run.state}: {run.reason[:60]}")
        bar.refresh()

    try:
        yield update
    finally:
        for bar in bars.values():
            bar.close()


@click.command()
@click.option("--group", default=None, help="Only the boards of this group.")
@click.option("--json", "as_json", is_flag=True, help="Print the boards' states as JSON.")
@_connection
def status(group, as_json, broker, ca, cert, key, username, password_file) -> None:
    """A table of the boards, from their retained state on the broker."""
    from .flash import read_states

    cfg = _service_config(broker, ca, cert, key, username, password_file)
    boards = {b: s for b, s in read_states(cfg).items()
              if group is None or s.get("fleet", {}).get("group") == group}
    if as_json:
        click.echo(json.dumps(boards))
        return
    if not boards:
        click.echo("no boards")
        return
    click.echo("board\tstate\tmodel\tprevious\tlast result\tbudget\tuptime")
    for b, s in sorted(boards.items()):
        fleet_state, runtime = s.get("fleet", {}), s.get("runtime", {})
        online = runtime.get("state", "?")
        seen = runtime.get("at") if online == "offline" and runtime.get("at") else None
        if online == "offline":  # a crash leaves no time in the will: the last refresh of the state
            seen = seen or fleet_state.get("at")
            online += f" since {_clock(seen)}" if seen else ""
        model = _model(fleet_state.get("model")) or (runtime.get("model") or {}).get("name", "?")
        last = fleet_state.get("last") or {}
        budget = runtime.get("memory_budget") or fleet_state.get("memory_budget")
        uptime = f"{runtime['uptime_s']} s" if runtime.get("state") == "online" and "uptime_s" in runtime else "-"
        previous = _model(fleet_state.get("previous")) or ("stock model" if fleet_state.get("slot") else "-")
        click.echo(f"{b}\t{online}\t{model}\t{previous}\t"
                   f"{last.get('event', '-')}: {last.get('detail', '')}\t"
                   f"{f'{budget >> 20} MiB' if budget else '-'}\t{uptime}")


def _model(m: dict | None) -> str:
    return f"{m['name']} v{m['version']} {m['sha256'][:12]}" if isinstance(m, dict) and "name" in m else ""


def _clock(t: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


@click.command("rollback")
@click.option("--to", multiple=True, help="A board; repeat for more.")
@click.option("--group", default=None, help="Every board of this group.")
@click.option("--signing-key", "private_key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              required=True, help="The private key (fleet.key) that signs the command.")
@click.option("--timeout", type=click.FloatRange(1), default=120, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@_connection
def rollback_command(to, group, private_key, timeout, as_json, broker, ca, cert, key, username,
                     password_file) -> None:
    """Switch boards back to the model they kept."""
    from .flash import rollback
    from .keys import load_private

    cfg = _service_config(broker, ca, cert, key, username, password_file)
    runs = rollback(cfg, _boards(cfg, to, group), load_private(private_key), timeout)
    if as_json:
        click.echo(json.dumps({b: {"state": r.state, "reason": r.reason} for b, r in runs.items()}))
    else:
        for r in runs.values():
            click.echo(f"{r.board}\t{r.state}\t{r.reason}")
    if any(r.state != "rolled_back" for r in runs.values()):
        raise EdgeSlmError("not every board rolled back")
