"""The technician's kiosk, end to end: the real model and index behind the
page, driven in Debian's headless Chromium through Playwright (never a
downloaded browser), and the HTTP rules checked on the wire.

Screenshots at 800x480 and 720x1280 are written to build/test-artifacts/."""

from __future__ import annotations

import json
import shutil
import socket
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from playwright import sync_api as playwright
from playwright.sync_api import expect

from edge_slm.engine import Engine, EngineConfig
from edge_slm.errors import EdgeSlmError
from edge_slm.grounding.index import Index
from edge_slm.kiosk.auth import FREE_TRIES, Gate
from edge_slm.kiosk.server import MAX_QUESTION, Kiosk, KioskConfig

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "build" / "test-artifacts"
EVAL_MANUALS = Path(__file__).parent / "grounding" / "manuals"
HOSTILE = "<img src=x onerror=\"window.pwned=1\"><script>window.pwned=1</script>"
LONG_QUESTION = "Write a long story about a pump, a press and a conveyor, in many chapters."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def index_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("kiosk") / "index.sqlite3"
    hostile = tmp_path_factory.mktemp("hostile")
    (hostile / "hostile.md").write_text(f"# Valve V-9 reset {HOSTILE}\n\nTo reset valve V-9, hold the "
                                        f"red button for 5 s. {HOSTILE}\n")
    with Index.open(path) as idx:
        idx.add_folder(EVAL_MANUALS / "hp-30", "hp-30")
        idx.add_folder(EVAL_MANUALS / "px-200", "px-200")
        idx.add_folder(hostile, "hostile")
    return path


@pytest.fixture(scope="module")
def engine(real_model, index_path):
    # answers long enough to be stopped midway on a fast core (160 tokens took 0.35 s)
    with Engine(EngineConfig(model=real_model, index=index_path, slots=1, ctx=1024, max_tokens=400,
                             threads=2)) as e:
        yield e


@pytest.fixture(scope="module")
def kiosk(engine):
    with Kiosk(engine, KioskConfig(kiosk_port=free_port())).start() as k:
        yield k


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is missing: run `make setup` (it installs Debian's chromium)")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


@pytest.fixture
def page(browser, kiosk):
    """A fresh page on the kiosk, recording every request it makes."""
    context = browser.new_context(viewport={"width": 800, "height": 480})
    pg = context.new_page()
    pg.requests = []
    pg.on("request", lambda r: pg.requests.append(r.url))
    pg.goto(kiosk.url)
    yield pg
    context.close()


def wait_until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.05)
    return False


def post(kiosk, path: str, body: bytes, content_type: str = "application/json",
         headers: dict | None = None) -> tuple[int, dict | str]:
    req = urllib.request.Request(kiosk.url.rstrip("/") + path, data=body, method="POST",
                                 headers={"Content-Type": content_type, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            text = r.read().decode()
            return r.status, json.loads(text) if r.headers.get_content_type() == "application/json" else text
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read().decode())


# ---- in the browser ----

def test_a_grounded_answer_streams_with_its_sources(page, kiosk, engine):
    page.fill("#question", "The HP-30 shows E-417. What does it mean?")
    page.click("#send")
    page.wait_for_selector("#sources li", timeout=20_000)
    assert page.text_content("#label").startswith("Based on the manual passages below")
    first = page.text_content("#sources li button")
    assert "hp-30-service.md" in first and "Error codes" in first
    # the stop button shows while the answer streams, and the text grows
    expect(page.locator("#text")).not_to_be_empty(timeout=20_000)
    page.wait_for_selector("#stop", state="hidden", timeout=60_000)
    assert page.text_content("#text").strip()
    assert "tokens in" in page.text_content("#meta")
    # the best source is open on its passage, the question's code highlighted; it closes and opens
    passage = page.locator("#sources li .passage").first
    assert passage.is_visible()
    page.click("#sources li button")
    assert not passage.is_visible() and page.get_attribute("#sources li button", "aria-expanded") == "false"
    page.click("#sources li button")
    assert "Dry running" in passage.text_content()
    marks = [m.lower() for m in passage.locator("mark").all_text_contents()]
    assert "e-417" in marks
    assert page.get_attribute("#sources li button", "aria-expanded") == "true"
    # the session's history holds it
    assert "E-417" in page.text_content("#history")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "kiosk-800x480.png"), full_page=False)
    page.set_viewport_size({"width": 720, "height": 1280})
    page.screenshot(path=str(ARTIFACTS / "kiosk-720x1280.png"), full_page=False)
    # nothing was asked of anywhere but the kiosk
    assert page.requests and all(u.startswith(kiosk.url) for u in page.requests), page.requests


def test_a_question_the_manuals_do_not_cover_is_declined(page):
    page.fill("#question", "What is the capital of France?")
    page.click("#send")
    page.wait_for_selector("#stop", state="hidden", timeout=20_000)
    assert page.text_content("#label") == "Not in the manuals"
    assert page.text_content("#text") == "The manuals do not cover this question."
    assert page.locator("#sources li").count() == 0


def test_stop_cancels_the_request_in_the_engine(page, engine):
    cancelled = engine.status()["requests"].get("cancelled", 0)
    # a question the manuals cover, so the model answers it at length
    page.fill("#question", "Describe every step of servicing the HP-30 pump bearings and the seal, in detail.")
    page.click("#send")
    expect(page.locator("#text")).not_to_be_empty(timeout=30_000)
    assert engine.status()["slots_busy"] == 1
    page.click("#stop")
    assert wait_until(lambda: engine.status()["slots_busy"] == 0, 5), engine.status()
    assert engine.status()["requests"].get("cancelled", 0) == cancelled + 1
    page.wait_for_selector("#stop", state="hidden", timeout=5_000)
    assert page.is_enabled("#send")


def test_the_page_says_when_the_board_is_busy(page, engine):
    # the equipment's questions fill the engine (one slot here) for longer than the page's poll
    others = [engine.submit(LONG_QUESTION, ignore_eos=True, timeout=60) for _ in range(10)]
    try:
        assert wait_until(lambda: engine.status()["slots_busy"] == 1, 10)
        page.wait_for_selector("#busy", state="visible", timeout=10_000)
        assert "busy" in page.text_content("#busy")
        assert "1 of 1 answering" in page.text_content("#board") and "waiting" in page.text_content("#board")
    finally:
        for other in others:
            other.cancel()
    page.wait_for_selector("#busy", state="hidden", timeout=10_000)


def test_the_page_says_when_the_kiosks_own_share_is_taken(page, kiosk, engine):
    from edge_slm.kiosk.server import MAX_REQUESTS

    # other kiosk browsers hold every kiosk place: a question now would be refused
    kiosk.running.update({f"other-{n}": None for n in range(MAX_REQUESTS)})
    try:
        page.wait_for_selector("#busy", state="visible", timeout=10_000)
        assert "ask again in a moment" in page.text_content("#busy")
        assert not page.is_enabled("#send")
    finally:
        for n in range(MAX_REQUESTS):
            kiosk.running.pop(f"other-{n}", None)
    page.wait_for_selector("#busy", state="hidden", timeout=10_000)
    assert page.is_enabled("#send")


def test_markup_in_questions_and_manuals_is_shown_as_text(page):
    page.fill("#question", f"How do I reset valve V-9? {HOSTILE}")
    page.click("#send")
    page.wait_for_selector("#sources li", timeout=20_000)
    page.wait_for_selector("#stop", state="hidden", timeout=60_000)
    passage = page.locator("#sources li .passage").first.text_content()
    assert "<script>window.pwned=1</script>" in passage
    assert "<script>" in page.text_content("#history")
    assert page.evaluate("window.pwned") is None
    assert page.locator("#sources img, #sources script, #history script").count() == 0


# ---- on the wire ----

def test_every_response_forbids_loading_from_elsewhere(kiosk):
    for path in ("/", "/static/kiosk.js", "/api/status", "/healthz"):
        with urllib.request.urlopen(kiosk.url.rstrip("/") + path, timeout=5) as r:
            csp = r.headers["Content-Security-Policy"]
            assert "default-src 'none'" in csp and "connect-src 'self'" in csp, path
            assert r.headers["X-Content-Type-Options"] == "nosniff"
    page = urllib.request.urlopen(kiosk.url, timeout=5).read().decode()
    assert "http://" not in page and "https://" not in page  # nothing from a CDN


def test_only_loopback_host_names_are_answered_on_loopback(kiosk):
    req = urllib.request.Request(kiosk.url + "healthz", headers={"Host": "attacker.example"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=5)
    assert e.value.code == 400


def test_bad_questions_get_one_clear_message(kiosk, engine):
    asked = sum(engine.status()["requests"].values())
    status, body = post(kiosk, "/api/ask", json.dumps({"question": "   "}).encode())
    assert status == 400 and "question" in body["message"]
    status, body = post(kiosk, "/api/ask", json.dumps({"question": "x" * (MAX_QUESTION + 1)}).encode())
    assert status == 400 and str(MAX_QUESTION) in body["message"]
    status, body = post(kiosk, "/api/ask", json.dumps({"question": "x" * 100_000}).encode())
    assert status == 413 and "KiB" in body["message"]
    status, body = post(kiosk, "/api/ask", b"question=hi", "application/x-www-form-urlencoded")
    assert status == 415
    status, body = post(kiosk, "/api/ask", b"{not json")
    assert status == 400 and "not JSON" in body["message"]
    status, body = post(kiosk, "/api/ask", json.dumps({"question": "hi", "collection": 5}).encode())
    assert status == 400
    status, body = post(kiosk, "/api/ask", json.dumps({"question": "hi"}).encode(),
                        headers={"Origin": "http://attacker.example"})
    assert status == 403
    assert sum(engine.status()["requests"].values()) == asked  # none reached the engine


def test_an_unknown_collection_is_answered_as_an_error(kiosk):
    status, text = post(kiosk, "/api/ask", json.dumps({"question": "E-417?", "collection": "nope"}).encode())
    assert status == 200
    done = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")][-1]
    assert done["status"] == "error" and "nope" in done["error"]


def test_the_network_needs_a_pin():
    with pytest.raises(EdgeSlmError, match="PIN"):
        KioskConfig(kiosk_host="0.0.0.0")
    with pytest.raises(EdgeSlmError, match="PIN: 6 to 64"):
        KioskConfig(kiosk_host="0.0.0.0", kiosk_pin="1234")
    KioskConfig(kiosk_host="0.0.0.0", kiosk_pin="246813")


def test_the_pin_grants_a_session_and_guessing_is_slowed():
    gate = Gate("246813")
    assert gate.allows("127.0.0.1", None, "127.0.0.1:8080")  # the board's own screen
    assert not gate.allows("192.0.2.7", None)
    token, wait = gate.login("192.0.2.7", "246813")
    assert token and wait == 0 and gate.allows("192.0.2.7", token)
    assert not gate.allows("192.0.2.7", token + "x")
    for _ in range(FREE_TRIES):
        assert gate.login("192.0.2.8", "000000")[0] is None
    token, wait = gate.login("192.0.2.8", "246813")     # even the right PIN waits now
    assert token is None and wait > 0
    assert gate.login("192.0.2.9", "246813")[0]         # another address is not held up


def test_many_addresses_cannot_share_out_the_guessing():
    from edge_slm.kiosk.auth import GLOBAL_TRIES

    gate = Gate("246813")
    for n in range(GLOBAL_TRIES):
        assert gate.login(f"192.0.2.{n + 10}", "000000")[0] is None
    token, wait = gate.login("198.51.100.1", "246813")  # a fresh address, the right PIN: it waits too
    assert token is None and wait > 0


def test_the_board_itself_is_let_in_only_under_its_own_name():
    gate = Gate("246813")
    assert gate.allows("127.0.0.1", None, "127.0.0.1:8080") and gate.allows("::1", None, "[::1]:8080")
    assert gate.allows("127.0.0.1", None, "localhost")
    # a page elsewhere whose name was rebound to 127.0.0.1: not the board's own screen
    assert not gate.allows("127.0.0.1", None, "evil.example:8080")


def test_a_pin_protected_kiosk_over_the_network(engine):
    """Served on a non-loopback address of this machine, reached through it,
    so the client is not loopback: the API needs the PIN, then the cookie."""
    try:  # the address a packet would leave by (a datagram socket's connect sends nothing)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            addr = s.getsockname()[0]
    except OSError:
        addr = "127.0.0.1"
    if addr.startswith("127."):
        pytest.skip("this machine has no non-loopback address")
    k = Kiosk(engine, KioskConfig(kiosk_host=addr, kiosk_port=free_port(), kiosk_pin="246813")).start()
    try:
        base = k.url.rstrip("/")
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(base + "/api/status", timeout=5)
        assert e.value.code == 401
        assert urllib.request.urlopen(base + "/", timeout=5).status == 200  # the page, to log in on
        status, body = post(k, "/api/login", json.dumps({"pin": "111111"}).encode())
        assert status == 403
        req = urllib.request.Request(base + "/api/login", data=json.dumps({"pin": "246813"}).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=5) as r:
            cookie = r.headers["Set-Cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie
        req = urllib.request.Request(base + "/api/status", headers={"Cookie": cookie.split(";")[0]})
        with urllib.request.urlopen(req, timeout=5) as r:
            assert json.load(r)["slots"] == 1
    finally:
        k.stop()


def test_a_port_in_use_is_refused_in_one_line(engine, kiosk):
    port = int(kiosk.url.rsplit(":", 1)[1].strip("/"))
    with pytest.raises(EdgeSlmError, match="cannot listen"):
        Kiosk(engine, KioskConfig(kiosk_port=port)).start()


# ---- the kiosk beside the MQTT service: one process, one engine, one budget ----

def test_serve_with_the_kiosk_answers_both_within_one_budget(real_model, index_path, mosquitto, tmp_path):
    import signal
    import subprocess
    import sys
    import threading

    from edge_slm.kiosk.server import planned_bytes, wait_healthy
    from firmware_bridge.client import DeviceClient
    from firmware_bridge.service import ServiceConfig

    port = free_port()
    budget = 320 << 20
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("edge-slm")), "serve", "--broker", mosquitto.url, "--kiosk",
         "--kiosk-port", str(port), "--model", str(real_model), "--index", str(index_path), "--slots", "2",
         "--max-tokens", "24", "--memory-budget", str(budget), "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = f"http://127.0.0.1:{port}/"
        assert wait_healthy(url, 60), proc.stderr.read() if proc.poll() is not None else "no answer"
        kiosk_answer: dict = {}

        def ask_the_kiosk() -> None:
            req = urllib.request.Request(url + "api/ask", method="POST",
                                         data=json.dumps({"question": "The PX-200 shows E-417. What is it?"}).encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                lines = r.read().decode().splitlines()
            kiosk_answer.update(json.loads([x for x in lines if x.startswith("data: ")][-1][6:]))

        technician = threading.Thread(target=ask_the_kiosk)
        technician.start()
        with DeviceClient(ServiceConfig(broker=mosquitto.url), "pump-7") as device:
            final = device.ask("The HP-30 pump shows E-417. What does it mean?", collection="hp-30",
                               max_tokens=24, timeout=60)
        technician.join(60)
        assert final["status"] == "ok" and final["grounding"] == "grounded", final
        assert final["sources"][0]["file"] == "hp-30-service.md"
        assert kiosk_answer.get("status") == "ok" and kiosk_answer["grounding"] == "grounded", kiosk_answer
        with urllib.request.urlopen(url + "api/status", timeout=5) as r:
            status = json.load(r)
        assert status["slots"] == 2 and status["memory"]["budget"] == budget
        assert status["memory"]["plan"] <= budget
        with open(f"/proc/{proc.pid}/status") as f:  # the whole process: engine, MQTT, kiosk, index
            peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        assert peak <= budget, (peak, status)
        retained = json.loads(subprocess.run(
            ["mosquitto_sub", "-p", str(mosquitto.port), "-t", "edge-slm/v1/_runtime/+/status", "-C", "1",
             "-W", "5"], capture_output=True, text=True, timeout=10).stdout)
        plan = retained["memory_plan"]
        assert plan["front_ends"] > planned_bytes() and plan["grounding"] > 0 and plan["total"] <= budget
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=40) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("args, words", [
    (["--host", "0.0.0.0"], "set a PIN"),
    (["--port", "0"], "--port"),
])
def test_kiosk_command_mistakes_are_one_line(args, words):
    import subprocess
    import sys

    proc = subprocess.run([str(Path(sys.executable).with_name("edge-slm")), "kiosk", *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
    assert words in proc.stderr and len(lines) <= 3, proc.stderr  # click's usage error is its 3 lines


def test_the_technician_waits_for_one_slot_at_most_behind_the_equipment(engine, kiosk, mosquitto, tmp_path):
    """The service keeps none of its questions queued inside a shared engine:
    with the equipment's questions waiting, the kiosk's question takes the
    next free slot, ahead of all of them."""
    from firmware_bridge.client import DeviceClient
    from firmware_bridge.service import Service, ServiceConfig

    cfg = ServiceConfig(broker=mosquitto.url, state_dir=tmp_path / "state", runtime_id="fair")
    service = Service(engine, cfg, shared=True).start()
    try:
        assert service.wait_connected(10)
        time.sleep(0.2)
        with DeviceClient(cfg, "press-1") as d1, DeviceClient(cfg, "press-2") as d2:
            ids = []
            for n in range(3):
                for d in (d1, d2):
                    rid = f"{d.device}-{n}"
                    d.send({"id": rid, "question": LONG_QUESTION, "ground": False, "max_tokens": 160})
                    ids.append((d, rid))
            assert wait_until(lambda: engine.status()["slots_busy"] == 1, 10)
            time.sleep(0.3)
            assert engine.status()["queue_depth"] == 0  # the rest wait in the service, not the engine
            status, text = post(kiosk, "/api/ask", json.dumps(
                {"question": "The HP-30 shows E-417. What does it mean?"}).encode())
            done = json.loads([x for x in text.splitlines() if x.startswith("data: ")][-1][6:])
            assert status == 200 and done["status"] == "ok", done
            finals = [d.wait_final(rid, 120) for d, rid in ids]
        assert all(f["status"] == "ok" for f in finals), finals
        # only the answer running when the technician asked was ahead of the question
        longest = max(f["latency_ms"]["total"] - f["latency_ms"]["queued"] for f in finals)
        assert done["queued_ms"] < 1.3 * longest, (done, longest)
    finally:
        service.stop()
