"""The CLI end to end on the real model: what a user types, what they see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).parent / "fixtures"


def edge_slm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_slm", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "EDGE_SLM_THREADS": "2"})


def test_ask_streams_the_answer_llama_cpp_gives(real_model):
    """`ask` renders the chat template with the default system prompt, as the
    fixture's chat prompts were; greedy, it must say what llama.cpp said up to
    llama.cpp's first near-tie."""
    from edge_slm.model import GGUFFile
    from edge_slm.tokenizer import Tokenizer

    meta = json.loads((FIXTURES / "parity.json").read_text())
    a = np.load(FIXTURES / "parity.npz")

    def decisive_run(k: int) -> int:
        margins = a["margin"][a["position_offsets"][k] + meta["prompts"][k]["n_prompt"] - 1:]
        return int(np.argmax(margins < 1.0)) if (margins < 1.0).any() else len(margins)

    chats = [k for k, p in enumerate(meta["prompts"])
             if p["kind"] == "chat" and len(p["messages"]) == 1]
    i = max(chats, key=decisive_run)
    n = decisive_run(i)
    assert n >= 4, "the fixture should be decisive for a few tokens"
    question = meta["prompts"][i]["messages"][-1]["content"]
    expected = Tokenizer.from_gguf(GGUFFile(real_model)).decode(a["generated_ids"][i][:n].tolist())
    proc = edge_slm("ask", question, "--max-tokens", "24", "--temperature", "0", "--repeat-penalty",
                    "1", "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(expected), (proc.stdout, expected)


def test_complete_json_is_greedy_and_matches_llama_cpp(real_model):
    meta = json.loads((FIXTURES / "parity.json").read_text())
    a = np.load(FIXTURES / "parity.npz")
    i = next(k for k, p in enumerate(meta["prompts"]) if p["kind"] == "raw")
    p = meta["prompts"][i]
    proc = edge_slm("complete", "--json", p["text"], "--max-tokens", "8", "--ignore-eos",
                    "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    po = a["prompt_offsets"]
    assert out["prompt_tokens"] == a["prompt_ids"][po[i]:po[i + 1]].tolist()
    margins = a["margin"][a["position_offsets"][i] + len(out["prompt_tokens"]) - 1:][:8]
    n = int(np.argmax(margins < 1.0)) if (margins < 1.0).any() else 8
    assert out["tokens"][:n] == a["generated_ids"][i][:n].tolist()
    assert isinstance(out["text"], str) and out["text"]


def test_tokenize_json(real_model):
    cases = json.loads((FIXTURES / "tokenize.json").read_text())
    case = next(c for c in cases["cases"] if "<|im_start|>" in c["text"]) if isinstance(cases, dict) \
        else None
    text = case["text"] if case else "<|im_start|>user\nHello, world!<|im_end|>"
    proc = edge_slm("tokenize", "--json", text)
    assert proc.returncode == 0, proc.stderr
    ids = json.loads(proc.stdout)
    if case:
        assert ids == case["ids"]
    assert ids[0] == 1  # <|im_start|> is one special token, and no BOS is added


def test_logits_npy_matches_fixture(real_model, tmp_path):
    a = np.load(FIXTURES / "parity.npz")
    ids = a["prompt_ids"][a["prompt_offsets"][6]:a["prompt_offsets"][7]].tolist()
    out = tmp_path / "logits.npy"
    proc = edge_slm("logits", "--ids", ",".join(map(str, ids)), "--npy", str(out), "--threads", "2")
    assert proc.returncode == 0, proc.stderr
    logits = np.load(out)
    assert logits.shape == (len(ids), 49152) and logits.dtype == np.float32
    rows = slice(a["position_offsets"][6], a["position_offsets"][6] + len(ids))
    decisive = a["margin"][rows] >= 1.0
    assert (logits.argmax(1) == a["top_ids"][rows, 0])[decisive].all()


def test_info_real_model(real_model):
    proc = edge_slm("info", "--memory-budget", "256M")
    assert proc.returncode == 0, proc.stderr
    assert "210 x Q4_1" in proc.stdout and "plan" in proc.stdout


def test_info_budget_too_small_is_one_line(real_model):
    proc = edge_slm("info", "--memory-budget", "100M")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "too small" in proc.stderr


def test_chat_keeps_history(real_model):
    proc = subprocess.run([sys.executable, "-m", "edge_slm", "chat", "--max-tokens", "16",
                           "--temperature", "0", "--threads", "2"],
                          input="My name is Ada.\nWhat is my name?\n\n", capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    answers = proc.stdout.split("> ")[1:]
    # the first answer does not use the name; the second can only know it
    # from the history
    assert len(answers) == 3 and "Ada" not in answers[0] and "Ada" in answers[1]


@pytest.mark.parametrize("command", ["ask", "complete", "chat", "tokenize", "logits", "info",
                                     "bench", "soak"])
def test_every_model_command_takes_model_and_threads(command):
    """Operators script the same flags across commands."""
    from click.testing import CliRunner

    from edge_slm.cli import main

    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0
    assert "--model" in result.output and "--threads" in result.output
