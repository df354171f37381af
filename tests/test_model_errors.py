"""Bad model files give one clear line naming the file and the problem:
from the loader as ModelError, from the CLI with exit code 1 and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
from tiny_models import TinySpec, write_tiny_model

from edge_slm.errors import ModelError, UnsupportedModel
from edge_slm.model import load_model

EDGE_SLM = [sys.executable, "-m", "edge_slm"]


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*EDGE_SLM, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def truncated(src: Path, dst: Path, keep: float) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * keep)])
    return dst


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such model file"):
        load_model(tmp_path / "nope.gguf")


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.05, 0.5, 0.999])
def test_truncated_file(tiny_model, tmp_path, keep):
    path = truncated(tiny_model, tmp_path / "cut.gguf", keep)
    with pytest.raises(ModelError, match=str(path)):
        load_model(path)


def test_not_a_gguf(tmp_path):
    p = tmp_path / "junk.gguf"
    p.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelError, match="not a readable GGUF"):
        load_model(p)


def test_corrupt_header_counts(tiny_model, tmp_path):
    data = bytearray(tiny_model.read_bytes())
    data[8:16] = (2**40).to_bytes(8, "little")  # absurd tensor count
    p = tmp_path / "corrupt.gguf"
    p.write_bytes(bytes(data))
    with pytest.raises(ModelError):
        load_model(p)


def test_unsupported_architecture(tmp_path):
    p = write_tiny_model(tmp_path / "gpt.gguf", TinySpec(arch="gpt2"))
    with pytest.raises(UnsupportedModel, match="architecture 'gpt2'"):
        load_model(p)


def test_unsupported_tensor_type(tmp_path):
    p = write_tiny_model(tmp_path / "q6k.gguf", TinySpec(down_type="Q6_K", hidden_dim=256))
    with pytest.raises(UnsupportedModel, match="blk.0.ffn_down.weight has type Q6_K"):
        load_model(p)


def test_missing_tensor(tmp_path, tiny_model):
    p = tmp_path / "holey.gguf"
    r = gguf.GGUFReader(tiny_model)
    w = gguf.GGUFWriter(str(p), "llama")
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        w.add_key_value(field.name, field.contents(), field.types[0],
                        field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for t in r.tensors:
        if t.name != "blk.1.ffn_up.weight":
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelError, match="blk.1.ffn_up.weight is missing"):
        load_model(p)


def test_cli_info_on_tiny_model(tiny_model):
    proc = cli("info", str(tiny_model), "--ctx", "128")
    assert proc.returncode == 0, proc.stderr
    assert "architecture  llama" in proc.stdout and "KV cache" in proc.stdout


@pytest.mark.parametrize("command", [["info"], ["tokenize", "hi", "--model"],
                                     ["complete", "hi", "--model"], ["ask", "hi", "--model"]])
def test_cli_bad_model_is_one_line(tiny_model, tmp_path, command):
    bad = truncated(tiny_model, tmp_path / "bad.gguf", 0.5)
    assert_one_line_error(cli(*command, str(bad)), "bad.gguf")
    assert_one_line_error(cli(*command, str(tmp_path / "absent.gguf")), "absent.gguf")


def test_cli_prompt_beyond_context(tiny_model):
    proc = cli("complete", "word " * 300, "--model", str(tiny_model), "--ctx", "64")
    assert_one_line_error(proc, "context holds 64")


def test_cli_bad_ids(tiny_model, tmp_path):
    proc = cli("logits", "--ids", "1,x", "--npy", str(tmp_path / "o.npy"), "--model", str(tiny_model))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    proc = cli("logits", "--ids", "1,999999", "--npy", str(tmp_path / "o.npy"), "--model",
               str(tiny_model))
    assert_one_line_error(proc, "outside the vocabulary")
