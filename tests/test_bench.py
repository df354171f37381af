"""`edge-slm bench` end to end on a tiny model (our runtime, and our ONNX
backend on its export), and the parts of the report that need llama.cpp,
fed with made-up rounds."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from test_cli import assert_one_line, edge_slm
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
                                    "--kernels", "ref", "--no-grounding",
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
    assert doc["settings"]["kernels_requested"] == "ref" and doc["settings"]["backends"] == []
    assert {r["backend"] for r in doc["runs"]} == {"ref"}
    assert doc["ratios"] == {}
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


def test_bench_rejects_an_unknown_kernel_table(long_model):
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer",
                                    "--kernels", "no-such-table"])
    assert res.exit_code == 1
    assert "no-such-table" in res.output and "available" in res.output


def test_bench_rejects_an_unknown_backend_in_one_line(long_model):
    proc = edge_slm("bench", "--model", str(long_model), "--no-peer", "--backend", "tvm")
    assert_one_line(proc, 2, "--backend", "'tvm' is not one of 'onnx', 'litert'")
    # the kernel table is --kernels now: a table's name is not a backend
    proc = edge_slm("bench", "--model", str(long_model), "--no-peer", "--backend", "ref")
    assert_one_line(proc, 2, "--backend", "'ref'")
    proc = edge_slm("bench", "--model", str(long_model), "--profile", "--backend", "onnx")
    assert_one_line(proc, 2, "--backend", "--profile times our C kernels' ops only")


def test_bench_refuses_a_backend_model_of_the_wrong_format_in_one_line(long_model, tmp_path):
    proc = edge_slm("bench", "--model", str(long_model), "--no-peer", "--backend", "onnx",
                    "--backend-model", str(long_model))
    assert_one_line(proc, 2, "--backend-model", str(long_model), "is a GGUF file",
                    "not a model for --backend onnx")
    tflite = tmp_path / "m.tflite"
    tflite.write_bytes(b"TFL3")
    proc = edge_slm("bench", "--model", str(long_model), "--no-peer", "--backend", "onnx",
                    "--backend-model", str(tflite))
    assert_one_line(proc, 2, "is a LiteRT (.tflite) model, not a model for --backend onnx")
    proc = edge_slm("bench", "--model", str(long_model), "--no-peer", "--backend-model", str(tflite))
    assert_one_line(proc, 2, "runs only beside the --backend it is for")
    proc = edge_slm("bench", "--model", str(long_model), "--no-peer", "--backend", "onnx",
                    "--backend-model", str(tmp_path))
    assert_one_line(proc, 2, "--backend-model", "no model.onnx in it")
    proc = edge_slm("bench", "--model", str(long_model), "--no-peer", "--backend", "onnx",
                    "--backend-model", str(tmp_path / "nothing"))
    assert_one_line(proc, 2, "nothing: no such file or folder")


# ---- another backend beside ours: the ONNX export ----

@pytest.fixture(scope="module")
def long_onnx(long_model, tmp_path_factory):
    from edge_slm.export.onnx import export_onnx
    from edge_slm.model import load_model

    out = tmp_path_factory.mktemp("onnx") / "long-onnx"
    export_onnx(load_model(long_model), out)
    return out


def test_bench_exports_the_model_and_runs_it_through_onnx_runtime_beside_ours(long_model, tmp_path):
    from edge_slm.pull import sha256_file

    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer", "--reps", "1",
                                    "--threads", "1", "--ctx", "1024", "--no-grounding",
                                    "--backend", "onnx", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "onnx: exporting model.gguf" in res.output and "ours/onnx" in res.output
    doc = json.loads(out.read_text())
    assert [(r["runtime"], r["threads"]) for r in doc["runs"]] == [(OURS, 1), ("onnx", 1)]
    ours, onnx = doc["runs"]
    assert onnx["backend"] == "onnxruntime cpu" and onnx["info"]["format"] == "onnx"
    assert onnx["info"]["kv_type"] == "f32" and ours["info"]["kv_type"] == "f16"
    assert all(v > 0 for v in onnx["prefill_tps"].values()) and onnx["decode_tps"] > 0
    assert onnx["peak_rss_mb"] > onnx["samples"]["rss_baseline_mb"][0] > 0
    assert onnx["decode_bw_fraction"] is None  # the GGUF's bytes are not what the graph reads
    ratios = doc["ratios"]["onnx"]["1"]
    assert ratios["decode_tps"] == pytest.approx(ours["decode_tps"] / onnx["decode_tps"])
    assert ratios["prefill_512_tps"] == pytest.approx(ours["prefill_tps"]["512"] / onnx["prefill_tps"]["512"])
    assert ratios["peak_rss_mb"] == pytest.approx(ours["peak_rss_mb"] / onnx["peak_rss_mb"])
    assert ratios["decode_bw_fraction"] is None
    made = doc["settings"]["backend_models"]["onnx"]
    assert made["given"] is False and made["export_s"] > 0
    assert made["source_sha256"] == sha256_file(long_model)
    # it ran the same model: every decisive choice along the fixed text is ours
    a = doc["greedy_agreement"]["backends"]["onnx"]["1"]
    assert a["confident_positions"] > 100 and a["confident_agree"] == a["confident_positions"]
    assert doc["greedy_agreement"]["by_threads"] == {}


def test_bench_runs_a_given_export(long_model, long_onnx, tmp_path):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer", "--reps", "1",
                                    "--threads", "2", "--ctx", "1024", "--no-grounding",
                                    "--backend", "onnx", "--backend-model", str(long_onnx),
                                    "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "exporting" not in res.output
    doc = json.loads(out.read_text())
    assert [(r["runtime"], r["threads"]) for r in doc["runs"]] == [(OURS, 2), ("onnx", 2)]
    assert doc["settings"]["backend_models"]["onnx"] == {
        "path": str(long_onnx), "given": True, "export_s": None,
        "source_sha256": doc["model"]["sha256"]}
    assert set(doc["ratios"]["onnx"]) == {"2"}


def test_bench_refuses_an_export_it_cannot_run_beside_the_model_in_one_line(long_model, long_onnx,
                                                                           tiny_model_factory, tmp_path):
    import shutil

    def bench(*args):
        return edge_slm("bench", "--model", str(long_model), "--no-peer", "--no-grounding",
                        "--backend", "onnx", *args)

    other = tiny_model_factory(TinySpec(context_length=4096, seed=7))
    proc = bench("--backend-model", str(long_onnx), "--model", str(other))
    assert_one_line(proc, 2, "--backend-model", "exported from model.gguf", "not from model.gguf",
                    "different models")
    proc = bench("--backend-model", str(long_onnx), "--ctx", "8192")
    assert_one_line(proc, 2, "holds 4096 positions, fewer than --ctx 8192")
    broken = tmp_path / "broken"
    shutil.copytree(long_onnx, broken)
    data = (broken / "model.onnx").read_bytes()
    (broken / "model.onnx").write_bytes(data[:len(data) // 2])
    proc = bench("--backend-model", str(broken))
    assert_one_line(proc, 2, "--backend-model", "ONNX Runtime cannot load it")
    (broken / "edge-slm.json").unlink()
    proc = bench("--backend-model", str(broken))
    assert_one_line(proc, 2, "no edge-slm.json beside it")


@pytest.mark.backends
def test_bench_runs_the_litert_export_through_the_same_path(long_model, long_onnx, tmp_path):
    """Both other backends in one bench, LiteRT exported by litert-torch (torch: a heavy toolchain)."""
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer", "--reps", "1",
                                    "--threads", "1", "--ctx", "1024", "--no-grounding",
                                    "--backend", "litert", "--backend", "onnx",
                                    "--backend-model", str(long_onnx), "--json", str(out)])
    assert res.exit_code == 0, res.output
    doc = json.loads(out.read_text())
    assert [r["runtime"] for r in doc["runs"]] == [OURS, "litert", "onnx"]
    litert = doc["runs"][1]
    assert litert["info"]["format"] == "litert" and litert["decode_tps"] > 0
    assert doc["settings"]["backend_models"]["litert"]["given"] is False
    assert doc["settings"]["backend_models"]["onnx"]["given"] is True
    assert set(doc["ratios"]) == {"litert", "onnx"}
    a = doc["greedy_agreement"]["backends"]["litert"]["1"]
    assert a["confident_positions"] > 100 and a["confident_agree"] == a["confident_positions"]


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


def summary(runtime: str, scale: float, decode_samples: list[float], rss: float = 100.0) -> RunSummary:
    return RunSummary(runtime=runtime, threads=2,
                      prefill_tps={"16": 100 * scale, "128": 200 * scale, "512": 300 * scale},
                      decode_tps=50 * scale, ttft_ms=10 / scale, peak_rss_mb=rss,
                      decode_bw_fraction=None if runtime == "onnx" else 0.2 * scale, backend="x",
                      version="0", samples={"decode_tps": decode_samples}, greedy_ids=[1, 2])


def test_table_shows_ratios_ours_over_peer():
    agreement = Agreement(greedy_prefix=[7, 9], greedy_tokens=129, top1_agree=50, positions=60,
                          confident_agree=40, confident_positions=41)
    table = format_table([summary(OURS, 2.0, [100, 20]), summary(PEER, 1.0, [50, 51])],
                         {2: 20.0}, {PEER: {2: agreement}}).splitlines()
    decode = next(line for line in table if line.strip().startswith("decode 128"))
    assert decode.split()[-2:] == ["2.00", "higher"]
    assert "100.0*" in decode and "50.0 " in decode  # ours' rounds were 5x apart: flagged
    ttft = next(line for line in table if line.strip().startswith("first token"))
    assert ttft.split()[-2:] == ["0.50", "lower"]
    assert "llama.cpp beside edge-slm:" in [line.strip() for line in table]
    assert "the first 7 of 129" in next(line for line in table if "greedy decode" in line)
    assert "50/60" in next(line for line in table if "fixed text" in line)
    assert table[-1].startswith("* rounds differ")


def test_table_has_a_column_and_a_ratio_for_each_backend():
    agreement = Agreement(greedy_prefix=[129], greedy_tokens=129, top1_agree=60, positions=60,
                          confident_agree=41, confident_positions=41, logit_corr_min=0.999,
                          logit_corr_median=0.9999)
    runs = [summary(OURS, 2.0, [1.0], rss=100.0), summary(PEER, 1.0, [1.0], rss=125.0),
            summary("onnx", 0.5, [1.0], rss=400.0)]
    table = format_table(runs, {2: 20.0}, {PEER: {2: agreement}, "onnx": {2: agreement}}).splitlines()
    assert table[1].split() == [OURS, PEER, "onnx", "ours/peer", "ours/onnx", "better"]
    # ours, llama.cpp, onnx, then ours over each
    decode = next(line for line in table if line.strip().startswith("decode 128")).split()
    assert decode[4:] == ["100.0", "50.0", "25.0", "2.00", "4.00", "higher"]
    rss = next(line for line in table if line.strip().startswith("peak RSS")).split()
    assert rss[3:] == ["100.0", "125.0", "400.0", "0.80", "0.25", "lower"]
    # the GGUF's bytes are not what the ONNX graph reads: no bandwidth share for it
    bw = next(line for line in table if line.strip().startswith("decode bandwidth")).split()
    assert bw[4:] == ["40.0", "20.0", "-", "2.00", "-", "higher"]
    assert table.index("  onnx beside edge-slm:") > table.index("  llama.cpp beside edge-slm:")
    assert "logits there (a fixed sample of ids) correlate: min 0.9990" in table[-1]


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


# ---- weight types: copies made by llama.cpp's quantizer (faked here) ----

@pytest.fixture
def fake_quantizer(monkeypatch, tmp_path):
    """requantize's call into llama.cpp replaced by one writing a tiny model
    whose matrices have the asked type; EDGE_SLM_HOME in tmp_path. Returns
    the calls made, as (source, type)."""
    from tiny_models import write_tiny_model

    from edge_slm import requantize as rq

    monkeypatch.setenv("EDGE_SLM_HOME", str(tmp_path / "home"))
    calls = []

    def quantize(source, dest, type_name, progress):
        calls.append((source, type_name))
        for k in (1, 2):
            if progress is not None:
                progress(k, 2)
        write_tiny_model(dest, TinySpec(context_length=4096, weight_type=type_name.upper()))
        return "a fake quantizer"

    monkeypatch.setattr(rq, "llama_cpp_quantize", quantize)
    return calls


def test_a_requantized_copy_is_made_once_and_again_when_either_file_changes(long_model, tmp_path,
                                                                            fake_quantizer):
    import os
    import shutil

    from edge_slm import requantize as rq

    source = tmp_path / "source.gguf"
    shutil.copy(long_model, source)
    seen = []
    v = rq.variant(source, "q8_0", lambda done, total: seen.append((done, total)))
    assert v.path == tmp_path / "home" / "models" / "source.requantized-Q8_0.gguf"
    assert v.path.stat().st_mode & 0o777 == 0o644 and seen == [(1, 2), (2, 2)]
    assert v.made_from["source"] == str(source) and v.made_from["quantizer"] == "a fake quantizer"
    assert v.made_from["source_sha256"] == bench_mod.sha256_file(source)
    assert rq.variant(source, "q8_0") == v and len(fake_quantizer) == 1  # reused
    assert not list(v.path.parent.glob(".*.part"))

    os.utime(v.path, ns=(0, 0))  # the copy changed since it was made
    rq.variant(source, "q8_0")
    with open(source, "r+b") as f:  # the source is other bytes now
        f.seek(-1, 2)
        f.write(b"\x01")
    rq.variant(source, "q8_0")
    assert len(fake_quantizer) == 3
    rq.variant(source, "q4_0")  # another type, another file
    assert [t for _, t in fake_quantizer] == ["q8_0", "q8_0", "q8_0", "q4_0"]
    assert (tmp_path / "home" / "models" / "source.requantized-Q4_0.gguf").exists()


def test_a_file_in_the_type_asked_for_is_taken_as_it_is(real_model, fake_quantizer):
    from edge_slm import requantize as rq

    assert rq.file_type(real_model) == "q4_1"
    assert rq.variant(real_model, "q4_1") == rq.ModelVariant("q4_1", real_model, None)
    assert fake_quantizer == []


def test_a_failed_quantize_leaves_nothing_behind(long_model, tmp_path, monkeypatch):
    from edge_slm import requantize as rq
    from edge_slm.errors import EdgeSlmError

    monkeypatch.setenv("EDGE_SLM_HOME", str(tmp_path / "home"))

    def quantize(source, dest, type_name, progress):
        dest.write_bytes(b"half a file")
        raise EdgeSlmError("llama.cpp could not requantize it")

    monkeypatch.setattr(rq, "llama_cpp_quantize", quantize)
    with pytest.raises(EdgeSlmError, match="could not requantize"):
        rq.variant(long_model, "q8_0")
    assert list((tmp_path / "home" / "models").iterdir()) == []


def test_the_file_type_ids_are_llama_cpps():
    llama_cpp = pytest.importorskip("llama_cpp")
    from edge_slm.requantize import FILE_TYPES

    for name, ftype in FILE_TYPES.items():
        constant = "LLAMA_FTYPE_ALL_F32" if name == "f32" else f"LLAMA_FTYPE_MOSTLY_{name.upper()}"
        assert getattr(llama_cpp, constant) == ftype, name


def test_default_types(real_model, long_model):
    from edge_slm.bench import default_types
    from edge_slm.requantize import AS_GIVEN

    # the reference model: its own type, and with the peer the two llama.cpp makes from it
    assert default_types(real_model, peer=True) == ["q4_1", "q4_k_m", "q8_0"]
    assert default_types(real_model, peer=False) == ["q4_1"]
    # any other model only as given (the tiny ones declare no file type)
    assert default_types(long_model, peer=True) == [AS_GIVEN]


def test_bench_refuses_an_unknown_type(long_model):
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer",
                                    "--types", "q4_1,q9_9"])
    assert res.exit_code == 2
    assert "q9_9: choose from" in res.output and "q4_k_m" in res.output


def test_bench_measures_each_type(long_model, tmp_path, fake_quantizer):
    out = tmp_path / "bench.json"
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer", "--reps", "1",
                                    "--threads", "1", "--ctx", "1024", "--no-grounding",
                                    "--types", "q8_0, Q4_0,q8_0", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "q8_0: requantizing model.gguf with llama.cpp's quantizer" in res.output
    assert "q8_0: model.requantized-Q8_0.gguf" in res.output and "by a fake quantizer" in res.output
    doc = json.loads(out.read_text())
    assert doc["settings"]["types"] == ["q8_0", "q4_0"]
    assert [t["type"] for t in doc["types"]] == ["q8_0", "q4_0"]
    q8, q4 = doc["types"]
    assert q8["model"]["tensor_types"]["Q8_0"] == 15 and q4["model"]["tensor_types"]["Q4_0"] == 14
    assert q8["model"]["made_from"]["source"] == str(long_model)
    assert q8["model"]["weight_bytes_per_token"] > q4["model"]["weight_bytes_per_token"]
    for t in doc["types"]:
        assert [(r["runtime"], r["threads"]) for r in t["runs"]] == [(OURS, 1)]
        assert t["runs"][0]["decode_tps"] > 0 and t["greedy_agreement"]["by_threads"] == {}
    # the first type's figures are where a single model's were
    assert doc["runs"] == q8["runs"] and doc["model"] == q8["model"]
    rows = res.output[res.output.index("by weight type"):].splitlines()
    assert [r.split()[0] for r in rows[3:5]] == ["q8_0", "q4_0"]
    # made once: a second run reuses both copies
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer", "--reps", "1",
                                    "--threads", "1", "--ctx", "1024", "--no-grounding",
                                    "--types", "q8_0,q4_0"])
    assert res.exit_code == 0, res.output
    assert "requantizing" not in res.output and len(fake_quantizer) == 2


def test_bench_refuses_a_type_edge_slm_cannot_load_before_any_round(long_model, monkeypatch, tmp_path):
    from tiny_models import write_tiny_model

    from edge_slm import requantize as rq

    monkeypatch.setenv("EDGE_SLM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(rq, "llama_cpp_quantize", lambda source, dest, type_name, progress: (
        write_tiny_model(dest, TinySpec(context_length=4096, down_type="Q2_K", hidden_dim=256)), "fake")[1])
    monkeypatch.setattr(bench_mod, "run_child", lambda *a: pytest.fail("a round ran"))
    res = CliRunner().invoke(main, ["bench", "--model", str(long_model), "--no-peer",
                                    "--no-grounding", "--types", "q4_k_m"])
    assert res.exit_code == 1
    assert "requantized-Q4_K_M.gguf" in res.output and "Q2_K" in res.output


def test_the_summary_has_a_row_per_type_and_thread_count():
    from edge_slm.bench import TypeReport, format_types
    from edge_slm.requantize import ModelVariant

    def report(name: str, scale: float) -> TypeReport:
        summaries = [summary(rt, s, [1.0]) for rt, s in ((OURS, scale), (PEER, 1.0))]
        for s in summaries:
            s.samples["prefill_tps"] = {"512": [1.0]}
        agreement = Agreement(greedy_prefix=[7], greedy_tokens=129, top1_agree=50, positions=60,
                              confident_agree=20, confident_positions=21, logit_corr_min=0.9987,
                              logit_corr_median=0.9995)
        return TypeReport(ModelVariant(name, None, None), 96 << 20, {}, False, {},
                          summaries=summaries, agreement={PEER: {2: agreement}})

    lines = format_types([report("q4_1", 2.0), report("q4_k_m", 0.5)], [2]).splitlines()
    assert "decode 128 tok" in lines[1] and "prefill 512 tok" in lines[1]
    q4_1, q4_k_m = lines[3].split(), lines[4].split()
    # type, MiB a token, threads, then ours, llama.cpp and the ratio for decode, then for prefill
    assert q4_1[:9] == ["q4_1", "96.0", "2", "100.0", "50.0", "2.00", "600.0", "300.0", "2.00"]
    assert q4_k_m[5] == "0.50" and q4_k_m[8] == "0.50"
    assert q4_1[9:] == ["20/21", "0.9987"]
