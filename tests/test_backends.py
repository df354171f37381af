"""Choosing the backend: by the file, or asked for; what is refused, in one
line, before anything is loaded. Each backend's own tests are
test_backend_onnx.py and test_backend_litert.py."""

from __future__ import annotations

import pytest
from test_cli import assert_one_line, edge_slm

from edge_slm.backends import detect, load_source
from edge_slm.engine import Engine, EngineConfig
from edge_slm.errors import EdgeSlmError, ModelError


def test_the_file_picks_the_backend(tmp_path, tiny_model):
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"")
    assert detect(tiny_model) == "gguf"
    assert detect(folder) == "onnx"
    assert detect(tmp_path / "m.tflite") == "litert"
    assert load_source(tiny_model).kind == "gguf"
    assert load_source(tiny_model, "gguf").kind == "gguf"


def test_a_folder_without_a_model_is_refused(tmp_path):
    with pytest.raises(ModelError, match="no model.onnx in it"):
        load_source(tmp_path)


def test_a_backend_that_does_not_fit_the_file_is_refused(tiny_model):
    with pytest.raises(ModelError, match="backend onnx was asked for, but this is a GGUF file"):
        load_source(tiny_model, "onnx")
    with pytest.raises(EdgeSlmError, match="choose from auto, gguf, onnx, litert"):
        load_source(tiny_model, "tvm")


def test_only_onnx_runs_on_another_execution_provider(tiny_model):
    with pytest.raises(EdgeSlmError, match="only the onnx backend runs on one"):
        Engine(EngineConfig(model=tiny_model, execution_provider="cuda", slots=1, ctx=64))
    with pytest.raises(EdgeSlmError, match="setting execution_provider: 'npu'"):
        EngineConfig(model=tiny_model, execution_provider="npu")
    with pytest.raises(EdgeSlmError, match="setting model_backend: 'tvm'"):
        EngineConfig(model=tiny_model, model_backend="tvm")


def test_the_cli_refuses_a_mismatched_backend_in_one_line(tiny_model):
    proc = edge_slm("ask", "hello", "--model", str(tiny_model), "--backend", "litert")
    assert_one_line(proc, 1, "backend litert was asked for", "GGUF file", "--backend gguf")
    proc = edge_slm("info", str(tiny_model), "--execution-provider", "tensorrt")
    assert_one_line(proc, 1, "execution provider tensorrt: only the onnx backend")
