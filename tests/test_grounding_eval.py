"""The grounding evaluation set (tests/grounding/) and the figures
scripts/eval-grounding measures on it.

The integrity checks read the manuals on their own (Markdown by heading,
PDF by page through pypdf), not through edge_slm.grounding, so that a
question whose passage or fact has gone from the manuals fails here
whatever the index does."""

from __future__ import annotations

import importlib.util
import re
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "eval-grounding"
MANUALS = ROOT / "tests" / "grounding" / "manuals"

# Floors a little below the first run's figures (see tests/grounding/README.md).
HIT_AT_3_FLOOR = 0.95
HIT_AT_1_FLOOR = 0.90
FACT_GROUNDED_FLOOR = 0.15
KEPT_FLOOR = 0.95      # answerable questions the engine's threshold lets through
DECLINED_FLOOR = 0.85  # unanswerable ones it declines


def load_script():
    loader = SourceFileLoader("eval_grounding", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


evalset = load_script()
QUESTIONS = evalset.load_questions()


def markdown_sections(path: Path) -> dict[str, str]:
    """Heading path (" > "-joined, from the top heading down) -> the text
    under that heading up to the next heading."""
    sections: dict[str, list[str]] = {}
    trail: list[tuple[int, str]] = []
    body: list[str] | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"(#{1,6})\s+(.+?)\s*$", line)
        if m:
            level = len(m.group(1))
            trail = [t for t in trail if t[0] < level] + [(level, m.group(2))]
            body = sections.setdefault(" > ".join(t for _, t in trail), [])
        elif body is not None:
            body.append(line)
    return {h: "\n".join(lines) for h, lines in sections.items()}


def pdf_pages(path: Path) -> list[str]:
    from pypdf import PdfReader

    return [page.extract_text() for page in PdfReader(path, strict=True).pages]


def expected_text(expected: dict) -> str:
    """The text of the one passage a question's expected source names."""
    path = MANUALS / expected["file"]
    if "page" in expected:
        pages = pdf_pages(path)
        assert 1 <= expected["page"] <= len(pages), f"{expected['file']} has {len(pages)} pages"
        return pages[expected["page"] - 1]
    found = [t for h, t in markdown_sections(path).items() if expected["heading"] in h]
    assert len(found) == 1, f"heading {expected['heading']!r} matches {len(found)} sections of {expected['file']}"
    return found[0]


def test_the_set_is_big_enough_and_well_formed():
    ids = [q["id"] for q in QUESTIONS]
    assert len(ids) == len(set(ids)), "question ids repeat"
    answerable = [q for q in QUESTIONS if q["answerable"]]
    assert len(answerable) >= 40
    assert len(QUESTIONS) - len(answerable) >= 8
    collections = {p.name for p in MANUALS.iterdir() if p.is_dir()}
    for q in QUESTIONS:
        assert q["question"].strip() and isinstance(q["answerable"], bool), q["id"]
        assert q["collection"] is None or q["collection"] in collections, q["id"]
        if q["answerable"]:
            exp = q["expected"]
            assert ("page" in exp) != ("heading" in exp), f"{q['id']}: name a heading or a page"
            assert q["collection"] in (None, exp["file"].split("/")[0]), q["id"]
            assert evalset.facts(q) and all(f.strip() for f in evalset.facts(q)), q["id"]
        else:
            assert "expected" not in q and "fact" not in q, q["id"]


def test_the_manuals_cover_markdown_and_a_pdf_of_several_pages():
    files = [p for p in MANUALS.rglob("*") if p.is_file()]
    assert len({p.parent for p in files}) >= 4
    pdfs = [p for p in files if p.suffix == ".pdf"]
    assert pdfs and all(len(pdf_pages(p)) >= 3 for p in pdfs)
    assert any(p.suffix == ".md" for p in files)


@pytest.mark.parametrize("q", [q for q in QUESTIONS if q["answerable"]], ids=lambda q: q["id"])
def test_the_fact_is_in_the_expected_passage(q):
    # the first spelling is the manual's own; the others are how an answer may put it
    assert evalset.facts(q)[0].lower() in expected_text(q["expected"]).lower()


def test_answers_are_judged_by_containment_and_decline_phrases():
    q = {"fact": ["45 Nm", "45Nm"]}
    assert evalset.states_fact("Tighten it to 45nm.", q)
    assert not evalset.states_fact("Tighten it to 54 Nm.", q)
    assert evalset.declines("The manuals do not cover this question.")
    assert not evalset.declines("E-417 means dry running.")


def test_the_threshold_is_the_coverage_that_best_separates_the_two_sets():
    rows = [{"answerable": True, "top_coverage": c} for c in (0.9, 0.8, 0.5)] + \
           [{"answerable": False, "top_coverage": c} for c in (0.2, 0.4, None)]
    best = evalset.best_threshold(rows)
    assert best["threshold"] == pytest.approx(0.5)
    assert best["answerable_kept"] == 1.0 and best["unanswerable_declined"] == 1.0
    # answering at >= 0.3 declines only the two below it (no hit at all: declined)
    assert evalset.at_threshold(rows, 0.3) == (1.0, pytest.approx(2 / 3))
    assert evalset.at_threshold(rows, 0.85) == (pytest.approx(1 / 3), 1.0)


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    pytest.importorskip("edge_slm.grounding.index")
    index = evalset.build_index(tmp_path_factory.mktemp("grounding") / "index.sqlite")
    try:
        return evalset.retrieve(index, QUESTIONS)
    finally:
        index.close()


def test_retrieval_finds_the_expected_passage(retrieval, parity_report):
    hit1, hit3 = evalset.hit_at(retrieval, 1), evalset.hit_at(retrieval, 3)
    parity_report.append(f"grounding retrieval: hit@1 {100 * hit1:.1f} %, hit@3 {100 * hit3:.1f} %")
    assert hit3 >= HIT_AT_3_FLOOR and hit1 >= HIT_AT_1_FLOOR, (hit1, hit3)


def test_the_engines_threshold_keeps_answerable_and_declines_unanswerable(retrieval, parity_report):
    s = evalset.summarize(QUESTIONS, retrieval)["engine_threshold"]
    parity_report.append(f"grounding threshold {s['threshold']}: keeps {100 * s['answerable_kept']:.1f} % "
                         f"of answerable, declines {100 * s['unanswerable_declined']:.1f} % of unanswerable")
    assert s["answerable_kept"] >= KEPT_FLOOR and s["unanswerable_declined"] >= DECLINED_FLOOR, s


@pytest.mark.slow
def test_grounded_answers_state_the_fact(retrieval, real_model, parity_report):
    pytest.importorskip("edge_slm.grounding.prompt")
    evalset.answer_all(QUESTIONS, retrieval, str(real_model), ctx=2048, max_tokens=evalset.MAX_TOKENS)
    s = evalset.summarize(QUESTIONS, retrieval)
    parity_report.append(f"grounding answers: fact grounded {100 * s['fact_grounded']:.1f} %, "
                         f"ungrounded {100 * s['fact_ungrounded']:.1f} %, "
                         f"unanswerable declined {100 * s['declined_grounded']:.1f} %")
    assert s["not_ok"] == 0
    assert s["fact_grounded"] >= FACT_GROUNDED_FLOOR and s["fact_grounded"] > s["fact_ungrounded"], s
