"""Make the committed LiteRT fixture that tests/test_backend_litert.py runs
without torch: the tiny random Llama of tests/tiny_models.py (TinySpec's
defaults, seed 0), exported by `edge_slm.export.litert` with int8 weights.

    .venv/bin/python scripts/make_litert_fixture.py   # needs the export-litert extra

It writes, under tests/fixtures/litert/:
  tiny.gguf           the source (the tests run our C kernels on it beside the export)
  tiny.tflite         the export: a cache of KV_LEN positions, prefill of PREFILL_LEN
  tiny.edge-slm.json  its sidecar

Run it again when the export's graph or sidecar changes; the tests check that
the sidecar names tiny.gguf's sha256."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from tiny_models import TinySpec, write_tiny_model  # noqa: E402

from edge_slm.backends.sidecar import sidecar_path  # noqa: E402
from edge_slm.export.litert import export_litert  # noqa: E402
from edge_slm.model import load_model  # noqa: E402

FIXTURES = REPO / "tests" / "fixtures" / "litert"
KV_LEN = 128      # short, so the tests fill a context in a few steps
PREFILL_LEN = 16  # short, so a prompt takes several prefill calls and a padded tail


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=FIXTURES)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    gguf, tflite = args.out / "tiny.gguf", args.out / "tiny.tflite"
    for old in (gguf, tflite, sidecar_path(tflite)):
        old.unlink(missing_ok=True)
    write_tiny_model(gguf, TinySpec())
    t0 = time.perf_counter()
    done = export_litert(load_model(gguf), tflite, weights="int8", kv_len=KV_LEN, prefill_len=PREFILL_LEN)
    logging.info("%s: %d bytes in %.1f s, signatures %s", done.path, done.bytes, time.perf_counter() - t0,
                 ", ".join(done.signatures))


if __name__ == "__main__":
    main()
