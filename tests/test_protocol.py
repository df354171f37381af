"""The MQTT protocol's checks (firmware_bridge/protocol.py), and that
PROTOCOL.md states the limits and codes the code enforces."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware_bridge import protocol as p

NOW = 1_000_000.0


def parse(obj, device="pump-7", **kw):
    payload = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return p.parse_question(payload, device, now=NOW, **kw)


def refused(obj, match, **kw):
    with pytest.raises(p.BadRequest, match=match) as e:
        parse(obj, **kw)
    return e.value


def test_topics():
    assert p.parse_topic("edge-slm/v1/pump-7/ask") == ("pump-7", "ask")
    assert p.parse_topic("edge-slm/v1/pump-7/cancel") == ("pump-7", "cancel")
    for bad in ("edge-slm/v1/pump-7/answer", "edge-slm/v2/pump-7/ask", "edge-slm/v1/_runtime/ask",
                "edge-slm/v1/a/b/ask", "edge-slm/v1//ask", "edge-slm/v1/+/ask", "x"):
        assert p.parse_topic(bad) is None, bad
    assert p.subscriptions("g") == ["$share/g/edge-slm/v1/+/ask", "edge-slm/v1/+/cancel"]
    assert p.topic_matches("a/+/c/#", "a/b/c/d/e") and not p.topic_matches("a/+/c", "a/b/c/d")


def test_a_good_question_and_its_defaults():
    q = parse({"id": "q1", "question": "Why?", "max_tokens": 20, "stream": True, "ttl_s": 5,
               "temperature": 0.5, "seed": 3, "future_field": [1]})
    assert (q.device, q.id, q.question, q.max_tokens, q.stream, q.seed) == ("pump-7", "q1", "Why?", 20, True, 3)
    assert q.reply_to == "edge-slm/v1/pump-7/answer" and not q.mqtt5
    assert q.expires_at == NOW + 5
    assert q.extra == {"future_field": [1]}


def test_mqtt5_properties_win_and_the_shorter_life_counts():
    q = parse({"id": "a", "question": "x", "ttl_s": 100}, response_topic="edge-slm/v1/pump-7/answer/x1",
              correlation=b"\x00\x01", expiry_s=7)
    assert q.reply_to == "edge-slm/v1/pump-7/answer/x1" and q.mqtt5 and q.correlation == b"\x00\x01"
    assert q.expires_at == NOW + 7


@pytest.mark.parametrize("obj, match", [
    (b"not json", "not JSON"),
    (b"\xff\xfe{}", "not UTF-8"),
    ([1, 2], "JSON object"),
    ({"question": "x"}, "id is missing"),
    ({"id": 5, "question": "x"}, "id must be a non-empty string"),
    ({"id": "x" * 65, "question": "x"}, "longer than 64"),
    ({"id": "a\nb", "question": "x"}, "control"),
    ({"id": "a"}, "exactly one of question and messages"),
    ({"id": "a", "question": "x", "messages": []}, "exactly one"),
    ({"id": "a", "question": "   "}, "empty"),
    ({"id": "a", "question": 7}, "question must be a string"),
    ({"id": "a", "question": "x", "max_tokens": 0}, "max_tokens"),
    ({"id": "a", "question": "x", "max_tokens": 10**9}, "max_tokens"),
    ({"id": "a", "question": "x", "max_tokens": 2.5}, "max_tokens"),
    ({"id": "a", "question": "x", "max_tokens": True}, "max_tokens"),
    ({"id": "a", "question": "x", "stream": "yes"}, "stream"),
    ({"id": "a", "question": "x", "temperature": -1}, "temperature"),
    ({"id": "a", "question": "x", "temperature": 1e9}, "temperature"),
    ({"id": "a", "question": "x", "temperature": 1e-5}, "temperature"),
    ({"id": "a", "question": "x", "seed": -1}, "seed"),
    ({"id": "a", "question": "x", "ttl_s": 0}, "ttl_s"),
    ({"id": "a", "question": "x", "ttl_s": "soon"}, "ttl_s"),
    ({"id": "a", "question": "x", "reply_to": "edge-slm/v1/valve-2/cmd"}, "outside"),
    ({"id": "a", "question": "x", "reply_to": "edge-slm/v1/pump-7/#"}, "outside"),
    ({"id": "a", "question": "x", "reply_to": "$SYS/x"}, "outside"),
    ({"id": "a", "question": "x", "reply_to": "edge-slm/v1/pump-7/cancel"}, "outside"),
    ({"id": "a", "question": "x", "reply_to": "edge-slm/v1/pump-7/ask"}, "outside"),
    ({"id": "a", "question": "x", "system": 5}, "system must be a string"),
    ({"id": "a", "question": "x", "seed": 2.5}, "seed"),
    ({"id": "a", "question": "x", "seed": "7"}, "seed"),
    ({"id": "a", "question": "x", "temperature": True}, "temperature"),
    ({"id": "a", "question": "x", "temperature": "0.5"}, "temperature"),
    ({"id": "a", "question": "x", "ttl_s": True}, "ttl_s"),
    ({"id": "a", "question": "x", "ttl_s": 10**7}, "ttl_s"),
    ({"id": "a", "question": "x", "reply_to": 5}, "reply_to must be a string"),
    ({"id": "a", "question": "x", "reply_to": "r" * 257}, "reply_to is longer than 256"),
    ({"id": "a", "question": "x", "ground": "yes"}, "ground"),
    ({"id": "a", "question": "x", "collection": 3}, "collection must be a string"),
    ({"id": "a", "question": "x", "collection": "c" * 65}, "collection is longer than 64"),
    ({"id": ""}, "id must be a non-empty string"),
    ({"id": "a", "messages": "hi"}, "non-empty list"),
    ({"id": "a", "messages": ["hi"]}, r"messages\[0\] must be an object"),
    ({"id": "a", "messages": [{"role": "root", "content": "x"}]}, "role"),
    ({"id": "a", "messages": [{"role": "user", "content": 3}]}, "content"),
    ({"id": "a", "messages": [{"role": "system", "content": "x"}]}, "no question"),
    ({"id": "a", "messages": [{"role": "user", "content": "x"}] * 65}, "more than 64"),
])
def test_each_bad_field_is_named(obj, match):
    e = refused(obj, match)
    if isinstance(obj, dict) and isinstance(obj.get("id"), str) and 0 < len(obj["id"]) <= 64 and "\n" not in obj["id"]:
        assert e.rid == obj["id"]  # so the refusal can carry it


def test_nan_and_infinity_are_not_json():
    refused(b'{"id": "a", "question": "x", "temperature": NaN}', "not JSON")
    refused(b'{"id": "a", "question": "x", "temperature": Infinity}', "not JSON")


def test_oversized_and_deeply_nested():
    assert refused({"id": "big-1", "question": "x" * 20000}, "more than 16384").rid == "big-1"
    refused(b"[" * 8000 + b"]" * 8000, "nested deeper")
    refused({"id": "a", "question": "x", "deep": [[[[[1]]]]]}, "nested deeper")
    # brackets inside strings are text, not nesting
    assert parse({"id": "a", "question": "[[[[[[[[{{{{{"}).question.startswith("[[[")
    refused({"id": "a", "question": "x" * 300}, "more than 256", max_payload=256)


def test_a_response_topic_outside_the_scope_is_refused_like_reply_to():
    refused({"id": "a", "question": "x"}, "outside", response_topic="edge-slm/v1/valve-2/answer")
    refused({"id": "a", "question": "x"}, "outside", response_topic="")
    # the payload's reply_to is still checked, then ignored for the Response Topic
    refused({"id": "a", "question": "x", "reply_to": 5}, "reply_to", response_topic=p.answer_topic("pump-7"))
    q = parse({"id": "a", "question": "x", "reply_to": "edge-slm/v1/valve-2/answer"},
              response_topic=p.answer_topic("pump-7"))
    assert q.reply_to == p.answer_topic("pump-7")


def test_reply_scope_can_be_widened():
    q = parse({"id": "a", "question": "x", "reply_to": "site/answers/pump-7"},
              reply_scope="site/answers/{device}")
    assert q.reply_to == "site/answers/pump-7"
    refused({"id": "a", "question": "x", "reply_to": "site/answers/valve-2"}, "outside",
            reply_scope="site/answers/{device}")


def test_cancel_payloads():
    assert p.parse_cancel(b'{"id": "q1"}') == "q1"
    for bad in (b"", b"q1", b'{"id": 1}', b"[", b'{"id": "' + b"x" * 300 + b'"}', b"\xff"):
        assert p.parse_cancel(bad) is None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.sampled_from(["id", "question", "messages", "max_tokens", "stream", "ttl_s", "role", "content",
                         "reply_to", "system", "seed", "temperature"]) | st.text(max_size=5), kids, max_size=6),
    max_leaves=30).map(lambda v: json.dumps(v).encode()))
def test_any_payload_is_a_question_or_a_bad_request(payload):
    try:
        q = p.parse_question(payload, "dev", now=NOW)
    except p.BadRequest as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert q.id and (q.question or q.messages) and p.reply_allowed(q.reply_to, "dev")


def test_finals_carry_id_status_and_given_fields():
    m = p.final("q1", p.BUSY, error="full", retry_after_s=2.0, finish_reason=None)
    assert m == {"id": "q1", "final": True, "status": "busy", "text": "", "error": "full", "retry_after_s": 2.0}
    assert p.remaining_expiry(NOW + 2.2, NOW) == 3 and p.remaining_expiry(NOW - 5, NOW) == 1
    assert p.remaining_expiry(None, NOW) is None


def test_protocol_document_matches_the_code():
    doc = (Path(__file__).parent.parent / "firmware_bridge" / "PROTOCOL.md").read_text()
    for status in p.STATUSES:
        assert f"`{status}`" in doc, status
    for name, value in (("MAX_PAYLOAD", p.MAX_PAYLOAD), ("MAX_ID", p.MAX_ID), ("MAX_MESSAGES", p.MAX_MESSAGES),
                        ("MAX_DEPTH", p.MAX_DEPTH), ("MAX_TOKENS", p.MAX_TOKENS),
                        ("MAX_DEVICE_ID", p.MAX_DEVICE_ID), ("MAX_TOPIC", p.MAX_TOPIC),
                        ("MAX_COLLECTION", p.MAX_COLLECTION)):
        assert re.search(rf"\b{value}\b", doc.replace(",", "")), f"{name} = {value} is not in PROTOCOL.md"
    for topic in ("edge-slm/v1/<device_id>/ask", "edge-slm/v1/<device_id>/cancel",
                  "edge-slm/v1/<device_id>/answer", "edge-slm/v1/_runtime/<runtime_id>/status"):
        assert topic in doc, topic
    for field in p._KNOWN:
        assert f"`{field}`" in doc, field
    from edge_slm.grounding import ground

    for label in (ground.GROUNDED, ground.NOT_COVERED, ground.UNGROUNDED):
        assert f"`{label}`" in doc, label
    assert ground.NOT_COVERED_TEXT in doc and f"{ground.DEFAULT_THRESHOLD}" in doc
    for kind in (p.OFFER, p.NEED, p.CHUNK, p.RESULT, p.COMMAND, p.STATE):
        assert f"`edge-slm/v1/_fleet/<board>/{kind}`" in doc, kind
    for state in p.FLEET_STATES:
        assert f"| `{state}` |" in doc, state
    assert f"{p.FLEET_CHUNK}" in doc and f"{p.MAX_OFFER}" in doc
