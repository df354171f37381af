"""Text to token ids and back, built from a GGUF file's own vocabulary.

Two vocabulary kinds are supported, as llama.cpp names them in
`tokenizer.ggml.model`:

  gpt2   byte-level BPE, run by Hugging Face `tokenizers`, with the
         pre-tokenizer regexes llama.cpp uses for the file's
         `tokenizer.ggml.pre`.
  llama  SentencePiece BPE, run by `sentencepiece` from a model proto built
         out of the tokens, scores and token types.

Both aim at llama.cpp's ids for `tokenize(text, add_bos=False, special=True)`.
Decoding goes through one table of bytes per token (what llama.cpp's
`token_to_piece` gives), so whole-sequence decoding and streaming share the
same code and streaming never splits a multi-byte character."""

from __future__ import annotations

import codecs
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol

from gguf import Keys, TokenType

from .chat_template import ConversationRejected, render_chat
from .errors import BadText, ModelError, UnsupportedModel
from .formats import MetaKind, metadata_value

K = Keys.Tokenizer

# Token texts llama.cpp treats as ending a generation whatever the metadata
# says (llama-vocab.cpp, "special_eog_ids").
EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>",
    "<|endoftext|>", "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
})

# Token types whose text becomes the token itself when special=True (and
# stays text otherwise), as in llama.cpp's cache_special_tokens.
PARSED_WHEN_SPECIAL = frozenset({TokenType.CONTROL, TokenType.UNKNOWN})
# How a BYTE token's text spells its byte.
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
# llama.cpp shows an unknown token as this block character.
UNKNOWN_PIECE = "\u2585".encode()
# A long text is measured in spans of about this many characters, so that
# one of megabytes is found too long without being tokenized whole (the
# tokenizer's memory grows with the tokens it makes).
SPAN_CHARS = 4096
# Tokens beyond those kept, tokenized at each end of a truncated text, so
# that where the cut falls does not change the ids kept (a run of
# whitespace longer than a span, cut through, may still tokenize otherwise).
END_MARGIN = 16


# ---------------------------------------------------------------- pre-tokenizers

GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_REGEX = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
                r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_REGEX = LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")


@dataclass(frozen=True)
class PreTokenizer:
    """How llama.cpp splits text into words before BPE, for one `tokenizer.ggml.pre`."""

    splits: tuple[str, ...]       # regexes applied in turn; matches and gaps both become words
    ignore_merges: bool = False   # a word that is itself a token is not merged further
    add_bos: bool = False         # llama.cpp's default when the file does not say


_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", GPT2_REGEX))
_GPT2 = PreTokenizer((GPT2_REGEX,))
_LLAMA3 = PreTokenizer((LLAMA3_REGEX,), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer((QWEN2_REGEX,))

# The same groups as llama.cpp's llm_tokenizer_bpe; names it maps to a type we
# do not list here are refused rather than tokenized subtly wrong.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    "default": PreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", GPT2_REGEX, r"\p{N}+", r"[0-9][0-9][0-9]")),
    **dict.fromkeys(["smollm", "starcoder", "refact", "command-r", "codeshell", "exaone",
                     "minerva-7b"], _DIGITS_THEN_GPT2),
    **dict.fromkeys(["gpt-2", "phi-2", "mpt", "olmo", "jais"], _GPT2),
    **dict.fromkeys(["llama3", "llama-v3", "llama-bpe", "falcon3", "dbrx", "smaug-bpe"], _LLAMA3),
    **dict.fromkeys(["qwen2", "stablelm2", "deepseek-r1-qwen"], _QWEN2),
}


# ---------------------------------------------------------------- metadata

@dataclass
class Vocab:
    """The `tokenizer.*` metadata of a GGUF file, checked."""

    model: str                    # tokenizer.ggml.model: "gpt2" or "llama"
    tokens: list[str]
    types: list[int]              # gguf.TokenType per token
    scores: list[float] | None
    merges: list[str] | None
    pre: str
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    eog_ids: frozenset[int]
    add_bos: bool | None          # None: the file does not say
    add_space_prefix: bool
    chat_template: str | None
    source: str = "model"         # names the file in error messages


def _token_id(meta: Mapping[str, Any], key: str, n_vocab: int, source: str) -> int | None:
    value = metadata_value(meta, key, MetaKind.INT, source)
    if value is None:
        return None
    if not 0 <= value < n_vocab:
        raise ModelError(f"{source}: {key} = {value} is outside the vocabulary (0..{n_vocab - 1})")
    return value


def _eog_ids(meta: Mapping[str, Any], tokens: list[str], source: str) -> frozenset[int]:
    ids = {_token_id(meta, k, len(tokens), source) for k in (K.EOS_ID, K.EOT_ID, K.EOM_ID)}
    ids.update(i for i, t in enumerate(tokens) if t in EOG_TEXTS)
    ids.discard(None)
    return frozenset(ids)


def parse_vocab(meta: Mapping[str, Any], source: str = "model") -> Vocab:
    """Check and collect the tokenizer metadata (keys as gguf-py names them).

    Each value must be of the kind llama.cpp reads it as; arrays' lengths are
    checked before their items are built (a GGUFFile leaves them in the map)."""
    def get(key: str, kind: MetaKind, **kw: Any) -> Any:
        return metadata_value(meta, key, kind, source, **kw)

    model = get(K.MODEL, MetaKind.TEXT)
    if model is None:
        raise ModelError(f"{source}: {K.MODEL} is missing")
    if model not in ("gpt2", "llama"):
        raise UnsupportedModel(f"{source}: tokenizer model {model!r} is not supported "
                               f"(supported: gpt2, llama)")
    tokens = get(K.LIST, MetaKind.TEXTS)
    if not tokens:
        raise ModelError(f"{source}: {K.LIST} is missing or empty")
    n = len(tokens)
    types = get(K.TOKEN_TYPE, MetaKind.INTS)
    scores = get(K.SCORES, MetaKind.NUMBERS)
    for key, values in ((K.TOKEN_TYPE, types), (K.SCORES, scores)):
        if values is not None and len(values) != n:
            raise ModelError(f"{source}: {key} has {len(values)} entries for {n} tokens")
    tokens = list(tokens)
    types = list(types) if types is not None else [TokenType.NORMAL] * n
    valid_types = {int(t) for t in TokenType}
    bad = next((t for t in types if t not in valid_types), None)
    if bad is not None:
        raise ModelError(f"{source}: {K.TOKEN_TYPE} holds {bad}, not a token type")
    bad = next((t for t, ty in zip(tokens, types)
                if ty == TokenType.BYTE and not BYTE_TOKEN.fullmatch(t)), None)
    if bad is not None:
        raise ModelError(f"{source}: byte token {bad!r} is not written <0xXX>")
    # llama.cpp refuses a gpt2 vocabulary without merges, but gguf-py's writer
    # drops an empty array, so "no merges" (byte-level tokens only) reads as missing.
    merges = get(K.MERGES, MetaKind.TEXTS)
    return Vocab(
        model=model, tokens=tokens, types=types,
        scores=[float(s) for s in scores] if scores is not None else None,
        merges=list(merges) if merges is not None else None,
        pre=get(K.PRE, MetaKind.TEXT) or "default",
        bos_id=_token_id(meta, K.BOS_ID, n, source),
        eos_id=_token_id(meta, K.EOS_ID, n, source),
        unk_id=_token_id(meta, K.UNK_ID, n, source),
        eog_ids=_eog_ids(meta, tokens, source),
        add_bos=get(K.ADD_BOS, MetaKind.BOOL),
        # llama.cpp's default: SentencePiece vocabularies prefix a space.
        add_space_prefix=get(K.ADD_PREFIX, MetaKind.BOOL, default=model == "llama"),
        chat_template=get(K.CHAT_TEMPLATE, MetaKind.TEXT) or None,
        source=source,
    )


def _reader_metadata(reader: Any) -> dict[str, Any]:
    """The tokenizer.* fields of a gguf.GGUFReader, as Python values."""
    out = {}
    for key, f in reader.fields.items():
        if key.startswith("tokenizer."):
            try:
                out[key] = f.contents()
            except Exception as e:  # gguf-py raises many types for a damaged field
                raise ModelError(f"metadata {key} is unreadable ({e})") from None
    return out


# ---------------------------------------------------------------- backends

class _Backend(Protocol):
    """What differs between vocabulary kinds."""

    def encode(self, text: str, special: bool) -> list[int]: ...

    def normal_bytes(self, text: str) -> bytes:
        """The bytes a NORMAL token stands for, from its text in the vocabulary."""


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, reversed: the printable stand-in for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    extra = iter(range(256, 512))
    return {chr(b if b in printable else next(extra)): b for b in range(256)}


class _ByteLevelBPE:
    def __init__(self, vocab: Vocab):
        pre = PRE_TOKENIZERS.get(vocab.pre)
        if pre is None:
            raise UnsupportedModel(
                f"{vocab.source}: pre-tokenizer {vocab.pre!r} ({K.PRE}) is not supported "
                f"(supported: {', '.join(sorted(PRE_TOKENIZERS))})")
        self.pre = pre
        self._hf = self._build(vocab, pre)
        self._byte_of = _byte_decoder()

    @staticmethod
    def _build(vocab: Vocab, pre: PreTokenizer):
        from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers

        merges = []
        for m in vocab.merges or []:
            left, sep, right = m.partition(" ")  # byte-level tokens hold no literal space
            if not sep:
                raise ModelError(f"{vocab.source}: merge {m!r} is not two tokens")
            merges.append((left, right))
        # Later duplicates win, as in llama.cpp's token_to_id.
        ids = {t: i for i, t in enumerate(vocab.tokens)}
        try:
            bpe = models.BPE(vocab=ids, merges=merges, ignore_merges=pre.ignore_merges)
        except Exception as e:
            raise ModelError(f"{vocab.source}: the BPE vocabulary is inconsistent ({e})") from None
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in pre.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        # Control tokens (and the unknown token) are matched in text only when
        # special=True; user-defined ones always, as llama.cpp's
        # tokenizer_st_partition does.
        tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, ty in zip(vocab.tokens, vocab.types)
                                if ty in PARSED_WHEN_SPECIAL])
        tok.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, ty in zip(vocab.tokens, vocab.types)
                        if ty == TokenType.USER_DEFINED])
        return tok

    @cached_property
    def _hf_plain(self):
        """A copy that reads control-token text as ordinary text (special=False);
        a separate object, so the shared one is never reconfigured mid-call."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(self._hf.to_str())
        tok.encode_special_tokens = True
        return tok

    def encode(self, text: str, special: bool) -> list[int]:
        hf = self._hf if special else self._hf_plain
        return hf.encode(text, add_special_tokens=False).ids

    def normal_bytes(self, text: str) -> bytes:
        # A character outside the alphabet (a malformed vocabulary) keeps its UTF-8.
        byte_of = self._byte_of
        return b"".join(bytes([byte_of[c]]) if c in byte_of else c.encode() for c in text)


def _special_splitter(texts: list[str]) -> re.Pattern[str] | None:
    """A pattern whose split() isolates these token texts, longest first so
    that a token containing another wins."""
    if not texts:
        return None
    return re.compile("(" + "|".join(re.escape(t) for t in sorted(texts, key=len, reverse=True)) + ")")


class _SentencePiece:
    def __init__(self, vocab: Vocab):
        import sentencepiece as spm

        try:
            self._sp = spm.SentencePieceProcessor(model_proto=self._model_proto(vocab))
        except (RuntimeError, OSError) as e:
            raise ModelError(f"{vocab.source}: sentencepiece rejected the vocabulary ({e})") from None
        # llama.cpp splits these out of the text before SentencePiece sees it;
        # control tokens (and the unknown token) only when special=True.
        self._user = [t for t, ty in zip(vocab.tokens, vocab.types) if ty == TokenType.USER_DEFINED]
        self._control = [t for t, ty in zip(vocab.tokens, vocab.types) if ty in PARSED_WHEN_SPECIAL]
        self._ids = {t: i for i, t in enumerate(vocab.tokens)}
        self._splitters = {special: _special_splitter(self._user + (self._control if special else []))
                           for special in (False, True)}

    @staticmethod
    def _model_proto(vocab: Vocab) -> bytes:
        from sentencepiece import sentencepiece_model_pb2 as pb

        types = list(vocab.types)
        unk = vocab.unk_id if vocab.unk_id is not None else next(
            (i for i, t in enumerate(types) if t == TokenType.UNKNOWN), None)
        if unk is None:
            raise ModelError(f"{vocab.source}: a SentencePiece vocabulary needs an unknown token")
        types[unk] = TokenType.UNKNOWN  # sentencepiece insists the unk id is typed so
        m = pb.ModelProto()
        scores = vocab.scores or [0.0] * len(vocab.tokens)
        for text, score, ttype in zip(vocab.tokens, scores, types):
            m.pieces.add(piece=text, score=score, type=ttype)
        ts = m.trainer_spec
        ts.model_type = pb.TrainerSpec.BPE
        ts.vocab_size = len(vocab.tokens)
        ts.byte_fallback = TokenType.BYTE in types
        ts.unk_id = unk
        ts.bos_id = ts.eos_id = ts.pad_id = -1  # BOS/EOS are our business, not sentencepiece's
        ns = m.normalizer_spec
        ns.name = "identity"  # llama.cpp does not normalise: neither may we
        ns.add_dummy_prefix = vocab.add_space_prefix
        ns.remove_extra_whitespaces = False
        ns.escape_whitespaces = True
        return m.SerializeToString()

    def encode(self, text: str, special: bool) -> list[int]:
        out: list[int] = []
        splitter = self._splitters[special]
        parts = splitter.split(text) if splitter else [text]
        # re.split with one group alternates text runs (even) and specials (odd).
        for i, part in enumerate(parts):
            if i % 2:
                out.append(self._ids[part])
            elif part:
                # Each run gets SentencePiece's leading space, as llama.cpp gives
                # every text fragment that follows a special token.
                out.extend(self._sp.encode(part))
        return out

    def normal_bytes(self, text: str) -> bytes:
        return text.replace("\u2581", " ").encode()  # SentencePiece writes spaces as U+2581


def _token_bytes(text: str, ttype: int, backend: _Backend) -> bytes:
    """The bytes llama.cpp's token_to_piece gives for a token (special=True)."""
    if ttype == TokenType.NORMAL:
        return backend.normal_bytes(text)
    if ttype == TokenType.BYTE:
        return bytes([int(text[3:5], 16)])  # "<0xAB>"
    if ttype == TokenType.UNKNOWN:
        return UNKNOWN_PIECE
    if ttype == TokenType.UNUSED:
        return b""
    return text.encode()  # control and user-defined tokens: their text as written


# ---------------------------------------------------------------- the tokenizer

def _check_utf8(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:  # surrogates: undecodable bytes from argv or stdin
        ch = ord(text[e.start])
        what = f"byte 0x{ch - 0xDC00:02x}" if 0xDC80 <= ch <= 0xDCFF else f"U+{ch:04X}"
        raise BadText(f"the text is not valid UTF-8 ({what})") from None


# In a rendered chat, a control-token text that came from a message stands as
# a mark: its index in ChatPrompt.literals between these private-use characters.
MARK_OPEN, MARK_CLOSE = "\ue000", "\ue001"
_MARK = re.compile(f"{MARK_OPEN}(\\d{{1,9}}){MARK_CLOSE}")
# Rendered when a model loads, so that a template that fails or costs too much refuses it then.
PROBE_CHAT = [{"role": "user", "content": "How do I reset the pump?"},
              {"role": "assistant", "content": "Switch it off, wait ten seconds, switch it on."},
              {"role": "user", "content": "And if it still fails?"}]


@dataclass(frozen=True)
class ChatPrompt:
    """A conversation rendered with the chat template, to be tokenized so that
    only the template's own markup makes control tokens: every control-token
    text the messages held (a user typing `<|im_end|>`) is marked in `text`
    and tokenized as the plain text it is, as encode(special=False) would."""

    text: str
    literals: tuple[str, ...]  # what each mark stands for
    chars: int                 # the length of the text with the marks' literals in place


def _spans(text: str) -> Iterable[tuple[int, int]]:
    """(start, end) of consecutive spans of about SPAN_CHARS, cut before a
    space or newline where there is one, so that words stay whole."""
    start = 0
    while start < len(text):
        end = min(start + SPAN_CHARS, len(text))
        if end < len(text):
            cut = max(text.rfind(" ", start + 1, end), text.rfind("\n", start + 1, end))
            end = cut if cut > start else end
        yield start, end
        start = end


class Tokenizer:
    """A GGUF file's tokenizer: encode, decode, stream, and the chat template."""

    def __init__(self, vocab: Vocab):
        self.vocab = vocab
        backend: _Backend
        if vocab.model == "gpt2":
            backend = _ByteLevelBPE(vocab)
            default_add_bos = backend.pre.add_bos
        else:
            backend = _SentencePiece(vocab)
            default_add_bos = True  # llama.cpp's default for SentencePiece vocabularies
        self._backend = backend
        self.add_bos = default_add_bos if vocab.add_bos is None else vocab.add_bos
        self._pieces = [_token_bytes(t, ty, backend) for t, ty in zip(vocab.tokens, vocab.types)]
        self._controls = frozenset(i for i, t in enumerate(vocab.types) if t == TokenType.CONTROL)
        # SentencePiece encoding puts a space before each text run: at the start
        # and after each token split out of the text (control or user-defined).
        self._strip_run_space = vocab.model == "llama" and vocab.add_space_prefix
        self._run_breaks = frozenset(i for i, t in enumerate(vocab.types)
                                     if t in PARSED_WHEN_SPECIAL or t == TokenType.USER_DEFINED)
        self._control_ids = {vocab.tokens[i]: i for i in sorted(self._controls)}  # a duplicate's last id
        # Finds the markup's control tokens in a rendered chat; and what a message's
        # fields have marked: their control-token texts, and the mark character,
        # so that no text can pass for a mark.
        self._control_split = _special_splitter(list(self._control_ids))
        self._to_mark = _special_splitter([*self._control_ids, MARK_OPEN])

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], source: str = "model") -> Tokenizer:
        """From GGUF metadata as a mapping of key -> value (only tokenizer.* keys are read)."""
        return cls(parse_vocab(meta, source))

    @classmethod
    def from_gguf(cls, src: Any) -> Tokenizer:
        """From an open edge_slm.model.GGUFFile, a gguf.GGUFReader, or a path to a GGUF file."""
        if isinstance(src, (str, os.PathLike)):
            from .model import GGUFFile  # here: model imports this module

            src = GGUFFile(src)
        if hasattr(src, "fields"):  # gguf.GGUFReader
            return cls.from_metadata(_reader_metadata(src), str(getattr(src, "path", "model")))
        return cls.from_metadata({k: v for k, v in src.metadata.items() if k.startswith("tokenizer.")},
                                 str(src.path))

    # -- ids

    @property
    def vocab_size(self) -> int:
        return len(self.vocab.tokens)

    @property
    def bos_id(self) -> int | None:
        return self.vocab.bos_id

    @property
    def eos_id(self) -> int | None:
        return self.vocab.eos_id

    def is_eog(self, token_id: int) -> bool:
        """Whether the token ends a generation (EOS, EOT, EOM, <|im_end|> and the like)."""
        return token_id in self.vocab.eog_ids

    # -- text

    def encode(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        """Token ids of `text`. BOS is prepended if the model asks for it, unless
        `add_bos` says otherwise; with special=False, special-token markup such
        as <|im_start|> is tokenized as plain text."""
        _check_utf8(text)
        return self._with_bos(self._backend.encode(text, special), add_bos)

    def _with_bos(self, ids: list[int], add_bos: bool | None) -> list[int]:
        if self.add_bos if add_bos is None else add_bos:
            if self.bos_id is None:
                raise ModelError(f"{self.vocab.source}: BOS requested but the model has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def _encode_chat(self, text: str, literals: tuple[str, ...], add_bos: bool | None = None) -> list[int]:
        """The ids of a ChatPrompt's text, or of a piece of it: the markup's
        control tokens, and each run of text between them, marks spelled out,
        tokenized as plain text (as the run is tokenized by encode())."""
        if not literals:  # no message held control-token text: exactly encode()
            return self.encode(text, add_bos)
        _check_utf8(text)

        def spelled(m: re.Match[str]) -> str:
            k = int(m[1])
            return literals[k] if k < len(literals) else m[0]

        ids: list[int] = []
        parts = self._control_split.split(text) if self._control_split else [text]
        for i, part in enumerate(parts):  # control tokens at odd indices
            if i % 2:
                ids.append(self._control_ids[part])
            elif part:
                ids += self._backend.encode(_MARK.sub(spelled, part), special=False)
        return self._with_bos(ids, add_bos)

    def _encoder(self, prompt: str | ChatPrompt) -> tuple[str, int, Callable[[str, bool | None], list[int]]]:
        """A prompt's text, the length it is tokenized as, and how to tokenize pieces of it."""
        if isinstance(prompt, ChatPrompt):
            return prompt.text, prompt.chars, lambda s, bos: self._encode_chat(s, prompt.literals, bos)
        return prompt, len(prompt), lambda s, bos: self.encode(s, bos)

    @cached_property
    def max_token_bytes(self) -> int | None:
        """The most text one token stands for, in bytes (an unknown token: one
        character); None when one unknown token may stand for a whole run of
        characters (SentencePiece without byte tokens)."""
        if self.vocab.model != "gpt2" and TokenType.BYTE not in self.vocab.types:
            return None
        return max(4, max(map(len, self._pieces)))

    def surely_over(self, n_chars: int, limit: int) -> bool:
        """Whether a text of n_chars characters must be more than `limit`
        tokens (it has at least bytes / max_token_bytes, and bytes >= characters)."""
        most = self.max_token_bytes
        return most is not None and n_chars > limit * most

    def messages_surely_over(self, messages: Iterable[Mapping[str, Any]], limit: int) -> bool:
        """Whether chat messages' contents alone must be more than `limit` tokens."""
        return self.surely_over(sum(len(c) for m in messages if isinstance(c := m.get("content"), str)),
                                limit)

    def encode_within(self, prompt: str | ChatPrompt, limit: int) -> list[int] | None:
        """The ids of `prompt` (BOS as encode() adds it) if there are at most
        `limit`, else None; a text far over is found so by its length, or
        span by span, without being tokenized whole."""
        text, chars, encode = self._encoder(prompt)
        if self.surely_over(chars, limit):
            return None
        if len(text) > SPAN_CHARS:
            n = 0
            for a, b in _spans(text):
                n += len(encode(text[a:b], False))
                if n > 2 * limit:  # far beyond what cuts between spans could add
                    return None
        ids = encode(text, None)
        return ids if len(ids) <= limit else None

    def encode_ends(self, prompt: str | ChatPrompt, head: int, tail: int) -> list[int]:
        """The first `head` and the last `tail` ids of a prompt too long to
        keep whole, tokenizing only its two ends."""
        text, _, encode = self._encoder(prompt)
        ids = encode(text[:self._reach(text, head, False, encode)], None)[:head] if head else []
        if tail:
            ids += encode(text[self._reach(text, tail, True, encode):], False)[-tail:]
        return ids

    def _reach(self, text: str, n: int, from_end: bool,
               encode: Callable[[str, bool | None], list[int]]) -> int:
        """Where to cut the text so that its first (or last) whole spans hold
        n tokens and END_MARGIN more."""
        spans = list(_spans(text))
        total = 0
        for a, b in reversed(spans) if from_end else spans:
            total += len(encode(text[a:b], False))
            if total >= n + END_MARGIN:
                return a if from_end else b
        return 0 if from_end else len(text)

    def token_bytes(self, token_id: int) -> bytes:
        """What the token contributes to the output, as bytes: possibly part of
        a UTF-8 character, hence bytes and not str."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary (0..{self.vocab_size - 1})")
        return self._pieces[token_id]

    def decode(self, ids: Iterable[int], special: bool = True) -> str:
        """The text of `ids`; with special=False control tokens (<|im_end|> ...) are left out."""
        stream = self.stream_decoder(special)
        return "".join(stream.feed(i) for i in ids) + stream.flush()

    def stream_decoder(self, special: bool = True) -> StreamDecoder:
        return StreamDecoder(self, special)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The model's chat template (ChatML if it has none) applied to `messages`."""
        tokens = self.vocab.tokens
        return render_chat(self.vocab.chat_template, messages, add_generation_prompt,
                           bos_token=tokens[self.bos_id] if self.bos_id is not None else "",
                           eos_token=tokens[self.eos_id] if self.eos_id is not None else "")

    def chat_prompt(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> ChatPrompt:
        """`messages` rendered for encode_within() and encode_ends(): a message
        (its content, role, any field of text) never makes a control token;
        only the template's own markup does."""
        literals: list[str] = []

        def mark(m: re.Match[str]) -> str:
            literals.append(m[0])
            return f"{MARK_OPEN}{len(literals) - 1}{MARK_CLOSE}"

        marked = [{k: self._to_mark.sub(mark, v) if isinstance(v, str) else v for k, v in m.items()}
                  for m in messages]
        text = self.render_chat(marked, add_generation_prompt)
        chars = len(text) + sum(len(literals[int(m[1])]) - len(m[0]) for m in _MARK.finditer(text)
                                if int(m[1]) < len(literals))
        return ChatPrompt(text, tuple(literals), chars)

    def check_chat_template(self) -> None:
        """Render PROBE_CHAT: a template that fails, or costs more than a render
        may, raises ModelError here, when the model loads, not at a question."""
        try:
            self.chat_prompt(PROBE_CHAT)
        except ConversationRejected:
            pass  # it wants conversations of another shape: real ones will tell
        except ModelError as e:
            raise ModelError(f"{self.vocab.source}: {e}") from None

    def _piece(self, token_id: int, special: bool, run_start: bool) -> tuple[bytes, bool]:
        """A token's bytes in context, and whether the next token starts a text run.

        The space SentencePiece encoding put before each text run comes off
        again, so that decode(encode(s)) == s."""
        piece = self.token_bytes(token_id)
        if token_id in self._run_breaks:
            run_start = True
        elif self._strip_run_space and run_start and piece:
            piece = piece.removeprefix(b" ")
            run_start = False
        if not special and token_id in self._controls:
            piece = b""
        return piece, run_start


class StreamDecoder:
    """Turns token ids into text as they arrive. Bytes of a character split
    across tokens are held back until the character is complete; invalid
    UTF-8 becomes U+FFFD, as in decode()."""

    def __init__(self, tokenizer: Tokenizer, special: bool = True):
        self._tokenizer = tokenizer
        self._special = special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._run_start = True

    def feed(self, token_id: int) -> str:
        """The text completed by this token: often "", sometimes more than its own share."""
        piece, self._run_start = self._tokenizer._piece(token_id, self._special, self._run_start)
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is held back (an unfinished character shows as U+FFFD)."""
        return self._utf8.decode(b"", final=True)
