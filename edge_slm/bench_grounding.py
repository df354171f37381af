"""What grounding costs, for `edge-slm bench`.

A synthetic library of manuals (the same bytes every run, from a fixed seed)
is indexed once; retrieval is timed alone on it; and the same questions are
asked through the engine grounded and ungrounded, in a process of its own
per thread count, as the bench's other rounds are:

    python -m edge_slm.bench_grounding --model M.gguf --index I.sqlite3 \
        --threads 2 --ctx 2048 --questions Q.json

which asks each question of Q.json both ways and prints one JSON line on
stdout: each request's time to first token, prompt length and grounding label."""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger("edge_slm.bench_grounding")

CORPUS_SEED = 2718
N_MANUALS = 40          # Markdown manuals, one machine each, a page per section
N_BULLETINS = 40        # plain-text service bulletins, a page each
PAGE_WORDS = (300, 600)  # a printed page of a manual
N_QUERIES = 50          # searched to time retrieval: codes alone, and questions
N_CODE_QUERIES = 20
RETRIEVAL_REPS = 5      # timed passes over the queries, after one untimed warm-up pass
FLUSH_PROMPT = "Hello"  # a raw prompt: no chat markup, so it shares no prefix with a chat prompt


# ---- the corpus ----

@dataclass(frozen=True)
class Family:
    prefix: str                 # of the machine names: HP-30, HP-45, ...
    kind: str
    parts: tuple[str, ...]      # what this kind of machine is built of, besides the common parts


FAMILIES = (
    Family("HP", "centrifugal pump", ("impeller", "volute casing", "suction strainer", "wear ring")),
    Family("AC", "screw compressor", ("air end", "intake filter", "oil separator", "minimum pressure valve")),
    Family("CV", "belt conveyor", ("drive drum", "tail pulley", "conveyor belt", "take-up unit")),
    Family("PX", "hydraulic press", ("ram", "hydraulic cylinder", "die cushion", "light curtain")),
    Family("GB", "helical gearbox", ("input shaft", "output shaft", "oil seal", "breather valve")),
    Family("MX", "paddle mixer", ("agitator shaft", "paddle", "mixing tank", "discharge gate")),
    Family("CH", "water chiller", ("evaporator", "condenser", "expansion valve", "refrigerant circuit")),
    Family("FN", "radial fan", ("fan wheel", "fan housing", "inlet damper", "belt guard")),
)
COMMON_PARTS = ("motor", "coupling", "controller", "pressure sensor", "temperature sensor",
                "contactor", "terminal box", "display", "main switch", "base frame")
CONDITIONS = ("overheated", "signal lost", "overcurrent", "pressure too low", "pressure too high",
              "speed out of range", "vibration too high", "short circuit", "not calibrated",
              "supply voltage too low", "communication timeout", "end position not reached")
ACTIONS = ("Let the {p} cool for {n} minutes, then restart and watch the current draw.",
           "Check the cable of the {p} at terminal X{n} and tighten the screws.",
           "Replace the {p} and reset the fault on the display.",
           "Measure the supply at the terminal box; it must be within 10 % of the rating.",
           "Clean the {p}, then run the machine at half load for {n} minutes.",
           "Call service: the {p} must be inspected before the machine runs again.")
SECTIONS = ("Specifications", "Safety instructions", "Transport and storage", "Installation",
            "Electrical connection", "Commissioning", "Operation", "Controls and display",
            *(f"Error codes E-{k}xx" for k in range(1, 10)),
            "Bearings", "Seals and gaskets", "Lubrication", "Maintenance schedule", "Torque values",
            "Spare parts", "Noise and vibration", "Decommissioning and disposal")
CORPUS_PAGES = N_MANUALS * len(SECTIONS) + N_BULLETINS  # what write_corpus writes by default
BEARINGS = ("6203-2RS", "6204-2RS", "6205-2RS", "6206-ZZ", "6305-2RS", "6306-ZZ", "NU206-E", "22208-E1")
FILLER = (
    "Before any work on the {p}, switch the {m} off at the main switch and lock it.",
    "The {p} of the {m} must be inspected by a trained technician at every scheduled service.",
    "Record every reading in the service log, so that a slow change shows over the months.",
    "If the {p} runs warmer than usual, reduce the load and check it again after {n} minutes.",
    "Use genuine spare parts only; a part that merely fits may shorten the life of the {p}.",
    "Keep the area around the {m} clear of tools, rags and loose material.",
    "A {p} that has been removed must be cleaned and checked for wear before it is refitted.",
    "Wear gloves and eye protection when you handle the {p}.",
    "The values given here hold for an ambient temperature between 5 and 40 deg C.",
    "Compare each measured value with the commissioning record of this {k}.",
    "Never bridge a safety device of the {m}, not even for a short test run.",
    "A change in the sound of the {p} is often the first sign of wear.",
    "Tighten every screw you loosened to the torque given in the section on torque values.",
    "The {m} leaves the factory tested; the test report is in the document pocket.",
    "Where two technicians work on the {m}, agree beforehand who switches it on again.",
    "Dispose of used oil, filters and cleaning cloths as the local rules require.",
    "After {h} operating hours the {p} should be checked even if it shows no fault.",
    "Dust on the {p} hinders cooling; blow it off with dry compressed air at low pressure.",
    "Write the date and the operating hours on the label of every part you replace.",
    "If in doubt, stop the {m} and ask: a short stop costs less than a damaged {p}.",
)


@dataclass(frozen=True)
class Query:
    text: str
    file: str          # the manual that answers it, relative to the corpus folder
    code: bool         # a code or part number alone, not a question


@dataclass(frozen=True)
class Corpus:
    root: Path
    pages: int         # manual sections and bulletins written, each a page of PAGE_WORDS words
    manuals: int
    bulletins: int
    words: int
    bytes: int
    queries: list[Query]


class _Writer:
    """Pages of one corpus, drawn from one seeded generator, and the facts
    they state, from which the queries are made."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.facts: list[Query] = []
        self.words = 0

    def filler(self, words: int, machine: str, kind: str, parts: tuple[str, ...]) -> str:
        """Paragraphs of plain sentences about `machine`, about `words` long."""
        rng, paragraphs, n = self.rng, [], 0
        while n < words:
            sentences = [rng.choice(FILLER).format(m=machine, k=kind, p=rng.choice(parts),
                                                   n=rng.randrange(1, 13) * 5, h=rng.randrange(1, 50) * 100)
                         for _ in range(rng.randrange(4, 8))]
            paragraphs.append(" ".join(sentences))
            n += sum(len(s.split()) for s in sentences)
        return "\n\n".join(paragraphs)

    def page(self, facts: str, machine: str, kind: str, parts: tuple[str, ...]) -> str:
        target = self.rng.randrange(*PAGE_WORDS)
        body = facts + "\n\n" + self.filler(target - len(facts.split()), machine, kind, parts)
        self.words += len(body.split())
        return body

    def manual(self, rel: str, machine: str, family: Family) -> str:
        parts = family.parts + COMMON_PARTS
        out = [f"# {machine} {family.kind}: Service Manual"]
        for section in SECTIONS:
            facts = self.facts_of(section, rel, machine, parts)
            out.append(f"## {section}\n\n{self.page(facts, machine, family.kind, parts)}")
        return "\n\n".join(out) + "\n"

    def facts_of(self, section: str, rel: str, machine: str, parts: tuple[str, ...]) -> str:
        """What `section` of `machine`'s manual states, a few of them kept as queries."""
        rng = self.rng
        if section.startswith("Error codes"):
            k = section[len("Error codes E-")]
            codes = sorted(rng.sample(range(100), 8))
            rows = ["| Code | Meaning | What to do |", "|------|---------|------------|"]
            for c in codes:
                part = rng.choice(parts)
                rows.append(f"| E-{k}{c:02d} | {part.capitalize()} {rng.choice(CONDITIONS)} | "
                            f"{rng.choice(ACTIONS).format(p=part, n=rng.randrange(2, 9))} |")
            code = f"E-{k}{rng.choice(codes):02d}"
            self.facts += [Query(f"{machine} {code}", rel, True),
                           Query(f"The {machine} stopped and shows {code}. What does that mean?", rel, False)]
            return (f"The controller of the {machine} shows one of these error codes on the display "
                    "and stops the machine.\n\n" + "\n".join(rows))
        if section == "Bearings":
            de, nde = rng.sample(BEARINGS, 2)
            self.facts += [Query(f"Which bearing is fitted at the drive end of the {machine}?", rel, False)]
            return (f"The drive-end bearing fitted to the {machine} is a {de}; the non-drive-end bearing "
                    f"is a {nde}. Replace both bearings every {rng.randrange(8, 40) * 1000:,} "
                    "operating hours.")
        if section == "Torque values":
            lines = [f"- {p.capitalize()} bolts M{rng.choice((8, 10, 12, 16))}: {rng.randrange(10, 120)} Nm"
                     for p in rng.sample(parts, 4)]
            self.facts += [Query(f"What torque do the bolts of the {machine} need?", rel, False)]
            return f"Tighten the bolts of the {machine} crosswise, to these torques:\n\n" + "\n".join(lines)
        if section == "Spare parts":
            numbers = [f"{rng.randrange(10, 99)}-{rng.randrange(1000, 9999)}" for _ in parts[:6]]
            lines = [f"- {p.capitalize()}: part number {n}" for p, n in zip(parts, numbers)]
            self.facts += [Query(numbers[0], rel, True)]
            return f"Spare parts for the {machine}, by part number:\n\n" + "\n".join(lines)
        if section == "Specifications":
            return (f"Rated power {rng.randrange(5, 900) / 10} kW at {rng.choice((960, 1450, 2900))} rpm, "
                    f"supply 400 V 50 Hz, weight {rng.randrange(20, 900)} kg without the motor.")
        if section == "Maintenance schedule":
            part = rng.choice(parts)
            hours = rng.randrange(2, 40) * 500
            self.facts += [Query(f"How often should the {part} of the {machine} be replaced?", rel, False)]
            return (f"- Every week: look for leaks and listen for unusual noise.\n"
                    f"- Every {hours:,} hours: replace the {part} of the {machine}.")
        return f"This section covers the {section.lower()} of the {machine}."

    def bulletin(self, number: int, machines: list[str]) -> str:
        applies = self.rng.sample(machines, 3)
        part = self.rng.choice(COMMON_PARTS)
        head = (f"Service bulletin SB-{number:04d}\n\nApplies to: {', '.join(applies)}.\n\n"
                f"Some units were delivered with a {part} from a faulty batch. Inspect the {part} "
                "at the next service and replace it if its label shows batch 7 or 8.")
        return self.page(head, applies[0], "machine", COMMON_PARTS) + "\n"


def write_corpus(root: Path, *, manuals: int = N_MANUALS, bulletins: int = N_BULLETINS,
                 queries: int = N_QUERIES, seed: int = CORPUS_SEED) -> Corpus:
    """Write the library under `root` (which must not hold other manuals):
    `manuals` Markdown manuals of len(SECTIONS) pages and `bulletins` text
    pages, the same bytes for the same arguments on every machine."""
    w = _Writer(seed)
    names: list[tuple[str, Family]] = []
    taken: set[str] = set()
    while len(names) < manuals:
        family = FAMILIES[len(names) % len(FAMILIES)]
        name = f"{family.prefix}-{w.rng.randrange(10, 990)}"
        if name not in taken:
            taken.add(name)
            names.append((name, family))
    size = 0
    for name, family in names:
        rel = f"manuals/{name.lower()}-service.md"
        size += _write(root / rel, w.manual(rel, name, family))
    for i in range(bulletins):
        size += _write(root / f"bulletins/sb-{i + 1:04d}.txt", w.bulletin(i + 1, [n for n, _ in names]))
    codes = [q for q in w.facts if q.code]
    asked = [q for q in w.facts if not q.code]
    n_codes = min(len(codes), N_CODE_QUERIES * queries // N_QUERIES)
    chosen = w.rng.sample(codes, n_codes) + w.rng.sample(asked, min(len(asked), queries - n_codes))
    return Corpus(root, pages=manuals * len(SECTIONS) + bulletins, manuals=manuals, bulletins=bulletins,
                  words=w.words, bytes=size, queries=chosen)


def _write(path: Path, text: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = text.encode()
    path.write_bytes(data)
    return len(data)


# ---- indexing and retrieval, timed ----

def index_corpus(corpus: Corpus, index_path: Path) -> dict[str, float]:
    """Index the corpus into a new file: passages, seconds, and the file's size once closed."""
    from .grounding import Index

    t0 = time.perf_counter()
    with Index.open(index_path) as idx:
        report = idx.add_folder(corpus.root, "bench")
        passages = sum(c.passages for c in idx.collections())
    seconds = time.perf_counter() - t0
    if report.skipped:
        raise RuntimeError(f"the bench's own corpus had files skipped: {report.skipped[:3]}")
    # Closing the last connection checkpoints the WAL into the file, so its size is the index's.
    return {"passages": passages, "seconds": seconds, "bytes": index_path.stat().st_size}


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q from 0 to 100): a value that was measured."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def measure_retrieval(index_path: Path, queries: list[Query], reps: int = RETRIEVAL_REPS) -> dict:
    """Index.search alone over `queries`, `reps` times each after a warm-up
    pass (the page cache filled, as in a running engine): milliseconds per
    search, and whether the answers were where they should be."""
    from .engine import EngineConfig
    from .grounding.ground import DEFAULT_THRESHOLD
    from .grounding.index import Index

    limit = EngineConfig.ground_passages  # as many passages as the engine asks for
    times: list[float] = []
    with Index.open(index_path, create=False) as idx:
        first = [idx.search(q.text, limit=limit) for q in queries]
        for _ in range(reps):
            for q in queries:
                t0 = time.perf_counter()
                idx.search(q.text, limit=limit)
                times.append((time.perf_counter() - t0) * 1e3)
    return {"queries": len(queries), "reps": reps, "limit": limit,
            "median_ms": statistics.median(times), "p95_ms": percentile(times, 95), "max_ms": max(times),
            # a check that the timed searches did real work: the right manual came first
            "top_hit_in_manual": sum(bool(h) and h[0].file == q.file for h, q in zip(first, queries)),
            "covered": sum(bool(h) and h[0].coverage >= DEFAULT_THRESHOLD for h in first)}


def ttft_questions(corpus: Corpus, n: int) -> list[str]:
    """The questions (not bare codes) asked through the engine, n of them, cycled if need be."""
    asked = [q.text for q in corpus.queries if not q.code]
    return [asked[i % len(asked)] for i in range(n)]


# ---- time to first token, grounded and not (the child process) ----

@dataclass
class Sample:
    question: str
    grounded: bool
    ttft_ms: float
    prompt_tokens: int
    cached_tokens: int      # 0: each prompt is prefilled whole (see measure_ttft)
    label: str | None       # Result.grounding
    passages: int           # in the prompt


def measure_ttft(engine, questions: list[str]) -> list[Sample]:
    """Each question asked grounded and ungrounded, one token of answer, the
    order swapped every pair so drift hits both alike. Before every timed
    request an untimed raw prompt empties the slot's cache of any chat
    prefix, so neither kind is helped by the one before: both pay their
    whole prompt, retrieval included for the grounded one."""
    from .engine import OK
    from .grounding.ground import GROUNDED

    engine.submit(prompt=FLUSH_PROMPT, max_tokens=1).result()  # warm-up: pages, thread pool
    samples = []
    for i, question in enumerate(questions):
        for grounded in ((True, False) if i % 2 == 0 else (False, True)):
            engine.submit(prompt=FLUSH_PROMPT, max_tokens=1).result()
            r = engine.submit(messages=[{"role": "user", "content": question}], max_tokens=1,
                              ground=grounded).result()
            if r.status != OK or r.ttft_s is None or (r.grounding == GROUNDED) != grounded:
                raise RuntimeError(f"{question!r} (ground={grounded}): {r.status}, "
                                   f"grounding {r.grounding}, {r.error or r.finish_reason}")
            samples.append(Sample(question, grounded, r.ttft_s * 1e3, r.prompt_tokens,
                                  r.cached_tokens, r.grounding, len(r.sources)))
    return samples


def summarize_ttft(samples: list[dict]) -> dict:
    """Medians over the samples of one thread count, grounded against ungrounded."""
    med = statistics.median

    def of(grounded: bool, key: str) -> float:
        return med(s[key] for s in samples if s["grounded"] == grounded)

    g, u = of(True, "ttft_ms"), of(False, "ttft_ms")
    return {"grounded_ms": g, "ungrounded_ms": u, "ratio": g / u, "extra_ms": g - u,
            "grounded_prompt_tokens": of(True, "prompt_tokens"),
            "ungrounded_prompt_tokens": of(False, "prompt_tokens"),
            "pairs": sum(s["grounded"] for s in samples), "samples": samples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edge_slm.bench_grounding",
                                description="Time to first token, grounded and ungrounded.")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--index", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--questions", type=Path, required=True, help="JSON list written by the parent")
    p.add_argument("--backend", default=None, help="edge-slm kernel table (default: the best)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    from .engine import Engine, EngineConfig

    questions = json.loads(a.questions.read_text())
    t0 = time.perf_counter()
    # One slot: the figures are one request's, with nothing else running.
    with Engine(EngineConfig(model=a.model, index=a.index, slots=1, threads=a.threads, ctx=a.ctx,
                             backend=a.backend)) as engine:
        load_s = time.perf_counter() - t0
        samples = measure_ttft(engine, questions)
        backend = engine.runtime.backend
    sys.stdout.write(json.dumps({"samples": [asdict(s) for s in samples], "load_s": load_s,
                                 "backend": backend}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
