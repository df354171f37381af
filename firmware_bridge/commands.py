"""`edge-slm serve` and `edge-slm mqtt-ask`: the MQTT side's command line,
joined to edge-slm's own (edge_slm/cli.py adds these commands)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

import click

from edge_slm.engine import MAX_SLOTS
from edge_slm.errors import EdgeSlmError
from edge_slm.options import engine_options

from . import protocol as p

log = logging.getLogger(__name__)

DEMO_DEVICE = "demo-pump"
DEMO_QUESTION = "What should I check first when a pump loses pressure?"
PASSWORD_ENV = "EDGE_SLM_MQTT_PASSWORD"


class Name(click.ParamType):
    """A runtime id or share group: the characters a topic level may safely hold."""

    name = "name"

    def convert(self, value, param, ctx) -> str:
        if not p.valid_device_id(value):
            self.fail(f"{value!r}: letters, digits, '_', '.', '-' (at most {p.MAX_DEVICE_ID}), "
                      "starting with a letter or digit", param, ctx)
        return value


NAME = Name()


class Broker(click.ParamType):
    """mqtt://HOST:PORT or mqtts://HOST:PORT, refused as a bad option (exit 2)."""

    name = "url"

    def convert(self, value, param, ctx) -> str:
        from .service import broker_address

        try:
            broker_address(value)
        except EdgeSlmError as e:
            self.fail(str(e), param, ctx)
        return value


def connection_options(f):
    """Where the broker is and how to log in: shared by serve and mqtt-ask."""
    for option in reversed([  # click lists options in the order they are applied, last first
        click.option("--broker", type=Broker(), default=None,
                     help="mqtt://HOST:PORT or mqtts://HOST:PORT (serve: none starts a private "
                          "mosquitto on loopback; mqtt-ask: 127.0.0.1:1883)."),
        click.option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TLS: CA certificates to trust."),
        click.option("--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TLS: client certificate."),
        click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TLS: client key."),
        click.option("--username", default=None, help="Broker user name."),
        click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help=f"File holding the broker password (or set {PASSWORD_ENV}; never "
                          "on the command line)."),
    ]):
        f = option(f)
    return f


def password(password_file: Path | None) -> str | None:
    if password_file is not None:
        try:
            return password_file.read_text().strip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeSlmError(f"{password_file}: {e}") from None
    return os.environ.get(PASSWORD_ENV) or None


@click.command()
@connection_options
@engine_options
@click.option("--slots", type=click.IntRange(1, MAX_SLOTS), default=None,
              help="Questions answered together (default: the configured number, else 4).")
@click.option("--max-tokens", type=click.IntRange(1, p.MAX_TOKENS), default=None,
              help="Longest answer, and the default length.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where accepted questions are kept (default: $EDGE_SLM_HOME/state).")
@click.option("--runtime-id", "--device-id", "runtime_id", type=NAME, default=None,
              help="This runtime's (board's) name on the broker (kept in the state dir).")
@click.option("--share-group", type=NAME, default=None,
              help="Split questions with other runtimes (MQTT 5 shared subscription).")
@click.option("--max-payload", type=click.IntRange(256, 1 << 20), default=None,
              help=f"Largest question, in bytes (default {p.MAX_PAYLOAD}).")
@click.option("--device-rate", type=click.FloatRange(0.01, 1000), default=None,
              help="Questions per second a device may send, sustained (default 2).")
@click.option("--device-burst", type=click.IntRange(1, 10000), default=None,
              help="Questions a quiet device may send at once (default 10).")
@click.option("--device-concurrency", type=click.IntRange(1, 1000), default=None,
              help="Questions per device in flight at once (default 4).")
@click.option("--reply-scope", default=None,
              help="Topics answers may go to, {device} being the asker's id "
                   f"(default {p.DEFAULT_REPLY_SCOPE}).")
@click.option("--drain-timeout", "drain_timeout_s", type=click.FloatRange(0, 3600), default=None,
              help="On SIGTERM, seconds to finish what is running (default 30).")
@click.option("--ha-discovery", is_flag=True, default=None, help="Announce the runtime to Home Assistant.")
@click.option("--demo", is_flag=True, help="Once up, ask one question as a device would and print the answer.")
@click.option("--index", "index_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Index of manuals to ground answers in (default: $EDGE_SLM_HOME/index.sqlite3, "
                   "used when it exists).")
@click.option("--trusted-keys", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Take fleet updates (edge-fleet flash) signed by the public keys in this folder.")
@click.option("--group", default=None, type=NAME, help="The board's group, for edge-fleet --group.")
@click.option("--fleet-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The board's two model slots (default: $EDGE_SLM_HOME/fleet).")
@click.option("--kiosk", "with_kiosk", is_flag=True,
              help="Also serve the technician's page, on the same engine and budget.")
@click.option("--kiosk-host", default=None, help="The page's address (default 127.0.0.1; another needs a PIN).")
@click.option("--kiosk-port", type=click.IntRange(1, 65535), default=None, help="The page's port (default 8080).")
@click.option("--kiosk-pin-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="File holding the PIN browsers off this board must enter (or EDGE_SLM_KIOSK_PIN).")
def serve(model_path, threads, n_ctx, kv_type, model_backend, execution_provider, memory_budget, slots,
          max_tokens, password_file, demo,
          index_path, trusted_keys, group, fleet_dir, with_kiosk, kiosk_host, kiosk_port, kiosk_pin_file,
          **service_options) -> None:
    """Answer devices' questions over MQTT (protocol: firmware_bridge/PROTOCOL.md).

    Settings also come from the [serve] table of the settings file and
    EDGE_SLM_<SETTING> variables (EDGE_SLM_BROKER, EDGE_SLM_STATE_DIR, ...)."""
    from edge_slm.config import load_engine_config, load_settings
    from edge_slm.engine import Engine
    from edge_slm.paths import home

    kiosk_cfg = None
    if with_kiosk:
        from edge_slm.kiosk.commands import kiosk_settings
        from edge_slm.kiosk.server import Kiosk  # before the engine plans: measured in its interpreter row
        from edge_slm.kiosk.server import planned_bytes as kiosk_bytes

        kiosk_cfg = kiosk_settings(kiosk_host, kiosk_port, kiosk_pin_file)

    from .broker import BrokerError, Mosquitto, free_port
    from .service import Service, ServiceConfig, planned_bytes
    from .store import Store, StoreError

    # A service says what it does (connects, refusals, drains) without -v.
    for name in ("firmware_bridge", "edge_slm.fleet"):  # and a board its updates
        service_log = logging.getLogger(name)
        if service_log.getEffectiveLevel() > logging.INFO:
            service_log.setLevel(logging.INFO)
    cfg = load_settings(ServiceConfig, "serve", {**service_options, "password": password(password_file)},
                        private=("password",))
    cfg = replace(cfg, state_dir=cfg.state_dir or home() / "state")
    # A typo or an unusable state directory is refused before the model loads.
    if cfg.broker is not None:
        _resolvable(cfg.broker)
    try:
        Store.in_folder(cfg.state_dir).close()
    except StoreError as e:
        raise EdgeSlmError(str(e)) from None
    engine_cfg = load_engine_config({"model": model_path, "memory_budget": memory_budget, "slots": slots,
                                     "ctx": n_ctx, "kv_type": kv_type, "threads": threads,
                                     "max_tokens": max_tokens, "index": index_path,
                                     "model_backend": model_backend, "execution_provider": execution_provider})
    fleet_bytes = 0
    if trusted_keys is not None:
        from .fleet_link import planned_bytes as fleet_bytes_planned

        fleet_bytes = fleet_bytes_planned()
    engine_cfg = replace(engine_cfg, front_end_bytes=planned_bytes(cfg, engine_cfg)
                         + (kiosk_bytes() if with_kiosk else 0) + fleet_bytes)
    board, trusted, link = None, None, None
    if trusted_keys is not None:  # this board takes fleet updates
        from edge_slm.fleet.board import Board
        from edge_slm.fleet.keys import trusted_keys as load_trusted

        trusted = load_trusted(trusted_keys)
        board = Board(fleet_dir or home() / "fleet")
        store = Store.in_folder(cfg.state_dir)
        cfg = replace(cfg, runtime_id=store.runtime_id(cfg.runtime_id))  # the board's name, kept
        store.close()
    private = None
    stop, reload = threading.Event(), threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, lambda *_: reload.set())  # `edge-slm install` asks for a restart
    running: dict[str, Engine] = {}
    try:
        if cfg.broker is None:
            port = 1883 if _port_free(1883) else free_port()
            try:
                private = Mosquitto(cfg.state_dir / "broker", port=port).start()
            except BrokerError as e:
                raise EdgeSlmError(str(e)) from None
            cfg = replace(cfg, broker=private.url)
        if board is not None:
            from .fleet_link import FleetLink

            link = FleetLink(board, cfg, cfg.runtime_id, trusted, engine_cfg.memory_budget,
                             on_switch=reload.set,
                             busy=lambda: bool(running) and running["engine"].status()["slots_busy"] > 0,
                             group=group).start()
            _write_pid(board.root)
        engine = _open_engine(engine_cfg, board, link)
        if engine is None:  # a new model failed to load: the board went back to the old one
            reload.set()
            return
        running["engine"] = engine
        with engine, contextlib.ExitStack() as front_ends:
            try:
                service = Service(engine, cfg, shared=with_kiosk,
                                  extra_status=lambda: _fleet_status(board, group)).start()
            except StoreError as e:
                raise EdgeSlmError(str(e)) from None
            front_ends.callback(service.stop)
            if kiosk_cfg is not None:
                front_ends.enter_context(Kiosk(engine, kiosk_cfg).start())
            log.warning("serving %s as runtime %s on %s", service.model_name, service.runtime_id, cfg.broker)
            if not service.wait_connected(10):
                log.warning("no broker answers at %s yet; retrying in the background", cfg.broker)
            elif demo:  # in its own thread: Ctrl-C while it streams is heard at once and drains
                threading.Thread(target=_demo, args=(cfg, stop), name="edge-slm-demo", daemon=True).start()
            if board is not None and board.pointer().trial:
                threading.Thread(target=_trial, args=(engine, board, link, reload), daemon=True).start()
            while not stop.wait(1.0) and not reload.is_set():
                pass
            running.clear()
            log.warning("stopping: draining questions in flight" if stop.is_set()
                        else "restarting on the model the fleet update chose")
    finally:
        if link is not None:
            link.stop()
        if board is not None:
            with contextlib.suppress(OSError):
                (board.root / "serve.pid").unlink()
            board.close()
        if private is not None:
            private.stop()
        if reload.is_set() and not stop.is_set():
            _restart()


def _restart() -> None:
    """Start this service again in this process's place (its pid, which
    systemd watches, stays): a fresh interpreter, so the memory plan measures
    the new model and not what the old one left behind."""
    args = [a for a in sys.argv[1:] if a != "--demo"]
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "edge_slm", *args])


def _open_engine(engine_cfg, board, link):
    """The engine on the board's active slot (or the configured model). A
    slot on trial that fails to load is given up for the previous one: None,
    so the caller starts again."""
    from edge_slm.engine import Engine

    model = board.start() if board is not None else None
    if board is not None and board.rolled_back:
        link.report(p.ROLLED_BACK, board.rolled_back)
    try:
        return Engine(replace(engine_cfg, model=model) if model else engine_cfg)
    except EdgeSlmError as e:
        if board is None or not board.pointer().trial:
            raise
        board.give_up(f"the new model failed to load: {e}")
        link.report(p.ROLLED_BACK, board.rolled_back)
        return None


def _trial(engine, board, link, reload: threading.Event) -> None:
    """The slot on trial asks its golden prompts through the running service's
    engine: commit it, or go back to the previous slot and restart."""
    from edge_slm.fleet.golden import failures

    m = board.manifest(board.pointer().active)
    failed = failures(engine, m.golden) if m else []
    if failed:
        reason = f"{len(failed)} golden prompts failed in service; first: {failed[0]}"
        board.give_up(reason)
        link.report(p.ROLLED_BACK, reason)
        reload.set()
    else:
        board.commit()
        link.report(p.COMMITTED, f"{m.name} v{m.version} answers its golden prompts" if m else "")


def _fleet_status(board, group: str | None) -> dict:
    return {"group": group, "fleet": board.describe() if board is not None else None}


def _write_pid(root: Path) -> None:
    (root / "serve.pid").write_text(f"{os.getpid()}\n")


def _port_free(port: int) -> bool:
    """Free to listen on; as mosquitto binds (SO_REUSEADDR), so a port whose
    last connections linger in TIME_WAIT after a restart counts as free."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _resolvable(broker: str) -> None:
    """A broker whose name does not resolve is a typo, not a broker that is
    down: refused at once instead of retried for ever in silence."""
    import socket

    from .service import broker_address

    host, port, _ = broker_address(broker)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise EdgeSlmError(f"broker {broker}: {host}: {e.strerror}") from None


def _demo(cfg, stop: threading.Event) -> None:
    """Ask one question through the broker, as a device would, and show the
    answer streaming in; then how to ask from another terminal."""
    from .client import DeviceClient
    from .service import broker_address

    host, port, _ = broker_address(cfg.broker)
    click.echo(f"\n{DEMO_DEVICE} asks over MQTT: {DEMO_QUESTION}\n", err=True)
    try:
        with DeviceClient(cfg, DEMO_DEVICE) as device:
            final = device.ask(DEMO_QUESTION, stream=True, max_tokens=128,
                               on_chunk=lambda c: (sys.stdout.write(c["text"]), sys.stdout.flush()))
    except EdgeSlmError as e:  # the service goes on serving
        log.error("the demo question: %s", e)
        return
    sys.stdout.write("\n")
    if stop.is_set():  # stopped while it streamed
        return
    ms = final.get("latency_ms", {})
    click.echo(f"\n[{final['status']}: {final.get('answer_tokens', 0)} tokens, first after "
               f"{ms.get('first_token')} ms, all in {ms.get('total')} ms]\n", err=True)
    click.echo("Serving. Ask from another terminal:\n"
               f"  mosquitto_sub -h {host} -p {port} -t 'edge-slm/v1/pump-7/answer' &\n"
               f"  mosquitto_pub -h {host} -p {port} -q 1 -t edge-slm/v1/pump-7/ask "
               "-m '{\"id\": \"q1\", \"question\": \"How do I bleed air from a hydraulic line?\"}'\n"
               "Ctrl-C stops.", err=True)


@click.command("mqtt-ask")
@click.argument("question")
@connection_options
@click.option("--device", default="cli", show_default=True, help="The device id to ask as.")
@click.option("--stream", is_flag=True, help="Print the answer as it is generated.")
@click.option("--max-tokens", type=click.IntRange(1, p.MAX_TOKENS), default=None)
@click.option("--temperature", type=click.FloatRange(0, p.MAX_TEMPERATURE), default=None,
              help=f"0 (greedy) or {p.MIN_TEMPERATURE:g} to {p.MAX_TEMPERATURE:g}.")
@click.option("--system", default=None, help="System prompt.")
@click.option("--mqtt311", is_flag=True, help="Speak MQTT 3.1.1 with the JSON envelope, as small firmware does.")
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=120.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final answer message as JSON.")
@click.option("--collection", default=None, help="Search only this collection of manuals.")
@click.option("--no-ground", "no_ground", is_flag=True, help="Answer without the manuals.")
def mqtt_ask(question, broker, ca, cert, key, username, password_file, device, stream, max_tokens,
             temperature, system, mqtt311, timeout, as_json, collection, no_ground) -> None:
    """Ask QUESTION through the broker as a device would, and print the answer."""
    import json

    from .client import DeviceClient
    from .service import ServiceConfig

    cfg = ServiceConfig(broker=broker or "mqtt://127.0.0.1:1883", ca=ca, cert=cert, key=key,
                        username=username, password=password(password_file))
    fields = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature),
                                ("system", system), ("collection", collection),
                                ("ground", False if no_ground else None)) if v is not None}
    printed = False

    def show(c):
        nonlocal printed
        if not as_json:
            sys.stdout.write(c["text"])
            sys.stdout.flush()
            printed = True

    with DeviceClient(cfg, device, mqtt5=not mqtt311, timeout=min(timeout, 10)) as client:
        final = client.ask(question, stream=stream, timeout=timeout, on_chunk=show, **fields)
    if as_json:
        click.echo(json.dumps(final, ensure_ascii=False))
    elif final["status"] == p.OK:
        click.echo("" if printed else final["text"])  # streamed text is already out: end its line
        if final.get("sources"):
            click.echo("Sources:")
        for n, source in enumerate(final.get("sources", []), 1):
            where = ", ".join(str(x) for x in (source["file"], source["heading"],
                                               source["page"] and f"page {source['page']}") if x)
            click.echo(f"  [{n}] {source['collection']}/{where}")
    if final["status"] != p.OK:
        raise EdgeSlmError(f"{final['status']}: {final.get('error', '')}")
