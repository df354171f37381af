"""Golden prompts: the questions a board asks a model before it trusts it,
each with the words one of which its answer must hold.

A candidate is checked in a child process (`python -m edge_slm.fleet.golden`)
under the board's memory budget, beside the running service: a model that
crashes or hangs the loader takes only the child down, and the service
answers on meanwhile. The board therefore needs room for the candidate's
plan beside the running process during the check; install refuses when the
memory available is less."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ..errors import EdgeSlmError

ANSWER_TOKENS = 48     # the facts come first; more only costs time
CHECK_TIMEOUT_S = 300  # loading and answering on a Pi 4 takes well under this


class GoldenFailed(EdgeSlmError):
    """A model that does not answer its golden prompts (or does not load)."""


def failures(engine, golden: list[dict]) -> list[str]:
    """Each golden prompt the engine's answer fails, as a line saying how."""
    from ..engine import OK

    tokens = min(ANSWER_TOKENS, engine.cfg.max_tokens)
    reqs = [engine.submit(messages=[{"role": "user", "content": g["question"]}], max_tokens=tokens,
                          ground=False, timeout=CHECK_TIMEOUT_S) for g in golden]
    out = []
    for g, req in zip(golden, reqs):
        r = req.result(CHECK_TIMEOUT_S + 10)
        if r.status != OK:
            out.append(f"{g['question']!r}: {r.status} ({r.error})")
        elif not any(word.lower() in r.text.lower() for word in g["must_contain"]):
            out.append(f"{g['question']!r}: answered {r.text.strip()[:80]!r}, without "
                       f"{' or '.join(repr(w) for w in g['must_contain'])}")
    return out


def check_candidate(model: Path, golden: list[dict], memory_budget: int | None, needs: int) -> None:
    """Load `model` in a child process under `memory_budget` and ask its
    golden prompts; raises GoldenFailed saying why it is not to be trusted."""
    available = _meminfo("MemAvailable")
    if available and needs > available:
        raise GoldenFailed(f"{needs >> 20} MiB are needed to check the model beside the running one; "
                           f"{available >> 20} MiB are available")
    cmd = [sys.executable, "-m", "edge_slm.fleet.golden", str(model)]
    if memory_budget:
        cmd += ["--memory-budget", str(memory_budget)]
    try:
        proc = subprocess.run(cmd, input=json.dumps(golden), capture_output=True, text=True,
                              timeout=CHECK_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise GoldenFailed(f"the model did not answer its golden prompts within {CHECK_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        lines = (proc.stdout.strip() or proc.stderr.strip() or f"exit {proc.returncode}").splitlines()
        raise GoldenFailed(lines[-1][:300])


def _meminfo(field: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> int:
    """The child: MODEL [--memory-budget N], golden prompts as JSON on stdin;
    exit 0 when all pass, else 1 with the reason as the last line of stdout."""
    from ..engine import Engine, EngineConfig

    args = sys.argv[1:]
    budget = int(args[args.index("--memory-budget") + 1]) if "--memory-budget" in args else None
    golden = json.loads(sys.stdin.read())
    try:
        with Engine(EngineConfig(model=args[0], memory_budget=budget, slots=1, grounding=False,
                                 max_tokens=ANSWER_TOKENS)) as engine:
            failed = failures(engine, golden)
    except EdgeSlmError as e:
        print(f"the model does not load: {e}")
        return 1
    if failed:
        print(f"{len(failed)} of {len(golden)} golden prompts failed; first: {failed[0]}")
        return 1
    print(f"{len(golden)} golden prompts answered")
    return 0


if __name__ == "__main__":
    sys.exit(main())
