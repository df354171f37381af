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


def test_the_mqtt_service_answers_from_an_onnx_model(tmp_path, tiny_model, mosquitto):
    """The main job on another backend: `serve` over an exported folder, a
    device asking through the broker, the retained status naming what runs."""
    import json
    import subprocess
    import sys
    import time
    from pathlib import Path

    from edge_slm.backends import load_source
    from edge_slm.export.onnx import export_onnx
    from edge_slm.model import load_model

    folder = tmp_path / "tiny-onnx"
    export_onnx(load_model(tiny_model), folder)
    exe = str(Path(sys.executable).with_name("edge-slm"))
    serve = subprocess.Popen([exe, "serve", "--broker", mosquitto.url, "--model", str(folder), "--slots", "2",
                              "--max-tokens", "8", "--state-dir", str(tmp_path / "state"),
                              "--runtime-id", "onnx-board"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        status = {}
        while status.get("state") != "online" and time.monotonic() < deadline and serve.poll() is None:
            got = subprocess.run(["mosquitto_sub", "-p", str(mosquitto.port), "-t",
                                  "edge-slm/v1/_runtime/onnx-board/status", "-C", "1", "-W", "2"],
                                 capture_output=True, text=True, timeout=10).stdout
            status = json.loads(got) if got.strip() else {}
        assert status.get("state") == "online", serve.stderr.read() if serve.poll() is not None else status
        assert status["model"]["sha256"] == load_source(folder).sha256()
        assert status["memory_plan"]["kv_type"] == "f32" and status["backend"] == "onnxruntime cpu"
        asked = subprocess.run([exe, "mqtt-ask", "--broker", mosquitto.url, "--device", "press-1", "--stream",
                                "--json", "--max-tokens", "6", "Hello there"],
                               capture_output=True, text=True, timeout=60)
        assert asked.returncode == 0, asked.stderr
        final = json.loads(asked.stdout.strip().splitlines()[-1])
        assert final["status"] == "ok" and final["answer_tokens"] >= 1, final
    finally:
        serve.terminate()
        assert serve.wait(timeout=40) == 0
