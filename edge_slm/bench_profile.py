"""Where a decoded token's time goes, for `edge-slm bench --profile`.

In a process of its own per thread count (as the bench's rounds are):

    python -m edge_slm.bench_profile --model M.gguf --threads 2 --ctx 2048 --tokens 128

decodes `--tokens` tokens through a fresh engine (one slot, one request)
with the C pass's profile on from the first answer token: each kind of op's
wall time and the weight bytes each gemm read, beside the engine's own split
of the same decode steps into the pass, sampling and the Python around them.
Prints one JSON line on stdout."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger("edge_slm.bench_profile")

PROMPT = "Q: What does a centrifugal pump do?\nA:"
TOKENS = 128  # decoded per thread count
# The C pass's op kinds, in the order a token meets them; gemm kinds follow.
OP_ORDER = ("embed", "norm", "quantize", "rope_kv", "attention", "ffn_act", "add", "dispatch")


def op_label(name: str) -> str:
    """gemm:3 -> 'gemm Q4_1', the rest as the C side names them."""
    from .formats import TensorType

    if name.startswith("gemm:"):
        return f"gemm {TensorType(int(name[5:])).name}"
    return {"rope_kv": "rope, KV store", "ffn_act": "silu * up", "add": "residual add",
            "dispatch": "pool start/join", "embed": "embedding"}.get(name, name)


def profile_decode(model_path: Path, threads: int, n_ctx: int, tokens: int,
                   backend: str | None) -> dict[str, Any]:
    from .engine import Engine, EngineConfig

    cfg = EngineConfig(model=model_path, slots=1, ctx=n_ctx, threads=threads, backend=backend,
                       grounding=False, max_tokens=tokens)
    with Engine(cfg) as engine:
        runtime = engine.runtime
        ids = engine.tokenizer.encode(PROMPT)
        # The engine's split covers its decode-only steps since it started:
        # with this request its only one, and the profile on from its first
        # token (made by the prefill step), the two cover the same steps.
        started = []

        def on_text(piece: str) -> None:  # on the engine thread, between steps
            if not started:
                runtime.profile(True)
                started.append(True)

        r = engine.submit(prompt_ids=ids, max_tokens=tokens, ignore_eos=True,
                          on_text=on_text).result(timeout=600)
        if r.status != "ok":
            raise RuntimeError(f"the engine answered {r.status}: {r.error}")
        prof = runtime.profile(False)  # the engine is idle: its request is over
        split = engine.status()["decode_ms_per_token"]
        kernels = runtime.backend
    return {"threads": threads, "backend": kernels, "tokens": prof["tokens"], "c": prof,
            "engine_ms_per_token": split}


def summarize(d: dict[str, Any]) -> dict[str, Any]:
    """Per token: each op's ms and share of the engine's decode step, the
    gemms' GB/s, then sampling and the Python step from the engine's split."""
    n = d["tokens"]
    ops = d["c"]["ops"]
    split = d["engine_ms_per_token"]
    step_ms = split["forward"] + split["sampling"] + split["python"]
    order = [k for k in OP_ORDER if k in ops] + sorted(k for k in ops if k.startswith("gemm:"))
    rows = [{"op": op_label(k), "ms": ops[k][0] / n * 1e3,
             "gbs": ops[k][1] / ops[k][0] / 1e9 if ops[k][1] and ops[k][0] else None}
            for k in order]
    rows += [{"op": "sampling", "ms": split["sampling"], "gbs": None},
             {"op": "Python step", "ms": split["python"], "gbs": None}]
    for r in rows:
        r["share"] = r["ms"] / step_ms
    return {"threads": d["threads"], "backend": d["backend"], "tokens": n, "rows": rows,
            "forward_ms": split["forward"], "step_ms": step_ms, "tokens_per_s": 1e3 / step_ms}


def format_profile(summaries: list[dict[str, Any]]) -> str:
    lines = []
    for s in summaries:
        lines.append(f"threads {s['threads']} ({s['backend']}): {s['step_ms']:.2f} ms a decoded "
                     f"token through the engine ({s['tokens_per_s']:.1f} tok/s), "
                     f"{s['forward_ms']:.2f} ms of it in the C pass"
                     + (f"; memory read bandwidth {s['bandwidth_gbs']:.1f} GB/s"
                        if "bandwidth_gbs" in s else ""))
        lines.append(f"  {'':22}{'ms/token':>10}{'share':>8}{'GB/s':>8}")
        for r in sorted(s["rows"], key=lambda r: -r["ms"]):
            gbs = f"{r['gbs']:8.1f}" if r["gbs"] is not None else f"{'':8}"
            lines.append(f"  {r['op']:22}{r['ms']:10.3f}{100 * r['share']:7.1f}%{gbs}")
    lines.append(f"  one request of {summaries[0]['tokens']} decoded tokens per thread count; an op's "
                 "time is wall time on all threads, waits included")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m edge_slm.bench_profile",
                                 description="One thread count's decode profile, as a JSON line.")
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--threads", required=True, type=int)
    ap.add_argument("--ctx", required=True, type=int)
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--backend", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    d = profile_decode(args.model, args.threads, args.ctx, args.tokens, args.backend)
    sys.stdout.write(json.dumps(d) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
