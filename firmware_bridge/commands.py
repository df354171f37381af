"""`edge-slm serve` and `edge-slm mqtt-ask`: the MQTT side's command line,
joined to edge-slm's own (edge_slm/cli.py adds these commands)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

import click

from edge_slm.errors import EdgeSlmError

from . import protocol as p

log = logging.getLogger(__name__)

DEMO_DEVICE = "demo-pump"
DEMO_QUESTION = "What should I check first when a pump loses pressure?"
PASSWORD_ENV = "EDGE_SLM_MQTT_PASSWORD"


def connection_options(f):
    """Where the broker is and how to log in: shared by serve and mqtt-ask."""
    f = click.option("--broker", default=None,
                     help="mqtt://HOST:PORT or mqtts://HOST:PORT (serve: default a private "
                          "mosquitto on loopback).")(f)
    f = click.option("--ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TLS: CA certificates to trust.")(f)
    f = click.option("--cert", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TLS: client certificate.")(f)
    f = click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="TLS: client key.")(f)
    f = click.option("--username", default=None, help="Broker user name.")(f)
    f = click.option("--password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help=f"File holding the broker password (or set {PASSWORD_ENV}; never "
                          "on the command line).")(f)
    return f


def password(password_file: Path | None) -> str | None:
    if password_file is not None:
        try:
            return password_file.read_text().strip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeSlmError(f"{password_file}: {e}") from None
    return os.environ.get(PASSWORD_ENV) or None


@click.command()
@connection_options
@click.option("--model", "model_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="GGUF file (default: the pulled SmolLM2-135M).")
@click.option("--memory-budget", default=None, help="Ceiling for the whole process, e.g. 256M.")
@click.option("--slots", type=click.IntRange(1, 256), default=None,
              help="Questions answered together (default: the configured number, else 4).")
@click.option("--ctx", "n_ctx", type=click.IntRange(16, 1 << 20), default=None,
              help="Tokens per slot (default: the most the budget allows).")
@click.option("--kv-type", type=click.Choice(["f16", "q8_0"]), default=None)
@click.option("--threads", type=click.IntRange(1, 256), default=None)
@click.option("--max-tokens", type=click.IntRange(1, p.MAX_TOKENS), default=None,
              help="Longest answer, and the default length.")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where accepted questions are kept (default: $EDGE_SLM_HOME/state).")
@click.option("--runtime-id", default=None, help="This runtime's name on the broker (kept in the state dir).")
@click.option("--share-group", default=None, help="Split questions with other runtimes (MQTT 5 shared subscription).")
@click.option("--max-payload", type=click.IntRange(256, 1 << 20), default=p.MAX_PAYLOAD, show_default=True,
              help="Largest question, in bytes.")
@click.option("--device-rate", type=click.FloatRange(0.01, 1000), default=2.0, show_default=True,
              help="Questions per second a device may send, sustained.")
@click.option("--device-burst", type=click.IntRange(1, 10000), default=10, show_default=True)
@click.option("--device-concurrency", type=click.IntRange(1, 1000), default=4, show_default=True,
              help="Questions per device in flight at once.")
@click.option("--reply-scope", default=p.DEFAULT_REPLY_SCOPE, show_default=True,
              help="Topics answers may go to; {device} is the asker's id.")
@click.option("--drain-timeout", type=click.FloatRange(0, 3600), default=30.0, show_default=True,
              help="On SIGTERM, seconds to finish what is running.")
@click.option("--ha-discovery", is_flag=True, help="Announce the runtime to Home Assistant.")
@click.option("--demo", is_flag=True, help="Once up, ask one question as a device would and print the answer.")
def serve(broker, ca, cert, key, username, password_file, model_path, memory_budget, slots, n_ctx, kv_type,
          threads, max_tokens, state_dir, runtime_id, share_group, max_payload, device_rate, device_burst,
          device_concurrency, reply_scope, drain_timeout, ha_discovery, demo) -> None:
    """Answer devices' questions over MQTT (protocol: firmware_bridge/PROTOCOL.md)."""
    from edge_slm.config import load_engine_config
    from edge_slm.engine import Engine
    from edge_slm.paths import home

    from .broker import BrokerError, Mosquitto, free_port
    from .service import Service, ServiceConfig, broker_address
    from .store import StoreError

    state_dir = state_dir or home() / "state"
    # A service says what it does (connects, refusals, drains) without -v.
    service_log = logging.getLogger("firmware_bridge")
    if service_log.getEffectiveLevel() > logging.INFO:
        service_log.setLevel(logging.INFO)
    if runtime_id is not None and not p.valid_device_id(runtime_id):
        raise click.BadParameter(f"{runtime_id!r}: letters, digits, '_', '.', '-'", param_hint="--runtime-id")
    if share_group is not None and not p.valid_device_id(share_group):
        raise click.BadParameter(f"{share_group!r}: letters, digits, '_', '.', '-'", param_hint="--share-group")
    if broker is not None:
        broker_address(broker)  # a typo is refused before the model loads
    engine_cfg = load_engine_config({"model": model_path, "memory_budget": memory_budget, "slots": slots,
                                     "ctx": n_ctx, "kv_type": kv_type, "threads": threads,
                                     "max_tokens": max_tokens})
    private = None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        if broker is None:
            port = 1883 if _port_free(1883) else free_port()
            try:
                private = Mosquitto(state_dir / "broker", port=port).start()
            except BrokerError as e:
                raise EdgeSlmError(str(e)) from None
            broker = private.url
        cfg = ServiceConfig(broker=broker, state_dir=state_dir, runtime_id=runtime_id, share_group=share_group,
                            ca=ca, cert=cert, key=key, username=username, password=password(password_file),
                            max_payload=max_payload, reply_scope=reply_scope, device_rate=device_rate,
                            device_burst=device_burst, device_concurrency=device_concurrency,
                            drain_timeout_s=drain_timeout, ha_discovery=ha_discovery)
        with Engine(engine_cfg) as engine:
            try:
                service = Service(engine, cfg).start()
            except StoreError as e:
                raise EdgeSlmError(str(e)) from None
            log.warning("serving %s as runtime %s on %s", service.model_name, service.runtime_id, broker)
            if not service.wait_connected(10):
                log.warning("no broker at %s yet; retrying in the background", broker)
            elif demo:
                _demo(cfg, stop)
            try:
                while not stop.wait(1.0):
                    pass
            finally:
                log.warning("stopping: draining questions in flight")
                service.stop()
    finally:
        if private is not None:
            private.stop()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _demo(cfg, stop: threading.Event) -> None:
    """Ask one question through the broker, as a device would, and show the
    answer streaming in; then how to ask from another terminal."""
    from .client import DeviceClient
    from .service import broker_address

    host, port, _ = broker_address(cfg.broker)
    click.echo(f"\n{DEMO_DEVICE} asks over MQTT: {DEMO_QUESTION}\n", err=True)
    with DeviceClient(cfg, DEMO_DEVICE) as device:
        final = device.ask(DEMO_QUESTION, stream=True, max_tokens=128,
                           on_chunk=lambda c: (sys.stdout.write(c["text"]), sys.stdout.flush()))
    sys.stdout.write("\n")
    ms = final.get("latency_ms", {})
    click.echo(f"\n[{final['status']}: {final.get('answer_tokens', 0)} tokens, first after "
               f"{ms.get('first_token')} ms, all in {ms.get('total')} ms]\n", err=True)
    click.echo("Serving. Ask from another terminal:\n"
               f"  mosquitto_sub -h {host} -p {port} -t 'edge-slm/v1/pump-7/answer' &\n"
               f"  mosquitto_pub -h {host} -p {port} -q 1 -t edge-slm/v1/pump-7/ask "
               "-m '{\"id\": \"q1\", \"question\": \"How do I bleed air from a hydraulic line?\"}'\n"
               "Ctrl-C stops.", err=True)


@click.command("mqtt-ask")
@click.argument("question")
@connection_options
@click.option("--device", default="cli", show_default=True, help="The device id to ask as.")
@click.option("--stream", is_flag=True, help="Print the answer as it is generated.")
@click.option("--max-tokens", type=click.IntRange(1, p.MAX_TOKENS), default=None)
@click.option("--temperature", type=click.FloatRange(0, p.MAX_TEMPERATURE), default=None)
@click.option("--system", default=None, help="System prompt.")
@click.option("--mqtt311", is_flag=True, help="Speak MQTT 3.1.1 with the JSON envelope, as small firmware does.")
@click.option("--timeout", type=click.FloatRange(0.1, 3600), default=120.0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print the final answer message as JSON.")
def mqtt_ask(question, broker, ca, cert, key, username, password_file, device, stream, max_tokens,
             temperature, system, mqtt311, timeout, as_json) -> None:
    """Ask QUESTION through the broker as a device would, and print the answer."""
    import json

    from .client import DeviceClient
    from .service import ServiceConfig

    cfg = ServiceConfig(broker=broker or "mqtt://127.0.0.1:1883", ca=ca, cert=cert, key=key,
                        username=username, password=password(password_file))
    fields = {k: v for k, v in (("max_tokens", max_tokens), ("temperature", temperature),
                                ("system", system)) if v is not None}
    printed = False

    def show(c):
        nonlocal printed
        if not as_json:
            sys.stdout.write(c["text"])
            sys.stdout.flush()
            printed = True

    with DeviceClient(cfg, device, mqtt5=not mqtt311, timeout=min(timeout, 10)) as client:
        final = client.ask(question, stream=stream, timeout=timeout, on_chunk=show, **fields)
    if as_json:
        click.echo(json.dumps(final, ensure_ascii=False))
    elif final["status"] == p.OK:
        click.echo("" if printed else final["text"])  # streamed text is already out: end its line
    if final["status"] != p.OK:
        raise EdgeSlmError(f"{final['status']}: {final.get('error', '')}")
