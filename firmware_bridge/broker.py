"""A private Mosquitto on a free loopback port: `edge-slm serve`'s default
when no broker is given, and the broker every test starts.

Its configuration is a plain file in the state directory, persistence on,
so queued questions for the runtime's session survive a broker restart."""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import subprocess
import time
from pathlib import Path

log = logging.getLogger(__name__)


class BrokerError(Exception):
    """Mosquitto is missing or would not start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Mosquitto:
    """One mosquitto process. `start()` writes its config under `folder` and
    waits (bounded) until it accepts connections; `stop()` ends it cleanly
    (it saves its persistence file), `kill()` does not."""

    def __init__(self, folder: Path, port: int | None = None, extra_config: str = ""):
        # extra_config: more listeners (TLS), ACLs; appended after the loopback listener
        self.folder = Path(folder)
        self.port = port or free_port()
        self.extra_config = extra_config
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        return "\n".join([
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
            "persistence true",
            f"persistence_location {self.folder}/",
            "autosave_interval 10",
            # Each answer chunk at once, not held for the last one's ACK (Nagle's algorithm)
            "set_tcp_nodelay true",
            # Logs go to a file a site can read, not over the service's own.
            f"log_dest file {self.folder}/mosquitto.log",
            "log_type error", "log_type warning", "log_type notice",
            "max_queued_messages 10000",
            # Started as root, mosquitto would switch to its own user, which
            # cannot write here; a private broker runs as whoever started it.
            f"user {pwd.getpwuid(os.geteuid()).pw_name}",
            self.extra_config, ""])

    def start(self, timeout: float = 10.0) -> Mosquitto:
        exe = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists()
                                            else None)
        if exe is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto), or pass --broker")
        self.folder.mkdir(parents=True, exist_ok=True)
        conf = self.folder / "mosquitto.conf"
        conf.write_text(self.config_text())
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not _listening(self.port):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace").strip().splitlines()
                raise BrokerError(f"mosquitto exited at start: {err[-1] if err else 'no message'}")
            if time.monotonic() > deadline:
                self.kill()
                raise BrokerError(f"mosquitto did not listen on port {self.port} within {timeout} s")
            time.sleep(0.05)
        log.info("private mosquitto on 127.0.0.1:%d (config %s)", self.port, conf)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        self._close()

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._close()

    def _close(self) -> None:
        if self.proc and self.proc.stderr:
            self.proc.stderr.close()

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
