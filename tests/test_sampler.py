"""The sampler and the text stream: choices, seeds, penalties, stop strings;
no valid setting makes NaN, and no stop string makes a token cost more than
its characters."""

from __future__ import annotations

import re
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from reference import GenerationConfig, generate

from edge_slm.errors import ModelError
from edge_slm.generate import TextStream
from edge_slm.model import RuntimeOptions, load_model
from edge_slm.sampler import REPEAT_PENALTY_RANGE, TEMPERATURE_RANGE, Sampler, SamplingConfig


def logits(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def test_greedy_takes_the_argmax():
    assert Sampler(SamplingConfig()).sample(logits(0.1, 3.0, 2.9)) == 1


def test_seed_makes_sampling_repeatable_and_different_seeds_differ():
    x = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    runs = [Sampler(SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, seed=7)) for _ in range(2)]
    a = [runs[0].sample(x) for _ in range(50)]
    b = [runs[1].sample(x) for _ in range(50)]
    assert a == b
    c = Sampler(SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, seed=8))
    assert [c.sample(x) for _ in range(50)] != a


def test_top_k_limits_the_choices():
    s = Sampler(SamplingConfig(temperature=5.0, top_k=2, top_p=1.0, seed=0))
    picks = {s.sample(logits(5, 4, 3, 2, 1)) for _ in range(300)}
    assert picks == {0, 1}


def test_top_p_keeps_the_smallest_likely_set():
    # probabilities ~ 0.64, 0.24, 0.09, ...: top_p 0.8 keeps the first two
    s = Sampler(SamplingConfig(temperature=1.0, top_k=0, top_p=0.8, seed=0))
    picks = {s.sample(logits(3, 2, 1, 0, -1)) for _ in range(300)}
    assert picks == {0, 1}


def test_temperature_sharpens_and_flattens():
    x = logits(2.0, 1.0, 0.0)
    cold = Sampler(SamplingConfig(temperature=0.05, top_k=0, top_p=1.0, seed=0))
    hot = Sampler(SamplingConfig(temperature=10.0, top_k=0, top_p=1.0, seed=0))
    assert all(cold.sample(x) == 0 for _ in range(100))
    assert len({hot.sample(x) for _ in range(300)}) == 3


def test_repetition_penalty_moves_away_from_seen_tokens():
    s = Sampler(SamplingConfig(repeat_penalty=2.0))
    assert s.sample(logits(3.0, 2.0, -1.0), history=[0]) == 1  # 3/2 < 2
    p = s.penalize(logits(3.0, 2.0, -1.0), [0, 2])
    assert p.tolist() == [1.5, 2.0, -2.0]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                 dict(repeat_penalty=0), dict(top_k=-1), dict(temperature=float("nan")),
                                 dict(top_p=float("nan")), dict(repeat_penalty=float("inf")),
                                 dict(seed=-1), dict(seed=1.5)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingConfig(**bad)


@pytest.mark.parametrize("bad", [dict(temperature=1e-310), dict(temperature=5e-324), dict(temperature=1e-4),
                                 dict(temperature=1e6), dict(repeat_penalty=1e-300), dict(repeat_penalty=1e300)])
def test_absurd_settings_are_refused_in_one_line(bad):
    (name, value), = bad.items()
    with pytest.raises(ValueError, match=f"^{name} must be [^\n]*, got {re.escape(f'{value:g}')}$"):
        SamplingConfig(**bad)


@settings(max_examples=200, deadline=None)
@given(config=st.builds(SamplingConfig,
                        temperature=st.one_of(st.just(0.0), st.floats(*TEMPERATURE_RANGE)),
                        top_k=st.integers(0, 80), top_p=st.floats(0, 1, exclude_min=True),
                        repeat_penalty=st.floats(*REPEAT_PENALTY_RANGE), repeat_last_n=st.integers(0, 64),
                        seed=st.integers(0, 2**32)),
       values=arrays(np.float32, st.integers(1, 64),
                     elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
       history=st.lists(st.integers(0, 10**6), max_size=80))
def test_no_valid_setting_and_finite_logits_make_nan(config, values, history):
    history = [h % len(values) for h in history]
    with np.errstate(over="raise", invalid="raise"):  # an inf or a NaN anywhere fails
        token = Sampler(config).sample(values, history)
    assert 0 <= token < len(values)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logits_that_are_not_finite_are_the_models_fault_in_one_line(bad, temperature):
    """A model whose weights or settings are broken computes NaN (or
    infinite) logits: greedy took the first NaN for the best token, and
    sampling raised numpy's "Probabilities contain NaN"."""
    values = logits(1.0, 2.0, 3.0, 0.5)
    values[2 if bad != float("-inf") else slice(None)] = bad  # -inf only matters everywhere
    with pytest.raises(ModelError, match="^the model computed logits that are not finite [^\n]+$"):
        Sampler(SamplingConfig(temperature=temperature, seed=1)).sample(values)


def test_a_token_masked_with_minus_infinity_is_never_chosen():
    values = logits(1.0, float("-inf"), 0.5)
    assert {Sampler(SamplingConfig(temperature=2.0, seed=i)).sample(values) for i in range(50)} == {0, 2}


class Letters:
    """A stand-in tokenizer whose token i is the i-th character of a string."""

    def __init__(self, text: str):
        self.text = text

    def stream_decoder(self):
        outer = self

        class D:
            def feed(self, i):
                return outer.text[i]

            def flush(self):
                return ""

        return D()


def test_stream_holds_back_a_possible_stop_string():
    text = "abc<END>xyz"
    stream = TextStream(Letters(text), stop=["<END>"])
    shown = [stream.feed(i) for i in range(len(text))]
    assert "".join(shown) == "abc" and stream.stopped
    assert "<" not in "".join(shown)


def test_stream_releases_a_false_alarm():
    text = "a<EN b"
    stream = TextStream(Letters(text), stop=["<END>"])
    shown = "".join(stream.feed(i) for i in range(len(text))) + stream.flush()
    assert shown == text and not stream.stopped


def test_a_long_stop_string_costs_each_token_its_characters_only():
    stop = "ab" * 50_000
    text = "ab" * 300 + "a" * 400  # held back while it may still become the stop string
    stream = TextStream(Letters(text), stop=[stop, stop[::-1]])
    start = time.monotonic()
    shown = "".join(stream.feed(i) for i in range(len(text))) + stream.flush()
    assert shown == text and not stream.stopped
    assert time.monotonic() - start < 0.5  # quadratic in the stop string, it took hours


@settings(max_examples=300, deadline=None)
@given(text=st.text("ab", max_size=30), stops=st.lists(st.text("ab", min_size=1, max_size=5), max_size=3))
def test_stream_ends_where_the_first_stop_string_ends_and_shows_none_of_it(text, stops):
    stream = TextStream(Letters(text), stop=stops)
    shown = ""
    for i in range(len(text)):
        shown += stream.feed(i)
        if stream.stopped:
            break
    shown += stream.flush()
    found = [(text.find(s) + len(s), text.find(s)) for s in stops if s in text]
    # the stop string that ends first; of those ending together, the longest
    assert shown == (text[:min(found)[1]] if found else text)
    assert stream.stopped == bool(found)


def test_generate_stops_on_stop_string_and_streams_the_same_text(tiny_model):
    m = load_model(tiny_model)
    tok = m.tokenizer()
    rt = m.runtime(RuntimeOptions(n_threads=1, n_ctx=128, max_batch=16))
    free = generate(rt, tok, tok.encode("hello"), GenerationConfig(max_tokens=40))
    assert free.finish_reason == "length" and len(free.tokens) == 40
    stop = free.text[10:13]
    pieces: list[str] = []
    cut = generate(rt, tok, tok.encode("hello"), GenerationConfig(max_tokens=40, stop=(stop,)),
                   on_text=pieces.append)
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[:free.text.index(stop)]
    assert "".join(pieces) == cut.text


def test_common_prefix():
    from edge_slm.engine import common_prefix

    assert common_prefix([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix([1, 2], [1, 2, 3]) == 2
    assert common_prefix([], [1]) == 0
