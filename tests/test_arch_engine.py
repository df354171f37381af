"""Every architecture through the parts around the forward pass: the engine's
batching, its context shift (re-rotating keys the way each family rotates
them), the prefix copy, the memory plan and `edge-slm info`. Parity with
llama.cpp is tests/test_arch_parity.py's; here each family must behave as
the reference model does."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from arch_models import ARCH_MODELS, write_arch_model
from click.testing import CliRunner
from reference import GenerationConfig, generate

from edge_slm.cli import main
from edge_slm.engine import OK, Engine, EngineConfig
from edge_slm.model import RuntimeOptions, load_model

PROMPTS = ["Check the pump", "The pressure should be", "Error E-042 means", "def check"]


@pytest.fixture(scope="module", params=list(ARCH_MODELS))
def arch_model(request, tmp_path_factory):
    name = request.param
    return name, write_arch_model(tmp_path_factory.mktemp("arch") / f"{name}.gguf", ARCH_MODELS[name])


def nmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a - b) ** 2) / np.mean(b ** 2))


def test_batched_decode_matches_one_at_a_time(arch_model):
    _, path = arch_model
    m = load_model(path)
    tok = m.tokenizer()
    gen = GenerationConfig(max_tokens=16, ignore_eos=True)
    alone = []
    for p in PROMPTS:
        rt = m.runtime(RuntimeOptions(n_threads=2, n_ctx=128, max_batch=1))
        alone.append(generate(rt, tok, tok.encode(p), gen).tokens)
    cfg = EngineConfig(model=path, slots=4, ctx=128, min_ctx=64, threads=2, timeout=30.0, prefill_chunk=4)
    with Engine(cfg) as e:
        with e._cond:  # all four queued before the engine admits any
            reqs = [e.submit(p, max_tokens=16, ignore_eos=True) for p in PROMPTS]
        together = [r.result(timeout=60) for r in reqs]
        assert e.status()["mean_decode_batch"] > 2
    assert all(r.status == OK for r in together)
    assert [r.tokens for r in together] == alone


def test_kv_shift_matches_recomputation(arch_model, tmp_path):
    """With one layer, cached keys and values depend only on token and
    position, so after dropping a span the cache must equal a fresh
    computation of the shortened sequence: the keys were turned back by the
    family's own RoPE (NeoX pairs, Llama 3's factors, the sliding layer's
    base)."""
    name, _ = arch_model
    path = write_arch_model(tmp_path / "one-layer.gguf", replace(ARCH_MODELS[name], n_layer=1))
    m = load_model(path)
    keep, drop, rest, nxt = [1, 2, 3, 4], list(range(10, 30)), [40, 41, 42, 43, 44, 45], 77
    opts = RuntimeOptions(n_threads=2, n_ctx=128)
    rt = m.runtime(opts)
    rt.prefill(keep + drop + rest)
    rt.kv_shift(0, len(keep), len(drop), len(keep + drop + rest))
    shifted = rt.prefill([nxt], start=len(keep) + len(rest))
    direct = m.runtime(opts).prefill(keep + rest + [nxt])
    assert nmse(shifted, direct) < 1e-4, name
    full = m.runtime(opts).prefill(keep + drop + rest + [nxt])  # the dropped tokens mattered
    assert nmse(full, direct) > 10 * nmse(shifted, direct), name


def test_kv_copy_shares_a_prefix(arch_model):
    _, path = arch_model
    m = load_model(path)
    rt = m.runtime(RuntimeOptions(n_threads=2, n_ctx=64, n_slots=2))
    prefix = [9, 8, 7, 6, 5, 4, 3, 2, 1, 10, 11, 12]  # past the tiny Gemma's window
    rt.prefill(prefix, slot=0)
    rt.kv_copy(0, 1, len(prefix))
    got = rt.prefill([100], start=len(prefix), slot=1)
    want = m.runtime(RuntimeOptions(n_threads=2, n_ctx=64)).prefill(prefix + [100])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_info_describes_the_family(arch_model):
    name, path = arch_model
    spec = ARCH_MODELS[name]
    out = CliRunner().invoke(main, ["info", str(path), "--memory-budget", "256M"])
    assert out.exit_code == 0, out.output
    assert f"architecture  {spec.arch}" in out.output
    assert ("window        " in out.output) == (spec.arch == "gemma3")
    assert "plan" in out.output
