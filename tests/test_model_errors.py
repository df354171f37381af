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
    p = write_tiny_model(tmp_path / "q2k.gguf", TinySpec(down_type="Q2_K", hidden_dim=256))
    with pytest.raises(UnsupportedModel, match="blk.0.ffn_down.weight has type Q2_K"):
        load_model(p)


def rewrite(src: Path, dst: Path, metadata: dict | None = None, drop: str | None = None) -> Path:
    """A copy of src with some metadata values replaced or added ({key: (value,
    GGUFValueType[, sub type of an array])}), or left out ({key: None}), or
    a tensor left out."""
    metadata = dict(metadata or {})
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "llama")
    for field in r.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        if field.name in metadata:
            if (new := metadata.pop(field.name)) is not None:
                w.add_key_value(field.name, *new)
            continue
        w.add_key_value(field.name, field.contents(), field.types[0],
                        field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for key, value in metadata.items():
        if value is not None:
            w.add_key_value(key, *value)
    for t in r.tensors:
        if t.name != drop:
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def test_missing_tensor(tmp_path, tiny_model):
    p = rewrite(tiny_model, tmp_path / "holey.gguf", drop="blk.1.ffn_up.weight")
    with pytest.raises(ModelError, match="blk.1.ffn_up.weight is missing"):
        load_model(p)


U32, STR, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.STRING, gguf.GGUFValueType.FLOAT32
ARRAY = gguf.GGUFValueType.ARRAY


@pytest.mark.parametrize("key,value,vtype,message", [
    ("llama.attention.head_count", 0, U32, "head_count is 0; it must be positive"),
    ("llama.attention.head_count", "four", STR, "head_count is text 'four', expected an integer"),
    ("llama.block_count", 0, U32, "block_count is 0; it must be positive"),
    ("llama.context_length", 0, U32, "context_length is 0; it must be positive"),
    ("llama.attention.layer_norm_rms_epsilon", -1e-5, F32, "must be positive"),
    ("llama.attention.head_count_kv", 3, U32, "4 attention heads cannot share 3 KV heads"),
])
def test_bad_metadata(tiny_model, tmp_path, key, value, vtype, message):
    p = rewrite(tiny_model, tmp_path / "odd.gguf", {key: (value, vtype)})
    with pytest.raises(ModelError, match=message):
        load_model(p)
    assert_one_line_error(cli("info", str(p)), "odd.gguf", message)


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


def test_cli_logits_refusals(tiny_model, tmp_path):
    many = ",".join(["5"] * 20)
    assert_one_line_error(cli("logits", "--ids", many, "--ctx", "16", "--npy", str(tmp_path / "o.npy"),
                              "--model", str(tiny_model)), "20 ids exceed the context of 16")
    assert not (tmp_path / "o.npy").exists()
    assert_one_line_error(cli("logits", "--ids", "1,2", "--npy", str(tmp_path / "no" / "o.npy"),
                              "--model", str(tiny_model)), "cannot write")
    proc = cli("logits", "--ids", "1,2", "--npy", str(tmp_path / "plain"), "--model", str(tiny_model))
    assert proc.returncode == 0 and str(tmp_path / "plain") in proc.stdout
    assert np.load(tmp_path / "plain").shape[0] == 2


def test_cli_bad_option_is_one_line(tiny_model):
    proc = cli("ask", "hi", "--temperature", "-1", "--model", str(tiny_model))
    assert proc.returncode == 2
    assert_one_line_error(proc, "edge-slm ask", "--temperature")
    assert_one_line_error(cli("no-such-command"), "No such command")


def test_cli_unusable_home_is_one_line(tmp_path):
    afile = tmp_path / "file"
    afile.write_text("")
    assert_one_line_error(cli("pull", env={"EDGE_SLM_HOME": str(afile)}), "Not a directory")


def test_cli_unknown_backend_is_one_line(tiny_model, tmp_path):
    proc = cli("logits", "--ids", "1,2", "--npy", str(tmp_path / "o.npy"), "--model", str(tiny_model),
               env={"EDGE_SLM_BACKEND": "bogus"})
    assert_one_line_error(proc, "EDGE_SLM_BACKEND=bogus")
    proc = cli("complete", "hi", "--model", str(tiny_model), env={"EDGE_SLM_BACKEND": "bogus"})
    assert_one_line_error(proc, "bogus")


def test_cli_empty_and_undecodable_prompts(tiny_model):
    assert_one_line_error(cli("complete", "", "--model", str(tiny_model)), "the prompt is empty")
    undecodable = subprocess.run([*EDGE_SLM, "ask", b"caf\xe9", "--model", str(tiny_model)],
                                 capture_output=True, text=True, timeout=120)
    assert_one_line_error(undecodable, "not valid UTF-8 (byte 0xe9)")
    assert undecodable.stdout == ""
    tok = subprocess.run([*EDGE_SLM, "tokenize", b"caf\xe9", "--model", str(tiny_model)],
                         capture_output=True, text=True, timeout=120)
    assert_one_line_error(tok, "not valid UTF-8")


def test_cli_chat_survives_an_undecodable_line(tiny_model):
    """The bad line is reported and forgotten; the next question is answered."""
    proc = subprocess.run([*EDGE_SLM, "chat", "--model", str(tiny_model), "--max-tokens", "4"],
                          input=b"caf\xe9\nhello\n", capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr.decode()
    assert err.count("not valid UTF-8") == 1 and "Traceback" not in err
    assert proc.stdout.decode().count("> ") == 3  # asked twice, then the end of input


def test_metadata_read_lean_matches_gguf_py(real_model, tiny_model):
    from edge_slm.model import GGUFFile, MetadataArray

    for path in (tiny_model, real_model):
        stock = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items()
                 if not k.startswith("GGUF.")}
        lean = GGUFFile(path).metadata
        assert {k: v.read() if isinstance(v, MetadataArray) else v for k, v in lean.items()} == stock


@pytest.mark.parametrize("n_bytes", [100, 5_000, 1_000_000])  # in the keys, the vocabulary, the merges
def test_metadata_cut_short(real_model, tmp_path, n_bytes):
    p = tmp_path / "short.gguf"
    with open(real_model, "rb") as f:
        p.write_bytes(f.read(n_bytes))
    with pytest.raises(ModelError, match="short.gguf: not a readable GGUF file"):
        load_model(p)


def test_cli_info_takes_the_model_from_the_environment(tiny_model, tmp_path):
    proc = cli("info", env={"EDGE_SLM_HOME": str(tmp_path), "EDGE_SLM_MODEL": str(tiny_model)})
    assert proc.returncode == 0, proc.stderr
    assert str(tiny_model) in proc.stdout


def test_cli_info_budget_zero_is_refused(tiny_model):
    assert_one_line_error(cli("info", str(tiny_model), "--memory-budget", "0"), "more than zero")


def test_alignment_stored_as_an_array_is_refused(tiny_model, tmp_path):
    p = rewrite(tiny_model, tmp_path / "odd.gguf", {"general.alignment": ([32], ARRAY, U32)})
    with pytest.raises(ModelError, match="odd.gguf: not a readable GGUF file.*alignment"):
        load_model(p)



def test_duplicate_metadata_key_is_refused(tiny_model, tmp_path):
    p = rewrite(tiny_model, tmp_path / "dup.gguf", {"test.aaa": (["x"], ARRAY, STR),
                                                    "test.bbb": (["y"], ARRAY, STR)})
    p.write_bytes(p.read_bytes().replace(b"test.bbb", b"test.aaa"))
    with pytest.raises(ModelError, match="dup.gguf: not a readable GGUF file.*duplicate"):
        load_model(p)


def test_cli_nan_sampling_is_one_line(tiny_model):
    for option in ("--top-p", "--temperature", "--repeat-penalty"):
        proc = cli("complete", "hi", "--model", str(tiny_model), option, "nan")
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "finite" in proc.stderr
