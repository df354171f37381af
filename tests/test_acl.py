"""The site configuration in firmware_bridge/mosquitto/, run for real: its
mosquitto.conf (moved to a loopback port and this test's folder), its very
ACL file and a password file from mosquitto_passwd, the real service logged
in as edge-slm and devices logged in as themselves. A device gets its own
answers and nobody else's, cannot ask as another device, and no one gets in
without a password."""

from __future__ import annotations

import json
import os
import pwd
import queue
import subprocess
import time
import uuid
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge_slm.engine import Engine, EngineConfig
from firmware_bridge import protocol as p
from firmware_bridge.broker import Mosquitto
from firmware_bridge.client import DeviceClient
from firmware_bridge.service import Service, ServiceConfig

SITE = Path(__file__).parent.parent / "firmware_bridge" / "mosquitto"
PASSWORDS = {"edge-slm": "runtime-secret", "pump-a": "a-secret", "pump-b": "b-secret"}
QUESTION = {"question": "Name one kind of pump.", "max_tokens": 6}


class SiteMosquitto(Mosquitto):
    """The shipped mosquitto.conf with only its places changed: the listener
    to this test's port on loopback, files and folders to this test's."""

    def config_text(self) -> str:
        text = (SITE / "mosquitto.conf").read_text()
        moves = {"\nlistener 1883\n": f"\nlistener {self.port} 127.0.0.1\n",
                 "/etc/mosquitto/passwd": str(self.folder / "passwd"),
                 "/etc/mosquitto/acl": str(SITE / "acl"),
                 "/var/lib/mosquitto/": f"{self.folder}/",
                 "/var/log/mosquitto/mosquitto.log": str(self.folder / "mosquitto.log")}
        for old, new in moves.items():
            assert old in text, f"mosquitto.conf no longer has {old.strip()!r}"
            text = text.replace(old, new)
        # Started as root, mosquitto would switch to its own user, who cannot write here.
        return f"{text}\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n"


def site_broker(folder: Path) -> SiteMosquitto:
    for i, (user, password) in enumerate(PASSWORDS.items()):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(folder / "passwd"),
                        user, password], check=True, timeout=10)
    return SiteMosquitto(folder).start()


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    site = site_broker(tmp_path_factory.mktemp("site-broker"))
    yield site
    site.stop()


@pytest.fixture(scope="module")
def engine(real_model):
    e = Engine(EngineConfig(model=real_model, slots=2, ctx=512, threads=2, max_tokens=16, timeout=60))
    yield e
    e.close()


def runtime(engine, broker, state_dir: Path, runtime_id: str, **settings) -> Service:
    """The service logged in as the shipped ACL's runtime user."""
    cfg = ServiceConfig(broker=broker.url, state_dir=state_dir, runtime_id=runtime_id, username="edge-slm",
                        password=PASSWORDS["edge-slm"], **settings)
    service = Service(engine, cfg).start()
    assert service.wait_connected(10)
    return service


@pytest.fixture(scope="module")
def service(engine, broker, tmp_path_factory):
    service = runtime(engine, broker, tmp_path_factory.mktemp("state"), "rt-site")
    yield service
    service.stop()


def device(broker, name: str, mqtt5: bool = True) -> DeviceClient:
    return DeviceClient(ServiceConfig(broker=broker.url, username=name, password=PASSWORDS[name]), name,
                        mqtt5=mqtt5)


class Listener:
    """A raw MQTT 5 client logged in as `user`, subscribed to `filters`
    (mosquitto grants any subscription, then delivers only what the ACL lets
    the user read), keeping what arrives and the reason of each PUBACK."""

    def __init__(self, broker, user: str, filters: list[str]):
        self.messages: queue.Queue = queue.Queue()
        self.pubacks: queue.Queue = queue.Queue()
        subscribed: queue.Queue = queue.Queue()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{user}-{uuid.uuid4().hex[:6]}",
                                  protocol=mqtt.MQTTv5)
        self.client.username_pw_set(user, PASSWORDS[user])
        self.client.on_message = lambda c, u, msg: self.messages.put((msg.topic, json.loads(msg.payload)))
        self.client.on_publish = lambda c, u, mid, reason, props: self.pubacks.put(reason)
        self.client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.client.subscribe([(f, 1) for f in filters])
        subscribed.get(timeout=10)

    def received_until(self, rid: str, timeout: float = 10.0) -> list[tuple[str, dict]]:
        """What arrived, up to and including the answer with id `rid`."""
        out: list[tuple[str, dict]] = []
        while not any(m.get("id") == rid for _, m in out):
            out.append(self.messages.get(timeout=timeout))
        return out

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.parametrize("mqtt5", [True, False], ids=["mqtt5", "mqtt311"])
def test_a_device_asks_as_itself_and_gets_its_answer(service, broker, mqtt5):
    with device(broker, "pump-a", mqtt5=mqtt5) as a:
        final = a.ask(QUESTION["question"], max_tokens=QUESTION["max_tokens"], timeout=30)
    assert final["status"] == p.OK and final["text"].strip()


def test_a_device_reads_only_its_own_answers(service, broker):
    snoop = Listener(broker, "pump-a", ["#", "edge-slm/v1/pump-b/answer/#", "edge-slm/v1/+/answer/#"])
    try:
        with device(broker, "pump-b") as b:
            assert b.ask(QUESTION["question"], id="b-secret-answer", max_tokens=6, timeout=30)["status"] == p.OK
        # A's own answer, published after B's, shows the snooper was listening all along.
        with device(broker, "pump-a") as a:
            assert a.ask(QUESTION["question"], id="a-own", max_tokens=6, timeout=30)["status"] == p.OK
        got = [m for _, m in snoop.received_until("a-own")]
    finally:
        snoop.close()
    assert {m.get("id") for m in got} == {"a-own"}


def test_a_device_cannot_ask_as_another(service, broker):
    b_answers = Listener(broker, "pump-b", [f"{p.answer_topic('pump-b')}/#"])
    intruder = Listener(broker, "pump-a", [f"{p.answer_topic('pump-a')}/#"])
    try:
        accepted = service.stats["accepted"]
        intruder.client.publish(p.ask_topic("pump-b"), json.dumps({"id": "intruder-5", **QUESTION}), qos=1)
        assert intruder.pubacks.get(timeout=10) == "Not authorized"
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-u", "pump-a", "-P", PASSWORDS["pump-a"],
                        "-V", "mqttv311", "-q", "1", "-t", p.ask_topic("pump-b"),
                        "-m", json.dumps({"id": "intruder-311", **QUESTION})], check=True, timeout=10)
        # B's own question comes after both: by its answer, theirs would have come too.
        with device(broker, "pump-b") as b:
            assert b.ask(QUESTION["question"], id="b-own", max_tokens=6, timeout=30)["status"] == p.OK
        got = b_answers.received_until("b-own")
    finally:
        b_answers.close()
        intruder.close()
    assert {m.get("id") for _, m in got} == {"b-own"} and intruder.messages.empty()
    assert service.stats["accepted"] == accepted + 1


@pytest.mark.parametrize("login", [[], ["-u", "pump-a", "-P", "wrong"], ["-u", "nobody", "-P", "x"]],
                         ids=["anonymous", "wrong-password", "unknown-user"])
def test_a_client_without_a_valid_login_is_refused(broker, login):
    out = subprocess.run(["mosquitto_sub", "-p", str(broker.port), *login, "-t", "#", "-C", "1", "-W", "5"],
                         capture_output=True, text=True, timeout=10)
    assert out.returncode != 0 and "not authori" in out.stderr.lower(), out.stderr


def test_runtimes_in_a_share_group_answer_under_the_acl(engine, tmp_path):
    """A broker of its own: the module's runtime, outside the group, would answer too."""
    site = site_broker(tmp_path)
    members = []
    try:
        for n in range(2):
            members.append(runtime(engine, site, tmp_path / f"state-{n}", f"rt-share-{n}", share_group="site",
                                   ha_discovery=True))
        time.sleep(0.3)  # the shared subscriptions reach the broker
        with device(site, "pump-a") as a:
            statuses = [a.ask(QUESTION["question"], id=f"s{n}", max_tokens=4, timeout=30)["status"]
                        for n in range(4)]
    finally:
        for m in members:
            m.stop()
        site.stop()
    assert statuses == [p.OK] * 4 and all(m.stats["accepted"] for m in members)


def test_the_runtime_may_write_what_it_needs_and_nothing_else(tmp_path):
    site = site_broker(tmp_path)  # of its own: nothing written here reaches another test's devices
    allowed = [p.status_topic("rt-x"), "homeassistant/sensor/edge_slm_rt_x/state/config",
               p.answer_topic("pump-a"), f"{p.answer_topic('pump-a')}/r1"]
    refused = [p.ask_topic("pump-a"), p.cancel_topic("pump-a"), "edge-slm/v1/pump-a/command", "site/valves"]
    rt = Listener(site, "edge-slm", [p.ask_topic("+")])
    try:
        for topic in allowed + refused:
            rt.client.publish(topic, "{}", qos=1)
        reasons = [rt.pubacks.get(timeout=10) for _ in allowed + refused]
    finally:
        rt.close()
        site.stop()
    # Taken ("Success", or "No matching subscribers": nobody listens here), or refused.
    assert [str(r) if r.is_failure else "taken" for r in reasons] == (
        ["taken"] * len(allowed) + ["Not authorized"] * len(refused)), reasons
