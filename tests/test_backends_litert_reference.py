"""The reference model exported to LiteRT (`edge-slm export --to litert`,
int8 weights, a cache of 1024 positions) beside our C kernels, along the
parity fixtures' sequences (tests/fixtures/parity.*; see test_parity.py):
the same choice wherever ours is decisive, every position's logits
correlated, greedy text identical up to our first near-tie. Needs the
export-litert toolchain (torch, litert-torch): make test-backends.

The export requantizes the GGUF's Q4_1 weights (dequantized to float) to
int8 per output channel, and XNNPACK's dynamic-range kernels quantize each
token's activations to int8 with one scale for the row; our kernels keep the
Q4_1 blocks and quantize activations in blocks of 32. The activations are
what costs: measured on these sequences, int8 weights with float activations
(the `weight_only_int8` recipe) agreed at every position of margin >= 1.0,
but XNNPACK holds those weights as float32 (2 GB resident); the dynamic
recipe the export uses parts from ours at 6 of 824 positions of margin >= 1.0
(two distinct contexts), none past 2.5. So the teacher-forced check requires
agreement from margin 2.5, and at 99 % of the positions from 1.0; greedy text
holds from 1.0."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from reference import GenerationConfig, generate
from tiny_models import TinySpec

from edge_slm.backends import load_source
from edge_slm.export.litert import export_litert
from edge_slm.memory import MIB
from edge_slm.model import RuntimeOptions, expected_tensors, load_model

pytestmark = pytest.mark.backends

FIXTURES = Path(__file__).parent / "fixtures"
KV_LEN = 1024
DECISIVE = 1.0          # our top-2 margin from which the greedy choice must be the same
DECISIVE_LOGITS = 2.5   # ... from which each teacher-forced position's must be (see above)
LEAST_DECISIVE_SHARE = 0.99  # of positions of margin >= DECISIVE that agree: measured 818 / 824
LEAST_CORR = 0.95       # per position: measured min 0.955, median 0.995 (the report says)
LEAST_MEDIAN_CORR = 0.99
# int4 blocks of 32 quantize the (already 4-bit) weights again, coarsely: 0.962 measured on the tiny model
LEAST_CORR_INT4 = 0.95


@pytest.fixture(scope="module")
def exported(real_model, tmp_path_factory, parity_report) -> Path:
    out = tmp_path_factory.mktemp("litert") / "smollm2.tflite"
    t0 = time.perf_counter()
    done = export_litert(load_model(real_model), out, weights="int8", kv_len=KV_LEN)
    parity_report.append(f"litert export of the reference model: {done.bytes / MIB:.1f} MiB "
                         f"({done.recipe}, kv_len {done.kv_len}, prefill {done.prefill_len}) in "
                         f"{time.perf_counter() - t0:.0f} s")
    return out


@pytest.fixture(scope="module")
def theirs(exported):
    return load_source(exported).runtime(RuntimeOptions(n_threads=2, n_ctx=512, max_batch=128, kv_type="f32"))


@pytest.fixture(scope="module")
def ours(real_model):
    return load_model(real_model).runtime(RuntimeOptions(n_threads=2, n_ctx=512, max_batch=128))


@pytest.fixture(scope="module")
def sequences() -> list[tuple[str, list[int], int]]:
    """(name, prompt + llama.cpp's continuation, prompt length) of each parity prompt."""
    meta = json.loads((FIXTURES / "parity.json").read_text())
    a = np.load(FIXTURES / "parity.npz")
    po = a["prompt_offsets"]
    return [(p["name"], a["prompt_ids"][po[i]:po[i + 1]].tolist() + a["generated_ids"][i].tolist(),
             int(po[i + 1] - po[i])) for i, p in enumerate(meta["prompts"])]


def margins(logits: np.ndarray) -> np.ndarray:
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def test_teacher_forced_logits(theirs, ours, sequences, parity_report):
    agree = total = decisive = decisive_agree = 0
    corrs, bad = [], []
    for name, seq, _ in sequences:
        t = theirs.prefill(seq, all_logits=True)  # every position wanted: decode, token by token
        m = ours.prefill(seq, all_logits=True)
        same, margin = t.argmax(1) == m.argmax(1), margins(m)
        bad += [f"{name}@{k} (margin {margin[k]:.2f})"
                for k in np.flatnonzero((margin >= DECISIVE_LOGITS) & ~same)]
        sure = margin >= DECISIVE
        agree, total = agree + int(same.sum()), total + len(same)
        decisive, decisive_agree = decisive + int(sure.sum()), decisive_agree + int(same[sure].sum())
        corrs += [np.corrcoef(x, y)[0, 1] for x, y in zip(t, m)]
    corrs = np.array(corrs)
    parity_report.append(
        f"litert vs our kernels, {len(sequences)} sequences: argmax {agree}/{total} "
        f"({100 * agree / total:.1f} %), at margin >= {DECISIVE} {decisive_agree}/{decisive}, logit "
        f"correlation min {corrs.min():.4f} median {np.median(corrs):.5f}")
    assert not bad, f"positions of margin >= {DECISIVE_LOGITS} differ: {', '.join(bad)}"
    assert decisive_agree >= LEAST_DECISIVE_SHARE * decisive, (decisive_agree, decisive)
    assert corrs.min() >= LEAST_CORR and np.median(corrs) >= LEAST_MEDIAN_CORR


def test_prefill_then_decode(theirs, ours, sequences, parity_report):
    """Each prompt in one run (prefill calls, its last token through decode)."""
    corrs = []
    for name, seq, n in sequences:
        want = np.zeros(n, np.uint8)
        want[-1] = 1
        t = theirs.forward(np.array(seq[:n], np.int32), np.arange(n, dtype=np.int32), np.zeros(n, np.int32),
                           want)[0]
        m = ours.prefill(seq[:n])
        if margins(m) >= DECISIVE:
            assert t.argmax() == m.argmax(), f"{name}: the prompt's next token differs"
        corrs.append(np.corrcoef(t, m)[0, 1])
    parity_report.append(f"litert prefill of {len(sequences)} prompts: last-token logit correlation "
                         f"min {min(corrs):.4f}")
    assert min(corrs) >= LEAST_CORR


def test_free_running_greedy(exported, theirs, ours, sequences, parity_report):
    tok = load_source(exported).tokenizer()
    checked = required = 0
    for name, seq, n in sequences:
        prompt = seq[:n]
        mine = generate(ours, tok, prompt, GenerationConfig(max_tokens=len(seq) - n, ignore_eos=True))
        other = generate(theirs, tok, prompt, GenerationConfig(max_tokens=len(seq) - n, ignore_eos=True))
        # our margins along our own continuation: the first near-tie is where the two may part
        m = margins(ours.prefill(prompt + mine.tokens, all_logits=True)[n - 1:])
        undecided = np.flatnonzero(m < DECISIVE)
        tie = int(undecided[0]) if len(undecided) else len(mine.tokens)
        differ = [k for k, (x, y) in enumerate(zip(other.tokens, mine.tokens)) if x != y]
        first = differ[0] if differ else len(mine.tokens)
        assert first >= tie, f"{name}: greedy token {first} differs where ours was decisive (first tie {tie})"
        checked, required = checked + first, required + tie
    parity_report.append(f"litert greedy, {len(sequences)} prompts: identical for {checked} tokens up to "
                         f"the first difference ({required} required, up to our first near-tie)")


@pytest.mark.parametrize("weights, spec", [("int4", TinySpec()), ("int8", TinySpec(tied=False, seed=3))],
                         ids=["int4", "untied"])
def test_tiny_exports(weights, spec, tiny_model_factory, tmp_path, parity_report):
    """int4 weights, and an output projection of its own: run, and close to ours;
    progress counts every tensor's bytes once."""
    model = load_model(tiny_model_factory(spec))
    seen: list[int] = []
    done = export_litert(model, tmp_path / "t.tflite", seen.append, weights=weights, kv_len=64, prefill_len=8)
    assert sum(seen) == sum(model.tensors[n].nbytes for n in expected_tensors(model.config, model.tensors))
    assert done.signatures == ("decode", "prefill_8") and done.sidecar.is_file()
    rt = load_source(done.path).runtime(RuntimeOptions(n_threads=2, n_ctx=64, max_batch=64, kv_type="f32"))
    seq = np.random.default_rng(5).integers(0, 256, 60).tolist()
    t = rt.prefill(seq, all_logits=True)
    m = load_model(tiny_model_factory(spec)).runtime(RuntimeOptions(n_threads=2, n_ctx=64, max_batch=64)).prefill(
        seq, all_logits=True)
    sure = margins(m) >= DECISIVE
    same = t.argmax(1) == m.argmax(1)
    corr = np.array([np.corrcoef(x, y)[0, 1] for x, y in zip(t, m)])
    parity_report.append(f"litert tiny {weights}{'' if spec.tied else ' untied'}: decisive "
                         f"{int(same[sure].sum())}/{int(sure.sum())}, correlation min {corr.min():.4f}")
    assert same[sure].all() and corr.min() >= (LEAST_CORR_INT4 if weights == "int4" else LEAST_CORR)
