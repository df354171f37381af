"""Record what llama.cpp (through llama-cpp-python) does with the reference
model, so our tokenizer and forward pass can be checked against it offline.

Run with an environment that has llama-cpp-python, e.g.

    .venv/bin/python scripts/make_parity_fixtures.py   # after `make bench` installed it

It writes, under tests/fixtures/:
  tokenize.json  llama.cpp's token ids for several hundred varied strings
  parity.npz     llama.cpp's logits along its own greedy continuation of a
                 set of prompts (top-8 per position plus a fixed random
                 subset of the vocabulary), and the tokens it chose
  parity.json    what was run: model digest, llama-cpp-python version,
                 threads, context, the prompts, the npz layout
  parity_kv_q8_0.json  llama.cpp's greedy continuations of the same prompts
                 with its KV cache in q8_0 (ids and top-2 margins), for our
                 8-bit cache to be compared with

The tests never import llama_cpp; they read these files."""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from edge_slm.chat_template import render_chat  # noqa: E402
from edge_slm.paths import default_model_path  # noqa: E402
from edge_slm.pull import sha256_file  # noqa: E402

log = logging.getLogger("make_parity_fixtures")

N_CTX = 2048
N_THREADS = 2
N_STEPS = 64          # greedy tokens generated per prompt, EOS or not
TOP_K = 8             # logits kept per position, highest first
# Vocabulary ids whose logits are kept at every position, in float16: enough
# to estimate each row's correlation with ours to about 2e-4 (for r ~ 0.997,
# the standard error is (1 - r^2) / sqrt(n)) while keeping the fixture small.
SUBSET_SIZE = 256
SUBSET_SEED = 1234
STRINGS_SEED = 20240611
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>",
            "<filename>", "<gh_stars>", "<issue_start>", "<jupyter_code>", "<empty_output>"]


# ---------------------------------------------------------------- strings

HAND_WRITTEN = [
    "", " ", "  ", "\t", "\n", "\r\n", "a", "A", "0", "9", ".", "'", '"', "é", "ß", "中", "🙂",
    "Hello world", "Hello, world!", "hello  world", " leading space", "trailing space ",
    "Hello\nworld", "Hello\n\nworld", "line one\r\nline two", "tab\tseparated\tvalues",
    "   three leading spaces", "\n\n\n", "\t\t\tindented", " \t \n mixed \n\t whitespace ",
    "multiple     spaces     between", "end with newline\n", "\n starts with newline",
    # contractions: the pre-tokenizer regex treats 's 't 're 've 'm 'll 'd specially
    "I'm sure you'll see it's what we'd've done", "DON'T SHOUT", "they're here, aren't they?",
    "rock 'n' roll", "O'Brien's", "'quoted'",
    # numbers
    "12345", "1234567890123456789012345678901234567890", "3.14159265358979",
    "-0.000001", "1e-10", "6.022e23", "1,234,567.89", "$1,299.99", "100%", "0x1F",
    "0b101010", "2024-06-11", "12:34:56", "+1 (555) 123-4567", "v1.2.3-rc.4", "3/4 cup",
    "IPv4 192.168.100.254", "Room 101B", "Q4_1", "x²+y²=z²", "½ ¾ ⅓", "٣٤٥ ٦٧٨",
    "१२३४", "一二三", "Ⅻ Ⅳ",
    # punctuation runs
    "!!!", "???", "...", "…", "?!?!", "---", "===", "***", "#####", "~~~~~", "<<>>", "((()))",
    "[[{{}}]]", "!@#$%^&*()_+-=[]{}|;':\",./<>?", "—–-", "«»‹›„“”‘’", "¡Hola! ¿Qué tal?",
    "....!!!!????", "-->", "=>", "::", "&&||", "/* */", "// comment",
    # code
    "def main():\n    print(\"hello\")\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i];\n}",
    "fn main() {\n    let v: Vec<u32> = (0..10).collect();\n}",
    "SELECT id, name FROM users WHERE age >= 18 ORDER BY name;",
    "const add = (a, b) => a + b;\nexport default add;",
    "#include <stdio.h>\nint main(void) { return 0; }",
    "if err != nil {\n\treturn fmt.Errorf(\"open: %w\", err)\n}",
    "<div class=\"card\"><p>Hi</p></div>",
    "#!/bin/bash\nset -euo pipefail\necho \"$HOME\"",
    "    return self._cache[key]  # why: avoid recomputation",
    "public static void main(String[] args) {}",
    "x = [i**2 for i in range(10) if i % 2 == 0]",
    "lambda x: x if x > 0 else -x", "@decorator\nclass Foo(Bar):\n    pass",
    "GPIO.output(LED_PIN, GPIO.HIGH)", "MOV R0, #0x20\nLDR R1, [R0]",
    "%YAML 1.2\n---\nkey: value\nlist:\n  - a\n  - b",
    # JSON, URLs, markdown
    '{"name": "edge-slm", "version": 1, "tags": ["a", "b"], "ok": true, "x": null}',
    '[{"id":1},{"id":2}]', '{"nested": {"deep": {"deeper": [1, 2.5, -3e4]}}}',
    "https://example.com/path/to/page?query=1&other=two#section",
    "http://localhost:8080/api/v1/status", "mailto:someone@example.org",
    "ftp://files.example.net/pub/file.tar.gz", "user@host:~/src$ make -j2",
    "# Title\n\n## Subtitle\n\n- item one\n- item two\n\n**bold** and _italic_ and `code`",
    "| col1 | col2 |\n|------|------|\n| a | b |", "> quoted line\n> another",
    "```python\nprint(1)\n```", "1. first\n2. second\n3. third", "[link](https://x.y/z)",
    "![image](img.png)",
    # long words
    "Donaudampfschifffahrtsgesellschaftskapitän", "pneumonoultramicroscopicsilicovolcanoconiosis",
    "supercalifragilisticexpialidocious" * 3, "a" * 100, "ab" * 64, "z" * 257,
    "internationalization-localization_globalization.configuration",
    "ThisIsAVeryLongCamelCaseIdentifierThatKeepsGoingAndGoing",
    "snake_case_identifier_with_many_parts_in_it_for_testing",
    # scripts
    "日本語のテキストです。", "中文测试：你好，世界！", "한국어 문장입니다.", "Привет, мир!",
    "Ελληνικά γράμματα: αβγδε", "مرحبا بالعالم", "שלום עולם", "नमस्ते दुनिया",
    "สวัสดีชาวโลก", "Tiếng Việt có dấu", "Zażółć gęślą jaźń", "Ærøskøbing Ångström",
    "naïve café résumé façade", "e\u0301 composed vs é precomposed", "ﬁ ligature ﬀ",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ", "ქართული ენა", "Հայերեն", "ᚠᚢᚦᚨᚱᚲ", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝕸𝖆𝖙𝖍",
    "ᐃᓄᒃᑎᑐᑦ", "አማርኛ", "தமிழ்", "বাংলা", "ગુજરાતી", "ಕನ್ನಡ", "മലയാളം", "සිංහල",
    "မြန်မာ", "ລາວ", "ខ្មែរ", "བོད་ཡིག", "Монгол", "עִבְרִית עם ניקוד", "اَلْعَرَبِيَّةُ",
    # emoji
    "🙂🙃😀", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇫🇷🇯🇵🇺🇸", "❤️", "✔️ done", "1️⃣ 2️⃣",
    "🧑🏿‍🔧 fixing the 🔧", "emoji at end 🎉", "🎉 emoji at start", "mixed🙂text🙃here",
    "⚠️ WARNING: high voltage ⚡", "🚗💨", "©®™", "☃︎ ☃️",
    # chat markup and special tokens
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more", "<|im_start|><|im_end|>", "<|im_start|> spaced <|im_end|>",
    "<|im_start", "im_end|>", "<|unknown_special|>", "< |im_start| >", "<<|im_start|>>",
    "<repo_name>edge-slm<file_sep>main.py", "<filename>README.md", "<jupyter_code>x=1",
    "<gh_stars>100", "<issue_start>bug<issue_comment>fixed<issue_closed>",
    "<|endoftext|><|endoftext|>", "</s>", "<s>", "[INST]", "<unk>",
    # repair and maintenance text, the domain the product serves
    "Check the V-belt tension: deflection should be 10-15 mm at 100 N.",
    "Torque the M8 bolts to 25 N·m in a star pattern.",
    "Error E-042: motor over-temperature (>85 °C). Reset after cooling.",
    "Replace the HEPA filter every 500 h or when ΔP > 250 Pa.",
    "Hydraulic oil ISO VG 46; capacity 12.5 L; change every 2,000 hours.",
    "PLC fault at I/O module 3, channel 7 — check 24 VDC supply.",
    "Measure insulation resistance: ≥ 1 MΩ at 500 V DC.",
]

WORDS = ["pump", "valve", "sensor", "the", "and", "bearing", "compressor", "voltage",
         "Café", "über", "naïve", "日本", "данные", "δεδομένα", "بيانات", "डेटा", "ข้อมูล",
         "print", "self", "return", "None", "true", "ERROR", "ok", "x", "I", "you'll"]
EMOJI = ["🙂", "👍🏽", "👩‍💻", "🇩🇪", "🔧", "⚙️", "🔥", "💡", "🧑‍🚀", "🏴‍☠️"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["…", "—", "«", "»", "¿", "¡", "·"]
SEPARATORS = [" ", "  ", "\t", "\n", "\n\n", " \n", "\r\n", "", ", ", "-", "_", "/"]
# (start, end) code point ranges to draw random characters from
SCRIPT_RANGES = [
    (0x0041, 0x007A), (0x00C0, 0x00FF), (0x0391, 0x03C9), (0x0410, 0x044F),
    (0x05D0, 0x05EA), (0x0621, 0x064A), (0x0905, 0x0939), (0x0E01, 0x0E30),
    (0x3041, 0x3096), (0x4E00, 0x4FFF), (0xAC00, 0xAD00), (0x1F600, 0x1F64F),
    (0x2200, 0x22FF), (0x2190, 0x21FF),
]


def number_string(rng: random.Random) -> str:
    kind = rng.randrange(5)
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
    if kind == 0:
        return digits
    if kind == 1:
        return f"{digits}.{rng.randint(0, 10 ** rng.randint(1, 8))}"
    if kind == 2:
        return f"-{rng.uniform(0, 1e6):.{rng.randint(0, 6)}f}"
    if kind == 3:
        return f"{rng.uniform(1, 10):.3f}e{rng.randint(-30, 30)}"
    return f"{rng.randint(0, 10**9):,}"


def whitespace_string(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(2, 5)):
        parts.append(rng.choice(WORDS))
        parts.append("".join(rng.choice([" ", "\t", "\n", "\r\n"])
                             for _ in range(rng.randint(1, 6))))
    return "".join(parts[:-1] if rng.random() < 0.5 else parts)


def mixed_string(rng: random.Random) -> str:
    pools = [WORDS, EMOJI, PUNCT, [number_string(rng)]]
    n = rng.randint(2, 6)
    pieces = [rng.choice(rng.choice(pools)) for _ in range(n)]
    return "".join(p + rng.choice(SEPARATORS) for p in pieces).rstrip(" ")


def script_string(rng: random.Random) -> str:
    lo, hi = rng.choice(SCRIPT_RANGES)
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12)))


def punctuation_string(rng: random.Random) -> str:
    return "".join(rng.choice(PUNCT) for _ in range(rng.randint(1, 16)))


def chat_string(rng: random.Random) -> str:
    parts = [rng.choice(SPECIALS)]
    for _ in range(rng.randint(1, 3)):
        parts.append(rng.choice(["user\n", "assistant\n", " ", "\n", "system"]) + rng.choice(WORDS))
        parts.append(rng.choice(SPECIALS))
    return "".join(parts)


GENERATORS = [number_string, whitespace_string, mixed_string, script_string,
              punctuation_string, chat_string]


def fixture_strings(n_generated: int = 30) -> list[str]:
    """The hand-written list, then n_generated strings from each generator.
    Deterministic: the same list on every run and machine."""
    rng = random.Random(STRINGS_SEED)
    generated = [gen(rng) for gen in GENERATORS for _ in range(n_generated)]
    return list(dict.fromkeys(HAND_WRITTEN + generated))  # drops repeats, keeps order


# ---------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Prompt:
    name: str
    kind: str                      # "chat" (rendered with the model's template) or "raw"
    text: str
    messages: tuple[dict, ...] = ()  # what a chat prompt was rendered from


CHATS = {
    "chat_capital": [{"role": "user", "content": "What is the capital of France?"}],
    "chat_battery": [{"role": "user", "content": "How do I check whether a 12 V lead-acid "
                                                 "battery is still good?"}],
    "chat_pump_noise": [{"role": "user", "content": "The hydraulic pump on our press makes a "
                                                    "whining noise. What could cause it?"}],
    "chat_vfd_system": [
        {"role": "system", "content": "You are a maintenance assistant for technicians who "
                                      "service industrial equipment. Answer briefly."},
        {"role": "user", "content": "What does an overcurrent fault on a variable frequency "
                                    "drive usually mean?"}],
    "chat_two_turns": [
        {"role": "user", "content": "What is 12 times 7?"},
        {"role": "assistant", "content": "12 times 7 is 84."},
        {"role": "user", "content": "And divided by 4?"}],
    "chat_explain": [{"role": "user", "content": "Explain in two sentences why bearings "
                                                 "need lubrication."}],
}

RAW = {
    "raw_story": "Once upon a time, in a small village by the sea, there lived",
    "raw_code_python": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "raw_code_c": "#include <stdio.h>\n\nint main(void) {\n",
    "raw_list": "Steps to replace the air filter in a car:\n1.",
    "raw_fact": "The boiling point of water at sea level is",
    "raw_arithmetic": "Q: What is 17 + 25?\nA:",
    "raw_repair": "To bleed air from a hydraulic brake line, first",
    "raw_checklist": "Troubleshooting checklist for a conveyor belt that keeps slipping:\n-",
}


def parity_prompts(chat_template: str | None) -> list[Prompt]:
    chats = [Prompt(name, "chat", render_chat(chat_template, messages), tuple(messages))
             for name, messages in CHATS.items()]
    return chats + [Prompt(name, "raw", text) for name, text in RAW.items()]


# ---------------------------------------------------------------- llama.cpp runs

def tokenize(llm, text: str, special: bool = True) -> list[int]:
    return [int(t) for t in llm.tokenize(text.encode("utf-8"), add_bos=False, special=special)]


def tokenize_cases(llm, strings: list[str]) -> list[dict]:
    cases = []
    for s in strings:
        case = {"text": s, "ids": tokenize(llm, s)}
        # Also record special=False where it matters: markup must then be plain text.
        if any(sp in s for sp in SPECIALS):
            case["ids_no_special"] = tokenize(llm, s, special=False)
        cases.append(case)
    return cases


@dataclass
class Trace:
    generated: list[int]           # N_STEPS greedy tokens
    logits: np.ndarray             # float32 [len(prompt) + N_STEPS, vocab]: row i predicts token i+1


def greedy_trace(llm, prompt_ids: list[int]) -> Trace:
    """Prompt in one batch, then N_STEPS one-token decodes, each choosing the
    argmax of the row llama.cpp just produced: the logits recorded are the
    ones its own greedy continuation used."""
    llm.reset()
    llm.eval(prompt_ids)
    generated: list[int] = []
    for _ in range(N_STEPS):
        row = llm.scores[llm.n_tokens - 1]
        tok = int(np.argmax(row))
        generated.append(tok)
        llm.eval([tok])
    return Trace(generated, np.array(llm.scores[: llm.n_tokens], dtype=np.float32))


def top_k(rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids and logits of the k largest entries of each row, largest first."""
    part = np.argpartition(-rows, k, axis=1)[:, :k]
    vals = np.take_along_axis(rows, part, axis=1)
    order = np.argsort(-vals, axis=1, kind="stable")
    return (np.take_along_axis(part, order, axis=1).astype(np.int32),
            np.take_along_axis(vals, order, axis=1).astype(np.float32))


def build_parity(llm, prompts: list[Prompt], vocab: int) -> tuple[dict[str, np.ndarray], list[dict]]:
    subset = np.sort(np.random.default_rng(SUBSET_SEED).choice(vocab, SUBSET_SIZE, replace=False))
    prompt_ids, generated, top_ids, top_logits, subset_logits, batched = [], [], [], [], [], []
    meta = []
    for p in prompts:
        ids = tokenize(llm, p.text)
        trace = greedy_trace(llm, ids)
        ti, tl = top_k(trace.logits, TOP_K)
        prompt_ids.append(np.array(ids, dtype=np.int32))
        generated.append(trace.generated)
        top_ids.append(ti)
        top_logits.append(tl)
        subset_logits.append(trace.logits[:, subset])
        batched.append(np.arange(len(trace.logits)) < len(ids))
        meta.append({"name": p.name, "kind": p.kind, "text": p.text, "messages": list(p.messages),
                     "n_prompt": len(ids),
                     "continuation": llm.detokenize(trace.generated).decode("utf-8", "replace")})
        log.info("%s: %d prompt tokens", p.name, len(ids))
    tl_all = np.concatenate(top_logits)
    arrays = {
        "prompt_ids": np.concatenate(prompt_ids),
        "prompt_offsets": np.cumsum([0] + [len(x) for x in prompt_ids]).astype(np.int64),
        "generated_ids": np.array(generated, dtype=np.int32),
        "position_offsets": np.cumsum([0] + [len(x) for x in top_ids]).astype(np.int64),
        "top_ids": np.concatenate(top_ids),
        "top_logits": tl_all.astype(np.float16),
        "margin": (tl_all[:, 0] - tl_all[:, 1]).astype(np.float32),
        "batched": np.concatenate(batched),
        "subset_ids": subset.astype(np.int32),
        "subset_logits": np.concatenate(subset_logits).astype(np.float16),
    }
    return arrays, meta


NPZ_LAYOUT = {
    "prompt_ids": "int32, the prompts' ids concatenated; prompt p is "
                  "prompt_ids[prompt_offsets[p]:prompt_offsets[p+1]]",
    "generated_ids": f"int32 [prompts, {N_STEPS}], llama.cpp's greedy tokens (EOS included, never stopped)",
    "position_offsets": "int64, rows of prompt p are [position_offsets[p], position_offsets[p+1]); "
                        "row j of a prompt holds the logits after its sequence (prompt + generated) "
                        "token j, i.e. predicting token j+1",
    "top_ids": f"int32 [rows, {TOP_K}], highest logit first",
    "top_logits": f"float16 [rows, {TOP_K}]",
    "margin": "float32 [rows], top-1 minus top-2 logit",
    "batched": "bool [rows], True where llama.cpp computed the row in the prompt batch, "
               "False for one-token decodes",
    "subset_ids": f"int32 [{SUBSET_SIZE}], sorted vocabulary ids (seed {SUBSET_SEED})",
    "subset_logits": f"float16 [rows, {SUBSET_SIZE}], logits at subset_ids",
}


def summarize(arrays: dict[str, np.ndarray], meta: list[dict]) -> dict:
    margin = arrays["margin"]
    stats = {
        "positions": int(margin.size),
        "margin_ge_1": int((margin >= 1.0).sum()),
        "margin_ge_0.5": int((margin >= 0.5).sum()),
        "margin_lt_0.1": int((margin < 0.1).sum()),
        "margin_median": float(np.median(margin)),
    }
    print(f"{len(meta)} prompts, {stats['positions']} positions with logits")
    print(f"margin >= 1.0: {stats['margin_ge_1']}  >= 0.5: {stats['margin_ge_0.5']}  "
          f"< 0.1: {stats['margin_lt_0.1']}  median {stats['margin_median']:.3f}")
    for m in meta:
        print(f"  {m['name']:<18} {m['n_prompt']:>3} prompt tokens -> {m['continuation'][:70]!r}")
    return stats


def kv_q8_0_traces(model: Path, prompts: list[Prompt], tokenize_llm) -> list[dict]:
    """The same greedy runs with llama.cpp's K and V cache in q8_0 (it needs
    flash attention for a quantized V cache)."""
    import llama_cpp

    q8 = llama_cpp.Llama(str(model), n_ctx=N_CTX, n_threads=N_THREADS, logits_all=True,
                         verbose=False, seed=0, flash_attn=True,
                         type_k=llama_cpp.GGML_TYPE_Q8_0, type_v=llama_cpp.GGML_TYPE_Q8_0)
    out = []
    for p in prompts:
        ids = tokenize(tokenize_llm, p.text)
        trace = greedy_trace(q8, ids)
        rows = trace.logits[len(ids) - 1:len(ids) - 1 + N_STEPS]
        top2 = np.sort(rows, axis=1)[:, -2:]
        out.append({"name": p.name, "prompt_ids": ids, "generated": trace.generated,
                    "margin": [round(float(x), 4) for x in top2[:, 1] - top2[:, 0]]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--out", type=Path, default=REPO / "tests" / "fixtures")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import llama_cpp

    llm = llama_cpp.Llama(str(args.model), n_ctx=N_CTX, n_threads=N_THREADS, logits_all=True,
                          verbose=False, seed=0)
    common = {"model": args.model.name, "model_sha256": sha256_file(args.model),
              "llama_cpp_python": llama_cpp.__version__}
    args.out.mkdir(parents=True, exist_ok=True)

    strings = fixture_strings()
    tok_doc = {**common, "call": "llm.tokenize(text.encode(), add_bos=False, special=True)",
               "cases": tokenize_cases(llm, strings)}
    (args.out / "tokenize.json").write_text(json.dumps(tok_doc, ensure_ascii=False, indent=1) + "\n",
                                            encoding="utf-8")
    print(f"tokenize.json: {len(strings)} strings")

    prompts = parity_prompts(llm.metadata.get("tokenizer.chat_template"))
    arrays, meta = build_parity(llm, prompts, llm.n_vocab())
    np.savez_compressed(args.out / "parity.npz", **arrays)
    doc = {**common, "n_threads": N_THREADS, "n_ctx": N_CTX, "n_batch": llm.n_batch,
           "n_steps": N_STEPS, "top_k": TOP_K, "subset_seed": SUBSET_SEED,
           "layout": NPZ_LAYOUT, "prompts": meta, "summary": summarize(arrays, meta)}
    (args.out / "parity.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n",
                                          encoding="utf-8")
    size = (args.out / "parity.npz").stat().st_size
    print(f"parity.npz: {size / 1e6:.1f} MB")

    kv_doc = {**common, "n_threads": N_THREADS, "n_ctx": N_CTX, "cache_type": "q8_0",
              "flash_attn": True, "n_steps": N_STEPS,
              "prompts": kv_q8_0_traces(args.model, prompts, llm)}
    (args.out / "parity_kv_q8_0.json").write_text(json.dumps(kv_doc, indent=1) + "\n",
                                                  encoding="utf-8")
    print("parity_kv_q8_0.json written")


if __name__ == "__main__":
    main()
