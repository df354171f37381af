"""One measurement round of `edge-slm bench`, in a process of its own.

The parent starts a fresh interpreter for every round so that each runtime's
peak memory is its own (nothing left over from the other runtime or an earlier
round) and every round starts from a cold process, as a device would:

    python -m edge_slm.bench_worker --runtime edge-slm --model M.gguf \
        --threads 2 --ctx 2048 --workload W.json

It loads one runtime, runs the whole suite once and prints one JSON line on
stdout. Every runtime runs the same code below; only `Runner` differs: our C
kernels and the other edge_slm.backends (ONNX Runtime, LiteRT, on an export
of the same model) share one, driven through the Runtime protocol as the
engine drives them; llama.cpp has its own."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("edge_slm.bench_worker")

OURS = "edge-slm"
PEER = "llama.cpp"
# edge_slm.backends' other runtimes, each named as its --backend is.
BACKENDS = ("onnx", "litert")
RUNTIMES = (OURS, PEER, *BACKENDS)
# What each runtime's round imports before its baseline RSS is read, so that
# the baseline counts the library and the peak beyond it is the model's.
LIBRARIES = {OURS: "edge_slm.model", PEER: "llama_cpp", "onnx": "onnxruntime",
             "litert": "ai_edge_litert.interpreter"}

# llama.cpp processes a prompt in batches of this many tokens; our runtime gets
# the same max_batch, so every prompt of the suite is one forward call in both.
N_BATCH = 512


@dataclass
class Workload:
    """The token ids every round evaluates; the parent makes them once so both
    runtimes see exactly the same inputs."""

    prefill: dict[int, list[int]]  # prompt length -> ids
    ttft_prompt: list[int]         # prompt for time to first token
    decode_prompt: list[int]       # short prompt the greedy decode continues
    check_ids: list[int] = field(default_factory=list)  # fed one at a time, untimed, to compare top-1
    n_decode: int = 128            # decode steps timed
    # Vocabulary ids whose logits are returned after each check id, to
    # correlate the runtimes' logits (the whole rows would be megabytes a round).
    check_subset: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str) -> Workload:
        d = json.loads(text)
        d["prefill"] = {int(n): ids for n, ids in d["prefill"].items()}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @property
    def positions_needed(self) -> int:
        """The context the suite fills at most."""
        return max(max(self.prefill), len(self.ttft_prompt),
                   len(self.decode_prompt) + self.n_decode, len(self.check_ids))


@dataclass
class RoundResult:
    """What one round measured; the parent takes medians over rounds."""

    runtime: str
    threads: int
    backend: str               # which kernels ran (Runtime.backend: a kernel table, "onnxruntime cpu", ...)
    version: str
    prefill_tps: dict[int, float]
    decode_tps: float
    ttft_ms: float
    greedy_ids: list[int]      # first token after the prompt, then one per decode step
    check_top1: list[int]      # argmax after each of Workload.check_ids
    check_margin: list[float]  # top-1 minus top-2 logit there: small = a near-tie
    load_s: float              # model load and runtime set-up
    rss_baseline_mb: float     # after the imports, before the model is loaded
    peak_rss_mb: float         # VmHWM at the end of the round
    info: dict[str, object] = field(default_factory=dict)
    check_logits: list[list[float]] = field(default_factory=list)  # [check id][Workload.check_subset]


class Runner(Protocol):
    """A runtime reduced to what the suite needs."""

    backend: str
    version: str
    info: dict[str, object]

    def reset(self) -> None:
        """Forget the sequence so the next prefill really recomputes from position 0."""

    def prefill(self, ids: list[int], start: int) -> np.ndarray:
        """Evaluate ids at positions start..; the last row of logits (valid until the next call)."""


class SourceRunner:
    """Any model edge_slm.backends loads, run as the engine runs it: one slot,
    prompts through forward() in chunks of N_BATCH, its default KV type."""

    def __init__(self, runtime: str, model_path: Path, kind: str, threads: int, ctx: int,
                 kernels: str | None = None):
        from .backends import load_source
        from .model import RuntimeOptions

        source = load_source(model_path, kind)
        kv_type = source.kv_types[0]
        # One logits row: the suite only ever reads the last, and a larger
        # buffer would be memory llama.cpp (logits_all=False) does not spend.
        self.rt = source.runtime(RuntimeOptions(n_threads=threads, n_ctx=ctx, n_slots=1,
                                                max_batch=N_BATCH, kv_type=kv_type, max_logits=1,
                                                backend=kernels))
        self.backend = self.rt.backend
        self.version = str(importlib.import_module(LIBRARIES[runtime].split(".")[0]).__version__)
        self.info: dict[str, object] = {"format": source.kind, "max_batch": N_BATCH, "kv_type": kv_type}

    def reset(self) -> None:
        # Nothing to do: tokens at position 0 start the slot's sequence afresh
        # (the Runtime protocol: a slot's tokens continue its cache up to their
        # positions), and attention reads only positions up to the current one.
        pass

    def prefill(self, ids: list[int], start: int) -> np.ndarray:
        from .backends import prefill_in_chunks

        return prefill_in_chunks(self.rt, ids, N_BATCH, start)


class EdgeSlmRunner(SourceRunner):
    """Our C kernels on the GGUF, with the kernel table asked for."""

    def __init__(self, model_path: Path, threads: int, ctx: int, kernels: str | None = None):
        from . import _core

        super().__init__(OURS, model_path, "gguf", threads, ctx, kernels)
        # The extension's build time: the parent checks that every round ran
        # the same build (a `make setup` elsewhere may replace it mid-run).
        core = Path(_core.__file__)
        self.info.update(core=core.name, core_mtime=core.stat().st_mtime)


class LlamaCppRunner:
    def __init__(self, model_path: Path, threads: int, ctx: int):
        import llama_cpp
        import numpy as np

        self._llama_cpp = llama_cpp
        self._as_array = np.ctypeslib.as_array
        self.llm = llama_cpp.Llama(str(model_path), n_ctx=ctx, n_threads=threads,
                                   n_threads_batch=threads, n_batch=N_BATCH, logits_all=False,
                                   verbose=False)
        self._memory = llama_cpp.llama_get_memory(self.llm._ctx.ctx)
        self._n_vocab = self.llm.n_vocab()
        system = llama_cpp.llama_print_system_info().decode().strip()
        # "CPU : SSE3 = 1 | AVX2 = 1 | ..." -> "CPU SSE3 AVX2 ..."
        features = system.split(":", 1)[-1].split("|")
        self.backend = "CPU " + " ".join(f.split("=")[0].strip() for f in features
                                         if f.strip().endswith("= 1"))
        self.version = llama_cpp.__version__
        self.info = {"system_info": system, "n_batch": N_BATCH,
                     "n_ubatch": self.llm.context_params.n_ubatch,
                     "flash_attn_type": int(self.llm.context_params.flash_attn_type)}

    def reset(self) -> None:
        # Llama.reset() only rewinds the Python-side token count; clear the KV
        # memory too and check it is empty, so no prefix can be reused.
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        pos_max = self._llama_cpp.llama_memory_seq_pos_max(self._memory, 0)
        if pos_max != -1:
            raise RuntimeError(f"llama.cpp KV cache still holds positions up to {pos_max} after clearing")

    def prefill(self, ids: list[int], start: int) -> np.ndarray:
        if self.llm.n_tokens != start:
            raise RuntimeError(f"llama.cpp is at position {self.llm.n_tokens}, asked for {start}")
        self.llm.eval(ids)
        # With logits_all=False the context holds only the last row.
        return self._as_array(self.llm._ctx.get_logits(), shape=(self._n_vocab,))


def make_runner(runtime: str, model_path: Path, threads: int, ctx: int,
                kernels: str | None = None) -> Runner:
    """kernels picks our kernel table (None: the best for this CPU); llama.cpp's is
    fixed at build, and the other backends choose their own."""
    if runtime == OURS:
        return EdgeSlmRunner(model_path, threads, ctx, kernels)
    if runtime == PEER:
        return LlamaCppRunner(model_path, threads, ctx)
    if runtime in BACKENDS:
        return SourceRunner(runtime, model_path, runtime, threads, ctx)
    raise ValueError(f"runtime {runtime!r}: choose from {', '.join(RUNTIMES)}")


def argmax(logits: np.ndarray) -> int:
    return int(logits.argmax())


def run_suite(runner: Runner, w: Workload) -> tuple[dict[int, float], float, float, list[int]]:
    """(prefill tokens/s by prompt length, decode tokens/s, time to first token ms, greedy ids)."""
    # Warm-up, untimed: faults in every weight page of the memory map, starts
    # the thread pools and grows any lazily sized buffers.
    longest = w.prefill[max(w.prefill)]
    runner.reset()
    tok = argmax(runner.prefill(longest, 0))
    for pos in range(len(longest), len(longest) + 4):
        tok = argmax(runner.prefill([tok], pos))

    prefill_tps = {}
    for n, ids in sorted(w.prefill.items()):
        runner.reset()
        t0 = time.perf_counter()
        runner.prefill(ids, 0)
        prefill_tps[n] = n / (time.perf_counter() - t0)

    runner.reset()
    t0 = time.perf_counter()
    argmax(runner.prefill(w.ttft_prompt, 0))
    ttft_ms = (time.perf_counter() - t0) * 1e3

    runner.reset()
    tok = argmax(runner.prefill(w.decode_prompt, 0))
    greedy = [tok]
    pos = len(w.decode_prompt)
    t0 = time.perf_counter()
    for _ in range(w.n_decode):
        tok = argmax(runner.prefill([tok], pos))
        greedy.append(tok)
        pos += 1
    decode_tps = w.n_decode / (time.perf_counter() - t0)
    return prefill_tps, decode_tps, ttft_ms, greedy


def top1_along(runner: Runner, ids: list[int],
               subset: list[int]) -> tuple[list[int], list[float], list[list[float]]]:
    """Top-1 id and its margin over the runner-up after each token of a fixed
    sequence, fed one at a time (the decode path), and the logits of the
    `subset` ids there.

    Free-running greedy output stops being comparable at the first near-tie,
    where the two runtimes may rightly pick different tokens; on a fixed
    sequence every position can be compared, and the margins say which
    disagreements are near-ties and which would be errors."""
    import numpy as np

    runner.reset()
    top1, margin, rows = [], [], []
    for pos, tok in enumerate(ids):
        logits = runner.prefill([tok], pos)
        second, first = np.partition(logits, -2)[-2:]
        top1.append(int(logits.argmax()))
        margin.append(float(first - second))
        rows.append(logits[subset].tolist())
    return top1, margin, rows


def status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    from .memory import MIB, status_bytes

    return status_bytes(key) / MIB


def run_round(runtime: str, model_path: Path, threads: int, ctx: int, w: Workload,
              kernels: str | None = None) -> RoundResult:
    # Imported now so that the baseline counts them: every runner but llama.cpp's
    # goes through edge_slm.backends.
    from . import backends  # noqa: F401

    importlib.import_module(LIBRARIES[runtime])
    baseline = status_mb("VmRSS")
    t0 = time.perf_counter()
    runner = make_runner(runtime, model_path, threads, ctx, kernels)
    load_s = time.perf_counter() - t0
    prefill_tps, decode_tps, ttft_ms, greedy = run_suite(runner, w)
    top1, margin, check_logits = top1_along(runner, w.check_ids, w.check_subset)
    # The peak is read by this process rather than taken from the parent's
    # wait4() rusage: Linux carries the spawning process's own peak RSS into a
    # child's ru_maxrss across fork/vfork + exec, so that figure would include
    # the parent (the bandwidth probe alone touches 512 MiB there).
    # VmHWM is the high-water mark of this process's address space since exec.
    return RoundResult(runtime=runtime, threads=threads, backend=runner.backend,
                       version=runner.version, prefill_tps=prefill_tps, decode_tps=decode_tps,
                       ttft_ms=ttft_ms, greedy_ids=greedy, check_top1=top1,
                       check_margin=margin, load_s=load_s,
                       rss_baseline_mb=baseline, peak_rss_mb=status_mb("VmHWM"), info=runner.info,
                       check_logits=check_logits)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_slm.bench_worker", description=__doc__.split("\n")[0])
    p.add_argument("--runtime", choices=RUNTIMES, required=True)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--workload", type=Path, required=True, help="JSON written by the parent")
    p.add_argument("--kernels", default=None, help="edge-slm kernel table (default: the best)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    w = Workload.from_json(a.workload.read_text())
    result = run_round(a.runtime, a.model, a.threads, a.ctx, w, a.kernels)
    # One line, last on stdout: the parent reads only that.
    sys.stdout.write(json.dumps(asdict(result)) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
