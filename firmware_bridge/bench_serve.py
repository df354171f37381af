"""`python -m firmware_bridge.bench_serve`: edge-slm serve, through a broker,
against llama.cpp's own HTTP server under the same concurrent questions; and
a soak through the broker under a memory budget.

    python -m firmware_bridge.bench_serve --slots 1,2,4 --rounds 3 --json bench-serve.json
    python -m firmware_bridge.bench_serve soak --questions 2000 --memory-budget 256M

A bench round is one of three, each in fresh processes so its peak RSS is
its own, measured with the same questions in the same order:
- edge-slm: a private mosquitto, `edge-slm serve --slots N` as a child, and
  the device simulator asking closed loop (4 askers, streamed);
- llama.cpp server: `python -m llama_cpp.server` (llama-cpp-python) with the
  same model, threads and context, asked the same through its OpenAI API
  (streamed chat completions, the same max_tokens, temperature 0);
- engine: the same closed loop straight on the Engine in a child process,
  which is what the broker path is measured against.
Rounds alternate (edge-slm, llama.cpp, engine, then again) so drift on the
machine hits all alike; every figure is the median over rounds. llama.cpp's
server answers one request at a time whatever the slot count, so its column
is measured again beside each slot count rather than once.
"""

from __future__ import annotations

import contextlib
import http.client
import importlib.util
import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import paho.mqtt.client as mqtt

from edge_slm.bench import NOISY_SPREAD, machine_info, spread
from edge_slm.cli import Group
from edge_slm.errors import EdgeSlmError
from edge_slm.memory import MIB, parse_size, status_bytes
from edge_slm.paths import check_writable, model_or_default, output_file
from edge_slm.soak import parse_slots

from . import protocol as p
from .broker import Mosquitto, free_port
from .service import REPEAT_PENALTY, ServiceConfig, broker_address
from .simulate import MALFORMED_MIX, QUESTIONS, SimConfig, parse_mix, percentile, simulate

log = logging.getLogger(__name__)

OURS, PEER, ENGINE = "edge-slm", "llama.cpp server", "engine"
ASKERS = 4
QUESTIONS_PER_ROUND = 24
MAX_TOKENS = 64
CTX = 1024
WARMUP = 2               # questions, one at a time and untimed, before each round's
START_TIMEOUT_S = 120.0
RUNTIME_ID = "bench"
BROKER_WITHIN = 0.95     # the target: through the broker at least this much of the engine's own rate
SOAK_FLAT = 0.05         # RSS after warm-up may rise this much (of the RSS at 10 %) and still be flat
FIGURES = (              # (key, label) of each row of the table
    ("answers_per_s", "answers/s"),
    ("tokens_per_s", "tokens/s"),
    ("first_chunk_p50_ms", "first chunk p50, ms"),
    ("first_chunk_p95_ms", "first chunk p95, ms"),
    ("final_p50_ms", "final p50, ms"),
    ("final_p95_ms", "final p95, ms"),
    ("answer_tokens_mean", "answer tokens, mean"),
    ("peak_rss_mb", "peak RSS, MiB"),
)


def questions(n: int, seed: int) -> list[str]:
    """The questions in the order the simulator asks them (ok mix, same seed)."""
    rng = random.Random(seed)
    return [rng.choice(QUESTIONS) for _ in range(n)]


def figures(first_ms: list[float], final_ms: list[float], tokens: list[int], wall_s: float) -> dict[str, Any]:
    """The figures of one round from per-answer times (ok answers only)."""
    return {"answers": len(final_ms), "wall_s": wall_s, "answers_per_s": len(final_ms) / wall_s,
            "tokens_per_s": sum(tokens) / wall_s,
            "first_chunk_p50_ms": percentile(first_ms, 0.5), "first_chunk_p95_ms": percentile(first_ms, 0.95),
            "final_p50_ms": percentile(final_ms, 0.5), "final_p95_ms": percentile(final_ms, 0.95),
            "answer_tokens_mean": statistics.fmean(tokens) if tokens else 0.0}


def last_level_cache() -> str | None:
    """The largest cache level's size as /sys gives it, e.g. '32768K'."""
    best: tuple[int, str] | None = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if best is None or level > best[0]:
            best = (level, f"L{level} {size}")
    return best[1] if best else None


def machine() -> dict[str, Any]:
    return {**machine_info(), "last_level_cache": last_level_cache()}


# ---- child processes ----

class Child:
    """A server process with its output in a log file; stopped with SIGTERM."""

    def __init__(self, cmd: list[str], log_path: Path, name: str):
        self.name, self.log_path = name, log_path
        self._log = open(log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log,
                                     stderr=subprocess.STDOUT)

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise EdgeSlmError(f"{self.name} exited ({self.proc.returncode}): {self.tail()}")

    def tail(self) -> str:
        lines = self.log_path.read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def peak_rss_mb(self) -> float:
        return status_bytes("VmHWM", self.proc.pid) / MIB

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %g s; killed", self.name, timeout)
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def wait_online(broker: str, child: Child, timeout: float = START_TIMEOUT_S) -> dict[str, Any]:
    """The runtime's retained status, once it says online (its subscriptions
    are in by then: it subscribes before it publishes the status)."""
    online = threading.Event()
    status: dict[str, Any] = {}

    def on_message(c, u, msg):
        with contextlib.suppress(ValueError):
            got = json.loads(msg.payload)
            if isinstance(got, dict) and got.get("state") == "online":
                status.update(got)
                online.set()

    host, port, _ = broker_address(broker)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.connect(host, port)
    client.subscribe(p.status_topic(RUNTIME_ID), qos=1)
    client.loop_start()
    try:
        deadline = time.monotonic() + timeout
        while not online.wait(0.2):
            child.check()
            if time.monotonic() > deadline:
                raise EdgeSlmError(f"edge-slm serve was not online within {timeout:g} s: {child.tail()}")
    finally:
        client.loop_stop()
        client.disconnect()
    return status


@contextlib.contextmanager
def serving(model: Path, slots: int, threads: int, ctx: int | None, max_tokens: int, folder: Path,
            memory_budget: str | None = None, askers: int = ASKERS,
            device_limits: bool = False) -> Iterator[tuple[str, Child, dict[str, Any]]]:
    """A private mosquitto and `edge-slm serve` on it; yields (broker URL,
    serve, its status). Without a `ctx`, serve sizes it to the budget.
    Without `device_limits`, the per-device rate and concurrency limits are
    opened wide, so admission does not cut into the throughput measured."""
    with Mosquitto(folder / "broker") as broker:
        cmd = [sys.executable, "-m", "edge_slm", "serve", "--broker", broker.url, "--model", str(model),
               "--slots", str(slots), "--threads", str(threads), "--max-tokens", str(max_tokens),
               "--state-dir", str(folder / "state"), "--runtime-id", RUNTIME_ID]
        if ctx:
            cmd += ["--ctx", str(ctx)]
        if memory_budget:
            cmd += ["--memory-budget", memory_budget]
        if not device_limits:
            cmd += ["--device-rate", "1000", "--device-burst", "10000",
                    "--device-concurrency", str(max(askers, 1))]
        serve = Child(cmd, folder / "serve.log", "edge-slm serve")
        try:
            yield broker.url, serve, wait_online(broker.url, serve)
        finally:
            serve.stop()


def round_ours(model: Path, slots: int, threads: int, ctx: int, max_tokens: int, n: int, seed: int,
               folder: Path) -> dict[str, Any]:
    with serving(model, slots, threads, ctx, max_tokens, folder) as (url, serve, _):
        connection = ServiceConfig(broker=url)
        simulate(connection, SimConfig(devices=1, concurrency=1, count=WARMUP, max_tokens=max_tokens,
                                       seed=seed + 1))
        report = simulate(connection, SimConfig(devices=ASKERS, concurrency=ASKERS, count=n,
                                                max_tokens=max_tokens, seed=seed))
        peak = serve.peak_rss_mb()
    ok = [r for r in report.records if r["status"] == p.OK]
    out = figures([r["first_chunk_ms"] for r in ok if r["first_chunk_ms"] is not None],
                  [r["final_ms"] for r in ok], [r["answer_tokens"] for r in ok], report.wall_s)
    out.update(peak_rss_mb=peak, outcomes=report.outcomes, exactly_once=report.exactly_once)
    return out


# ---- llama.cpp's server ----

def _chat(port: int, question: str, max_tokens: int, timeout: float) -> tuple[float | None, float, int, str]:
    """One streamed chat completion: (first content s, total s, answer tokens, finish reason)."""
    body = json.dumps({"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
                       "temperature": 0.0, "repeat_penalty": REPEAT_PENALTY, "stream": True})
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    t0 = time.monotonic()
    first, pieces, finish = None, 0, ""
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise EdgeSlmError(f"llama.cpp server: HTTP {resp.status} {resp.read(200)!r}")
        while line := resp.readline():
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            for choice in event.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    pieces += 1
                    if first is None:
                        first = time.monotonic() - t0
                finish = choice.get("finish_reason") or finish
    finally:
        conn.close()
    # The stream carries no token counts. An answer cut at max_tokens has
    # that many; otherwise each piece of content is one token (the server
    # sends one per token, merging a few only around incomplete characters).
    tokens = max_tokens if finish == "length" else pieces
    return first, time.monotonic() - t0, tokens, finish


def _wait_http(port: int, child: Child, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        child.check()
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise EdgeSlmError(f"llama.cpp server did not answer within {timeout:g} s: {child.tail()}")
        time.sleep(0.3)


def closed_loop(ask, qs: list[str], askers: int) -> tuple[list[float], list[float], list[int], float]:
    """Ask every question from `askers` threads, each asking its next once
    the last one is answered. `ask(q)` -> (first s or None, total s, tokens,
    ok). Returns first-chunk and final ms and tokens of the ok answers, and
    the wall time."""
    lock = threading.Lock()
    todo = iter(qs)
    first_ms: list[float] = []
    final_ms: list[float] = []
    tokens: list[int] = []
    errors: list[BaseException] = []

    def asker() -> None:
        while True:
            with lock:
                q = next(todo, None)
            if q is None or errors:
                return
            try:
                first, total, n, ok = ask(q)
            except (OSError, EdgeSlmError, ValueError) as e:
                errors.append(e)
                return
            with lock:
                if ok:
                    final_ms.append(1000 * total)
                    tokens.append(n)
                    if first is not None:
                        first_ms.append(1000 * first)

    t0 = time.monotonic()
    threads = [threading.Thread(target=asker) for _ in range(askers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise EdgeSlmError(f"a question failed: {errors[0]}")
    return first_ms, final_ms, tokens, time.monotonic() - t0


def round_peer(model: Path, threads: int, ctx: int, max_tokens: int, n: int, seed: int,
               folder: Path) -> dict[str, Any]:
    port = free_port()
    # interrupt_requests off: by default a new request cuts short the one
    # being streamed, which would turn four askers into truncated answers.
    # Every runtime samples as serve does: greedy, with serve's repeat penalty.
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--n_threads", str(threads),
           "--n_threads_batch", str(threads), "--n_ctx", str(ctx), "--host", "127.0.0.1", "--port", str(port),
           "--interrupt_requests", "False", "--verbose", "False"]
    server = Child(cmd, folder / "llama-server.log", "llama.cpp server")
    try:
        _wait_http(port, server)

        def ask(q: str):
            first, total, tokens, finish = _chat(port, q, max_tokens, timeout=600)
            return first, total, tokens, finish in ("stop", "length")

        for q in questions(WARMUP, seed + 1):
            ask(q)
        out = figures(*closed_loop(ask, questions(n, seed), ASKERS))
        out["peak_rss_mb"] = server.peak_rss_mb()
    finally:
        server.stop()
    return out


# ---- the engine on its own ----

def engine_round(model: Path, slots: int, threads: int, ctx: int, max_tokens: int, n: int, seed: int,
                 memory_budget: str | None = None) -> dict[str, Any]:
    """The same closed loop on the Engine in this process, with the settings
    `edge-slm serve` gives it (the config file and environment apply alike)."""
    from edge_slm.config import load_engine_config
    from edge_slm.engine import OK, Engine
    from edge_slm.memory import peak_rss
    from edge_slm.sampler import SamplingConfig

    cfg = load_engine_config({"model": model, "memory_budget": memory_budget, "slots": slots, "ctx": ctx,
                              "threads": threads, "max_tokens": max_tokens})
    with Engine(cfg) as engine:
        def ask(q: str):
            t0 = time.monotonic()
            first: list[float] = []

            def on_text(piece: str) -> None:
                if not first:
                    first.append(time.monotonic() - t0)

            req = engine.submit(messages=[{"role": "user", "content": q}], max_tokens=max_tokens,
                                sampling=SamplingConfig(temperature=0.0, repeat_penalty=REPEAT_PENALTY),
                                on_text=on_text)
            r = req.result(timeout=600)
            return (first[0] if first else None), time.monotonic() - t0, len(r.tokens), r.status == OK

        for q in questions(WARMUP, seed + 1):
            ask(q)
        out = figures(*closed_loop(ask, questions(n, seed), ASKERS))
    out["peak_rss_mb"] = peak_rss() / MIB
    return out


def round_engine(model: Path, slots: int, threads: int, ctx: int, max_tokens: int, n: int,
                 seed: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "firmware_bridge.bench_serve", "engine-round", "--model", str(model),
           "--slots", str(slots), "--threads", str(threads), "--ctx", str(ctx), "--max-tokens",
           str(max_tokens), "--questions", str(n), "--seed", str(seed)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        last = lines[-1] if lines else "no output"
        raise EdgeSlmError(f"the engine round failed ({proc.returncode}): {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- the table ----

def median_figures(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    return {key: statistics.median(r[key] for r in rounds) if all(r[key] is not None for r in rounds)
            else None for key, _ in FIGURES}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(rounds: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians, ratios and the issue's targets at one slot count; `noisy`
    names the figures whose rounds differ by more than bench's NOISY_SPREAD."""
    med = {rt: median_figures(rs) for rt, rs in rounds.items()}
    ours, peer, engine = med[OURS], med.get(PEER), med[ENGINE]
    out: dict[str, Any] = {"median": med}
    if peer:
        out["vs_peer"] = {key: _ratio(ours[key], peer[key]) for key, _ in FIGURES}
    out["broker_vs_engine"] = {key: _ratio(ours[key], engine[key])
                               for key in ("answers_per_s", "tokens_per_s")}
    out["noisy"] = {rt: [key for key, _ in FIGURES if all(r[key] for r in rs)
                         and spread([r[key] for r in rs]) > NOISY_SPREAD] for rt, rs in rounds.items()}
    targets = {"broker_within_5pct_of_engine":
               (out["broker_vs_engine"]["answers_per_s"] or 0) >= BROKER_WITHIN}
    if peer:
        targets["answers_2x_peer"] = (out["vs_peer"]["answers_per_s"] or 0) >= 2.0
        targets["first_chunk_p95_half_of_peer"] = (out["vs_peer"]["first_chunk_p95_ms"] or 9) <= 0.5
    out["targets"] = targets
    return out


def format_table(by_slots: dict[int, dict[str, Any]], settings: dict[str, Any]) -> str:
    fmt = lambda x, nd=1: "-" if x is None else f"{x:,.{nd}f}"  # noqa: E731
    lines = [f"{ASKERS} concurrent askers, streamed, {settings['questions']} questions per round, "
             f"max_tokens {settings['max_tokens']}, ctx {settings['ctx']}, {settings['threads']} threads; "
             f"median of {settings['rounds']} round{'s' * (settings['rounds'] > 1)}"]
    noisy = False
    for slots, s in by_slots.items():
        med, vs = s["median"], s.get("vs_peer")
        lines += ["", f"slots {slots}", f"  {'figure':22}{OURS:>10} {PEER:>17} {'ratio':>7}"
                                        f"{ENGINE + ' alone':>14} {'broker/engine':>14}"]

        def cell(rt: str, key: str, width: int) -> str:
            nonlocal noisy
            mark = "*" if key in s["noisy"].get(rt, []) else " "
            noisy |= mark == "*"
            return f"{fmt(med[rt][key]):>{width}}{mark}"

        for key, label in FIGURES:
            row = f"  {label:22}{cell(OURS, key, 10)}"
            row += f"{cell(PEER, key, 17)}{fmt(vs[key], 2):>7}" if vs else f"{'-':>18}{'-':>7}"
            row += cell(ENGINE, key, 14)
            if (bve := s["broker_vs_engine"].get(key)) is not None:
                row += f"{fmt(bve, 3):>14}"
            lines.append(row.rstrip())
        met = (f"{k} {'yes' if v else 'NO'}" for k, v in s["targets"].items())
        lines.append("  targets: " + ", ".join(met))
    if noisy:
        lines += ["", f"* rounds differ by more than {NOISY_SPREAD:g}x: the machine was busy; see the JSON"]
    return "\n".join(lines)


# ---- the command line ----

def model_option(f):
    return click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
                        default=None, help="GGUF file (default: the pulled SmolLM2-135M).")(f)


def threads_option(f):
    return click.option("--threads", type=click.IntRange(1, 256), default=None,
                        help="Threads, the same for every runtime (default: all CPUs).")(f)


@click.group(cls=Group, invoke_without_command=True)
@model_option
@click.option("--slots", "slots_text", default="1,2,4", show_default=True, help="Slot counts to run.")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Rounds per runtime and slot count; figures are medians.")
@click.option("--questions", "n_questions", type=click.IntRange(ASKERS), default=QUESTIONS_PER_ROUND,
              show_default=True, help="Questions per round.")
@threads_option
@click.option("--ctx", "n_ctx", type=click.IntRange(64, 1 << 16), default=CTX, show_default=True,
              help="Context per conversation, the same for every runtime.")
@click.option("--max-tokens", type=click.IntRange(1, p.MAX_TOKENS), default=MAX_TOKENS, show_default=True)
@click.option("--no-peer", is_flag=True, help="Measure edge-slm alone (no llama-cpp-python needed).")
@click.option("--seed", type=int, default=0, show_default=True, help="Chooses the questions.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.pass_context
def main(ctx: click.Context, model_path, slots_text, rounds, n_questions, threads, n_ctx, max_tokens, no_peer,
         seed, json_path, verbose) -> None:
    """edge-slm serve through a broker against llama.cpp's HTTP server, at
    each slot count (without a command); `soak`: the long run under a
    memory budget."""
    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if ctx.invoked_subcommand is None:
        bench(model_path, parse_slots(slots_text), rounds, n_questions, threads, n_ctx, max_tokens, no_peer,
              seed, json_path)


def bench(model_path: Path | None, slot_counts: list[int], rounds: int, n_questions: int, threads: int | None,
          n_ctx: int, max_tokens: int, no_peer: bool, seed: int, json_path: Path | None) -> None:
    from edge_slm.engine import default_threads

    path = model_or_default(model_path)
    check_writable(json_path)
    threads = threads or default_threads()
    if not no_peer and (importlib.util.find_spec("llama_cpp") is None
                        or importlib.util.find_spec("uvicorn") is None):
        raise EdgeSlmError("llama-cpp-python's server is not installed (the `bench` extra: pip install "
                           "'llama-cpp-python[server]', built as `make bench` does), or pass --no-peer")
    settings = {"slots": slot_counts, "rounds": rounds, "questions": n_questions, "askers": ASKERS,
                "threads": threads, "ctx": n_ctx, "max_tokens": max_tokens, "warmup": WARMUP, "seed": seed,
                "stream": True, "temperature": 0.0, "repeat_penalty": REPEAT_PENALTY, "model": str(path),
                "peak_rss": "VmHWM of the server process (serve, llama_cpp.server, the engine's child), MiB"}
    info = machine()
    runtimes = [OURS, ENGINE] if no_peer else [OURS, PEER, ENGINE]
    raw: dict[int, dict[str, list[dict[str, Any]]]] = {n: {rt: [] for rt in runtimes} for n in slot_counts}
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="edge-slm-bench-serve-") as tmp:
        for r in range(rounds):
            for n in slot_counts:
                for rt in runtimes:
                    click.echo(f"round {r + 1}/{rounds}: {rt}, {n} slot{'s' * (n > 1)}", err=True)
                    folder = Path(tmp) / f"{r}-{n}-{rt.split()[0]}"
                    folder.mkdir()
                    if rt == OURS:
                        got = round_ours(path, n, threads, n_ctx, max_tokens, n_questions, seed, folder)
                        if not got["exactly_once"]:
                            log.warning("round %d, %d slots: not every question was answered exactly "
                                        "once: %s", r + 1, n, got["outcomes"])
                    elif rt == PEER:
                        got = round_peer(path, threads, n_ctx, max_tokens, n_questions, seed, folder)
                    else:
                        got = round_engine(path, n, threads, n_ctx, max_tokens, n_questions, seed)
                    raw[n][rt].append(got)
    info["loadavg_end"] = list(os.getloadavg())
    by_slots = {n: summarize(raw[n]) for n in slot_counts}
    click.echo(format_table(by_slots, settings))
    if json_path is not None:
        doc = {"settings": settings, "machine": info, "elapsed_s": time.monotonic() - started,
               "by_slots": {str(n): {**s, "rounds": raw[n]} for n, s in by_slots.items()}}
        with output_file(json_path) as f:
            f.write((json.dumps(doc, indent=2) + "\n").encode())
        click.echo(f"wrote {json_path}")


@main.command("engine-round", hidden=True)
@model_option
@click.option("--slots", type=click.IntRange(1, 256), required=True)
@click.option("--threads", type=click.IntRange(1, 256), required=True)
@click.option("--ctx", "n_ctx", type=click.IntRange(64, 1 << 16), required=True)
@click.option("--max-tokens", type=click.IntRange(1, p.MAX_TOKENS), required=True)
@click.option("--questions", "n_questions", type=click.IntRange(1), required=True)
@click.option("--seed", type=int, default=0)
def engine_round_command(model_path, slots, threads, n_ctx, max_tokens, n_questions, seed) -> None:
    """One engine round in this process; one JSON line on stdout."""
    got = engine_round(model_or_default(model_path), slots, threads, n_ctx, max_tokens, n_questions, seed)
    click.echo(json.dumps(got))


@main.command()
@model_option
@click.option("--questions", "n_questions", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--memory-budget", default="256M", show_default=True, help="Ceiling for serve's whole process.")
@click.option("--slots", type=click.IntRange(1, 256), default=4, show_default=True)
@threads_option
@click.option("--max-tokens", type=click.IntRange(1, p.MAX_TOKENS), default=32, show_default=True)
@click.option("--askers", type=click.IntRange(1), default=None,
              help="Closed-loop askers (default: 2 per slot + 2).")
@click.option("--devices", type=click.IntRange(1), default=16, show_default=True)
@click.option("--mix", default=MALFORMED_MIX, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
def soak(model_path, n_questions, memory_budget, slots, threads, max_tokens, askers, devices, mix,
         json_path) -> None:
    """Questions through the broker, with the malformed mix, under a memory
    budget: serve's RSS sampled every second; every question answered once.
    The service's own per-device limits apply, as on a site."""
    from edge_slm.engine import default_threads

    path = model_or_default(model_path)
    check_writable(json_path)
    budget = parse_size(memory_budget)
    threads = threads or default_threads()
    askers = askers or 2 * slots + 2
    cfg = SimConfig(devices=devices, concurrency=askers, count=n_questions, mix=parse_mix(mix),
                    max_tokens=max_tokens)
    samples: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="edge-slm-soak-serve-") as tmp, \
            serving(path, slots, threads, None, max_tokens, Path(tmp), memory_budget=memory_budget,
                    device_limits=True) as (url, serve, status):
        t0 = time.monotonic()

        def sample(sim) -> None:
            now = time.monotonic()
            if not samples or now - t0 - samples[-1]["t_s"] >= 1.0:
                serve.check()
                samples.append({"t_s": now - t0, "rss_mb": status_bytes("VmRSS", serve.proc.pid) / MIB,
                                "answered": sim.answered})

        report = simulate(ServiceConfig(broker=url), cfg, progress=sys.stderr.isatty(), on_tick=sample)
        peak = serve.peak_rss_mb()
        serve_log = serve.log_path.read_text(errors="replace").splitlines()
    warm = next((i for i, s in enumerate(samples) if s["answered"] >= n_questions / 10), len(samples) - 1)
    at_10, end = samples[warm]["rss_mb"], samples[-1]["rss_mb"]
    after = max(s["rss_mb"] for s in samples[warm:])
    result = {"questions": n_questions, "slots": status.get("slots"), "ctx": status.get("context"),
              "memory_budget_mb": budget / MIB, "askers": askers, "devices": devices, "mix": mix,
              "max_tokens": max_tokens, "threads": threads, "peak_rss_mb": peak, "rss_at_10pct_mb": at_10,
              "rss_end_mb": end, "rss_max_after_10pct_mb": after, "within_budget": peak * MIB <= budget,
              "flat": after - at_10 <= SOAK_FLAT * at_10, "exactly_once": report.exactly_once,
              "serve_log_lines": len(serve_log), "samples": samples, "report": report.as_dict(),
              "machine": machine()}
    click.echo(f"soak through the broker: {n_questions} questions ({mix}), {result['slots']} slots, "
               f"ctx {result['ctx']}, budget {memory_budget}, {askers} askers on {devices} devices")
    click.echo(f"peak RSS (VmHWM)       {peak:7.1f} MiB   within the budget: "
               f"{'yes' if result['within_budget'] else 'NO'}")
    click.echo(f"RSS at 10 %            {at_10:7.1f} MiB")
    click.echo(f"RSS at the end         {end:7.1f} MiB")
    click.echo(f"highest after 10 %     {after:7.1f} MiB   (+{after - at_10:.1f}; flat within "
               f"{100 * SOAK_FLAT:g} %: {'yes' if result['flat'] else 'NO'})")
    click.echo(report.table())
    if json_path is not None:
        with output_file(json_path) as f:
            f.write((json.dumps(result, indent=2) + "\n").encode())
        click.echo(f"wrote {json_path}")
    if not (result["within_budget"] and report.exactly_once):
        sys.exit(1)


if __name__ == "__main__":
    main(prog_name="python -m firmware_bridge.bench_serve")
