"""Devices asking through the broker, for load tests and soaks: the engine of
`scripts/simulate-devices` and of `python -m firmware_bridge.bench_serve`.

N devices, each its own MQTT connection (MQTT 5 with Response Topic and
Correlation Data, or MQTT 3.1.1 with the JSON envelope), ask either open
loop (questions published at a fixed rate, whatever the answers do) or
closed loop (C askers, each sending its next question once the last one's
final arrived), for a count or a duration. A mix sets what they send:

    ok         an equipment question
    malformed  a payload the protocol refuses (not JSON, wrong types, bad id, ...)
    oversized  over the payload limit (refused), or within it but over the
               model's context (too_long), alternately
    expired    ttl_s of a millisecond: answered `expired` without running
    cancel     a streamed question, cancelled when its first chunk arrives

Every answer message is timed on arrival (on the connection's network
thread, which does nothing else); the report says how many finals each
question got, so a question answered twice or never shows.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import math
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import paho.mqtt.client as mqtt

from edge_slm.errors import EdgeSlmError
from edge_slm.soak import MANUAL
from edge_slm.soak import QUESTIONS as SOAK_QUESTIONS

from . import protocol as p
from .client import DeviceClient
from .commands import connection_options, password
from .service import ServiceConfig

log = logging.getLogger(__name__)

QUESTIONS = SOAK_QUESTIONS + [
    "The pump runs but delivers no flow. What are the likely causes?",
    "Why is my centrifugal pump cavitating at low suction pressure?",
    "A ball valve is leaking through when closed. How do I fix it?",
    "How do I tell if a solenoid valve coil has failed?",
    "What does a high-pitched squeal from a motor bearing indicate?",
    "How much grease should a deep groove ball bearing get?",
    "The drive shows error code E07 overcurrent. What should I check?",
    "Controller fault F012 means low hydraulic oil pressure. What now?",
    "What vibration level on a pump bearing housing is too high?",
    "How do I replace a worn mechanical seal on a water pump?",
]

KINDS = ("ok", "malformed", "oversized", "expired", "cancel")
DEFAULT_MIX = "ok=100"
MALFORMED_MIX = "ok=70,malformed=10,oversized=5,expired=5,cancel=10"
# Statuses each kind may rightly end with. `busy` is right for any question
# the runtime had no room for; a cancel may lose the race to the last token.
EXPECTED = {
    "ok": {p.OK, p.BUSY},
    "malformed": {p.BAD_REQUEST},
    "oversized": {p.BAD_REQUEST, p.TOO_LONG, p.BUSY},
    "expired": {p.EXPIRED, p.BUSY},
    "cancel": {p.CANCELLED, p.OK, p.BUSY},
}
TINY_TTL_S = 0.001
CANCEL_TOKENS_FACTOR = 4
LINGER_S = 0.5
MAX_OUTGOING = 100_000  # after the last final: time for a duplicate to show up


def parse_mix(text: str) -> dict[str, float]:
    """'ok=70,malformed=10' -> weights by kind (they need not sum to 100)."""
    mix: dict[str, float] = {}
    for part in (x.strip() for x in text.split(",") if x.strip()):
        kind, sep, weight = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS or not sep:
            raise EdgeSlmError(f"mix {part!r}: expected KIND=WEIGHT with KIND one of {', '.join(KINDS)}")
        try:
            w = float(weight)
        except ValueError:
            raise EdgeSlmError(f"mix {part!r}: the weight is not a number") from None
        if not w >= 0 or math.isinf(w):
            raise EdgeSlmError(f"mix {part!r}: the weight must be a number >= 0")
        mix[kind] = mix.get(kind, 0.0) + w
    if not sum(mix.values()) > 0:
        raise EdgeSlmError(f"mix {text!r}: no kind has a weight above 0")
    return mix


def percentile(values: list[float], q: float) -> float | None:
    """The q-quantile (0..1), linear between the nearest ranks; None for no values."""
    if not values:
        return None
    xs = sorted(values)
    at = q * (len(xs) - 1)
    lo = math.floor(at)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


# ---- what the devices send ----

def _malformed(i: int, rid: str, question: str) -> tuple[bytes, bool]:
    """The i-th kind of bad payload, and whether the runtime can read its id
    (so a 3.1.1 device can tell which question a refusal is for)."""
    q = json.dumps(question)
    variants: list[tuple[bytes, bool]] = [
        (b"pump 7 pressure low??", False),                                # not JSON
        (b'["a list", "not an object"]', False),
        (f'{{"question": {q}}}'.encode(), False),                         # no id
        (f'{{"id": 7, "question": {q}}}'.encode(), False),
        (f'{{"id": "{rid}", "question": 7}}'.encode(), True),
        (b"\xff\xfe not UTF-8 \xc3", False),
        (b"[" * 64 + b"]" * 64, False),                                   # nested too deep
        (f'{{"id": "{rid}", "question": {q}, "max_tokens": 100000}}'.encode(), True),
        (json.dumps({"id": rid + "x" * p.MAX_ID, "question": question}).encode(), False),
        (f'{{"id": "{rid}", "question": {q}, "temperature": -1}}'.encode(), True),
        (json.dumps({"id": rid, "messages": [{"role": "robot", "content": question}]}).encode(), True),
    ]
    return variants[i % len(variants)]


def _oversized(i: int, rid: str, question: str, max_payload: int) -> tuple[bytes | None, str, bool]:
    """(raw payload or None, question text, id readable): alternately over the
    payload limit (refused before parsing) and within it but long enough to
    overflow any context the runtime has room for."""
    if i % 2 == 0:
        text = MANUAL * (max_payload // len(MANUAL) + 1) + question
        return json.dumps({"id": rid, "question": text}).encode(), text, False
    text = MANUAL * max(1, (max_payload - 1024) // len(MANUAL)) + question
    return None, text, True


# ---- the simulator ----

@dataclass
class SimConfig:
    devices: int = 4
    mqtt5: bool = True                  # False: MQTT 3.1.1 with the envelope's reply_to
    rate: float | None = None           # questions/s, open loop; None: closed loop
    per_device: bool = False            # rate is per device rather than in total
    concurrency: int = 4                # closed loop: askers, each one question at a time
    count: int | None = 100             # questions to send; or
    duration: float | None = None       # seconds to keep sending
    mix: dict[str, float] = field(default_factory=lambda: parse_mix(DEFAULT_MIX))
    stream: bool = True
    max_tokens: int = 64
    temperature: float = 0.0
    max_payload: int = p.MAX_PAYLOAD    # the runtime's, for oversized questions
    timeout: float = 120.0              # seconds to wait for one question's final
    seed: int = 0
    device_prefix: str = "sim-"

    def __post_init__(self) -> None:
        if (self.count is None) == (self.duration is None):
            raise EdgeSlmError("give exactly one of a question count and a duration")
        if self.devices < 1 or self.concurrency < 1:
            raise EdgeSlmError(f"devices {self.devices}, askers {self.concurrency}: each must be at least 1")
        if self.rate is not None and not self.rate > 0:
            raise EdgeSlmError(f"rate {self.rate!r}: must be more than 0 questions/s")

    @property
    def total_rate(self) -> float | None:
        return None if self.rate is None else self.rate * (self.devices if self.per_device else 1)


@dataclass
class Record:
    """One question, from publish to its final."""

    id: str
    device: str
    kind: str
    sent: float = 0.0                   # monotonic seconds
    first_chunk: float | None = None
    final: float | None = None
    status: str | None = None
    answer_tokens: int = 0
    chunks: int = 0
    finals: int = 0
    well_formed: bool = True            # False: refused as written (malformed, over the payload limit)
    cancel_sent: bool = False
    done: threading.Event = field(default_factory=threading.Event, repr=False)

    def as_dict(self, t0: float) -> dict[str, Any]:
        ms = lambda t: None if t is None else round(1000 * (t - self.sent), 1)  # noqa: E731
        return {"id": self.id, "device": self.device, "kind": self.kind, "status": self.status,
                "sent_s": round(self.sent - t0, 3), "first_chunk_ms": ms(self.first_chunk),
                "final_ms": ms(self.final), "answer_tokens": self.answer_tokens,
                "chunks": self.chunks, "finals": self.finals}


@dataclass
class SimReport:
    config: dict[str, Any]
    sent: int
    by_kind: dict[str, int]
    outcomes: dict[str, int]            # "kind:status" -> questions
    unexpected: dict[str, int]          # outcomes outside EXPECTED
    answered_once: int                  # questions with exactly one final
    missing: list[str]                  # ids with no final
    duplicated: list[str]               # ids with more than one final
    well_formed: int                    # questions the protocol accepts as written
    well_formed_answered_once: int
    strays: int                         # finals that matched no question of this run
    wall_s: float
    answers_per_s: float                # ok finals / wall time
    tokens_per_s: float                 # answer tokens of ok finals / wall time
    first_chunk_ms: dict[str, float | None]  # p50 / p95 over ok streamed answers
    final_ms: dict[str, float | None]        # p50 / p95 over ok answers
    records: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exactly_once(self) -> bool:
        """Every question, well-formed or not, got exactly one final."""
        return not self.missing and not self.duplicated and self.answered_once == self.sent

    def as_dict(self, records: bool = True) -> dict[str, Any]:
        d = asdict(self)
        d["exactly_once"] = self.exactly_once
        if not records:
            d.pop("records")
        return d

    def table(self) -> str:
        fmt = lambda x: "-" if x is None else f"{x:,.0f}"  # noqa: E731
        kinds = ", ".join(f"{k} {n}" for k, n in self.by_kind.items())
        lines = [
            f"questions sent           {self.sent}  ({kinds})",
            f"wall time, s             {self.wall_s:.1f}",
            f"answers/s (ok)           {self.answers_per_s:.2f}",
            f"tokens/s (ok answers)    {self.tokens_per_s:.1f}",
            f"first chunk p50/p95, ms  {fmt(self.first_chunk_ms['p50'])} / {fmt(self.first_chunk_ms['p95'])}",
            f"final p50/p95, ms        {fmt(self.final_ms['p50'])} / {fmt(self.final_ms['p95'])}",
            "outcomes                 " + ", ".join(f"{k} {n}" for k, n in sorted(self.outcomes.items())),
        ]
        if self.unexpected:
            lines.append("unexpected               " + ", ".join(f"{k} {n}" for k, n in
                                                               sorted(self.unexpected.items())))
        lines.append(f"well-formed answered once {self.well_formed_answered_once}/{self.well_formed}; "
                     f"all questions {self.answered_once}/{self.sent}"
                     + (f"; missing {len(self.missing)}" if self.missing else "")
                     + (f"; duplicated {len(self.duplicated)}" if self.duplicated else "")
                     + (f"; stray finals {self.strays}" if self.strays else ""))
        lines.append("every question answered exactly once: " + ("yes" if self.exactly_once else "NO"))
        return "\n".join(lines)


class Simulator:
    """Run with `run()`; `answered` counts finals so far, for a progress bar."""

    def __init__(self, connection: ServiceConfig, cfg: SimConfig):
        self.connection = connection
        self.cfg = cfg
        self.tag = uuid.uuid4().hex[:6]  # ids unique per run: the runtime dedups (device, id)
        self.records: dict[str, Record] = {}
        self.anonymous: dict[str, collections.deque[str]] = collections.defaultdict(collections.deque)
        self.lock = threading.Lock()
        self.answered = 0
        self.strays = 0
        self.devices: list[DeviceClient] = []
        self._rng = random.Random(cfg.seed)
        self._credit = dict.fromkeys(cfg.mix, 0.0)
        self._sent_of_kind: collections.Counter[str] = collections.Counter()  # picks each kind's variants
        self._index = 0
        self._stop_at: float | None = None

    # ---- connections ----

    def _connect(self) -> None:
        width = len(str(self.cfg.devices - 1))
        # A load generator must not drop its own questions: paho's queue of
        # unsent messages as long as the settings allow (the service's is short).
        connection = dataclasses.replace(self.connection, max_outgoing=MAX_OUTGOING)
        for k in range(self.cfg.devices):
            d = DeviceClient(connection, f"{self.cfg.device_prefix}{k:0{width}d}", mqtt5=self.cfg.mqtt5)
            d.client.on_message = lambda c, u, msg, d=d: self._on_message(d, msg)
            self.devices.append(d)
            if not self.cfg.mqtt5:
                # A 3.1.1 device's refusals go to its default answer topic:
                # the runtime could not read the envelope's reply_to.
                subscribed = threading.Event()
                d.client.on_subscribe = lambda *a, ev=subscribed: ev.set()
                d.client.subscribe(p.answer_topic(d.device), qos=1)
                if not subscribed.wait(10):
                    raise EdgeSlmError(f"broker {self.connection.broker}: no answer to our "
                                       "subscription in 10 s")

    def close(self) -> None:
        for d in self.devices:
            d.close()
        self.devices = []

    # ---- answers (network threads) ----

    def _on_message(self, device: DeviceClient, msg: mqtt.MQTTMessage) -> None:
        now = time.monotonic()
        try:
            answer = json.loads(msg.payload)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            log.warning("%s: an answer that is not a JSON object on %s", device.device, msg.topic)
            return
        props = msg.properties
        correlation = getattr(props, "CorrelationData", None) if props else None
        with self.lock:
            rid = correlation.decode(errors="replace") if correlation else answer.get("id")
            if not rid and answer.get("final"):
                queue = self.anonymous[device.device]
                rid = queue.popleft() if queue else None
            rec = self.records.get(rid) if isinstance(rid, str) else None
            if rec is None:
                self.strays += bool(answer.get("final"))
                return
            if not answer.get("final"):
                rec.chunks += 1
                if rec.first_chunk is None:
                    rec.first_chunk = now
                    if rec.kind == "cancel" and not rec.cancel_sent:
                        rec.cancel_sent = True
                        device.cancel(rec.id)
                return
            rec.finals += 1
            if rec.finals > 1:
                log.warning("%s: a second final answer (%s)", rec.id, answer.get("status"))
                return
            rec.final, rec.status = now, answer.get("status")
            rec.answer_tokens = int(answer.get("answer_tokens") or 0)
            self.answered += 1
        rec.done.set()

    # ---- questions ----

    def _next_kind(self) -> str:
        # Smooth weighted round robin: the mix holds over any stretch of
        # questions, not only on average, and kinds are interleaved.
        total = sum(self.cfg.mix.values())
        for kind, weight in self.cfg.mix.items():
            self._credit[kind] += weight
        kind = max(self._credit, key=self._credit.get)
        self._credit[kind] -= total
        return kind

    def _next(self, device: DeviceClient) -> Record | None:
        """Publish the next question from `device`; None once the count or duration is reached."""
        with self.lock:
            i = self._index
            if self.cfg.count is not None and i >= self.cfg.count or \
                    self._stop_at is not None and time.monotonic() >= self._stop_at:
                return None
            self._index += 1
            kind = self._next_kind()
            variant = self._sent_of_kind[kind]
            self._sent_of_kind[kind] += 1
            question = self._rng.choice(QUESTIONS)
            rec = Record(id=f"{self.tag}-{i:06d}", device=device.device, kind=kind)
            self.records[rec.id] = rec
            raw, readable = None, True
            if kind == "malformed":
                raw, readable = _malformed(variant, rec.id, question)
            elif kind == "oversized":
                raw, question, readable = _oversized(variant, rec.id, question, self.cfg.max_payload)
            if not readable and not self.cfg.mqtt5:
                self.anonymous[device.device].append(rec.id)
            rec.well_formed = raw is None
            rec.sent = time.monotonic()
        # A cancel is meant to land mid-answer: its question asks for a long one.
        max_tokens = min(p.MAX_TOKENS, CANCEL_TOKENS_FACTOR * self.cfg.max_tokens) if kind == "cancel" \
            else self.cfg.max_tokens
        request: dict[str, Any] = {"id": rec.id, "question": question, "max_tokens": max_tokens,
                                   "stream": self.cfg.stream or kind == "cancel",
                                   "temperature": self.cfg.temperature}
        if kind == "expired":
            request["ttl_s"] = TINY_TTL_S
        if raw is None:
            device.send(request)
        else:
            device.send_raw(rec.id, raw)
        return rec

    def _closed_loop(self, asker: int) -> None:
        device = self.devices[asker % len(self.devices)]
        while (rec := self._next(device)) is not None:
            if not rec.done.wait(self.cfg.timeout):
                log.warning("%s: no final within %g s", rec.id, self.cfg.timeout)

    def _open_loop(self) -> None:
        interval = 1.0 / self.cfg.total_rate
        start = time.monotonic()
        for n in range(sys.maxsize):
            delay = start + n * interval - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if self._next(self.devices[n % len(self.devices)]) is None:
                return

    def run(self, on_tick: Callable[[Simulator], None] | None = None) -> SimReport:
        """Send every question, wait for the finals (each up to cfg.timeout
        after it was sent), and report. `on_tick` is called every 0.2 s."""
        try:
            self._connect()
            t0 = time.monotonic()
            if self.cfg.duration is not None:
                self._stop_at = t0 + self.cfg.duration
            if self.cfg.rate is None:
                senders = [threading.Thread(target=self._closed_loop, args=(a,), daemon=True)
                           for a in range(self.cfg.concurrency)]
            else:
                senders = [threading.Thread(target=self._open_loop, daemon=True)]
            for s in senders:
                s.start()
            while any(s.is_alive() for s in senders) or self._waiting():
                if on_tick:
                    on_tick(self)
                time.sleep(0.2)
            if on_tick:
                on_tick(self)
            time.sleep(LINGER_S)
            return self.report(t0)
        finally:
            self.close()

    def _waiting(self) -> bool:
        now = time.monotonic()
        with self.lock:
            return any(r.final is None and now - r.sent < self.cfg.timeout for r in self.records.values())

    def report(self, t0: float) -> SimReport:
        with self.lock:
            recs = list(self.records.values())
            strays = self.strays
        ended = max((r.final for r in recs if r.final is not None), default=time.monotonic())
        wall = max(1e-9, ended - t0)
        ok = [r for r in recs if r.status == p.OK]
        outcomes = collections.Counter(f"{r.kind}:{r.status or 'missing'}" for r in recs)
        unexpected = {k: n for k, n in outcomes.items()
                      if k.split(":")[1] not in EXPECTED[k.split(":")[0]]}
        well = [r for r in recs if r.well_formed]
        first = [1000 * (r.first_chunk - r.sent) for r in ok if r.first_chunk is not None]
        final = [1000 * (r.final - r.sent) for r in ok]
        cfg = asdict(self.cfg)
        cfg["broker"] = self.connection.broker
        return SimReport(
            config=cfg, sent=len(recs), by_kind=dict(collections.Counter(r.kind for r in recs)),
            outcomes=dict(outcomes), unexpected=unexpected,
            answered_once=sum(r.finals == 1 for r in recs),
            missing=[r.id for r in recs if r.finals == 0],
            duplicated=[r.id for r in recs if r.finals > 1],
            well_formed=len(well), well_formed_answered_once=sum(r.finals == 1 for r in well),
            strays=strays, wall_s=wall, answers_per_s=len(ok) / wall,
            tokens_per_s=sum(r.answer_tokens for r in ok) / wall,
            first_chunk_ms={"p50": percentile(first, 0.5), "p95": percentile(first, 0.95)},
            final_ms={"p50": percentile(final, 0.5), "p95": percentile(final, 0.95)},
            records=[r.as_dict(t0) for r in sorted(recs, key=lambda r: r.id)])


def simulate(connection: ServiceConfig, cfg: SimConfig, progress: bool = False,
             on_tick: Callable[[Simulator], None] | None = None) -> SimReport:
    """Run a simulation; with `progress`, a bar on stderr. `on_tick` as for Simulator.run."""
    sim = Simulator(connection, cfg)
    if not progress:
        return sim.run(on_tick)
    if cfg.count is not None:
        length, label, done = cfg.count, "finals", lambda s: s.answered
    else:
        start = time.monotonic()
        length, label = math.ceil(cfg.duration), "seconds"
        done = lambda s: min(length, int(time.monotonic() - start))  # noqa: E731
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        shown = 0

        def tick(s: Simulator) -> None:
            nonlocal shown
            now = done(s)
            bar.update(now - shown)
            shown = now
            if on_tick:
                on_tick(s)

        return sim.run(tick)


# ---- the command line (scripts/simulate-devices) ----

@click.command("simulate-devices")
@connection_options
@click.option("--devices", type=click.IntRange(1, 10000), default=4, show_default=True)
@click.option("--mqtt311", is_flag=True, help="Speak MQTT 3.1.1 with the JSON envelope.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Open loop: questions/s in total (or per device with --per-device).")
@click.option("--per-device", is_flag=True, help="--rate is per device.")
@click.option("--concurrency", type=click.IntRange(1, 10000), default=4, show_default=True,
              help="Closed loop (no --rate): askers, each waiting for its answer before asking again.")
@click.option("--count", type=click.IntRange(1), default=None, help="Questions to send (default 100).")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds to keep sending, instead of a count.")
@click.option("--mix", default=DEFAULT_MIX, show_default=True,
              help=f"Weights of {', '.join(KINDS)}, e.g. '{MALFORMED_MIX}'.")
@click.option("--stream/--no-stream", default=True, show_default=True, help="Ask for streamed chunks.")
@click.option("--max-tokens", type=click.IntRange(1, p.MAX_TOKENS), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, p.MAX_TEMPERATURE), default=0.0, show_default=True)
@click.option("--max-payload", type=click.IntRange(256, 1 << 20), default=p.MAX_PAYLOAD, show_default=True,
              help="The runtime's payload limit (oversized questions go past it).")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=120.0, show_default=True,
              help="Seconds to wait for a question's final.")
@click.option("--seed", type=int, default=0, show_default=True, help="Chooses the questions.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the report and every question's record here.")
@click.option("-v", "--verbose", count=True)
def main(broker, ca, cert, key, username, password_file, devices, mqtt311, rate, per_device, concurrency,
         count, duration, mix, stream, max_tokens, temperature, max_payload, timeout, seed, json_path,
         verbose) -> None:
    """Devices asking edge-slm questions over MQTT: throughput, latency, and
    whether every question got exactly one final answer."""
    from edge_slm.paths import check_writable, output_file


    logging.basicConfig(level=[logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)],
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        check_writable(json_path)
        connection = ServiceConfig(broker=broker or "mqtt://127.0.0.1:1883", ca=ca, cert=cert, key=key,
                                   username=username, password=password(password_file))
        cfg = SimConfig(devices=devices, mqtt5=not mqtt311, rate=rate, per_device=per_device,
                        concurrency=concurrency, count=count if count or duration else 100,
                        duration=duration, mix=parse_mix(mix), stream=stream, max_tokens=max_tokens,
                        temperature=temperature, max_payload=max_payload, timeout=timeout, seed=seed)
        report = simulate(connection, cfg, progress=sys.stderr.isatty())
    except EdgeSlmError as e:
        raise click.ClickException(str(e)) from None
    click.echo(report.table())
    if json_path is not None:
        with output_file(json_path) as f:
            f.write((json.dumps(report.as_dict(), indent=2) + "\n").encode())
        click.echo(f"wrote {json_path}")
    if not report.exactly_once:
        sys.exit(1)
