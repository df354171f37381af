"""Manuals cut into passages of bounded size, each keeping where it came from:
Markdown by heading (the heading path kept on every piece), plain text by
paragraph, PDF by page. Text is kept as text: HTML in a manual is never
interpreted, here or later."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

MAX_PASSAGE_CHARS = 800   # small enough that several passages fit a 135M model's prompt
MAX_TEXT_BYTES = 64 << 20  # a Markdown or text file is read whole; a bigger one is no manual

_ATX_HEADING = re.compile(r" {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r" {0,3}(```|~~~)")
_BLANK_LINES = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
# Where a long text is cut, coarsest first, and what joins parts packed together.
_CUTS = ((_BLANK_LINES, "\n\n"), (re.compile(r"\n"), "\n"), (_SENTENCE_END, " "), (re.compile(r"\s+"), " "))


@dataclass(frozen=True)
class Passage:
    heading: str       # ' > '-joined heading path, or ''
    page: int | None   # PDF page from 1
    text: str


class UnparsableFile(Exception):
    """A manual that cannot be read as its kind says; the message is the reason."""


def split_markdown(path: Path) -> Iterator[Passage]:
    """Sections between ATX headings (a '#' inside a fenced code block is not
    one), each cut into pieces that carry the section's heading path."""
    stack: list[tuple[int, str]] = []  # (level, title) of the headings above this line
    body: list[str] = []
    fence: str | None = None
    for line in _read_text(path).splitlines():
        opened = _FENCE.match(line)
        if opened and (fence is None or opened.group(1) == fence):
            fence = opened.group(1) if fence is None else None
        heading = _ATX_HEADING.match(line) if fence is None and not opened else None
        if heading is None:
            body.append(line)
            continue
        yield from _pieces(" > ".join(t for _, t in stack), None, "\n".join(body))
        body = []
        level = len(heading.group(1))
        stack = [(lv, t) for lv, t in stack if lv < level] + [(level, heading.group(2).strip())]
    yield from _pieces(" > ".join(t for _, t in stack), None, "\n".join(body))


def split_text(path: Path) -> Iterator[Passage]:
    """One passage per paragraph (blank-line separated); a long one in pieces."""
    for paragraph in _BLANK_LINES.split(_read_text(path)):
        yield from _pieces("", None, paragraph)


def split_pdf(path: Path) -> Iterator[Passage]:
    """Each page's text, one page at a time, in pieces that keep the page."""
    from pypdf import PdfReader  # only an index of PDFs pays for importing it

    # pypdf reports malformed but readable input on its logger; that is not
    # ours to show for every odd file in a folder of thousands.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    found = False
    # pypdf raises many kinds of exception on a malformed file (its own
    # PdfReadError, but also ValueError, KeyError, TypeError, RecursionError
    # ...); any of them means only that this file cannot be read.
    try:
        reader = PdfReader(path)
        if reader.is_encrypted:
            raise UnparsableFile("an encrypted PDF")
        for number, page in enumerate(reader.pages, 1):
            text = page.extract_text() or ""
            for piece in _pieces("", number, text):
                found = True
                yield piece
    except UnparsableFile:
        raise
    except Exception as e:  # noqa: BLE001 - see above
        raise UnparsableFile(f"not a readable PDF ({type(e).__name__}: {e})") from None
    if not found:
        raise UnparsableFile("a PDF with no text in it (a scan?)")


def _read_text(path: Path) -> str:
    try:
        if path.stat().st_size > MAX_TEXT_BYTES:
            raise UnparsableFile(f"larger than {MAX_TEXT_BYTES >> 20} MiB")
        data = path.read_bytes()
    except OSError as e:  # e.g. removed or made unreadable since it was listed
        raise UnparsableFile(f"cannot be read ({e.strerror})") from None
    if b"\0" in data:
        raise UnparsableFile("a binary file, not text")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        # Guessing another encoding would index mojibake without a word said.
        raise UnparsableFile(f"not UTF-8 (byte {e.start} is {data[e.start]:#04x})") from None


def _pieces(heading: str, page: int | None, text: str) -> Iterator[Passage]:
    """`text` as passages of at most MAX_PASSAGE_CHARS, cut at paragraph,
    then line, then sentence, then word boundaries, packing small parts
    together so that a short section stays one passage."""
    for piece in _pack(text.strip(), _CUTS):
        yield Passage(heading, page, piece)


def _pack(text: str, cuts: tuple[tuple[re.Pattern, str], ...]) -> Iterator[str]:
    if len(text) <= MAX_PASSAGE_CHARS:
        if text:
            yield text
        return
    if not cuts:  # one word longer than a passage
        for start in range(0, len(text), MAX_PASSAGE_CHARS):
            yield text[start:start + MAX_PASSAGE_CHARS]
        return
    (cut, joiner), finer = cuts[0], cuts[1:]
    current = ""
    for part in (p.strip() for p in cut.split(text)):
        if not part:
            continue
        if current and len(current) + len(joiner) + len(part) <= MAX_PASSAGE_CHARS:
            current += joiner + part
            continue
        if current:
            yield current
        if len(part) <= MAX_PASSAGE_CHARS:
            current = part
        else:
            current = ""
            yield from _pack(part, finer)
    if current:
        yield current
