"""`edge-slm bench`: our runtime against llama.cpp on the same GGUF, and
beside our other backends (--backend onnx|litert) on its export.

Every runtime gets the same model, thread count, context size and token ids.
Every measurement round is a fresh process (edge_slm.bench_worker) running
the whole suite once for one runtime on one file; rounds alternate between
the runtimes (and the weight types, see --types) so slow drift on the
machine (thermal state, other load) hits all alike, and every figure
reported is the median over rounds."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click

from . import bench_grounding as bg
from . import bench_profile as bp
from . import requantize as rq
from .bench_worker import BACKENDS, LIBRARIES, OURS, PEER, RoundResult, Workload
from .engine import common_prefix
from .errors import EdgeSlmError
from .paths import check_writable, default_model_path, model_or_default, output_file
from .pull import file_sha256, sha256_file

log = logging.getLogger(__name__)

PREFILL_LENGTHS = (16, 128, 512)
TTFT_PROMPT = 64
N_DECODE = 128
# A prompt whose greedy continuation stays decisive for a while (llama.cpp's
# top-2 margin >= 1 for 11 tokens in tests/fixtures), so comparing the two
# runtimes' greedy ids says something before the first near-tie.
DECODE_TEXT = "Q: What is 17 + 25?\nA:"
# Fed one token at a time, untimed, to compare the runtimes' top-1 choice at
# every position (see bench_worker.top1_along).
CHECK_TEXT = ("A centrifugal pump turns the rotation of a motor into the motion of a fluid. "
              "Water enters at the eye of the impeller and the vanes throw it outward, which "
              "raises its pressure. When a pump loses pressure, check the suction line for air "
              "leaks first, then the impeller for wear.")
# Logits of this many fixed vocabulary ids are compared after each token of
# CHECK_TEXT (their correlation between the runtimes).
CHECK_SUBSET = 256
# Top-1 margins below this are near-ties on which llama.cpp disagrees with
# itself (NOTES.md), so only positions above it count as a real disagreement.
CONFIDENT_MARGIN = 1.0
# Rounds of one figure further apart than this (max / min) are flagged as noisy.
NOISY_SPREAD = 1.5
# Token ids for prompts are drawn from here (clipped to the vocabulary): ordinary
# text tokens, clear of the special tokens at the start of the vocabulary.
ID_RANGE = (100, 40000)
WORKLOAD_SEED = 1234
BANDWIDTH_BYTES = 512 << 20  # well past the last-level cache
BANDWIDTH_REPS = 5
MIN_REPS = 5                 # fewer rounds than this make medians noisy
CHILD_TIMEOUT_S = 900.0
MIB = 1024 * 1024
# Made from the reference model by default, besides its own type: the
# K-quant mix llama.cpp users most often pick, and the 8-bit type.
DEFAULT_REQUANTIZED = ("q4_k_m", "q8_0")


@dataclass
class RunSummary:
    """Medians over rounds for one runtime at one thread count, plus the raw samples."""

    runtime: str
    threads: int
    prefill_tps: dict[str, float]
    decode_tps: float
    ttft_ms: float
    peak_rss_mb: float
    # None for another backend: the GGUF's bytes are not what its format reads
    decode_bw_fraction: float | None
    backend: str
    version: str
    samples: dict[str, Any]
    greedy_ids: list[int]  # from the first round
    info: dict[str, object] = field(default_factory=dict)


def weight_bytes_per_token(model_path: Path) -> tuple[int, dict[str, int]]:
    """Bytes of weights one decode step reads from memory, and how they add up.

    Counted: every tensor of every block (the nine per layer, norms included),
    output_norm, and the output projection read in full; SmolLM2 ties it to
    token_embd, so then token_embd counts in full. The embedding lookup adds
    one row of token_embd (counted once more: it is a separate read). Not
    counted: the KV cache, which grows with position (at the positions the
    decode covers it is a few percent of the weights) and activations, which
    stay in cache."""
    from .formats import row_bytes
    from .model import load_model

    model = load_model(model_path)
    t = model.tensors
    blocks = sum(v.nbytes for k, v in t.items() if k.startswith("blk."))
    out = t.get("output.weight", t["token_embd.weight"])
    embd = t["token_embd.weight"]
    parts = {"blocks": blocks, "output_norm": t["output_norm.weight"].nbytes,
             "output_projection": out.nbytes, "embedding_row": row_bytes(embd.type, embd.cols)}
    return sum(parts.values()), parts


def tensor_types(model_path: Path) -> dict[str, int]:
    """How many tensors of each type the file holds, most common first: a
    quantizer's file type names a mix (llama.cpp's Q4_K_M of SmolLM2 is
    mostly Q5_0)."""
    from collections import Counter

    from .model import GGUFFile

    counts = Counter(t.type.name for t in GGUFFile(model_path).tensors().values())
    return dict(counts.most_common())


def make_workload(model_path: Path) -> tuple[Workload, str]:
    """The suite's token ids, and where the decode prompt came from.

    Prefill speed does not depend on which ids are fed, so those prompts are
    fixed pseudo-random ids; the decode prompt is real text when the tokenizer
    is available, so the greedy continuation compared across runtimes is a
    sensible one."""
    import numpy as np

    from .model import load_model

    model = load_model(model_path)
    vocab = model.config.vocab
    lo, hi = min(ID_RANGE[0], vocab // 2), min(ID_RANGE[1], vocab)
    rng = np.random.default_rng(WORKLOAD_SEED)

    def ids(n: int) -> list[int]:
        return [int(x) for x in rng.integers(lo, hi, n)]

    prefill = {n: ids(n) for n in PREFILL_LENGTHS}
    ttft = ids(TTFT_PROMPT)
    subset = sorted(int(x) for x in rng.choice(vocab, min(CHECK_SUBSET, vocab), replace=False))
    try:
        tok = model.tokenizer()
        decode_prompt, check, source = tok.encode(DECODE_TEXT), tok.encode(CHECK_TEXT), "text"
    except ImportError:  # the tokenizer module is not there yet
        decode_prompt, check, source = ids(16), ttft, "fixed ids"
    return Workload(prefill=prefill, ttft_prompt=ttft, decode_prompt=decode_prompt,
                    check_ids=check, n_decode=N_DECODE, check_subset=subset), source


def measure_bandwidth(threads: list[int]) -> dict[int, float]:
    from . import _core

    return {t: float(_core.read_bandwidth(t, BANDWIDTH_BYTES, BANDWIDTH_REPS)) for t in threads}


def run_child(runtime: str, model_path: Path, threads: int, ctx: int, workload: Path,
              kernels: str | None = None) -> tuple[RoundResult, float]:
    """One round in a fresh interpreter: its result and the CPU seconds it used."""
    args = ["--runtime", runtime, "--model", str(model_path), "--threads", str(threads),
            "--ctx", str(ctx), "--workload", str(workload)]
    if kernels is not None and runtime == OURS:
        args += ["--kernels", kernels]
    d, cpu_s = run_process("edge_slm.bench_worker", args, f"the {runtime} benchmark round")
    d["prefill_tps"] = {int(n): v for n, v in d["prefill_tps"].items()}
    return RoundResult(**d), cpu_s


def run_process(module: str, args: list[str], what: str) -> tuple[dict[str, Any], float]:
    """`python -m module args` in a fresh interpreter: the JSON of the last
    line it printed, and the CPU seconds it used. `what` names it in errors."""
    cmd = [sys.executable, "-m", module, *args]
    log.info("round: %s", " ".join(cmd[2:]))
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err)
        timer = threading.Timer(CHILD_TIMEOUT_S, p.kill)
        timer.start()
        try:
            out = p.stdout.read()
            p.stdout.close()
            # wait4 rather than wait(): it also returns the child's rusage.
            _, status, usage = os.wait4(p.pid, 0)
        finally:
            timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)  # so Popen does not wait again
        err.seek(0)
        stderr = err.read().decode(errors="replace").strip()
    if p.returncode != 0:
        log.error("%s failed (exit %d):\n%s", what, p.returncode, stderr)
        last = stderr.splitlines()[-1] if stderr else "no output"
        raise EdgeSlmError(f"{what} failed (exit {p.returncode}): {last}")
    if stderr:
        log.debug("%s: stderr:\n%s", what, stderr)
    return json.loads(out.decode().strip().splitlines()[-1]), usage.ru_utime + usage.ru_stime


def summarize(rounds: list[RoundResult], cpu_s: list[float], bandwidth_gbs: float,
              bytes_per_token: int | None) -> RunSummary:
    """bytes_per_token: what a decoded token reads of the GGUF's weights; None
    for a runtime that runs another format (its decode bandwidth share is None)."""
    med = statistics.median
    first = rounds[0]
    builds = {(r.backend, json.dumps(r.info, sort_keys=True)) for r in rounds}
    if len(builds) > 1:
        log.warning("%s at %d threads: rounds ran different builds or backends: %s",
                    first.runtime, first.threads, sorted(builds))
    prefill = {str(n): med(r.prefill_tps[n] for r in rounds) for n in sorted(first.prefill_tps)}
    decode = med(r.decode_tps for r in rounds)
    samples = {
        "prefill_tps": {str(n): [r.prefill_tps[n] for r in rounds] for n in sorted(first.prefill_tps)},
        "decode_tps": [r.decode_tps for r in rounds],
        "ttft_ms": [r.ttft_ms for r in rounds],
        "peak_rss_mb": [r.peak_rss_mb for r in rounds],
        "rss_baseline_mb": [r.rss_baseline_mb for r in rounds],
        "load_s": [r.load_s for r in rounds],
        "cpu_s": cpu_s,
        "backend": [r.backend for r in rounds],
    }
    return RunSummary(
        runtime=first.runtime, threads=first.threads, prefill_tps=prefill, decode_tps=decode,
        ttft_ms=med(r.ttft_ms for r in rounds), peak_rss_mb=med(r.peak_rss_mb for r in rounds),
        # Weight bytes streamed per second over what the machine can read:
        # how close decode is to the memory-bound ceiling.
        decode_bw_fraction=None if bytes_per_token is None
        else decode * bytes_per_token / (bandwidth_gbs * 1e9),
        backend=first.backend, version=first.version, samples=samples,
        greedy_ids=first.greedy_ids, info=first.info)


@dataclass
class Agreement:
    """How far our greedy choices match another runtime's at one thread count."""

    greedy_prefix: list[int]  # leading greedy decode tokens in common, per round
    greedy_tokens: int        # of this many
    top1_agree: int           # positions of the fixed text where the top-1 ids match
    positions: int
    confident_agree: int      # the same, counting only positions where both margins >= CONFIDENT_MARGIN
    confident_positions: int
    # Correlation of the two runtimes' logits (of Workload.check_subset) at
    # each position of the fixed text: the least and the median.
    logit_corr_min: float | None = None
    logit_corr_median: float | None = None


def compare(ours: list[RoundResult], other: list[RoundResult]) -> Agreement:
    import numpy as np

    a, b = ours[0], other[0]  # the fixed-text check is deterministic per build
    confident = [x == y for x, y, ma, mb in zip(a.check_top1, b.check_top1, a.check_margin,
                                                b.check_margin)
                 if min(ma, mb) >= CONFIDENT_MARGIN]
    corr = [float(np.corrcoef(x, y)[0, 1]) for x, y in zip(a.check_logits, b.check_logits)]
    return Agreement(
        greedy_prefix=[common_prefix(r.greedy_ids, q.greedy_ids) for r, q in zip(ours, other)],
        greedy_tokens=len(a.greedy_ids),
        top1_agree=sum(x == y for x, y in zip(a.check_top1, b.check_top1)),
        positions=len(a.check_top1), confident_agree=sum(confident),
        confident_positions=len(confident),
        logit_corr_min=min(corr) if corr else None,
        logit_corr_median=statistics.median(corr) if corr else None)


def last_level_cache(cpu: int = 0) -> tuple[int, int] | None:
    """(level, bytes) of the CPU's last-level data cache, from sysfs; None
    where the kernel does not say."""
    best = None
    for index in sorted(Path(f"/sys/devices/system/cpu/cpu{cpu}/cache").glob("index*")):
        try:
            kind = (index / "type").read_text().strip()
            level = int((index / "level").read_text())
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        if kind == "Instruction" or not size:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1].upper(), 1)
        try:
            nbytes = int(size.rstrip("KMGkmg")) * scale
        except ValueError:
            continue
        if best is None or level > best[0]:
            best = (level, nbytes)
    return best


def machine_info() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "Model")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    llc = last_level_cache()
    return {"platform": platform.platform(), "machine": platform.machine(), "cpu": cpu,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "last_level_cache": {"level": llc[0], "bytes": llc[1]} if llc else None,
            "loadavg_start": list(os.getloadavg())}


def cache_note(machine: dict[str, Any], weight_bytes: int) -> str:
    """The last-level cache beside the weights a token reads, and whether the
    decode bandwidth figure means anything: weights that fit in the cache
    are not read from DRAM, so the DRAM bound is not the limit."""
    llc = machine.get("last_level_cache")
    if not llc:
        return f"last-level cache: unknown; weights read per token {weight_bytes / (1 << 20):.1f} MiB"
    line = (f"last-level cache: L{llc['level']} {llc['bytes'] / (1 << 20):.0f} MiB; weights read per token "
            f"{weight_bytes / (1 << 20):.1f} MiB")
    if weight_bytes <= llc["bytes"]:
        line += (" -- they fit in the cache, so the decode bandwidth share (marked !) is not measured "
                 "against the DRAM bound")
    return line


# ---- the table ----

def _fmt(x: float) -> str:
    return f"{x:,.1f}" if x < 1000 else f"{x:,.0f}"


def spread(values: list[float]) -> float:
    return max(values) / min(values) if values and min(values) > 0 else 1.0


def _cell(value: float | None, samples: list[float]) -> tuple[str, bool]:
    """A median right-aligned in 12 characters, marked * if its rounds were
    too far apart; and whether they were. None (not measured) is a dash."""
    if value is None:
        return f"{'-':>11} ", False
    noisy = spread(samples) > NOISY_SPREAD
    return f"{_fmt(value):>11}{'*' if noisy else ' '}", noisy


@dataclass(frozen=True)
class Figure:
    """One row of the table: a median of each runtime's, compared by ratio."""

    key: str     # its name among the JSON's ratios
    label: str
    get: Callable[[RunSummary], float | None]
    samples: Callable[[RunSummary], list[float]]
    better: str  # "higher" or "lower"


def figures(in_cache: bool = False) -> list[Figure]:
    """`in_cache`: the weights fit in the last-level cache, so the bandwidth
    share is marked as not measured against the DRAM bound."""
    rows = [Figure(f"prefill_{n}_tps", f"prefill {n} tok, tok/s", lambda s, n=str(n): s.prefill_tps[n],
                   lambda s, n=str(n): s.samples.get("prefill_tps", {}).get(n, []), "higher")
            for n in PREFILL_LENGTHS]
    return rows + [
        Figure("decode_tps", f"decode {N_DECODE} tok, tok/s", lambda s: s.decode_tps,
               lambda s: s.samples.get("decode_tps", []), "higher"),
        Figure("ttft_ms", f"first token ({TTFT_PROMPT} tok), ms", lambda s: s.ttft_ms,
               lambda s: s.samples.get("ttft_ms", []), "lower"),
        Figure("peak_rss_mb", "peak RSS, MiB", lambda s: s.peak_rss_mb,
               lambda s: s.samples.get("peak_rss_mb", []), "lower"),
        Figure("decode_bw_fraction", "decode bandwidth used, %" + (" !" if in_cache else ""),
               lambda s: None if s.decode_bw_fraction is None else 100 * s.decode_bw_fraction,
               lambda s: s.samples.get("decode_tps", []), "higher"),
    ]


def ratio(f: Figure, ours: RunSummary, other: RunSummary) -> float | None:
    """Ours over the other runtime's, for one figure; None where either is not measured."""
    a, b = f.get(ours), f.get(other)
    return None if a is None or not b else a / b


def ratio_label(runtime: str) -> str:
    return "ours/peer" if runtime == PEER else f"ours/{runtime}"


def agreement_lines(a: Agreement) -> list[str]:
    lines = [f"greedy decode: the first {min(a.greedy_prefix)} of {a.greedy_tokens} "
             f"tokens agree (fewest over rounds)",
             f"top-1 along a fixed text: {a.top1_agree}/{a.positions} positions agree, "
             f"{a.confident_agree}/{a.confident_positions} where both margins "
             f">= {CONFIDENT_MARGIN:g}"]
    if a.logit_corr_min is not None:
        lines.append(f"logits there (a fixed sample of ids) correlate: min "
                     f"{a.logit_corr_min:.4f}, median {a.logit_corr_median:.4f}")
    return lines


def format_table(summaries: list[RunSummary], bandwidth: dict[int, float],
                 agreement: dict[str, dict[int, Agreement]], in_cache: bool = False) -> str:
    """A block per thread count: each runtime's medians, and ours over each
    other runtime's; then how far the others' choices match ours.
    `agreement`: by the other runtime, then by thread count."""
    by = {(s.runtime, s.threads): s for s in summaries}
    runtimes = [r for r in (OURS, PEER, *BACKENDS) if any(s.runtime == r for s in summaries)]
    others = runtimes[1:]
    lines = []
    head = f"{'':28}" + "".join(f"{r:>12}" for r in runtimes)
    if others:
        head += "".join(f"{ratio_label(r):>12}" for r in others) + "  better"
    noisy = False
    for t in sorted({s.threads for s in summaries}):
        lines.append(f"threads {t}  (memory read bandwidth {bandwidth[t]:.1f} GB/s)")
        lines.append(head)
        for f in figures(in_cache):
            row = f"  {f.label:26}"
            for r in runtimes:
                cell, was_noisy = _cell(f.get(by[(r, t)]), f.samples(by[(r, t)]))
                row += cell
                noisy |= was_noisy
            for r in others:
                x = ratio(f, by[(OURS, t)], by[(r, t)])
                row += f"{'-' if x is None else f'{x:.2f}':>12}"
            if others:
                row += f"  {f.better}"
            lines.append(row)
        for r in others:
            if t in agreement.get(r, {}):
                lines.append(f"  {r} beside edge-slm:")
                lines.extend(f"    {line}" for line in agreement_lines(agreement[r][t]))
        lines.append("")
    if noisy:
        lines.append(f"* rounds differ by more than {NOISY_SPREAD:g}x: the machine was busy; "
                     "see the raw samples")
    return "\n".join(lines).rstrip()


# ---- grounding: what it costs ----

def measure_grounding(model_path: Path, thread_counts: list[int], n_ctx: int, pairs: int,
                      kernels: str | None, workdir: Path) -> dict[str, Any]:
    """The bench's grounding section (see edge_slm.bench_grounding): a
    synthetic library indexed, retrieval timed alone, and the first token of
    `pairs` questions asked grounded and ungrounded, in a fresh process per
    thread count."""
    corpus = bg.write_corpus(workdir / "manuals")
    index_path = workdir / "index.sqlite3"
    indexed = bg.index_corpus(corpus, index_path)
    retrieval = bg.measure_retrieval(index_path, corpus.queries)
    questions = workdir / "questions.json"
    questions.write_text(json.dumps(bg.ttft_questions(corpus, pairs)))
    ttft = {}
    for t in thread_counts:
        click.echo(f"grounding: {pairs} question{'s' * (pairs > 1)} grounded and ungrounded, "
                   f"{t} thread{'s' * (t > 1)}", err=True)
        args = ["--model", str(model_path), "--index", str(index_path), "--threads", str(t),
                "--ctx", str(n_ctx), "--questions", str(questions)]
        if kernels is not None:
            args += ["--backend", kernels]
        d, _ = run_process("edge_slm.bench_grounding", args, "the grounding round")
        ttft[str(t)] = {**bg.summarize_ttft(d["samples"]), "load_s": d["load_s"],
                        "backend": d["backend"]}
    return {"corpus": {"seed": bg.CORPUS_SEED, "pages": corpus.pages, "manuals": corpus.manuals,
                       "bulletins": corpus.bulletins, "words": corpus.words, "bytes": corpus.bytes},
            "index": indexed, "retrieval": retrieval, "ttft_by_threads": ttft,
            "settings": {"slots": 1, "answer_tokens": 1,
                         "ttft": "submit to first token: retrieval, prompt and prefill",
                         "prompt_cache": "emptied before every timed request"}}


def format_grounding(g: dict[str, Any]) -> str:
    c, ix, r = g["corpus"], g["index"], g["retrieval"]
    lines = [f"grounding: {c['pages']:,} pages ({c['manuals']} manuals, {c['bulletins']} bulletins) "
             f"-> {ix['passages']:,} passages, indexed in {ix['seconds']:.1f} s, "
             f"index file {ix['bytes'] / MIB:.1f} MiB",
             f"  retrieval alone, ms: median {r['median_ms']:.1f}, p95 {r['p95_ms']:.1f} "
             f"({r['queries']} queries x {r['reps']}; the right manual first for "
             f"{r['top_hit_in_manual']}/{r['queries']})",
             f"{'':28}{'ungrounded':>12}{'grounded':>12}{'grounded/ungrounded':>21}"]
    noisy = False
    by_threads = sorted(g["ttft_by_threads"].items(), key=lambda item: int(item[0]))
    for t, s in by_threads:
        row = f"  {f'first token, {t} thread' + 's' * (t != '1') + ', ms':26}"
        for grounded, key in ((False, "ungrounded_ms"), (True, "grounded_ms")):
            mark = "*" if spread([x["ttft_ms"] for x in s["samples"] if x["grounded"] == grounded]) \
                > NOISY_SPREAD else " "
            noisy |= mark == "*"
            row += f"{_fmt(s[key]):>11}{mark}"
        lines.append(row + f"{s['ratio']:>21.2f}")
    s = by_threads[0][1]  # the prompts are the same at every thread count
    u, gr = s["ungrounded_prompt_tokens"], s["grounded_prompt_tokens"]
    lines.append(f"  {'prompt tokens':26}{u:>11.0f} {gr:>11.0f} {gr / u:>21.2f}")
    lines.append(f"  median of {s['pairs']} question{'s' * (s['pairs'] > 1)}, each asked both ways, "
                 "one slot, a cold prompt cache; grounded includes retrieval")
    if noisy:
        lines.append(f"* samples differ by more than {NOISY_SPREAD:g}x: the machine was busy; "
                     "see the raw samples")
    return "\n".join(lines)


# ---- where a token's time goes ----

def profile_only(path: Path, thread_counts: list[int], n_ctx: int, kernels: str | None,
                 json_path: Path | None) -> None:
    """`bench --profile`: edge_slm.bench_profile in a fresh process per thread count."""
    check_kernels(kernels)
    bandwidth = measure_bandwidth(thread_counts)
    summaries, raw = [], []
    for t in thread_counts:
        click.echo(f"profile: {bp.TOKENS} tokens, {t} thread{'s' * (t > 1)}", err=True)
        args = ["--model", str(path), "--threads", str(t), "--ctx", str(n_ctx),
                "--tokens", str(bp.TOKENS)]
        if kernels is not None:
            args += ["--backend", kernels]
        d, _ = run_process("edge_slm.bench_profile", args, "the profile")
        raw.append(d)
        summaries.append({**bp.summarize(d), "bandwidth_gbs": bandwidth[t]})
    machine = machine_info()
    bytes_per_token, _ = weight_bytes_per_token(path)
    click.echo(f"{path.name}: n_ctx {n_ctx}")
    click.echo(cache_note(machine, bytes_per_token))
    click.echo(bp.format_profile(summaries))
    if json_path is not None:
        doc = {"profile": summaries, "raw": raw, "machine": machine,
               "model": {"path": str(path), "weight_bytes_per_token": bytes_per_token}}
        with output_file(json_path) as f:
            f.write((json.dumps(doc, indent=2) + "\n").encode())
        click.echo(f"wrote {json_path}")


def check_kernels(kernels: str | None) -> None:
    if kernels is not None:
        from . import _core

        if kernels not in _core.backends():
            raise EdgeSlmError(f"kernel table {kernels!r} does not run on this CPU "
                               f"(available: {', '.join(_core.backends())})")


@contextlib.contextmanager
def spinners(n: int) -> Iterator[list[subprocess.Popen]]:
    """n processes that spin on a CPU each until the block ends."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        yield procs
    finally:
        for p in procs:
            p.kill()
            p.wait()


# ---- other backends: the model's export, run through edge_slm.backends ----

@dataclass
class BackendModel:
    """The model in another backend's format, as that backend's rounds run it."""

    kind: str                 # its --backend: "onnx", "litert"
    path: Path
    export_s: float | None    # how long the bench took to export it; None: given by --backend-model
    source_sha256: str        # of the GGUF it was made from (its sidecar's, checked)

    def doc(self) -> dict[str, Any]:
        return {"path": str(self.path), "given": self.export_s is None, "export_s": self.export_s,
                "source_sha256": self.source_sha256}


def usage_error(message: str, option: str) -> click.BadParameter:
    """A bad option's value, in one line, exit 2 (the CLI's Group prints it)."""
    return click.BadParameter(message, click.get_current_context(silent=True), param_hint=option)


def given_backend_models(backends: tuple[str, ...], paths: tuple[Path, ...]) -> dict[str, Path]:
    """--backend-model: each an export in the format of one --backend, one per format."""
    from .backends import FORMAT_NAMES, detect

    given: dict[str, Path] = {}
    for path in paths:
        if not path.exists():
            raise usage_error(f"{path}: no such file or folder", "--backend-model")
        try:
            kind = detect(path)
        except EdgeSlmError as e:
            raise usage_error(str(e), "--backend-model") from None
        if not backends:
            raise usage_error(f"{path}: runs only beside the --backend it is for", "--backend-model")
        if kind not in backends:
            wanted = " or ".join(f"--backend {b}" for b in backends)
            raise usage_error(f"{path} is a {FORMAT_NAMES[kind]}, not a model for {wanted}",
                              "--backend-model")
        if kind in given:
            raise usage_error(f"{path}: a second {kind} model (the first is {given[kind]})",
                              "--backend-model")
        given[kind] = path
    return given


def export_model(kind: str, gguf: Path, workdir: Path, n_ctx: int) -> Path:
    """The GGUF exported for backend `kind` into workdir, as `edge-slm export` writes it."""
    from .model import load_model

    model = load_model(gguf)
    if kind == "onnx":
        from .export.onnx import export_onnx

        out = workdir / "model-onnx"
        export_onnx(model, out)
        return out
    from .export.litert import export_litert

    out = workdir / "model.tflite"
    # Its KV cache holds a fixed number of positions: as many as our runtime's.
    export_litert(model, out, kv_len=n_ctx)
    return out


def check_backend_model(kind: str, path: Path, gguf: Path, n_ctx: int) -> str:
    """That backend `kind` loads the model at path, that it was exported from
    this GGUF and holds n_ctx positions; the GGUF's sha256. EdgeSlmError in
    one line if not."""
    from .backends import load_source
    from .backends.sidecar import read_sidecar

    positions = load_source(path, kind).config.context_length
    gguf_sha256 = file_sha256(gguf)
    doc, _, _ = read_sidecar(path, kind)
    source = doc.get("source") if isinstance(doc.get("source"), dict) else {}
    if source.get("sha256") != gguf_sha256:
        raise EdgeSlmError(f"{path}: exported from {source.get('name', 'another file')} "
                           f"(sha256 {str(source.get('sha256'))[:12]}...), not from {gguf.name} "
                           f"(sha256 {gguf_sha256[:12]}...): the runtimes would run different models")
    if positions < n_ctx:
        raise EdgeSlmError(f"{path}: holds {positions} positions, fewer than --ctx {n_ctx}")
    return gguf_sha256


def given_backend_model(kind: str, path: Path, gguf: Path, n_ctx: int) -> BackendModel:
    """The export given by --backend-model, checked: a bad one is a usage error (exit 2)."""
    try:
        return BackendModel(kind, path, None, check_backend_model(kind, path, gguf, n_ctx))
    except EdgeSlmError as e:
        raise usage_error(str(e), "--backend-model") from None


def exported_backend_model(kind: str, gguf: Path, n_ctx: int, workdir: Path) -> BackendModel:
    """The GGUF exported for backend `kind` into workdir, and checked as a given one is."""
    click.echo(f"{kind}: exporting {gguf.name}", err=True)
    started = time.monotonic()
    path = export_model(kind, gguf, workdir, n_ctx)
    export_s = time.monotonic() - started
    return BackendModel(kind, path, export_s, check_backend_model(kind, path, gguf, n_ctx))


# ---- weight types: the model as given and its copies made by llama.cpp ----

@dataclass
class TypeReport:
    """What was measured on one weight type of the model."""

    variant: rq.ModelVariant
    weight_bytes: int            # read per decoded token (weight_bytes_per_token)
    weight_parts: dict[str, int]
    in_cache: bool               # those bytes fit in the last-level cache
    tensor_types: dict[str, int]
    summaries: list[RunSummary] = field(default_factory=list)
    # ours against each other runtime (llama.cpp, a backend), by thread count
    agreement: dict[str, dict[int, Agreement]] = field(default_factory=dict)
    greedy_sequences: int = 1    # distinct greedy outputs of ours over rounds and thread counts


def parse_types(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    """--types: comma-separated names from requantize.FILE_TYPES, each kept once, in order."""
    if value is None:
        return None
    names = [n.strip().lower() for n in value.split(",") if n.strip()]
    unknown = [n for n in names if n not in rq.FILE_TYPES]
    if unknown or not names:
        raise click.BadParameter(f"{', '.join(unknown) or 'no type given'}: choose from "
                                 f"{', '.join(rq.FILE_TYPES)}")
    return tuple(dict.fromkeys(names))


def default_types(path: Path, peer: bool) -> list[str]:
    """The model's own type; for the pulled reference model compared with
    llama.cpp, DEFAULT_REQUANTIZED too (llama-cpp-python, installed for the
    peer, makes them; another model's copies are made only when asked for)."""
    own = rq.file_type(path) or rq.AS_GIVEN
    reference = path.resolve() == default_model_path().resolve()
    return [own, *(t for t in DEFAULT_REQUANTIZED if t != own and reference and peer)]


def variant_shown(source: Path, type_name: str) -> rq.ModelVariant:
    """requantize.variant, saying so when llama.cpp has to make the file (a
    few seconds), with a progress bar on a terminal."""
    made = False
    with contextlib.ExitStack() as stack:
        bar: Any = None

        def progress(done: int, total: int) -> None:
            nonlocal bar, made
            if not made:
                made = True
                click.echo(f"{type_name}: requantizing {source.name} with llama.cpp's quantizer", err=True)
                if sys.stderr.isatty():
                    bar = stack.enter_context(click.progressbar(length=total, label="tensors",
                                                                file=sys.stderr))
            if bar is not None:
                bar.update(done - bar.pos)

        v = rq.variant(source, type_name, progress)
    if made:
        click.echo(f"{type_name}: wrote {v.path} ({v.path.stat().st_size / MIB:.1f} MiB)", err=True)
    return v


def type_heading(r: TypeReport) -> str:
    v = r.variant
    line = f"{v.type}: {v.path.name}, {v.path.stat().st_size / MIB:.1f} MiB"
    if v.made_from is not None:
        line += f", made from {Path(v.made_from['source']).name} by {v.made_from['quantizer']}"
    return line + "\ntensors: " + ", ".join(f"{n} x {t}" for t, n in r.tensor_types.items())


def format_types(reports: list[TypeReport], thread_counts: list[int]) -> str:
    """The summary: a row per weight type and thread count, with decode and
    the longest prefill beside llama.cpp's and the top-1 check against it."""
    n = str(max(PREFILL_LENGTHS))
    runtimes = [rt for rt in (OURS, PEER) if any(s.runtime == rt for s in reports[0].summaries)]
    peer = PEER in runtimes
    figures = [(f"decode {N_DECODE} tok", lambda s: s.decode_tps,
                lambda s: s.samples.get("decode_tps", [])),
               (f"prefill {n} tok", lambda s: s.prefill_tps[n],
                lambda s: s.samples.get("prefill_tps", {}).get(n, []))]
    width = 12 * len(runtimes) + 7 * peer
    head = f"{'':26}" + "".join(f"{label:>{width}}" for label, _, _ in figures)
    sub = f"  {'type':10}{'MiB/token':>10}{'thr':>4}" + (
        "".join(f"{rt:>12}" for rt in runtimes) + ("  ratio" if peer else "")) * len(figures)
    if peer:
        head += f"{'top-1 agrees':>16}{'logit corr':>12}"
        sub += f"{'(confident)':>16}{'(least)':>12}"
    lines = ["by weight type, tok/s" + ("; ratio edge-slm / llama.cpp, higher is faster" if peer else ""),
             head, sub]
    noisy = False
    for r in reports:
        for i, t in enumerate(thread_counts):
            by = {s.runtime: s for s in r.summaries if s.threads == t}
            name, mib = (r.variant.type, f"{r.weight_bytes / MIB:.1f}") if i == 0 else ("", "")
            row = f"  {name:10}{mib:>10}{t:>4}"
            for _, get, raw in figures:
                for rt in runtimes:
                    cell, was_noisy = _cell(get(by[rt]), raw(by[rt]))
                    row += cell
                    noisy |= was_noisy
                if peer:
                    row += f"{get(by[OURS]) / get(by[PEER]):>7.2f}"
            if peer:
                a = r.agreement[PEER][t]
                corr = "" if a.logit_corr_min is None else f"{a.logit_corr_min:.4f}"
                row += f"{f'{a.confident_agree}/{a.confident_positions}':>16}{corr:>12}"
            lines.append(row)
    if noisy:
        lines.append(f"* rounds differ by more than {NOISY_SPREAD:g}x: the machine was busy; "
                     "see the raw samples")
    return "\n".join(lines)


def ratios_doc(summaries: list[RunSummary]) -> dict[str, dict[str, dict[str, float | None]]]:
    """Our median over each other runtime's for every figure of the table, by
    runtime and thread count: for tok/s and the bandwidth share above 1 is
    ours ahead, for ms and MiB below 1 is."""
    ours = {s.threads: s for s in summaries if s.runtime == OURS}
    doc: dict[str, dict[str, dict[str, float | None]]] = {}
    for s in summaries:
        if s.runtime != OURS:
            doc.setdefault(s.runtime, {})[str(s.threads)] = {f.key: ratio(f, ours[s.threads], s)
                                                             for f in figures()}
    return doc


def type_doc(r: TypeReport, decode_source: str) -> dict[str, Any]:
    """One weight type's part of the JSON."""
    v = r.variant
    return {
        "type": v.type,
        "model": {"path": str(v.path), "sha256": sha256_file(v.path), "bytes": v.path.stat().st_size,
                  "made_from": v.made_from, "tensor_types": r.tensor_types,
                  "weight_bytes_per_token": r.weight_bytes,
                  "fits_in_last_level_cache": r.in_cache, "weight_bytes_per_token_parts": r.weight_parts},
        "runs": [{k: val for k, val in asdict(s).items() if k != "greedy_ids"} for s in r.summaries],
        "ratios": ratios_doc(r.summaries),
        "greedy_agreement": {
            "prompts": decode_source,
            "decode_text": DECODE_TEXT if decode_source == "text" else None,
            "check_text": CHECK_TEXT if decode_source == "text" else None,
            "confident_margin": CONFIDENT_MARGIN,
            # ours against llama.cpp's, and against each other backend's
            "by_threads": {str(t): asdict(a) for t, a in r.agreement.get(PEER, {}).items()},
            "backends": {rt: {str(t): asdict(a) for t, a in by.items()}
                         for rt, by in r.agreement.items() if rt != PEER},
            "edge_slm_consistent": r.greedy_sequences == 1,
            "greedy_ids": {f"{s.runtime}/{s.threads}": s.greedy_ids for s in r.summaries},
        },
    }


@click.command()
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="GGUF file (default: the pulled SmolLM2-135M).")
@click.option("--types", callback=parse_types, default=None, metavar="TYPE,...",
              help="Weight types to measure, e.g. q4_1,q4_k_m,q8_0: the model's own type is the "
                   "file as given, any other a copy made from it by llama.cpp's quantizer "
                   "(llama-cpp-python), kept beside the pulled model and reused while the "
                   "model's sha256 is the same. Default: the model's own type, and for the "
                   f"pulled model compared with llama.cpp also {', '.join(DEFAULT_REQUANTIZED)}.")
@click.option("--threads", type=click.IntRange(1, 256), multiple=True, default=(1, 2),
              show_default=True, help="Thread count to measure at (repeatable).")
@click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=2048, show_default=True,
              help="Context length, the same for both runtimes.")
@click.option("--reps", type=click.IntRange(1), default=MIN_REPS, show_default=True,
              help="Rounds per runtime, type and thread count; figures are medians.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write every figure and raw sample here.")
@click.option("--no-peer", is_flag=True, help="Measure edge-slm only (no llama-cpp-python needed).")
@click.option("--kernels", default=None,
              help="edge-slm kernel table, e.g. avx2 to match an AVX2 build of llama.cpp "
                   "(default: the best for this CPU).")
@click.option("--backend", "backends", type=click.Choice(BACKENDS), multiple=True,
              help="Also run the model's export in this format (ONNX Runtime, LiteRT) through "
                   "edge-slm's backend for it, the same threads, context and prompts, beside our "
                   "C kernels on the model as given (repeatable). The export is made in a "
                   "temporary folder unless --backend-model gives it.")
@click.option("--backend-model", "backend_models", type=click.Path(path_type=Path), multiple=True,
              help="The export a --backend runs (an ONNX folder, a .tflite file), made from "
                   "--model by `edge-slm export`; one per format (repeatable).")
@click.option("--busy-cores", type=click.IntRange(0), default=0, show_default=True,
              help="Keep this many other processes spinning throughout, as other programs "
                   "on a shared board would.")
@click.option("--profile", is_flag=True,
              help="Instead of the comparison: where a decoded token's time goes, per kind "
                   "of op (each weight type's gemm with the GB/s it streamed, attention, "
                   "norms, ..., sampling, the Python step), at each --threads, on the model "
                   "as given.")
@click.option("--grounding/--no-grounding", default=True, show_default=True,
              help="Also measure what grounding costs: retrieval alone on a corpus of "
                   f"{bg.CORPUS_PAGES:,} pages, and the first token of the same questions "
                   "grounded and ungrounded (one each per --reps), on the model as given.")
def bench(model_path: Path | None, types: tuple[str, ...] | None, threads: tuple[int, ...], n_ctx: int,
          reps: int, json_path: Path | None, no_peer: bool, kernels: str | None,
          backends: tuple[str, ...], backend_models: tuple[Path, ...], busy_cores: int,
          profile: bool, grounding: bool) -> None:
    """Measure speed and memory against llama.cpp (llama-cpp-python) on the same model,
    and beside edge-slm's ONNX Runtime and LiteRT backends on its export (--backend)."""
    path = model_or_default(model_path)
    check_writable(json_path)
    backends = tuple(dict.fromkeys(backends))
    given_models = given_backend_models(backends, backend_models)
    if profile:
        if backends:
            raise usage_error("--profile times our C kernels' ops only", "--backend")
        return profile_only(path, sorted(set(threads)), n_ctx, kernels, json_path)
    if not no_peer and importlib.util.find_spec("llama_cpp") is None:
        raise EdgeSlmError("llama-cpp-python is not installed; run `make bench` "
                           "(or pass --no-peer to measure edge-slm alone)")
    for kind in backends:
        library = LIBRARIES[kind].split(".")[0]
        if importlib.util.find_spec(library) is None:
            raise EdgeSlmError(f"--backend {kind} runs on {library}, which is not installed")
    check_kernels(kernels)
    if reps < MIN_REPS:
        log.warning("%d rounds: medians of fewer than %d are noisy", reps, MIN_REPS)
    thread_counts = sorted(set(threads))
    runtimes = (OURS,) if no_peer else (OURS, PEER)

    variants = [variant_shown(path, t) for t in types or default_types(path, peer=not no_peer)]
    # The other backends run an export of the model as given, beside ours on that file.
    as_given = next((v for v in variants if v.made_from is None), None)
    if backends and as_given is None:
        raise usage_error(f"{path.name}'s own type is not among --types: the backends run its export "
                          "beside it", "--backend")

    def runtimes_of(v: rq.ModelVariant) -> tuple[str, ...]:
        return runtimes + backends if v is as_given else runtimes

    # Loaded now: a file the backend refuses fails the bench before anything is measured.
    exports = {kind: given_backend_model(kind, p, path, n_ctx) for kind, p in given_models.items()}

    workload, decode_source = make_workload(path)
    if workload.positions_needed > n_ctx:
        raise EdgeSlmError(f"--ctx {n_ctx} is too small: the suite needs {workload.positions_needed} positions")
    machine = machine_info()
    llc = machine["last_level_cache"]
    reports = []
    for v in variants:
        # This loads the file: one edge-slm cannot run fails the bench here, before any round.
        nbytes, parts = weight_bytes_per_token(v.path)
        reports.append(TypeReport(v, nbytes, parts, in_cache=bool(llc) and nbytes <= llc["bytes"],
                                  tensor_types=tensor_types(v.path)))
    if machine["loadavg_start"][0] > 0.5 and not busy_cores:
        log.warning("load average %.1f: other work on this machine will skew the figures",
                    machine["loadavg_start"][0])
    bandwidth = measure_bandwidth(thread_counts)

    rounds: dict[tuple[str, str, int], list[RoundResult]] = {}
    cpu: dict[tuple[str, str, int], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="edge-slm-bench-") as tmp, spinners(busy_cores):
        # Before the rounds, and outside their time: an export that cannot be
        # made or loaded fails the bench at once.
        exports.update({kind: exported_backend_model(kind, path, n_ctx, Path(tmp))
                        for kind in backends if kind not in exports})
        for e in exports.values():
            click.echo(f"{e.kind}: {e.path}" + ("" if e.export_s is None else
                                                f", exported in {e.export_s:.1f} s"), err=True)
        started = time.monotonic()
        # First: it takes a fraction of the rounds' time, and a model it
        # cannot ground with fails the bench before they run.
        grounding_doc = measure_grounding(path, thread_counts, n_ctx, reps, kernels, Path(tmp)) \
            if grounding else None
        wpath = Path(tmp) / "workload.json"
        wpath.write_text(workload.to_json())
        for rep in range(reps):
            for v in variants:
                for t in thread_counts:
                    for rt in runtimes_of(v):
                        click.echo(f"round {rep + 1}/{reps}: {v.type}, {rt}, {t} thread{'s' * (t > 1)}",
                                   err=True)
                        model = exports[rt].path if rt in exports else v.path
                        result, cpu_s = run_child(rt, model, t, n_ctx, wpath, kernels)
                        rounds.setdefault((v.type, rt, t), []).append(result)
                        cpu.setdefault((v.type, rt, t), []).append(cpu_s)
    elapsed = time.monotonic() - started
    machine["loadavg_end"] = list(os.getloadavg())

    for r in reports:
        rts = runtimes_of(r.variant)
        of = {(rt, t): rounds[(r.variant.type, rt, t)] for rt in rts for t in thread_counts}
        r.summaries = [summarize(of[(rt, t)], cpu[(r.variant.type, rt, t)], bandwidth[t],
                                 None if rt in exports else r.weight_bytes)
                       for t in thread_counts for rt in rts]
        r.agreement = {rt: {t: compare(of[(OURS, t)], of[(rt, t)]) for t in thread_counts}
                       for rt in rts if rt != OURS}
        # Whether our own greedy output is the same in every round and at every
        # thread count: a cheap check that threading does not change the result.
        r.greedy_sequences = len({tuple(x.greedy_ids) for t in thread_counts for x in of[(OURS, t)]})

    click.echo(f"{path.name}: n_ctx {n_ctx}, median of {reps} round{'s' * (reps > 1)} "
               f"per figure, one fresh process each ({elapsed:.0f} s)"
               + (f"; {busy_cores} other process{'es' * (busy_cores > 1)} spinning" if busy_cores else ""))
    ran_on: dict[str, list[str]] = {}  # a backend may name its threads: each once
    for s in (s for r in reports for s in r.summaries):
        if s.backend not in ran_on.setdefault(s.runtime, []):
            ran_on[s.runtime].append(s.backend)
    click.echo("kernels: " + "; ".join(f"{rt} {', '.join(names)}" for rt, names in ran_on.items()))
    for r in reports:
        click.echo("\n" + type_heading(r))
        click.echo(cache_note(machine, r.weight_bytes))
        click.echo(format_table(r.summaries, bandwidth, r.agreement, r.in_cache))
        if r.greedy_sequences > 1:
            click.echo(f"note: edge-slm's greedy tokens differ between rounds or thread counts "
                       f"({r.greedy_sequences} distinct sequences)")
    if len(reports) > 1:
        click.echo("\n" + format_types(reports, thread_counts))
    if grounding_doc is not None:
        click.echo("\n" + format_grounding(grounding_doc))

    if json_path is not None:
        top = max(thread_counts)
        # The first type's figures also at the top level, where they were
        # before the bench measured more than one type.
        types_doc = [type_doc(r, decode_source) for r in reports]
        doc = {
            "bandwidth_gbs": bandwidth[top],
            "bandwidth_gbs_by_threads": {str(t): bw for t, bw in bandwidth.items()},
            "runs": types_doc[0]["runs"],
            "ratios": types_doc[0]["ratios"],
            "greedy_agreement": types_doc[0]["greedy_agreement"],
            "grounding": grounding_doc,
            "model": types_doc[0]["model"],
            "types": types_doc,
            "settings": {"n_ctx": n_ctx, "reps": reps, "threads": thread_counts,
                         "types": [v.type for v in variants],
                         "kernels_requested": kernels, "backends": list(backends),
                         "backend_models": {k: e.doc() for k, e in exports.items()},
                         "ratios": "edge-slm's median over the other runtime's",
                         "busy_cores": busy_cores,
                         "prefill_lengths": list(PREFILL_LENGTHS), "ttft_prompt": TTFT_PROMPT,
                         "n_decode": N_DECODE, "kv_type": "f16", "n_batch": 512,
                         "check_subset": len(workload.check_subset),
                         "bandwidth_bytes": BANDWIDTH_BYTES, "bandwidth_reps": BANDWIDTH_REPS,
                         "peak_rss": "VmHWM of the round's own process, MiB"},
            "machine": machine,
            "elapsed_s": elapsed,
        }
        with output_file(json_path) as f:
            f.write((json.dumps(doc, indent=2) + "\n").encode())
        click.echo(f"wrote {json_path}")
