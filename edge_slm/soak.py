"""The soak benchmark: thousands of requests through the engine API from
concurrent threads, under a memory budget, to show that resident memory
stays under the budget and does not grow with traffic.

Each slot count runs in its own child process, so each has its own peak
RSS. The mix: normal questions, long prompts (a manual passage), prompts
beyond the context (refused as too_long) and requests cancelled mid-answer.
"""

from __future__ import annotations

import json
import logging
import random
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import click

from .memory import MIB, current_rss, peak_rss
from .options import Size
from .paths import check_writable, output_file

log = logging.getLogger(__name__)

QUESTIONS = [
    "What should I check first when a pump loses pressure?",
    "How do I bleed air from a hydraulic line?",
    "Why would a motor overheat under light load?",
    "What does a blinking red status light usually mean?",
    "How often should air filters be replaced?",
    "What causes a conveyor belt to drift to one side?",
    "How do I reset a tripped thermal overload relay?",
    "What is the safe way to discharge a capacitor?",
]
MANUAL = (
    "Section 4.2 Hydraulic unit maintenance. Before any work, isolate the unit electrically, "
    "relieve stored pressure through the bleed valve and confirm zero pressure on the gauge. "
    "Inspect hoses for abrasion, blistering and leaks at fittings; replace any hose older than "
    "six years regardless of appearance. Check the reservoir level with the cylinders retracted. "
    "Replace the return filter every 500 operating hours or when the clogging indicator shows red. "
)


@dataclass
class SoakRun:
    slots: int
    requests: int
    peak_rss_mb: float
    rss_start_mb: float        # after the first 10 % of requests: past warm-up, steady state
    rss_end_mb: float
    decode_tps: float          # aggregate decode rate: tokens / time in the steps that only decoded
    tokens_per_s: float        # tokens generated / wall time, prompts, refusals and all
    requests_per_s: float
    p50_ms: float
    p95_ms: float
    n_ctx: int
    outcomes: dict
    within_budget: bool


def _request_kind(i: int, rng: random.Random) -> str:
    r = rng.random()
    return "normal" if r < 0.7 else "long" if r < 0.8 else "oversized" if r < 0.9 else "cancelled"


def run_soak(model: Path | None, budget: int, slots: int, n_requests: int, threads: int,
             kv_type: str, max_tokens: int, clients: int) -> SoakRun:
    """One slot count, in this process."""
    from .config import load_engine_config
    from .engine import BUSY, OK, Engine

    # The config file and environment apply, as for any engine; the soak's
    # own options win.
    engine = Engine(load_engine_config({"model": model, "memory_budget": budget, "slots": slots,
                                        "threads": threads, "kv_type": kv_type,
                                        "queue_size": 2 * slots, "timeout": 300.0,
                                        "max_tokens": max_tokens}))
    n_ctx = engine.plan.n_ctx
    oversized = MANUAL * (4 * n_ctx // 80 + 1)
    rng_lock = threading.Lock()
    rng = random.Random(0)
    next_index = iter(range(n_requests))
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    rss_marks: dict[str, int] = {}
    t_start = time.monotonic()

    def client() -> None:
        while True:
            with rng_lock:
                i = next(next_index, None)
                if i is None:
                    return
                kind = _request_kind(i, rng)
                question = rng.choice(QUESTIONS)
                if i == n_requests // 10:
                    rss_marks["start"] = current_rss()
            content = {"normal": question, "long": MANUAL + "\n" + question,
                       "oversized": oversized + question, "cancelled": question}[kind]
            while True:
                req = engine.submit(messages=[{"role": "user", "content": content}],
                                    max_tokens=max_tokens)
                if kind == "cancelled":
                    next(iter(req.stream(timeout=300)), None)
                    req.cancel()
                res = req.result(timeout=600)
                if res.status != BUSY:
                    break
                time.sleep(min(res.retry_after or 0.1, 0.5))
            with rng_lock:
                outcomes[f"{kind}:{res.status}"] = outcomes.get(f"{kind}:{res.status}", 0) + 1
                if res.status == OK:
                    latencies.append(res.total_s * 1000)

    workers = [threading.Thread(target=client) for _ in range(clients)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.monotonic() - t_start
    status = engine.status()
    engine.close()
    latencies.sort()
    peak = peak_rss()
    return SoakRun(
        slots=len(engine.slots), requests=n_requests, peak_rss_mb=peak / MIB,
        rss_start_mb=rss_marks.get("start", 0) / MIB, rss_end_mb=current_rss() / MIB,
        decode_tps=status["decode_tps"], tokens_per_s=status["tokens_generated"] / elapsed,
        requests_per_s=n_requests / elapsed,
        p50_ms=statistics.median(latencies) if latencies else 0.0,
        p95_ms=latencies[int(0.95 * (len(latencies) - 1))] if latencies else 0.0,
        n_ctx=n_ctx, outcomes=outcomes, within_budget=peak <= budget)


def parse_slots(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise click.BadParameter("slot counts must be positive")
    return values


@click.command()
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--memory-budget", "budget", type=Size(), default="256M", show_default=True,
              help="Ceiling for the process.")
@click.option("--slots", "slots_text", default="1,2,4", show_default=True, help="Slot counts to run.")
@click.option("--requests", "n_requests", type=click.IntRange(1), default=2000, show_default=True)
@click.option("--threads", type=click.IntRange(1, 256), default=2, show_default=True)
@click.option("--kv-type", type=click.Choice(["f16", "q8_0"]), default="f16", show_default=True)
@click.option("--max-tokens", type=click.IntRange(1), default=32, show_default=True,
              help="Answer length cap for normal and long requests.")
@click.option("--clients", type=click.IntRange(1), default=None,
              help="Concurrent client threads (default: 2 per slot + 2).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--child", is_flag=True, hidden=True)
def soak(model_path, budget, slots_text, n_requests, threads, kv_type, max_tokens, clients,
         json_path, child) -> None:
    """Many concurrent requests under a memory budget; peak RSS, growth, throughput."""
    slot_counts = parse_slots(slots_text)
    check_writable(json_path)
    if child:  # one slot count, in a fresh process so its peak RSS is its own
        run = run_soak(model_path, budget, slot_counts[0], n_requests, threads, kv_type, max_tokens,
                       clients or 2 * slot_counts[0] + 2)
        click.echo(json.dumps(asdict(run)))
        return
    runs = []
    click.echo(f"{'slots':>5} {'requests':>8} {'ctx':>5} {'peak MB':>8} {'start MB':>8} {'end MB':>7} "
               f"{'tok/s':>7} {'decode':>7} {'req/s':>6} {'p50 ms':>7} {'p95 ms':>7}  budget")
    for n in slot_counts:
        cmd = [sys.executable, "-m", "edge_slm", "soak", "--child", "--slots", str(n),
               "--memory-budget", str(budget), "--requests", str(n_requests), "--threads",
               str(threads), "--kv-type", kv_type, "--max-tokens", str(max_tokens)]
        if model_path:
            cmd += ["--model", str(model_path)]
        if clients:
            cmd += ["--clients", str(clients)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            raise click.ClickException(f"soak at {n} slots failed: {lines[-1] if lines else proc.returncode}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        runs.append(run)
        click.echo(f"{run['slots']:>5} {run['requests']:>8} {run['n_ctx']:>5} {run['peak_rss_mb']:>8.1f} "
                   f"{run['rss_start_mb']:>8.1f} {run['rss_end_mb']:>7.1f} {run['tokens_per_s']:>7.1f} "
                   f"{run['decode_tps']:>7.1f} "
                   f"{run['requests_per_s']:>6.2f} {run['p50_ms']:>7.0f} {run['p95_ms']:>7.0f}  "
                   f"{'ok' if run['within_budget'] else 'EXCEEDED'}")
    if len(runs) > 1:
        for key, label in (("tokens_per_s", "tokens/s, all told"), ("decode_tps", "batched decode")):
            base = runs[0][key] or 1e-9
            click.echo(f"{label} vs {runs[0]['slots']} slot(s): " + ", ".join(
                f"{r['slots']} slots {r[key] / base:.2f}x" for r in runs))
    if json_path:
        with output_file(json_path) as f:
            f.write(json.dumps({"budget_mb": budget / MIB, "runs": runs}, indent=2).encode())
