"""The MQTT protocol between devices and edge-slm, version v1: topics,
limits, status codes, and the checks every question goes through. Declared
once here; PROTOCOL.md says the same thing for firmware authors, and
tests/test_protocol.py holds the two together.

    edge-slm/v1/<device_id>/ask       device -> runtime   a question (JSON)
    edge-slm/v1/<device_id>/cancel    device -> runtime   {"id": "..."}
    edge-slm/v1/<device_id>/answer    runtime -> device   chunks and the final (default reply topic)
    edge-slm/v1/_runtime/<runtime_id>/status              retained: online / offline
    edge-slm/v1/_fleet/<board>/offer    operator -> board   a signed bundle's manifest (JSON)
    edge-slm/v1/_fleet/<board>/need     board -> operator   the chunks it wants next (JSON)
    edge-slm/v1/_fleet/<board>/chunk    operator -> board   one chunk of the model (binary)
    edge-slm/v1/_fleet/<board>/result   board -> operator   how the update goes (JSON)
    edge-slm/v1/_fleet/<board>/command  operator -> board   a signed rollback (JSON)
    edge-slm/v1/_fleet/<board>/state    retained: its slots, models, last update result
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

VERSION = "v1"
ROOT = f"edge-slm/{VERSION}"
RUNTIME_SEGMENT = "_runtime"  # not a valid device id, so it cannot collide with one

ASK, CANCEL, ANSWER, STATUS = "ask", "cancel", "answer", "status"

# Limits a question is checked against. Sizes are bytes of the raw payload.
MAX_PAYLOAD = 16 * 1024          # default; `serve --max-payload` changes it
MAX_ID = 64                      # characters of a request id
MAX_DEVICE_ID = 64
MAX_MESSAGES = 64                # chat messages in one question
MAX_DEPTH = 4                    # JSON nesting: {"messages": [{"role": ...}]} is 3
MAX_TOKENS = 4096                # the engine clamps further to its configured max_tokens
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.001, 5.0  # or 0, greedy; below, sampling is greedy in all but name
MAX_SEED = 2**63 - 1
MAX_TTL_S = 7 * 24 * 3600
MAX_TOPIC = 256                  # characters of a response topic
MAX_COLLECTION = 64              # characters of a collection name (as `edge-slm index` allows)
ROLES = ("system", "user", "assistant")

# Status of a final answer. "ok" carries the text; each other is an error code.
OK = "ok"
BAD_REQUEST = "bad_request"
TOO_LONG = "too_long"
BUSY = "busy"
EXPIRED = "expired"
TIMEOUT = "timeout"
CANCELLED = "cancelled"
INTERNAL = "internal"
STATUSES = (OK, BAD_REQUEST, TOO_LONG, BUSY, EXPIRED, TIMEOUT, CANCELLED, INTERNAL)

CONTENT_TYPE = "application/json"
STATUS_PROPERTY = "status"  # MQTT 5 User Property on every answer

_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,%d}" % (MAX_DEVICE_ID - 1))


def ask_topic(device: str) -> str:
    return f"{ROOT}/{device}/{ASK}"


def cancel_topic(device: str) -> str:
    return f"{ROOT}/{device}/{CANCEL}"


def answer_topic(device: str) -> str:
    return f"{ROOT}/{device}/{ANSWER}"


def status_topic(runtime_id: str) -> str:
    return f"{ROOT}/{RUNTIME_SEGMENT}/{runtime_id}/{STATUS}"


# Fleet updates (edge_slm/fleet, firmware_bridge/fleet_link.py): a board is a runtime,
# named by its runtime id. Chunks are MQTT 5 binary payloads with User Properties.
FLEET_SEGMENT = "_fleet"
OFFER, NEED, CHUNK, RESULT, COMMAND, STATE = "offer", "need", "chunk", "result", "command", "state"
FLEET_CHUNK = 128 * 1024         # bytes of model per chunk message
FLEET_WINDOW = 8                 # chunks a board asks for at once: what is in flight
MAX_OFFER = 128 * 1024           # bytes of an offer or command (a manifest is at most 64 KiB)
# A board's update, as its result messages report it.
ACCEPTED, RECEIVING, CHECKING, SWITCHED, COMMITTED, REFUSED, ROLLED_BACK = (
    "accepted", "receiving", "checking", "switched", "committed", "refused", "rolled_back")
FLEET_STATES = (ACCEPTED, RECEIVING, CHECKING, SWITCHED, COMMITTED, REFUSED, ROLLED_BACK)


def fleet_topic(board: str, kind: str) -> str:
    return f"{ROOT}/{FLEET_SEGMENT}/{board}/{kind}"


def subscriptions(share_group: str | None = None) -> list[str]:
    """The filters the runtime subscribes to. Questions go through an MQTT 5
    shared subscription when several runtimes split the load; cancels reach
    every runtime, since only the one holding the question knows it."""
    ask = f"{ROOT}/+/{ASK}"
    return [f"$share/{share_group}/{ask}" if share_group else ask, f"{ROOT}/+/{CANCEL}"]


def valid_device_id(device: str) -> bool:
    return bool(_DEVICE_ID.fullmatch(device))


def parse_topic(topic: str) -> tuple[str, str] | None:
    """(device_id, "ask" | "cancel") for a topic the runtime listens on, else None."""
    parts = topic.split("/")
    if len(parts) != 4 or "/".join(parts[:2]) != ROOT or parts[3] not in (ASK, CANCEL):
        return None
    return (parts[2], parts[3]) if valid_device_id(parts[2]) else None


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching (`+` one level, `#` the rest)."""
    p, t = pattern.split("/"), topic.split("/")
    for i, level in enumerate(p):
        if level == "#":
            return i == len(p) - 1
        if i >= len(t) or level != "+" and level != t[i]:
            return False
    return len(p) == len(t)


DEFAULT_REPLY_SCOPE = f"{ROOT}/{{device}}/{ANSWER}/#"  # `answer` itself and below


def reply_allowed(topic: str, device: str, scope: str = DEFAULT_REPLY_SCOPE) -> bool:
    """Whether an answer may be published to `topic` for `device`. The scope is
    an MQTT filter in which `{device}` stands for the asker's id; by default
    the asker's own answer topics, so no device can make the runtime publish
    model text onto another device's topics, nor onto its own ask and cancel."""
    if not topic or len(topic) > MAX_TOPIC or any(c in topic for c in "+#\0") or topic.startswith("$"):
        return False
    return topic_matches(scope.replace("{device}", device), topic)


class BadRequest(Exception):
    """A question that fails a check; `rid` is its id when one could be read."""

    def __init__(self, message: str, rid: str | None = None):
        super().__init__(message)
        self.rid = rid


@dataclass
class Question:
    device: str
    id: str
    question: str | None = None                 # or:
    messages: list[dict[str, str]] | None = None
    system: str | None = None
    max_tokens: int | None = None
    stream: bool = False
    temperature: float | None = None
    seed: int | None = None
    ground: bool | None = None                  # None: grounded when the runtime has an index
    collection: str | None = None               # the manuals searched; None = all
    reply_to: str = ""                          # topic for the answers
    correlation: bytes | None = None            # MQTT 5 Correlation Data, echoed
    mqtt5: bool = False                         # the question carried a Response Topic
    expires_at: float | None = None             # wall-clock seconds; None = never
    received_at: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)  # unknown fields, ignored

    @property
    def key(self) -> tuple[str, str]:
        return (self.device, self.id)


def _nesting_ok(payload: bytes) -> bool:
    """Bracket depth, counted before parsing: a payload of 16 KiB of `[`
    would otherwise reach the parser's recursion limit."""
    depth, in_string, escaped = 0, False, False
    for b in payload:
        if in_string:
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:
                in_string = False
        elif b == 0x22:
            in_string = True
        elif b in (0x5B, 0x7B):
            depth += 1
            if depth > MAX_DEPTH:
                return False
        elif b in (0x5D, 0x7D):
            depth -= 1
    return True


_ID_PEEK = re.compile(rb'"id"\s*:\s*"([A-Za-z0-9_.:-]{1,%d})"' % MAX_ID)


def _peek_id(payload: bytes) -> str | None:
    """The id of a payload too large to parse, if its opening bytes show one
    plainly, so its refusal can name it."""
    m = _ID_PEEK.search(payload[:1024])
    return m.group(1).decode() if m else None


def _text(obj: dict, name: str, rid: str | None, limit: int, required: bool = False) -> str | None:
    value = obj.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name} is missing", rid)
        return None
    if not isinstance(value, str):
        raise BadRequest(f"{name} must be a string, not {type(value).__name__}", rid)
    if len(value) > limit:
        raise BadRequest(f"{name} is longer than {limit} characters", rid)
    return value


def _whole(obj: dict, name: str, rid: str | None, least: int, most: int) -> int | None:
    value = obj.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= most:
        raise BadRequest(f"{name} must be a whole number from {least} to {most}, not {value!r}", rid)
    return value


def parse_question(payload: bytes, device: str, *, now: float, max_payload: int = MAX_PAYLOAD,
                   response_topic: str | None = None, correlation: bytes | None = None,
                   expiry_s: float | None = None, reply_scope: str = DEFAULT_REPLY_SCOPE) -> Question:
    """Check a question's payload (and its MQTT 5 properties) and return it;
    raise BadRequest naming the first thing wrong. `now` is wall-clock time."""
    if len(payload) > max_payload:
        raise BadRequest(f"payload is {len(payload)} bytes, more than {max_payload}", _peek_id(payload))
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(f"payload is not UTF-8 (byte {e.start})") from None
    if not _nesting_ok(payload):
        raise BadRequest(f"JSON nested deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(text, parse_constant=lambda c: _reject_constant(c))
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"payload is not JSON: {str(e).splitlines()[0][:80]}") from None
    if not isinstance(obj, dict):
        raise BadRequest(f"payload must be a JSON object, not {type(obj).__name__}")
    raw_id = obj.get("id")
    rid = raw_id if isinstance(raw_id, str) and 0 < len(raw_id) <= MAX_ID else None
    if raw_id is None:
        raise BadRequest("id is missing")
    if not isinstance(raw_id, str) or not raw_id:
        raise BadRequest("id must be a non-empty string")
    if rid is None:
        raise BadRequest(f"id is longer than {MAX_ID} characters")
    if any(ord(c) < 0x20 for c in rid):
        raise BadRequest("id holds control characters")

    q = Question(device=device, id=rid, received_at=now, correlation=correlation)
    limit = max_payload  # no text can be longer than the payload that carried it
    q.question = _text(obj, "question", rid, limit)
    q.system = _text(obj, "system", rid, limit)
    messages = obj.get("messages")
    if (q.question is None) == (messages is None):
        raise BadRequest("give exactly one of question and messages", rid)
    if q.question is not None and not q.question.strip():
        raise BadRequest("question is empty", rid)
    if messages is not None:
        q.messages = _messages(messages, rid)
    q.max_tokens = _whole(obj, "max_tokens", rid, 1, MAX_TOKENS)
    q.seed = _whole(obj, "seed", rid, 0, MAX_SEED)
    stream = obj.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest(f"stream must be true or false, not {stream!r}", rid)
    q.stream = stream
    ground = obj.get("ground")
    if ground is not None and not isinstance(ground, bool):
        raise BadRequest(f"ground must be true or false, not {ground!r}", rid)
    q.ground = ground
    q.collection = _text(obj, "collection", rid, MAX_COLLECTION)
    temperature = obj.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
                temperature == 0 or MIN_TEMPERATURE <= temperature <= MAX_TEMPERATURE):
            raise BadRequest(f"temperature must be 0 (greedy) or a number from {MIN_TEMPERATURE:g} "
                             f"to {MAX_TEMPERATURE:g}, not {temperature!r}", rid)
        q.temperature = float(temperature)
    ttl = obj.get("ttl_s")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl <= MAX_TTL_S:
            raise BadRequest(f"ttl_s must be a number of seconds above 0, at most {MAX_TTL_S}, not {ttl!r}", rid)
    lifetimes = [t for t in (expiry_s, ttl) if t is not None]
    q.expires_at = now + min(lifetimes) if lifetimes else None

    reply_to = _text(obj, "reply_to", rid, MAX_TOPIC)
    q.mqtt5 = response_topic is not None
    q.reply_to = response_topic if response_topic is not None else reply_to or answer_topic(device)
    if not reply_allowed(q.reply_to, device, reply_scope):
        raise BadRequest(f"reply topic {q.reply_to[:MAX_TOPIC]!r} is outside this device's namespace", rid)
    q.extra = {k: v for k, v in obj.items() if k not in _KNOWN}
    return q


_KNOWN = {"id", "question", "messages", "system", "max_tokens", "stream", "temperature", "seed",
          "ttl_s", "reply_to", "ground", "collection"}


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _messages(messages: Any, rid: str) -> list[dict[str, str]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list", rid)
    if len(messages) > MAX_MESSAGES:
        raise BadRequest(f"more than {MAX_MESSAGES} messages", rid)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object", rid)
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}", rid)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string", rid)
        out.append({"role": role, "content": content})
    if not any(m["role"] == "user" and m["content"].strip() for m in out):
        raise BadRequest("messages hold no question from the user", rid)
    return out


def parse_cancel(payload: bytes) -> str | None:
    """The id a cancel message names, or None if it names none."""
    if len(payload) > 4 * MAX_ID:
        return None
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    rid = obj.get("id") if isinstance(obj, dict) else None
    return rid if isinstance(rid, str) and 0 < len(rid) <= MAX_ID else None


def dumps(message: dict[str, Any]) -> bytes:
    return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()


def chunk(rid: str, seq: int, text: str) -> dict[str, Any]:
    return {"id": rid, "seq": seq, "text": text}


def source(hit: Any) -> dict[str, Any]:
    """A source of a grounded answer (a grounding.Hit) as the final carries it."""
    return {"collection": hit.collection, "file": hit.file, "heading": hit.heading or None,
            "page": hit.page, "passage": hit.text}


def final(rid: str, status: str, *, text: str = "", error: str | None = None,
          **fields: Any) -> dict[str, Any]:
    """A final answer: `status` and `final: true` always; an error code's
    message in `error`; the rest (finish_reason, tokens, latency, model) as given."""
    assert status in STATUSES, status
    msg: dict[str, Any] = {"id": rid, "final": True, "status": status, "text": text}
    if error is not None:
        msg["error"] = error
    msg.update({k: v for k, v in fields.items() if v is not None})
    return msg


def remaining_expiry(expires_at: float | None, now: float) -> int | None:
    """Whole seconds an answer may live (MQTT 5 Message Expiry), at least 1."""
    if expires_at is None:
        return None
    return max(1, math.ceil(expires_at - now))
