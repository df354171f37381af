"""`edge-slm bench` end to end on a tiny model (our runtime only), and the
parts of the report that need llama.cpp, fed with made-up rounds."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny_models import TinySpec

from edge_slm import bench as bench_mod
from edge_slm.bench import RunSummary, format_table
from edge_slm.bench_worker import OURS, PEER, Workload
from edge_slm.cli import main

FIGURES = ("decode_tps", "ttft_ms", "peak_rss_mb", "decode_bw_fraction")


@pytest.fixture(scope="module")
def long_model(tiny_model_factory):
    # The suite's longest prompt is 512 tokens: the tiny default context is too short.
    return tiny_model_factory(TinySpec(context_length=4096))


def test_bench_json_layout(long_model, tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer", "--reps", "1",
                                    "--threads", "1", "--threads", "2", "--ctx", "1024",
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "prefill 512 tok" in res.output
    doc = json.loads(out.read_text())
    assert isinstance(doc["bandwidth_gbs"], float) and doc["bandwidth_gbs"] > 0
    assert doc["bandwidth_gbs"] == doc["bandwidth_gbs_by_threads"]["2"]
    assert [(r["runtime"], r["threads"]) for r in doc["runs"]] == [(OURS, 1), (OURS, 2)]
    for run in doc["runs"]:
        assert set(run["prefill_tps"]) == {"16", "128", "512"}
        assert all(v > 0 for v in run["prefill_tps"].values())
        assert all(run[k] > 0 for k in FIGURES), run
        assert len(run["samples"]["decode_tps"]) == 1
    assert doc["greedy_agreement"]["edge_slm_consistent"] is True
    assert len(doc["greedy_agreement"]["greedy_ids"][f"{OURS}/1"]) == 129
    assert doc["settings"]["n_ctx"] == 1024


def test_bench_refuses_a_context_too_small(long_model):
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer", "--ctx", "256"])
    assert res.exit_code == 1
    assert "too small" in res.output


def test_bench_without_the_peer_says_how_to_get_it(long_model, monkeypatch):
    monkeypatch.setattr(bench_mod.importlib.util, "find_spec", lambda name: None)
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model)])
    assert res.exit_code == 1
    assert "make bench" in res.output
    assert len(res.output.strip().splitlines()) == 1


def test_workload_round_trips():
    w = Workload(prefill={16: [1, 2], 512: [3]}, ttft_prompt=[4], decode_prompt=[5, 6], n_decode=3)
    assert Workload.from_json(w.to_json()) == w
    assert w.positions_needed == 512


def summary(runtime: str, scale: float) -> RunSummary:
    return RunSummary(runtime=runtime, threads=2,
                      prefill_tps={"16": 100 * scale, "128": 200 * scale, "512": 300 * scale},
                      decode_tps=50 * scale, ttft_ms=10 / scale, peak_rss_mb=100.0,
                      decode_bw_fraction=0.2 * scale, backend="x", version="0", samples={},
                      greedy_ids=[1, 2])


def test_table_shows_ratios_ours_over_peer():
    table = format_table([summary(OURS, 2.0), summary(PEER, 1.0)], {2: 20.0}, {2: [7, 9]}, 129)
    decode = next(line for line in table.splitlines() if line.strip().startswith("decode"))
    assert decode.split()[-2:] == ["2.00", "higher"]
    ttft = next(line for line in table.splitlines() if line.strip().startswith("first token"))
    assert ttft.split()[-2:] == ["0.50", "lower"]
    assert "7" in next(line for line in table.splitlines() if "agreeing" in line)
