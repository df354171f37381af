"""A device's side of the protocol, in Python: `edge-slm mqtt-ask`, the demo
question `make run` asks, and what the tests and the device simulator use.

MQTT 5 by default (Response Topic and Correlation Data), or MQTT 3.1.1 with
the JSON envelope's `reply_to`, as small firmware would speak it."""

from __future__ import annotations

import json
import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edge_slm.errors import EdgeSlmError

from . import protocol as p
from .service import ServiceConfig, broker_address, make_client, send_at_once


def subscribed_client(cfg: ServiceConfig, client_id: str, topics: list[str],
                      on_message: Callable[[mqtt.MQTTMessage], None], *, mqtt5: bool = True,
                      timeout: float = 10.0) -> mqtt.Client:
    """A client connected to `cfg`'s broker, its network loop running, once
    the broker has granted each of `topics` (QoS 1): messages go to
    `on_message` (on the network thread: keep it to a queue put)."""
    if mqtt5:
        client = make_client(client_id, cfg)
        client.manual_ack_set(False)
    else:
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
        if cfg.username:
            client.username_pw_set(cfg.username, cfg.password)
        send_at_once(client)
    client.on_message = lambda c, u, msg: on_message(msg)
    subscribed: queue.Queue = queue.Queue()
    client.on_subscribe = lambda c, u, mid, codes, props: subscribed.put(codes)

    def on_connect(c, u, flags, reason, props) -> None:  # every connect: a restarted broker forgot them
        if not reason.is_failure:
            for topic in topics:
                c.subscribe(topic, qos=1)

    client.on_connect = on_connect
    host, port, _ = broker_address(cfg.broker)
    try:
        client.connect(host, port, keepalive=30)
    except OSError as e:
        raise EdgeSlmError(f"broker {cfg.broker}: {e}") from None
    client.loop_start()
    for topic in topics:
        try:
            codes = subscribed.get(timeout=timeout)
        except queue.Empty:
            client.loop_stop()
            client.disconnect()
            raise EdgeSlmError(f"broker {cfg.broker}: no answer to our subscription in {timeout:g} s") from None
        if any(getattr(c, "is_failure", False) or c == 0x80 for c in codes):
            client.loop_stop()
            client.disconnect()
            raise EdgeSlmError(f"broker {cfg.broker}: not allowed to read {topic}")
    return client


class DeviceClient:
    """One device's connection. `ask()` publishes a question and returns its
    final answer, passing streamed chunks to `on_chunk` on the way."""

    def __init__(self, cfg: ServiceConfig, device: str, mqtt5: bool = True, timeout: float = 10.0):
        if not p.valid_device_id(device):
            raise EdgeSlmError(f"device id {device!r}: letters, digits, '_', '.', '-' (at most "
                               f"{p.MAX_DEVICE_ID}), starting with a letter or digit")
        self.device = device
        self.mqtt5 = mqtt5
        self.reply_topic = f"{p.answer_topic(device)}/{uuid.uuid4().hex[:8]}"
        self._inbox: queue.Queue = queue.Queue()
        self.client = subscribed_client(cfg, f"{device}-{uuid.uuid4().hex[:6]}", [self.reply_topic],
                                        self._inbox.put, mqtt5=mqtt5, timeout=timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def __enter__(self) -> DeviceClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, request: dict[str, Any], expiry_s: int | None = None) -> None:
        """Publish a question (a dict as the protocol describes) without waiting."""
        payload = dict(request)
        if not self.mqtt5:
            payload.setdefault("reply_to", self.reply_topic)
        self.send_raw(str(payload["id"]), json.dumps(payload).encode(), expiry_s)

    def send_raw(self, rid: str, payload: bytes, expiry_s: int | None = None) -> None:
        """Publish a payload as it is (a malformed one, say), with the MQTT 5
        properties that reply to this client, correlated by `rid`."""
        props = None
        if self.mqtt5:
            props = Properties(PacketTypes.PUBLISH)
            props.ResponseTopic = self.reply_topic
            props.CorrelationData = rid.encode()
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
        self.client.publish(p.ask_topic(self.device), payload, qos=1, properties=props)

    def cancel(self, rid: str) -> None:
        self.client.publish(p.cancel_topic(self.device), json.dumps({"id": rid}), qos=1)

    def messages(self, timeout: float, finals: set[str] | None = None
                 ) -> list[tuple[dict[str, Any], mqtt.MQTTMessage]]:
        """Answer messages as they arrive, for `timeout` seconds or until
        each id in `finals` has had its final answer."""
        out, deadline = [], time.monotonic() + timeout
        waiting = set(finals) if finals else None
        while (left := deadline - time.monotonic()) > 0 and waiting != set():
            try:
                msg = self._inbox.get(timeout=left)
            except queue.Empty:
                break
            answer = json.loads(msg.payload)
            out.append((answer, msg))
            if waiting and answer.get("final"):
                waiting.discard(answer.get("id"))
        return out

    def wait_final(self, rid: str, timeout: float,
                   on_chunk: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self._inbox.get(timeout=left)
            except queue.Empty:
                break
            answer = json.loads(msg.payload)
            if answer.get("id") != rid:
                continue
            if answer.get("final"):
                return answer
            if on_chunk:
                on_chunk(answer)
        raise EdgeSlmError(f"no final answer to {rid} within {timeout:g} s")

    def ask(self, question: str, *, stream: bool = False, timeout: float = 120.0,
            on_chunk: Callable[[dict[str, Any]], None] | None = None, **fields: Any) -> dict[str, Any]:
        rid = fields.pop("id", None) or uuid.uuid4().hex[:12]
        self.send({"id": rid, "question": question, "stream": stream, **fields})
        return self.wait_final(rid, timeout, on_chunk)
