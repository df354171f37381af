"""The index of manuals: passages, exact and stemmed matching, incremental and
interrupted re-indexing, bad files and bad indexes. Real files, real SQLite."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

from edge_slm.errors import EdgeSlmError
from edge_slm.grounding import Index, IndexFileError, grounded_messages
from edge_slm.grounding.passages import MAX_PASSAGE_CHARS

PUMP_MD = """\
# Pump HP-30

The HP-30 is a circulation pump for the boiler room.

## Error codes

### E-417

E-417 means the motor is too hot. Let it cool for 20 minutes, then restart.

### E-418

E-418 means the inlet pressure is low. Open the inlet valve fully.

```
# a comment in a code block, not a heading
```

## Parts

The shaft runs on a 6204-2RS bearing. <script>alert("x")</script> is how the vendor's page showed it.
"""


def write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def pdf_bytes(pages: list[str]) -> bytes:
    """A minimal PDF, written by hand: a catalog, a page tree, one page with a
    text stream per entry of `pages`, a font and an xref table."""
    n = len(pages)
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(n))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               f"<< /Type /Pages /Kids [{kids}] /Count {n} >>".encode(),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for i, text in enumerate(pages):
        stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
        objects.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources "
                       f"<< /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode())
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(stream), stream))
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@pytest.fixture
def manuals(tmp_path: Path) -> Path:
    folder = tmp_path / "manuals"
    write(folder / "pump.md", PUMP_MD)
    write(folder / "notes" / "filters.txt",
          "Filters\n\nReplace the filter cartridge every 300 hours of running.\n\n"
          "The HP-300 compressor has no filter.\n")
    write(folder / "chiller.pdf", pdf_bytes(["Chiller CH-2 start-up: close the drain.",
                                             "Chiller fault F-12: the condenser fan has stopped."]))
    return folder


@pytest.fixture
def index(tmp_path: Path):
    idx = Index.open(tmp_path / "index.sqlite3")
    yield idx
    idx.close()


def test_markdown_passages_keep_their_heading_path_and_html_as_text(index, manuals):
    report = index.add_folder(manuals, "plant")
    assert (report.added, report.changed, report.removed, report.unchanged, report.skipped) == (3, 0, 0, 0, [])
    hit = index.search("inlet pressure")[0]
    assert (hit.collection, hit.file, hit.heading, hit.page) == ("plant", "pump.md", "Pump HP-30 > Error codes > E-418",
                                                                 None)
    assert "# a comment in a code block" in hit.text  # a '#' in a code block starts no section
    parts = index.search("bearing")[0]
    assert parts.heading == "Pump HP-30 > Parts" and '<script>alert("x")</script>' in parts.text
    text = index.search("cartridge")[0]
    assert (text.file, text.heading, text.text) == ("notes/filters.txt", "",
                                                    "Replace the filter cartridge every 300 hours of running.")


def test_a_long_section_is_cut_on_sentences_and_every_piece_keeps_the_heading(index, tmp_path):
    sentences = [f"Step {i}: tighten bolt number {i} to the torque in table {i}." for i in range(60)]
    write(tmp_path / "m" / "long.md", "# Gearbox\n\n## Assembly\n\n" + " ".join(sentences) + "\n")
    index.add_folder(tmp_path / "m")
    pieces = index.search("tighten bolt torque", limit=100)
    assert len(pieces) > 1
    assert all(len(p.text) <= MAX_PASSAGE_CHARS and p.heading == "Gearbox > Assembly" for p in pieces)
    assert all(p.text.endswith(".") for p in pieces)  # cut between sentences, not inside one
    assert sorted(" ".join(p.text for p in pieces).split(". ")) == sorted(" ".join(sentences).split(". "))


def test_codes_and_part_numbers_match_exactly(index, manuals):
    index.add_folder(manuals)
    hits = index.search("E-417")
    assert [h.heading for h in hits] == ["Pump HP-30 > Error codes > E-417"]  # and E-418 is not matched
    assert index.search("what does error E-417 mean?")[0].heading.endswith("E-417")
    assert index.search("6204-2RS")[0].heading == "Pump HP-30 > Parts"
    assert [h.file for h in index.search("HP-300")] == ["notes/filters.txt"]  # not the HP-30 manual
    assert index.search("E-419") == []
    assert index.passage(hits[0].passage_id) == replace(hits[0], score=0.0, coverage=0.0)
    assert index.passage(10**9) is None


def test_an_exact_code_ranks_above_the_same_words_split_apart(index, tmp_path):
    # For the stemmed table "E-417" is the phrase "e 417", which the short
    # line matches too, and bm25 favours a short passage: only the exact
    # table's match puts the code itself first.
    write(tmp_path / "m" / "fault.txt", "Fault E-417: the motor is too hot; let it cool for twenty minutes.\n")
    write(tmp_path / "m" / "table.txt", "Table E 417.\n")
    index.add_folder(tmp_path / "m")
    assert [h.file for h in index.search("E-417")] == ["fault.txt", "table.txt"]


def test_words_match_by_their_stem(index, manuals):
    index.add_folder(manuals)
    assert index.search("replacing filters")[0].file == "notes/filters.txt"


def test_headings_weigh_more_than_body_text(index, tmp_path):
    # Unweighted, b.md would win: it says "valve" twice in a short body.
    write(tmp_path / "m" / "a.md",
          "# Cooling circuit\n\n## Valve care\n\nThe unit is serviced yearly by the plant crew on site.\n")
    write(tmp_path / "m" / "b.md",
          "# Cooling circuit\n\n## Unit care\n\nThe valve is serviced yearly; the valve seat by the plant crew.\n")
    for k in range(4):  # documents without the word, so that it weighs anything at all
        write(tmp_path / "m" / f"pump{k}.md", f"# Pump {k}\n\nThe pump runs quietly.\n")
    index.add_folder(tmp_path / "m")
    assert [h.file for h in index.search("valve")] == ["a.md", "b.md"]


@pytest.mark.parametrize("query", ['"E-417', 'E-417"', "(E-417", "E-417)", "NEAR(E-417 E-418)", "E-41*", "*",
                                   "heading: E-418", "body:E-417", "E-417 OR", "AND", "NOT E-417", "^E-417",
                                   "E-417 + E-418 -", '"""', "{heading body}: x", "", "   ", "?!"])
def test_any_user_text_is_a_safe_query(index, manuals, query):
    index.add_folder(manuals)
    hits = index.search(query)  # raises nothing
    if "E-417" in query:  # even after NOT: operators are words here, not syntax
        assert hits[0].heading.endswith("E-417")


def test_pdf_by_page_and_bad_files_are_skipped_naming_them(index, manuals):
    write(manuals / "broken.pdf", b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog /Pages 9 0 R\n")
    write(manuals / "latin1.txt", "Vorsicht: heiße Oberfläche".encode("latin-1"))
    write(manuals / "picture.png", b"\x89PNG\r\n")  # not a manual: passed over in silence
    report = index.add_folder(manuals)
    assert report.added == 3
    skipped = dict(report.skipped)
    assert set(skipped) == {"broken.pdf", "latin1.txt"}
    assert "PDF" in skipped["broken.pdf"] and "UTF-8" in skipped["latin1.txt"]
    hit = index.search("condenser fan")[0]
    assert (hit.file, hit.page, hit.heading) == ("chiller.pdf", 2, "")
    assert "F-12" in hit.text
    assert index.search("drain")[0].page == 1


def test_a_file_that_stops_parsing_keeps_what_was_indexed_from_it(index, manuals):
    index.add_folder(manuals)
    write(manuals / "pump.md", b"E-417 \xff")
    report = index.add_folder(manuals)
    assert report.skipped == [("pump.md", "not UTF-8 (byte 6 is 0xff)")] and report.removed == 0
    assert index.search("E-417")[0].text.startswith("E-417 means the motor is too hot")


def test_a_folder_of_thousands_of_files_is_indexed_in_one_go(index, tmp_path):
    folder = tmp_path / "many"
    for n in range(3000):
        write(folder / f"part-{n // 100}" / f"note-{n}.txt", f"Spare part SP-{n}: order it by its number.\n")
    started = time.monotonic()
    report = index.add_folder(folder)
    assert report.added == 3000 and not report.skipped
    assert time.monotonic() - started < 30
    assert index.search("SP-2718")[0].file == "part-27/note-2718.txt"
    again = index.add_folder(folder)  # nothing changed: nothing is read into the index again
    assert (again.added, again.changed, again.unchanged) == (0, 0, 3000)


def test_another_folder_does_not_silently_replace_a_collection(index, manuals, tmp_path):
    index.add_folder(manuals)
    other = tmp_path / "other"
    write(other / "press.md", "# Press\n\nThe press P-9 needs 200 bar.\n")
    with pytest.raises(EdgeSlmError, match="holds the manuals of .*--replace"):
        index.add_folder(other)
    assert index.collections()[0].files == 3  # nothing lost
    index.add_folder(other, "press")          # a collection of its own
    report = index.add_folder(other, replace=True)
    assert report.added == 1 and report.removed == 3


def test_reindexing_touches_only_changed_files_and_drops_deleted_ones(index, manuals):
    index.add_folder(manuals)
    pump_ids = {h.passage_id for h in index.search("E-417 E-418 bearing", limit=20) if h.file == "pump.md"}
    write(manuals / "notes" / "filters.txt", "Replace the filter cartridge every 500 hours.\n")
    (manuals / "chiller.pdf").unlink()
    write(manuals / "new.md", "# Dryer\n\nE-501 means the drum is blocked.\n")
    report = index.add_folder(manuals)
    assert (report.added, report.changed, report.removed, report.unchanged) == (1, 1, 1, 1)
    assert {h.passage_id for h in index.search("E-417 E-418 bearing", limit=20) if h.file == "pump.md"} == pump_ids
    assert index.search("condenser") == [] and index.search("F-12") == []
    assert "500 hours" in index.search("cartridge")[0].text and index.search("300") == []
    assert index.search("E-501")[0].file == "new.md"
    [info] = index.collections()
    assert (info.name, info.files) == ("default", 3)
    again = index.add_folder(manuals)
    assert (again.added, again.changed, again.removed, again.unchanged) == (0, 0, 0, 3)


def test_collections_are_searched_apart(index, manuals, tmp_path):
    write(tmp_path / "other" / "fan.md", "# Fan\n\nE-417 on the fan means a blocked grille.\n")
    index.add_folder(manuals, "pumps")
    index.add_folder(tmp_path / "other", "fans")
    assert {h.collection for h in index.search("E-417")} == {"pumps", "fans"}
    assert [h.file for h in index.search("E-417", collection="fans")] == ["fan.md"]
    assert [(c.name, c.files) for c in index.collections()] == [("fans", 1), ("pumps", 3)]
    with pytest.raises(EdgeSlmError, match="'dryers'"):
        index.search("E-417", collection="dryers")


def test_a_missing_or_corrupt_index_is_one_clear_error(tmp_path):
    with pytest.raises(IndexFileError, match="no index there"):
        Index.open(tmp_path / "absent.sqlite3", create=False)
    garbage = write(tmp_path / "garbage.sqlite3", b"this is not a database at all" * 100)
    with pytest.raises(IndexFileError, match="not an edge-slm index"):
        Index.open(garbage)
    other = tmp_path / "other.sqlite3"
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    with pytest.raises(IndexFileError, match="not an edge-slm index"):
        Index.open(other)


def test_grounded_messages_hold_the_best_hits_that_fit(index, manuals):
    index.add_folder(manuals)
    hits = index.search("E-417 E-418 bearing", limit=3)
    assert len(hits) == 3

    def words(text: str) -> int:
        return len(text.split())

    question = [{"role": "user", "content": "What does E-417 mean?"}]
    everything, used = grounded_messages(question, hits, words, budget_tokens=10_000)
    assert used == hits
    full = sum(words(m["content"]) for m in everything)
    messages, used = grounded_messages(question, hits, words, budget_tokens=full - 1)
    assert used == hits[:2]
    assert sum(words(m["content"]) for m in messages) <= full - 1
    assert [m["role"] for m in messages] == ["system", "user"]
    assert "only" in messages[0]["content"] and "do not cover" in messages[0]["content"]
    user = messages[1]["content"]
    assert "[1]" in user and "[2]" in user and "[3]" not in user and user.endswith(question[0]["content"])
    assert hits[0].text in user and hits[2].text not in user
    _, none = grounded_messages(question, hits, words, budget_tokens=5)
    assert none == []


def test_grounded_conversations_keep_their_history_and_system_prompt(index, manuals):
    index.add_folder(manuals)
    hits = index.search("E-417", limit=1)
    chat = [{"role": "system", "content": "Answer in one sentence."},
            {"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi."},
            {"role": "user", "content": "What does E-417 mean?"}]
    messages, used = grounded_messages(chat, hits, lambda t: len(t.split()), budget_tokens=10_000)
    assert used == hits
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert "do not cover" in messages[0]["content"] and messages[0]["content"].endswith("Answer in one sentence.")
    assert messages[1:3] == chat[1:3]
    assert hits[0].text in messages[3]["content"]


def test_coverage_is_a_share_that_does_not_grow_with_the_index(tmp_path, manuals):
    # bm25's scale grows with the number of passages; coverage must not, or one
    # threshold would decline everything in a small index
    small = Index.open(tmp_path / "small.sqlite3")
    small.add_folder(manuals)
    top_small = small.search("What does E-417 mean?", limit=1)[0]
    big = Index.open(tmp_path / "big.sqlite3")
    big.add_folder(manuals)
    big.add_folder(Path(__file__).parent / "grounding" / "manuals", "evalset")
    top_big = big.search("What does E-417 mean?", collection="default", limit=1)[0]
    assert top_small.file == top_big.file
    assert 0.9 <= top_small.coverage <= 1.0 and 0.9 <= top_big.coverage <= 1.0
    assert top_small.score != pytest.approx(top_big.score, rel=0.05)  # the reason for coverage
    unrelated = big.search("What is the capital of France?", limit=1)
    assert not unrelated or unrelated[0].coverage < 0.2
    small.close()
    big.close()


INDEX_THEN_STALL = """\
import sys, time
from pathlib import Path
from edge_slm.grounding import Index

def progress(done, total, rel):
    if done == {stall_at}:
        print("stalled", flush=True)
        time.sleep(120)

Index.open(Path(sys.argv[1])).add_folder(Path(sys.argv[2]), progress=progress)
"""


def test_a_killed_index_run_leaves_the_previous_index_usable(tmp_path, manuals):
    path = tmp_path / "index.sqlite3"
    with Index.open(path) as idx:
        idx.add_folder(manuals)
    filler = " ".join(f"word{i}" for i in range(300))
    for i in range(3000):
        write(manuals / "bulk" / f"{i // 100:02d}" / f"m{i:04d}.md", f"# Machine M-{i}\n\nPart P-{i}: {filler}\n")
    child = subprocess.Popen([sys.executable, "-c", INDEX_THEN_STALL.format(stall_at=2000), str(path),
                              str(manuals)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "stalled\n"
        assert path.with_name(path.name + "-wal").stat().st_size > 2 << 20  # pages were written, uncommitted
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    with Index.open(path) as idx:
        assert [(c.name, c.files) for c in idx.collections()] == [("default", 3)]
        assert idx.search("E-417")[0].file == "pump.md"
        assert idx.search("M-5") == []
        report = idx.add_folder(manuals)
        assert (report.added, report.unchanged) == (3000, 3)
        assert idx.search("P-1999")[0].file == "bulk/19/m1999.md"


def cli(*args: str) -> subprocess.CompletedProcess:
    edge_slm = str(Path(sys.executable).with_name("edge-slm"))
    return subprocess.run([edge_slm, *args], capture_output=True, text=True, timeout=60)


def test_the_index_command(tmp_path, manuals):
    path = str(tmp_path / "cli.sqlite3")
    write(manuals / "latin1.txt", "heiße Oberfläche".encode("latin-1"))
    made = cli("index", str(manuals), "--collection", "plant", "--index", path)
    assert made.returncode == 0, made.stderr
    assert made.stdout == "plant: 3 added, 0 changed, 0 removed, 0 unchanged, 1 skipped\n"
    assert made.stderr.startswith("edge-slm: skipped latin1.txt: not UTF-8")
    listed = cli("index", "--list", "--index", path)
    assert listed.returncode == 0 and listed.stdout.startswith("plant\t3 files\t")
    found = cli("index", "--search", "E-417", "--index", path)
    assert found.returncode == 0 and "pump.md, Pump HP-30 > Error codes > E-417" in found.stdout
    write(tmp_path / "bad.sqlite3", b"garbage" * 1000)
    for args in (["--list", "--index", str(tmp_path / "bad.sqlite3")], ["--list", "--index", str(tmp_path / "no")],
                 ["--search", "x", "--collection", "nope", "--index", path]):
        failed = cli("index", *args)
        assert failed.returncode == 1 and failed.stderr.count("\n") == 1 and failed.stderr.startswith("edge-slm: ")
    assert cli("index", "--index", path).returncode == 2
