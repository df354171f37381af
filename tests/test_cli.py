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


def edge_slm(*args: str, timeout: float = 300, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
             env: dict[str, str] | None = None, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run the CLI; `prefix` runs it under another command (e.g. a shell that closes a stream)."""
    return subprocess.run([*prefix, sys.executable, "-m", "edge_slm", *args], stdin=stdin,
                          stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout,
                          env={**os.environ, "EDGE_SLM_THREADS": "2", **(env or {})})


def assert_one_line(proc: subprocess.CompletedProcess, code: int, *needles: str) -> None:
    """Exit `code` with exactly one line on stderr, holding every needle, and no traceback."""
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("\n"), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, proc.stderr


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


def model_commands(model, tmp_path) -> dict[str, list[str]]:
    """A run of every command that writes to stdout, on the tiny model."""
    m = ["--model", str(model)]
    return {
        "info": ["info", str(model)],
        "tokenize": ["tokenize", "hello", *m],
        "ask": ["ask", "hello", "--max-tokens", "4", *m],
        "complete": ["complete", "hello", "--max-tokens", "4", "--ignore-eos", *m],
        "logits": ["logits", "--ids", "1,2", "--npy", str(tmp_path / "l.npy"), *m],
        "help": ["--help"],
    }


STDOUT_COMMANDS = ["info", "tokenize", "ask", "complete", "logits", "help"]


@pytest.mark.parametrize("command", STDOUT_COMMANDS)
def test_stdout_on_a_full_device_is_one_line(command, tiny_model, tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    with open("/dev/full", "w") as full:
        proc = edge_slm(*model_commands(tiny_model, tmp_path)[command], stdout=full, timeout=60)
    assert_one_line(proc, 1, "standard output", "No space left on device")


@pytest.mark.parametrize("command", STDOUT_COMMANDS)
def test_a_reader_that_has_gone_is_a_quiet_exit(command, tiny_model, tmp_path):
    """`edge-slm info | head -c1`, with head gone before the first write: no
    message, and the status a shell shows for a tool stopped by SIGPIPE."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = edge_slm(*model_commands(tiny_model, tmp_path)[command], stdout=write_end, timeout=60)
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")


def test_stdout_closed_is_one_line(tiny_model):
    proc = edge_slm("info", str(tiny_model), stdout=None, timeout=60,
                    prefix=("sh", "-c", 'exec "$@" >&-', "sh"))
    assert_one_line(proc, 1, "standard output is closed")


def test_chat_with_stdin_closed_is_one_line(tiny_model):
    proc = edge_slm("chat", "--model", str(tiny_model), stdin=None, timeout=60,
                    prefix=("sh", "-c", 'exec "$@" <&-', "sh"))
    assert_one_line(proc, 1, "standard input is closed")


def test_chat_refuses_a_line_that_is_not_utf8_and_goes_on(tiny_model, tmp_path):
    """Even where the locale decodes strictly, as on many boards."""
    questions = tmp_path / "questions"
    questions.write_bytes(b"caf\xe9?\nhello\n")
    with open(questions, "rb") as stdin:
        proc = edge_slm("chat", "--model", str(tiny_model), "--max-tokens", "3", stdin=stdin,
                        timeout=60, env={"PYTHONIOENCODING": "utf-8:strict"})
    assert_one_line(proc, 0, "not valid UTF-8")
    assert proc.stdout.count("> ") == 3  # both questions read, then the end of input


@pytest.mark.parametrize("args, option", [
    (["info", "--slots", "100000"], "--slots"),
    (["info", "--ctx", "4294967296"], "--ctx"),
    (["info", "--memory-budget", "xyz"], "--memory-budget"),
    (["info", "--memory-budget", "0"], "--memory-budget"),
    (["ask", "hi", "--memory-budget", "1.5.5"], "--memory-budget"),
    (["chat", "--memory-budget", "-1"], "--memory-budget"),
    (["ask", "hi", "--stop", "x" * 257], "--stop"),
    (["complete", "hi", *["--stop", "x"] * 17], "--stop"),
])
def test_bad_option_values_exit_2_like_every_usage_error(args, option, tiny_model):
    proc = edge_slm(*args, "--model", str(tiny_model), timeout=60)
    assert_one_line(proc, 2, f"Invalid value for '{option}'")


@pytest.mark.parametrize("args, code, message", [
    (["ask", "hi", "--temperature", "1e-310"], 2, "temperature must be 0 (greedy) or from 0.001 to 100"),
    (["chat", "--repeat-penalty", "1e-300"], 2, "repeat_penalty must be from 0.01 to 100"),
    (["ask", ""], 1, "the prompt is empty"),
    (["ask", " \t "], 1, "the prompt is empty"),
    (["complete", "   "], 1, "the prompt is empty"),
])
def test_subnormal_sampling_values_and_blank_questions_are_one_line(args, code, message, tiny_model):
    """A temperature of 1e-310 made the sampler's probabilities NaN; a blank question was answered."""
    proc = edge_slm(*args, "--model", str(tiny_model), timeout=60)
    assert_one_line(proc, code, message)
    assert proc.stdout == ""
