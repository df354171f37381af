"""`edge-slm soak` end to end on a tiny model: every request accounted for,
the budget held, the JSON laid out as documented."""
from __future__ import annotations

import json
import subprocess
import sys

RUN_KEYS = {"slots", "requests", "peak_rss_mb", "rss_start_mb", "rss_end_mb", "decode_tps",
            "tokens_per_s", "requests_per_s", "p50_ms", "p95_ms", "n_ctx", "outcomes",
            "within_budget"}


def test_soak_accounts_for_every_request(tiny_model, tmp_path):
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "-m", "edge_slm", "soak", "--model", str(tiny_model), "--memory-budget",
         "128M", "--slots", "1,2", "--requests", "60", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "batched decode vs 1 slot(s)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["budget_mb"] == 128
    assert [r["slots"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert set(run) == RUN_KEYS
        assert sum(run["outcomes"].values()) == run["requests"] == 60
        kinds = {k.split(":")[0] for k in run["outcomes"]}
        assert kinds == {"normal", "long", "oversized", "cancelled"}
        assert run["outcomes"].get("oversized:too_long") == sum(
            n for k, n in run["outcomes"].items() if k.startswith("oversized:"))
        assert run["within_budget"] and 0 < run["peak_rss_mb"] <= report["budget_mb"]
        assert run["decode_tps"] > 0 and run["tokens_per_s"] > 0
        assert 0 < run["p50_ms"] <= run["p95_ms"]


def test_soak_refuses_a_budget_too_small(tiny_model):
    proc = subprocess.run(
        [sys.executable, "-m", "edge_slm", "soak", "--model", str(tiny_model), "--memory-budget",
         "1M", "--slots", "1", "--requests", "5"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "soak at 1 slots failed" in proc.stderr
