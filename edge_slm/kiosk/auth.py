"""Who may use a kiosk exposed on the network: a PIN typed once per browser,
which then holds a session cookie. The board's own screen (loopback) needs
none. Guessing is slowed per client address (after a few wrong PINs, each
further try waits longer) and for all addresses together (many addresses
cannot share the guessing out)."""

from __future__ import annotations

import hmac
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass, field

COOKIE = "edge_slm_kiosk"
SESSION_S = 12 * 3600          # a shift: the technician types the PIN once
MAX_SESSIONS = 64              # the oldest is dropped beyond, so a flood of logins holds no memory
FREE_TRIES = 5                 # wrong PINs from one address before it must wait
LOCKOUT_S = 30.0               # the first wait; doubles with each further wrong PIN, up to an hour
MAX_LOCKOUT_S = 3600.0
MAX_CLIENTS = 1024             # addresses whose failures are remembered
GLOBAL_TRIES = 20              # wrong PINs from all addresses together before everyone waits
GLOBAL_WINDOW_S = 600.0        # ... within this long: many addresses cannot share out the guessing
MIN_PIN = 6                    # characters: a million PINs at least


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


def host_name(host_header: str | None) -> str:
    """The name in a Host header, without its port."""
    host = (host_header or "").strip().lower()
    if host.startswith("["):
        return host[:host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass
class _Failures:
    count: int = 0
    until: float = 0.0  # monotonic time before which this address may not try


@dataclass
class Gate:
    """The PIN check and the sessions it grants; `pin` None lets everyone in."""

    pin: str | None
    _sessions: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    _failures: dict[str, _Failures] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    _global: list[float] = field(default_factory=list)  # when recent wrong PINs came, any address

    def allows(self, client: str | None, token: str | None, host: str | None = None) -> bool:
        """Whether a request may go on: with no PIN, always; from the board
        itself (a loopback client that asked for a loopback name: a page
        elsewhere that rebinds its name to 127.0.0.1 is not the board's), or
        with a live session."""
        if self.pin is None or (client is not None and is_loopback(client)
                                and host_name(host) in LOOPBACK_NAMES):
            return True
        now = time.monotonic()
        with self._lock:
            expiry = self._sessions.get(token or "")
            if expiry is not None and expiry < now:
                del self._sessions[token]
                expiry = None
        return expiry is not None

    def login(self, client: str, pin: str) -> tuple[str | None, float]:
        """A new session token for the right PIN; else None and the seconds
        this address must wait before trying again (0 while tries are free)."""
        now = time.monotonic()
        with self._lock:
            self._global = [t for t in self._global if now - t < GLOBAL_WINDOW_S]
            failures = self._failures.get(client)
            if failures and failures.until > now:
                return None, failures.until - now
            if len(self._global) >= GLOBAL_TRIES:
                return None, self._global[0] + GLOBAL_WINDOW_S - now
            if self.pin is not None and hmac.compare_digest(pin.encode(), self.pin.encode()):
                self._failures.pop(client, None)
                token = secrets.token_urlsafe(32)
                self._sessions[token] = now + SESSION_S
                while len(self._sessions) > MAX_SESSIONS:
                    del self._sessions[next(iter(self._sessions))]
                return token, 0.0
            self._global.append(now)
            failures = self._failures.setdefault(client, _Failures())
            failures.count += 1
            if failures.count >= FREE_TRIES:
                failures.until = now + min(MAX_LOCKOUT_S, LOCKOUT_S * 2 ** (failures.count - FREE_TRIES))
            while len(self._failures) > MAX_CLIENTS:
                del self._failures[next(iter(self._failures))]
            return None, max(0.0, failures.until - now)
