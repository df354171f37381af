"""User text turned into safe FTS5 queries, and the exact-token form of text.

No user text ever reaches FTS5 as syntax: a query is cut into word tokens,
each one quoted, joined by OR, so quotes, parentheses, NEAR, '*', '^' and
column filters ('body:') in a question are only words or nothing."""

from __future__ import annotations

import re

MAX_QUERY_TERMS = 64  # a 100 KB question costs no more to search than a long sentence

# A word, or words joined by '-', '.', '/' or '_' with nothing between them:
# E-417, HP-30, 6204-2RS, v2.1, M8/1.25. The fts_exact table's tokenizer keeps
# the same characters inside tokens, so these are its tokens exactly.
_EXACT_TOKEN = re.compile(r"\w+(?:[-./_]\w+)*")

# Words a question is made of that say nothing about the manual it needs
# (nor the ways of asking: "explain in detail, step by step"); kept only when
# a query holds nothing else. A word no manual holds lowers a question's
# coverage, so these must not count against it.
_STOPWORDS = frozenset("""
a an and are as at be by can could do does did for from has have how i if in into is it its me my
of on or our should so than that the their then there these this to was we were what when where which
who why will with would you your
about all any each every explain describe detail detailed details tell list show give please step
steps also just need want know way ways thing things one some
""".split())


def is_code(token: str) -> bool:
    """Whether a token reads as a code, a part number or a model name (a digit
    or an inner '-', '.', '/', '_' in it): what fts_exact is asked for. It
    holds every token, so that its bm25 weighs a code against the passage's
    whole length (measured: better hit@1 on tests/grounding than codes alone)."""
    return any(c.isdigit() or c in "-./_" for c in token)


def exact_text(text: str) -> str:
    """`text` as the space-separated tokens fts_exact indexes, so that a
    trailing '.' or a '-' starting a list item is not taken into a token."""
    return " ".join(_EXACT_TOKEN.findall(text))


def query_terms(text: str) -> list[str]:
    """The distinct lower-case tokens of `text` a search uses (the words to
    highlight in a passage found): stopwords left out unless nothing else is
    there, at most MAX_QUERY_TERMS."""
    terms: list[str] = []
    for token in _EXACT_TOKEN.findall(text.lower()):
        if token not in terms:
            terms.append(token)
        if len(terms) == MAX_QUERY_TERMS:
            break
    return [t for t in terms if t not in _STOPWORDS] or terms


def fts_query(text: str, codes_only: bool = False) -> str:
    """An FTS5 MATCH expression for either table, or '' when `text` holds no
    word at all (`codes_only`: no code in it). fts_exact reads a
    quoted "e-417" as one token; fts_stem reads it as the phrase "e 417",
    which "E-418" does not match either."""
    terms = [t for t in query_terms(text) if not codes_only or is_code(t)]
    # A quoted token is an FTS5 string: '"' cannot occur in it (tokens are
    # word characters and -./_), so nothing inside can end the quote.
    return " OR ".join(f'"{t}"' for t in terms)
