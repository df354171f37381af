"""`edge-slm serve` end to end: a real mosquitto, the real model, devices as
real clients (paho in MQTT 5 and 3.1.1, mosquitto_pub / mosquitto_sub)."""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import replace

import pytest

from edge_slm import engine as eng
from edge_slm.engine import Engine, EngineConfig, Result
from firmware_bridge import protocol as p
from firmware_bridge.client import DeviceClient
from firmware_bridge.service import Flight, Service, ServiceConfig
from firmware_bridge.store import Store, StoreError

QUESTION = "What should I check first when a pump loses pressure?"


@pytest.fixture(scope="module")
def engine(real_model):
    e = Engine(EngineConfig(model=real_model, slots=2, ctx=512, threads=2, max_tokens=64, timeout=60))
    yield e
    e.close()


def device(broker, name="pump-7", mqtt5=True) -> DeviceClient:
    return DeviceClient(ServiceConfig(broker=broker.url), name, mqtt5=mqtt5)


def test_mqtt5_answer_on_the_response_topic_with_its_properties(service, mosquitto):
    with device(mosquitto) as d:
        d.send({"id": "q1", "question": QUESTION, "max_tokens": 24}, expiry_s=300)
        (final, msg), = [m for m in d.messages(30, {"q1"}) if m[0].get("final")]
    assert final["status"] == p.OK and final["id"] == "q1" and final["text"].strip()
    assert final["finish_reason"] in ("stop", "length") and 0 < final["answer_tokens"] <= 24
    assert final["prompt_tokens"] > 5
    assert final["model"]["sha256"] == service.model_sha256 and final["model"]["name"]
    lat = final["latency_ms"]
    assert 0 <= lat["queued"] <= lat["first_token"] <= lat["total"]
    props = msg.properties
    assert props.CorrelationData == b"q1" and props.ContentType == "application/json"
    assert props.PayloadFormatIndicator == 1 and ("status", "ok") in props.UserProperty
    assert 0 < props.MessageExpiryInterval <= 300


def test_mqtt311_with_the_envelope_through_mosquitto_clients(service, mosquitto):
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(mosquitto.port), "-t", "edge-slm/v1/valve-2/answer",
                            "-C", "1", "-W", "60"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-q", "1", "-V", "mqttv311",
                    "-t", "edge-slm/v1/valve-2/ask",
                    "-m", json.dumps({"id": "v1", "question": "Name one valve type.", "max_tokens": 12})],
                   check=True, timeout=10)
    out, _ = sub.communicate(timeout=70)
    final = json.loads(out)
    assert final["id"] == "v1" and final["status"] == p.OK and final["final"] is True


def test_streamed_chunks_arrive_in_order_then_one_final(service, mosquitto):
    with device(mosquitto) as d:
        d.send({"id": "s1", "question": QUESTION, "stream": True, "max_tokens": 40})
        got = [m for m, _ in d.messages(20, {"s1"})]
    chunks = [m for m in got if not m.get("final")]
    finals = [m for m in got if m.get("final")]
    assert len(finals) == 1 and got[-1] is finals[0]
    assert [c["seq"] for c in chunks] == list(range(len(chunks))) and len(chunks) >= 2
    assert "".join(c["text"] for c in chunks) == finals[0]["text"]


def test_cancel_frees_the_slot_and_keeps_the_text_so_far(service, mosquitto):
    with device(mosquitto) as d:
        d.send({"id": "c1", "question": "Write a long story about a pump.", "stream": True, "max_tokens": 64})
        chunks = []

        def cancel_at_first(chunk):
            if not chunks:
                d.cancel("c1")
            chunks.append(chunk["text"])

        final = d.wait_final("c1", 30, on_chunk=cancel_at_first)
    assert final["status"] == p.CANCELLED and 0 < final["answer_tokens"] < 64
    assert final["text"].startswith(chunks[0])  # what was generated is kept


def test_a_question_that_expires_while_waiting_is_not_run(service_factory, mosquitto):
    service_factory(device_concurrency=8)
    with device(mosquitto) as d:
        for i in range(4):  # both slots and the engine's look-ahead busy
            d.send({"id": f"long{i}", "question": "Tell me everything about pumps.", "max_tokens": 64})
        d.send({"id": "late", "question": "Quick one?", "ttl_s": 0.2})
        final = d.wait_final("late", 60)
    assert final["status"] == p.EXPIRED and final["answer_tokens"] == 0


def test_busy_past_a_devices_concurrency_with_a_retry_hint(service_factory, mosquitto):
    service_factory(device_concurrency=1)
    with device(mosquitto) as d:
        d.send({"id": "b1", "question": QUESTION, "max_tokens": 32})
        d.send({"id": "b2", "question": QUESTION, "max_tokens": 32})
        finals = {m["id"]: m for m, _ in d.messages(20, {"b1", "b2"}) if m.get("final")}
    assert finals["b1"]["status"] == p.OK
    assert finals["b2"]["status"] == p.BUSY and finals["b2"]["retry_after_s"] > 0


def test_rate_limit_per_device_does_not_touch_others(service_factory, mosquitto):
    service_factory(device_rate=0.01, device_burst=1, device_concurrency=8)
    with device(mosquitto, "noisy") as noisy, device(mosquitto, "quiet") as quiet:
        for i in range(3):
            noisy.send({"id": f"n{i}", "question": "hi", "max_tokens": 4})
        quiet.send({"id": "q", "question": "hi", "max_tokens": 4})
        statuses = sorted(m["status"] for m, _ in noisy.messages(15, {"n0", "n1", "n2"}) if m.get("final"))
        assert quiet.wait_final("q", 15)["status"] == p.OK
    assert statuses == [p.BUSY, p.BUSY, p.OK]


BAD = [
    (b"not json", "not JSON"),
    (b"[1, 2]", "JSON object"),
    (b'{"question": "x"}', "id is missing"),
    (b'{"id": 7, "question": "x"}', "id must be"),
    (b'{"id": "a", "question": 7}', "question must be a string"),
    (b"\xff\xfe not utf-8", "not UTF-8"),
    (b'{"id": "a", "question": "' + b"x" * 17000 + b'"}', "more than 16384"),
    (b"[" * 5000 + b"]" * 5000, "nested deeper"),
    (b'{"id": "a", "question": "x", "max_tokens": 100000}', "max_tokens"),
    (json.dumps({"id": "i" * 65, "question": "x"}).encode(), "longer than 64"),
    (b'{"id": "a", "question": "x", "reply_to": "edge-slm/v1/other/answer"}', "outside"),
]


def test_bad_requests_are_refused_on_the_devices_topic_and_others_answered(service, mosquitto):
    sub = subprocess.Popen(["mosquitto_sub", "-p", str(mosquitto.port), "-t", p.answer_topic("bad-dev"),
                            "-C", str(len(BAD) + 1), "-W", "60"], stdout=subprocess.PIPE)
    time.sleep(0.3)
    good = b'{"id": "good", "question": "hi", "max_tokens": 4}'
    for payload in [x for x, _ in BAD] + [good]:
        subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-q", "1", "-t", p.ask_topic("bad-dev"),
                        "-s"], input=payload, check=True, timeout=10)
    out, _ = sub.communicate(timeout=70)
    finals = [json.loads(line) for line in out.splitlines()]
    assert len(finals) == len(BAD) + 1
    for (payload, match), final in zip(BAD, finals):
        assert final["status"] == p.BAD_REQUEST and match in final["error"], (payload[:40], final)
    assert finals[-1]["id"] == "good" and finals[-1]["status"] == p.OK
    assert service.stats[p.BAD_REQUEST] == len(BAD)


def test_the_same_question_twice_is_computed_once(service, mosquitto, engine):
    with device(mosquitto) as d:
        first = d.ask(QUESTION, id="dup", max_tokens=16, timeout=30)
        before = engine.status()["tokens_generated"]
        d.send({"id": "dup", "question": QUESTION, "max_tokens": 16})
        again = d.wait_final("dup", 10)
    assert again == first and engine.status()["tokens_generated"] == before


def test_retained_status_online_then_offline(service_factory, mosquitto):
    service = service_factory()
    topic = p.status_topic(service.runtime_id)

    def read():
        out = subprocess.run(["mosquitto_sub", "-p", str(mosquitto.port), "-t", topic, "-C", "1", "-W", "5"],
                             capture_output=True, text=True, timeout=10).stdout
        return json.loads(out)

    online = read()
    assert online["state"] == "online" and online["model"]["sha256"] == service.model_sha256
    assert {"slots", "context", "queue_depth", "uptime_s", "version", "memory_budget"} <= set(online)
    time.sleep(1.0)  # twice the fixture's status interval: refreshed while it runs
    assert read()["at"] > online["at"]
    service.stop()
    assert read()["state"] == "offline"


def test_home_assistant_discovery_is_sent_again_when_it_comes_online(service_factory, mosquitto):
    service = service_factory(ha_discovery=True)
    node = f"edge_slm_{service.runtime_id}".replace("-", "_")

    def configs(trigger=None):
        sub = subprocess.Popen(["mosquitto_sub", "-p", str(mosquitto.port), "-t",
                                f"homeassistant/sensor/{node}/+/config", "-C", "4", "-W", "10", "-v",
                                "-R"],  # -R: only messages sent now, not the retained copies
                               stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)
        if trigger:
            trigger()
        out, _ = sub.communicate(timeout=15)
        return dict(line.split(" ", 1) for line in out.splitlines())

    retained = subprocess.run(["mosquitto_sub", "-p", str(mosquitto.port), "-t",
                               f"homeassistant/sensor/{node}/+/config", "-C", "4", "-W", "5", "-v"],
                              capture_output=True, text=True, timeout=10).stdout.splitlines()
    assert len(retained) == 4
    fresh = configs(lambda: subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-t",
                                            "homeassistant/status", "-m", "online"], check=True))
    assert len(fresh) == 4
    queue_depth = json.loads(fresh[f"homeassistant/sensor/{node}/queue_depth/config"])
    assert queue_depth["state_topic"] == p.status_topic(service.runtime_id)
    assert queue_depth["availability_topic"] == queue_depth["state_topic"]


def test_a_share_group_splits_questions_and_survives_one_runtime_leaving(service_factory, mosquitto):
    a = service_factory(share_group="site", device_concurrency=16, device_burst=50)
    b = service_factory(share_group="site", device_concurrency=16, device_burst=50)
    ids = [f"g{i}" for i in range(8)]
    with device(mosquitto) as d:
        for rid in ids:
            d.send({"id": rid, "question": "hi", "max_tokens": 4})
        first = {m["id"]: m for m, _ in d.messages(60, set(ids)) if m.get("final")}
        assert set(first) == set(ids) and all(m["status"] == p.OK for m in first.values())
        assert a.stats["accepted"] > 0 and b.stats["accepted"] > 0
        assert a.stats["accepted"] + b.stats["accepted"] == len(ids)  # each answered by one runtime
        a.stop()
        later = [f"h{i}" for i in range(4)]
        for rid in later:
            d.send({"id": rid, "question": "hi", "max_tokens": 4})
        rest = {m["id"]: m for m, _ in d.messages(60, set(later)) if m.get("final")}
    assert set(rest) == set(later) and all(m["status"] == p.OK for m in rest.values())


def _tls_files(folder):
    """A CA, and a server certificate for 127.0.0.1 signed by it (openssl)."""
    def run(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr",
                                                       "server.pem"))
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
        "-days", "2", "-subj", "/CN=edge-slm test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return ca, cert, key


def _client_cert(folder, ca):
    """A client certificate signed by `_tls_files`' CA in `folder`."""
    key, csr, cert = (folder / n for n in ("client.key", "client.csr", "client.pem"))
    subprocess.run(["openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                    "-subj", "/CN=edge-slm"], check=True, capture_output=True, timeout=60)
    subprocess.run(["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(folder / "ca.key"),
                    "-CAcreateserial", "-out", str(cert), "-days", "2"], check=True, capture_output=True, timeout=60)
    return cert, key


def test_mqtts_with_a_site_ca(engine, tmp_path):
    from firmware_bridge.broker import Mosquitto, free_port

    ca, cert, key = _tls_files(tmp_path)
    tls_port = free_port()
    extra = f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    with Mosquitto(tmp_path / "broker", extra_config=extra) as broker:
        url = f"mqtts://127.0.0.1:{tls_port}"
        service = Service(engine, ServiceConfig(broker=url, ca=ca, state_dir=tmp_path / "state")).start()
        try:
            assert service.wait_connected(10)
            time.sleep(0.2)
            with DeviceClient(ServiceConfig(broker=url, ca=ca), "secure-1") as d:
                assert d.ask("hi", max_tokens=4, timeout=30)["status"] == p.OK
            # the same broker without our CA: the certificate is refused
            with pytest.raises(Exception):
                DeviceClient(ServiceConfig(broker=url), "secure-2", timeout=3)
        finally:
            service.stop()
        assert broker.port != tls_port


def test_mqtts_with_a_client_certificate(engine, tmp_path):
    from firmware_bridge.broker import Mosquitto, free_port

    ca, cert, key = _tls_files(tmp_path)
    client_cert, client_key = _client_cert(tmp_path, ca)
    tls_port = free_port()
    extra = (f"listener {tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
             "require_certificate true\n")
    with Mosquitto(tmp_path / "broker", extra_config=extra):
        tls = ServiceConfig(broker=f"mqtts://127.0.0.1:{tls_port}", ca=ca, cert=client_cert, key=client_key)
        service = Service(engine, replace(tls, state_dir=tmp_path / "state")).start()
        try:
            assert service.wait_connected(10)
            time.sleep(0.2)
            with DeviceClient(tls, "secure-3") as d:
                assert d.ask("hi", max_tokens=4, timeout=30)["status"] == p.OK
            with pytest.raises(Exception):  # the CA, but no certificate of its own
                DeviceClient(replace(tls, cert=None, key=None), "secure-4", timeout=3)
        finally:
            service.stop()


def test_a_cancel_on_the_heels_of_its_question(service, mosquitto):
    with device(mosquitto) as d:
        for i in range(3):  # the question and its cancel often land in one batch of the worker
            d.send({"id": f"x{i}", "question": "Write a long story about a pump.", "max_tokens": 64})
            d.cancel(f"x{i}")
        finals = {m["id"]: m for m, _ in d.messages(30, {"x0", "x1", "x2"}) if m.get("final")}
        assert {m["status"] for m in finals.values()} == {p.CANCELLED}
        assert d.ask("hi", max_tokens=4, timeout=20)["status"] == p.OK  # the service is still answering


def test_home_assistant_announcements_do_not_use_up_the_receive_maximum(service_factory, mosquitto):
    service_factory(ha_discovery=True, receive_maximum=3)
    for _ in range(5):
        subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-q", "1", "-t", "homeassistant/status",
                        "-m", "online"], check=True, timeout=10)
    with device(mosquitto) as d:
        assert d.ask("hi", max_tokens=4, timeout=20)["status"] == p.OK


def test_a_noisy_device_does_not_starve_a_quiet_one(service_factory, mosquitto):
    service_factory(device_concurrency=12, device_burst=20, device_rate=50)
    with device(mosquitto, "noisy") as noisy, device(mosquitto, "quiet") as quiet:
        for i in range(10):  # long answers: none is done before the quiet device asks
            noisy.send({"id": f"n{i}", "question": "Write a long story about pumps.", "max_tokens": 64})
        time.sleep(0.1)  # all ten are in before the quiet device asks
        quiet.send({"id": "q", "question": "Tell me about pumps.", "max_tokens": 32})
        (_, mine), = [m for m in quiet.messages(60, {"q"}) if m[0].get("final")]
        theirs = [msg for m, msg in noisy.messages(60, {f"n{i}" for i in range(10)}) if m.get("final")]
    assert len(theirs) == 10
    # Waiting questions go to the engine one device at a time: the quiet one
    # runs after the few already handed over (two slots, two more queued in
    # the engine), not after all ten, as first come first served would have it.
    after = sum(msg.timestamp > mine.timestamp for msg in theirs)
    assert after >= 4, f"only {after} of the noisy device's answers came after the quiet one's"


def test_a_response_topic_outside_the_devices_namespace_is_refused_on_its_own_topic(service, mosquitto):
    port = str(mosquitto.port)
    other = subprocess.Popen(["mosquitto_sub", "-p", port, "-t", "edge-slm/v1/valve-2/#", "-v", "-W", "30"],
                             stdout=subprocess.PIPE, text=True)
    own = subprocess.Popen(["mosquitto_sub", "-V", "mqttv5", "-p", port, "-t", p.answer_topic("pump-7"),
                            "-C", "1", "-W", "30", "-F", "%D|%p"], stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    subprocess.run(["mosquitto_pub", "-V", "mqttv5", "-p", port, "-q", "1", "-t", p.ask_topic("pump-7"),
                    "-D", "publish", "response-topic", "edge-slm/v1/valve-2/command",
                    "-D", "publish", "correlation-data", "r9",
                    "-m", json.dumps({"id": "r9", "question": QUESTION})], check=True, timeout=10)
    out, _ = own.communicate(timeout=40)
    time.sleep(0.3)  # anything sent to valve-2 would have arrived by now
    other.terminate()
    leaked, _ = other.communicate(timeout=10)
    correlation, payload = out.strip().split("|", 1)
    final = json.loads(payload)
    assert correlation == "r9" and final["id"] == "r9" and final["status"] == p.BAD_REQUEST
    assert "outside this device's namespace" in final["error"] and leaked == ""
    assert service.stats["accepted"] == 0


def test_the_same_question_sent_again_while_it_runs_is_answered_once(service, mosquitto, engine):
    before = engine.status()["tokens_generated"]
    with device(mosquitto) as d:
        question = {"id": "twice", "question": "Write a long story about a pump.", "stream": True,
                    "max_tokens": 48}
        sent_again = []

        def again_at_first_chunk(chunk):  # it is running now
            if not sent_again:
                d.send(question)
                sent_again.append(chunk)

        d.send(question)
        first = d.wait_final("twice", 30, on_chunk=again_at_first_chunk)
        later = d.messages(1.0)  # a second final would come now
    finals = [first] + [m for m, _ in later if m.get("final")]
    assert sent_again
    assert len(finals) == 1 and finals[0]["status"] == p.OK
    assert service.stats["accepted"] == 1
    assert engine.status()["tokens_generated"] - before == finals[0]["answer_tokens"]


def test_busy_when_the_runtime_is_full_with_a_retry_hint_and_a_log_line(service_factory, mosquitto, caplog):
    caplog.set_level(logging.INFO, logger="firmware_bridge")
    service_factory(max_accepted=2, device_concurrency=8)
    ids = [f"full{i}" for i in range(4)]
    with device(mosquitto) as d:
        for rid in ids:
            d.send({"id": rid, "question": QUESTION, "max_tokens": 32})
        finals = {m["id"]: m for m, _ in d.messages(30, set(ids)) if m.get("final")}
    assert [finals[rid]["status"] for rid in ids] == [p.OK, p.OK, p.BUSY, p.BUSY]
    for rid in ids[2:]:
        assert finals[rid]["error"] == "the runtime is busy" and finals[rid]["retry_after_s"] >= 0.5
    refusals = [r.getMessage() for r in caplog.records if ": busy: " in r.getMessage()]
    assert len(refusals) == 2 and all("the runtime is busy; retry after" in m for m in refusals), refusals


def test_a_question_on_a_topic_without_a_valid_device_id_is_dropped_with_a_log_line(service, mosquitto, caplog):
    caplog.set_level(logging.INFO, logger="firmware_bridge")
    for topic in ("edge-slm/v1/_runtime/ask", f"edge-slm/v1/{'x' * 65}/ask"):
        subprocess.run(["mosquitto_pub", "-p", str(mosquitto.port), "-q", "1", "-t", topic,
                        "-m", json.dumps({"id": "z", "question": "hi"})], check=True, timeout=10)
    with device(mosquitto) as d:
        assert d.ask("hi", max_tokens=4, timeout=20)["status"] == p.OK  # still answering
    dropped = [r.getMessage() for r in caplog.records if "not a topic of this protocol" in r.getMessage()]
    assert len(dropped) == 2 and "_runtime" in dropped[0], dropped
    assert service.stats["accepted"] == 1 and not service.stats[p.BAD_REQUEST]


def test_engine_outcomes_map_to_the_protocols_codes(service):
    q = p.Question(device="pump-7", id="m1", question="x", received_at=time.time())

    def final(result: Result, question: p.Question = q) -> dict:
        return service._from_result(Flight(question, submitted=time.time()), result)

    assert final(Result(eng.ERROR, error="a fault", internal=True))["status"] == p.INTERNAL
    assert final(Result(eng.ERROR, error="no such collection"))["status"] == p.BAD_REQUEST
    assert final(Result(eng.TOO_LONG, error="needs 600 tokens"))["status"] == p.TOO_LONG
    busy = final(Result(eng.BUSY, error="queue full", retry_after=2.5))
    assert busy["status"] == p.BUSY and busy["retry_after_s"] == 2.5
    cut = final(Result(eng.TIMEOUT, text="so far", tokens=[1, 2], error="out of time"))
    assert cut["status"] == p.TIMEOUT and cut["text"] == "so far" and cut["answer_tokens"] == 2
    # Out of time before any text, past the question's own lifetime: it expired.
    assert final(Result(eng.TIMEOUT), replace(q, expires_at=time.time() - 1))["status"] == p.EXPIRED
    assert final(Result(eng.TIMEOUT))["status"] == p.TIMEOUT  # the runtime's own limit


def test_a_question_whose_lifetime_ends_while_it_is_generated(service, mosquitto):
    with device(mosquitto) as d:
        # 64 tokens take 0.2-0.3 s on one slot of a fast x86 core: a lifetime well inside that
        d.send({"id": "t1", "question": "Write a long story about a pump.", "stream": True, "max_tokens": 64,
                "ttl_s": 0.08})
        got = [m for m, _ in d.messages(30, {"t1"})]
    final = got[-1]
    assert final["final"] and final["latency_ms"]["total"] < 5000
    if final["answer_tokens"]:  # it had started: cut off, with the text so far
        assert final["status"] == p.TIMEOUT and final["text"]
    else:  # a busy machine: it expired before its first token
        assert final["status"] == p.EXPIRED


def test_the_store_keeps_the_runtime_id_and_forgets_answers_after_the_window(tmp_path):
    store = Store.in_folder(tmp_path)
    made = store.runtime_id()
    store.close()
    store = Store.in_folder(tmp_path)
    assert store.runtime_id() == made and store.runtime_id("rt-site") == "rt-site"
    store.close()
    store = Store.in_folder(tmp_path)
    assert store.runtime_id() == "rt-site"
    # On disk when a write returns: WAL, synchronous=FULL (2).
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.db.execute("PRAGMA synchronous").fetchone()[0] == 2
    q = p.Question(device="pump-7", id="a", question="x", correlation=b"\x00\xff", received_at=1.0)
    store.accept([q])
    assert store.pending() == [q]
    store.answer(q.key, b'{"final": true}')
    assert store.pending() == [] and store.undelivered() == [(q, b'{"final": true}')]
    store.delivered([q.key])
    assert store.lookup(q.key) == ("delivered", b'{"final": true}') and store.undelivered() == []
    assert store.purge(time.time() - 600) == 0 and store.lookup(q.key)  # inside the window: kept
    assert store.purge(time.time() + 1) == 1 and store.lookup(q.key) is None
    store.close()


def test_the_receive_maximum_bounds_what_the_broker_sends_unacknowledged(service_factory, mosquitto,
                                                                         monkeypatch):
    service = service_factory(receive_maximum=2, device_concurrency=8)

    def disk_refuses(questions):
        raise StoreError("disk I/O error (the test's)")

    monkeypatch.setattr(service.store, "accept", disk_refuses)
    ids = [f"rm{i}" for i in range(5)]
    with device(mosquitto) as d:
        for rid in ids:
            d.send({"id": rid, "question": "hi", "max_tokens": 4})
        time.sleep(1.5)
        held = len(service.unacked)  # the rest wait at the broker
        monkeypatch.undo()  # the disk takes them again: acknowledged, so the broker sends the rest
        finals = {m["id"]: m for m, _ in d.messages(30, set(ids)) if m.get("final")}
    assert held == 2
    assert set(finals) == set(ids) and {m["status"] for m in finals.values()} == {p.OK}
