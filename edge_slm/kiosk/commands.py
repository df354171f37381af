"""`edge-slm kiosk`, and the options `edge-slm serve --kiosk` shares with it."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import replace
from pathlib import Path

import click

from ..engine import MAX_SLOTS
from ..errors import EdgeSlmError
from ..options import engine_options

log = logging.getLogger(__name__)


def kiosk_settings(host: str | None, port: int | None, pin_file: Path | None):
    """The kiosk's settings: [kiosk] of the settings file, EDGE_SLM_KIOSK_HOST,
    _PORT and _PIN, then the options. Checked (a network address without a
    PIN is refused) before the model loads."""
    from ..config import load_settings
    from .server import KioskConfig

    pin = None
    if pin_file is not None:
        try:
            pin = pin_file.read_text().strip("\r\n")
        except (OSError, UnicodeDecodeError) as e:
            raise EdgeSlmError(f"{pin_file}: {e}") from None
    return load_settings(KioskConfig, "kiosk", {"kiosk_host": host, "kiosk_port": port, "kiosk_pin": pin})


def wait_for_signal() -> None:
    """Until SIGTERM or Ctrl-C."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


@click.command()
@engine_options
@click.option("--slots", type=click.IntRange(1, MAX_SLOTS), default=None,
              help="Questions answered together (default: the configured number, else 4).")
@click.option("--max-tokens", type=click.IntRange(1, 4096), default=None, help="Longest answer.")
@click.option("--index", "index_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Index of manuals (default: $EDGE_SLM_HOME/index.sqlite3, used when it exists).")
@click.option("--host", default=None, help="Address to serve on (default 127.0.0.1; another one "
                                           "needs a PIN).")
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="Port (default 8080).")
@click.option("--pin-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="File holding the PIN browsers off this board must enter (or set EDGE_SLM_KIOSK_PIN).")
def kiosk(model_path, threads, n_ctx, kv_type, model_backend, execution_provider, memory_budget, slots,
          max_tokens, index_path, host, port, pin_file) -> None:
    """Serve the technician's page: questions answered from the site's manuals.

    For the kiosk and the MQTT service in one process, on one engine and
    one memory budget, run `edge-slm serve --kiosk` instead."""
    from ..config import load_engine_config
    from ..engine import Engine
    from .server import Kiosk, planned_bytes  # before the engine plans: measured in its interpreter row

    cfg = kiosk_settings(host, port, pin_file)
    engine_cfg = load_engine_config({"model": model_path, "memory_budget": memory_budget, "slots": slots,
                                     "ctx": n_ctx, "kv_type": kv_type, "threads": threads,
                                     "max_tokens": max_tokens, "index": index_path,
                                     "model_backend": model_backend, "execution_provider": execution_provider})
    engine_cfg = replace(engine_cfg, front_end_bytes=planned_bytes())
    with Engine(engine_cfg) as engine:
        if engine.grounder is None:
            log.warning("no index of manuals: answers are the model's alone (`edge-slm index DIR` makes one)")
        with Kiosk(engine, cfg).start():
            wait_for_signal()
