"""`edge-slm bench` end to end on a tiny model (our runtime only), and the
parts of the report that need llama.cpp, fed with made-up rounds."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from tiny_models import TinySpec

from edge_slm import bench as bench_mod
from edge_slm.bench import Agreement, RunSummary, compare, format_table
from edge_slm.bench_worker import OURS, PEER, RoundResult, Workload
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
                                    "--backend", "ref", "--no-grounding",
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
    assert doc["settings"]["n_ctx"] == 1024 and doc["settings"]["busy_cores"] == 0
    assert {r["backend"] for r in doc["runs"]} == {"ref"}
    assert doc["grounding"] is None


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


def test_bench_rejects_an_unknown_backend(long_model):
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer",
                                    "--backend", "no-such-table"])
    assert res.exit_code == 1
    assert "no-such-table" in res.output and "available" in res.output


def test_spinners_burn_cpu_until_the_block_ends():
    import resource
    import time

    from edge_slm.bench import spinners

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime
    with spinners(2) as procs:
        time.sleep(0.5)
        assert [p.poll() for p in procs] == [None, None]
    assert all(p.returncode is not None for p in procs)
    # they were spinning, not sleeping: the reaped children used CPU time
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_utime - before > 0.3


def test_workload_round_trips():
    w = Workload(prefill={16: [1, 2], 512: [3]}, ttft_prompt=[4], decode_prompt=[5, 6],
                 check_ids=[7, 8], n_decode=3)
    assert Workload.from_json(w.to_json()) == w
    assert w.positions_needed == 512


def round_result(runtime: str, greedy: list[int], top1: list[int], margin: list[float]) -> RoundResult:
    return RoundResult(runtime=runtime, threads=2, backend="x", version="0",
                       prefill_tps={16: 1.0}, decode_tps=1.0, ttft_ms=1.0, greedy_ids=greedy,
                       check_top1=top1, check_margin=margin, load_s=0.0, rss_baseline_mb=1.0,
                       peak_rss_mb=1.0)


def test_compare_discounts_near_ties():
    ours = [round_result(OURS, [1, 2, 3], [5, 6, 7, 8], [3.0, 0.1, 2.0, 2.0])]
    peer = [round_result(PEER, [1, 2, 4], [5, 9, 7, 0], [3.0, 0.2, 2.0, 2.0])]
    a = compare(ours, peer)
    assert a.greedy_prefix == [2] and a.greedy_tokens == 3
    assert (a.top1_agree, a.positions) == (2, 4)
    # position 1 is a near-tie and does not count; position 3 is a real disagreement
    assert (a.confident_agree, a.confident_positions) == (2, 3)


def summary(runtime: str, scale: float, decode_samples: list[float]) -> RunSummary:
    return RunSummary(runtime=runtime, threads=2,
                      prefill_tps={"16": 100 * scale, "128": 200 * scale, "512": 300 * scale},
                      decode_tps=50 * scale, ttft_ms=10 / scale, peak_rss_mb=100.0,
                      decode_bw_fraction=0.2 * scale, backend="x", version="0",
                      samples={"decode_tps": decode_samples}, greedy_ids=[1, 2])


def test_table_shows_ratios_ours_over_peer():
    agreement = Agreement(greedy_prefix=[7, 9], greedy_tokens=129, top1_agree=50, positions=60,
                          confident_agree=40, confident_positions=41)
    table = format_table([summary(OURS, 2.0, [100, 20]), summary(PEER, 1.0, [50, 51])],
                         {2: 20.0}, {2: agreement}).splitlines()
    decode = next(line for line in table if line.strip().startswith("decode 128"))
    assert decode.split()[-2:] == ["2.00", "higher"]
    assert "100.0*" in decode and "50.0 " in decode  # ours' rounds were 5x apart: flagged
    ttft = next(line for line in table if line.strip().startswith("first token"))
    assert ttft.split()[-2:] == ["0.50", "lower"]
    assert "the first 7 of 129" in next(line for line in table if "greedy decode" in line)
    assert "50/60" in next(line for line in table if "fixed text" in line)
    assert table[-1].startswith("* rounds differ")


def corpus_bytes(root) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_grounding_corpus_is_a_thousand_pages_and_the_same_every_time(tmp_path):
    from edge_slm.bench_grounding import PAGE_WORDS, write_corpus

    a, b = write_corpus(tmp_path / "a"), write_corpus(tmp_path / "b")
    assert a.pages >= 1000 and (a.pages, a.queries) == (b.pages, b.queries)
    files = corpus_bytes(a.root)
    assert files == corpus_bytes(b.root) and len(files) == a.manuals + a.bulletins
    # a page is a section of a manual or a whole bulletin, and is a page long
    sections = sum(text.count(b"\n## ") for rel, text in files.items() if rel.endswith(".md"))
    assert sections + sum(rel.endswith(".txt") for rel in files) == a.pages
    assert PAGE_WORDS[0] <= a.words / a.pages <= PAGE_WORDS[1]
    assert len(a.queries) == 50 and {q.code for q in a.queries} == {True, False}
    # another seed, another corpus
    assert corpus_bytes(write_corpus(tmp_path / "c", seed=1).root) != files


def test_retrieval_is_timed_on_real_searches(tmp_path):
    from edge_slm.bench_grounding import index_corpus, measure_retrieval, write_corpus

    corpus = write_corpus(tmp_path / "manuals", manuals=4, bulletins=4, queries=20)
    indexed = index_corpus(corpus, tmp_path / "index.sqlite3")
    assert indexed["passages"] > corpus.pages and indexed["seconds"] > 0
    assert indexed["bytes"] == (tmp_path / "index.sqlite3").stat().st_size > 0
    r = measure_retrieval(tmp_path / "index.sqlite3", corpus.queries, reps=2)
    assert (r["queries"], r["reps"], r["limit"]) == (20, 2, 3)
    assert 0 < r["median_ms"] <= r["p95_ms"] <= r["max_ms"] < 1000
    # the searches found what the corpus states, not nothing quickly
    assert r["top_hit_in_manual"] >= 18 and r["covered"] == 20


def test_grounding_section_end_to_end(real_model, tmp_path):
    g = bench_mod.measure_grounding(real_model, [1], 2048, 1, None, tmp_path)
    assert g["corpus"]["pages"] >= 1000 and g["index"]["passages"] > g["corpus"]["pages"]
    t = g["ttft_by_threads"]["1"]
    grounded, ungrounded = (next(s for s in t["samples"] if s["grounded"] == k) for k in (True, False))
    assert grounded["question"] == ungrounded["question"]
    assert (grounded["label"], ungrounded["label"]) == ("grounded", None)
    assert grounded["passages"] >= 1 and ungrounded["passages"] == 0
    assert grounded["cached_tokens"] == ungrounded["cached_tokens"] == 0
    # the passages are the cost: a prompt several times longer, a later first token
    assert t["grounded_prompt_tokens"] > 3 * t["ungrounded_prompt_tokens"]
    assert t["ratio"] == t["grounded_ms"] / t["ungrounded_ms"] > 1
    table = bench_mod.format_grounding(g).splitlines()
    assert table[0].startswith("grounding: 1,040 pages")
    row = next(line for line in table if line.strip().startswith("first token, 1 thread"))
    assert row.split()[-1] == f"{t['ratio']:.2f}"
    tokens = next(line for line in table if line.strip().startswith("prompt tokens")).split()
    assert tokens[2:4] == [f"{t['ungrounded_prompt_tokens']:.0f}", f"{t['grounded_prompt_tokens']:.0f}"]


def test_the_last_level_cache_is_reported_and_weights_that_fit_are_flagged():
    from edge_slm.bench import cache_note, last_level_cache, machine_info

    llc = last_level_cache()
    assert llc is None or (llc[0] >= 1 and llc[1] >= 1 << 16)
    machine = {"last_level_cache": {"level": 3, "bytes": 32 << 20}}
    assert "they fit in the cache" in cache_note(machine, 20 << 20)
    assert "fit" not in cache_note(machine, 96 << 20) and "L3 32 MiB" in cache_note(machine, 96 << 20)
    assert "unknown" in cache_note({"last_level_cache": None}, 96 << 20)
    assert "last_level_cache" in machine_info()


def test_numpys_blas_starts_no_threads_of_its_own():
    import subprocess
    import sys

    env = {k: v for k, v in __import__("os").environ.items() if k != "OPENBLAS_NUM_THREADS"}
    code = ("import edge_slm, numpy, os; a = numpy.ones((400, 400)); a @ a; "
            "print(len(os.listdir('/proc/self/task')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.strip() == "1", out


def test_profile_shows_where_a_tokens_time_goes(real_model, tmp_path):
    """`bench --profile` on the real model: every kind of op the pass runs,
    the two weight types' gemms with the bytes they streamed (all of the
    model's matrices, once a token), and the engine's sampling and Python."""
    out = tmp_path / "profile.json"
    res = CliRunner().invoke(main, ["bench", "--profile", "--model", str(real_model),
                                    "--threads", "1", "--ctx", "512", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "gemm Q4_1" in res.output and "Python step" in res.output
    doc = json.loads(out.read_text())
    (s,) = doc["profile"]
    rows = {r["op"]: r for r in s["rows"]}
    assert {"gemm Q4_1", "gemm Q8_0", "attention", "norm", "quantize", "sampling",
            "Python step"} <= set(rows)
    assert all(r["ms"] >= 0 for r in rows.values())
    assert rows["gemm Q4_1"]["gbs"] > 0.5 and rows["gemm Q8_0"]["gbs"] > 0.5
    assert rows["attention"]["gbs"] is None
    # the ops and the engine's own split describe the same steps
    assert 0.8 < sum(r["share"] for r in rows.values()) < 1.2
    raw = doc["raw"][0]
    tokens = raw["c"]["tokens"]
    assert tokens == raw["c"]["runs"] and tokens >= 100  # one token a decode step
    q4 = raw["c"]["ops"]["gemm:3"][1] / tokens
    q8 = raw["c"]["ops"]["gemm:8"][1] / tokens
    assert q4 == 66_355_200 and q8 == 30_081_024  # every weight once a token
