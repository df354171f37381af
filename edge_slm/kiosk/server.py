"""The technician's kiosk: one local page, served on the engine every front
end shares, answering questions from the site's manuals.

    GET  /              the page (static/, shipped in the package: no CDN, no build step)
    GET  /healthz       200 once the engine is loaded: what the autostart waits for
    GET  /api/status    the board: model, memory, load, collections
    POST /api/ask       {"question", "collection"?, "ground"?} -> server-sent events:
                          start, sources, text..., done (status, grounding, timings)
    POST /api/cancel    {"id"}: the request is cancelled in the engine, its slot freed
    POST /api/login     {"pin"}: a session cookie, when the kiosk is exposed with a PIN

Starlette routes the requests and uvicorn (with h11, pure Python) serves
them, on a thread of their own; engine callbacks only hand pieces to the
event loop. Every response forbids loading anything from elsewhere (CSP),
and on loopback only the loopback host names are answered (a web page on
the technician's laptop cannot reach the kiosk by DNS rebinding)."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..engine import BUSY, Engine, Result
from ..errors import EdgeSlmError, is_whole
from ..memory import MIB
from .auth import COOKIE, MIN_PIN, SESSION_S, Gate, is_loopback

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
MAX_BODY = 16 * 1024           # bytes of a request body: a question and its options
MAX_QUESTION = 4000            # characters: a technician's question, typed or pasted
MAX_REQUESTS = 2               # kiosk questions in the engine at once: the equipment keeps its share
CONNECTIONS = 32               # open connections at once; more are answered 503 by uvicorn
CONNECTION_BYTES = 256 * 1024  # one connection's buffers, request and parsed objects
KEEPALIVE_S = 2.0              # an idle event stream says so this often, so a gone client is noticed
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
HEADERS = {"content-security-policy": CSP, "x-content-type-options": "nosniff",
           "referrer-policy": "no-referrer", "x-frame-options": "DENY", "cache-control": "no-store"}


@dataclass(frozen=True)
class KioskConfig:
    kiosk_host: str = "127.0.0.1"   # where the page is served; another address needs kiosk_pin
    kiosk_port: int = 8080
    kiosk_pin: str | None = None    # asked of every browser but the board's own screen

    def __post_init__(self) -> None:
        if not is_whole(self.kiosk_port, 1) or self.kiosk_port > 65535:
            raise EdgeSlmError(f"setting kiosk_port: {self.kiosk_port!r} is not a port from 1 to 65535")
        if not isinstance(self.kiosk_host, str) or not self.kiosk_host:
            raise EdgeSlmError(f"setting kiosk_host: {self.kiosk_host!r} is not a host address")
        pin = self.kiosk_pin
        if pin is not None and not (isinstance(pin, str) and MIN_PIN <= len(pin) <= 64 and pin.isprintable()):
            raise EdgeSlmError(f"the kiosk's PIN: {MIN_PIN} to 64 printable characters")
        if pin is None and not is_loopback(self.kiosk_host):
            raise EdgeSlmError(f"the kiosk on {self.kiosk_host} would be open to the network: set a PIN "
                               "(in a file given to --pin-file, or to serve's --kiosk-pin-file; or "
                               "EDGE_SLM_KIOSK_PIN)")


def planned_bytes() -> int:
    """What the kiosk holds beside the engine for the memory plan: its
    connections. Starlette and uvicorn themselves are imported before the
    engine plans, so they are in its measured interpreter row."""
    return CONNECTIONS * CONNECTION_BYTES + 1 * MIB


class Kiosk:
    def __init__(self, engine: Engine, cfg: KioskConfig):
        self.engine = engine
        self.cfg = cfg
        self.gate = Gate(cfg.kiosk_pin)
        self.running: dict[str, Any] = {}  # request id -> engine Request, for /api/cancel
        self.model_name = engine.model.path.name
        self._server = None
        self._thread: threading.Thread | None = None
        self._socket: socket.socket | None = None
        hosts = ["127.0.0.1", "localhost", "[::1]", "::1"] if is_loopback(cfg.kiosk_host) else ["*"]
        self.app = Starlette(routes=[
            Route("/", self.page),
            Route("/healthz", self.health),
            Route("/api/status", self.status),
            Route("/api/ask", self.ask, methods=["POST"]),
            Route("/api/cancel", self.cancel, methods=["POST"]),
            Route("/api/login", self.login, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC)),
        ], middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])

    # ---- running ----

    @property
    def url(self) -> str:
        host = self.cfg.kiosk_host
        port = self._socket.getsockname()[1] if self._socket else self.cfg.kiosk_port
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"

    def start(self) -> Kiosk:
        """Bind (a port in use is refused here, in one line) and serve on a thread."""
        import uvicorn

        family = socket.AF_INET6 if ":" in self.cfg.kiosk_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.cfg.kiosk_host, self.cfg.kiosk_port))
        except OSError as e:
            sock.close()
            raise EdgeSlmError(f"kiosk: cannot listen on {self.cfg.kiosk_host}:{self.cfg.kiosk_port} "
                               f"({e.strerror})") from None
        sock.listen(CONNECTIONS)
        self._socket = sock
        config = uvicorn.Config(_SecurityHeaders(self.app), log_level="warning", access_log=False,
                                lifespan="off", limit_concurrency=CONNECTIONS, timeout_keep_alive=5,
                                http="h11", ws="none")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="edge-slm-kiosk", daemon=True)
        self._thread.start()
        log.warning("kiosk on %s%s", self.url, " (PIN required off this board)" if self.cfg.kiosk_pin else "")
        return self

    def stop(self, timeout: float = 5.0) -> None:
        for req in list(self.running.values()):
            if req is not None:  # None: still being submitted
                req.cancel()
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        if self._socket is not None:
            self._socket.close()

    def __enter__(self) -> Kiosk:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- routes ----

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def health(self, request: Request) -> Response:
        return JSONResponse({"ok": True, "model": self.model_name})

    def _allowed(self, request: Request) -> bool:
        client = request.client.host if request.client else None
        return self.gate.allows(client, request.cookies.get(COOKIE), request.headers.get("host"))

    async def _request_body(self, request: Request) -> dict | Response:
        """An API request's JSON body, or the refusal: no session, or not JSON."""
        if not self._allowed(request):
            return _refuse(401, "login", "enter the kiosk's PIN")
        return await _json_body(request)

    async def status(self, request: Request) -> Response:
        if not self._allowed(request):
            return _refuse(401, "login", "enter the kiosk's PIN")
        s = self.engine.status()
        plan = s["memory_plan"]
        return JSONResponse({
            "model": self.model_name, "backend": s["backend"], "slots": s["slots"],
            "slots_busy": s["slots_busy"], "queue_depth": s["queue_depth"],
            "memory": {"rss": s["rss"], "plan": plan["total"], "budget": plan["budget"] or None},
            "decode_tps": round(s["decode_tps"], 1), "kiosk_busy": len(self.running) >= MAX_REQUESTS,
            "collections": (s["grounding"] or {}).get("collections", []),
            "grounding": s["grounding"] is not None, "uptime_s": round(s["uptime_s"])})

    async def login(self, request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        pin = body.get("pin")
        if not isinstance(pin, str) or len(pin) > 64:
            return _refuse(400, "bad_request", "pin must be text")
        token, wait = self.gate.login(request.client.host if request.client else "?", pin)
        if token is None:
            if wait:
                return _refuse(429, "locked", f"too many wrong PINs; try again in {wait:.0f} s")
            return _refuse(403, "wrong_pin", "wrong PIN")
        response = JSONResponse({"ok": True})
        response.set_cookie(COOKIE, token, max_age=SESSION_S, httponly=True, samesite="strict", path="/")
        return response

    async def cancel(self, request: Request) -> Response:
        body = await self._request_body(request)
        if isinstance(body, Response):
            return body
        req = self.running.get(body.get("id")) if isinstance(body.get("id"), str) else None
        if req is not None:
            req.cancel()
        return JSONResponse({"cancelled": req is not None})

    async def ask(self, request: Request) -> Response:
        body = await self._request_body(request)
        if isinstance(body, Response):
            return body
        question, collection, ground = body.get("question"), body.get("collection"), body.get("ground")
        if not isinstance(question, str) or not question.strip():
            return _refuse(400, "bad_request", "type a question first")
        if len(question) > MAX_QUESTION:
            return _refuse(400, "bad_request", f"the question is {len(question)} characters long; "
                                               f"at most {MAX_QUESTION} fit")
        if collection is not None and not isinstance(collection, str) or ground not in (None, True, False):
            return _refuse(400, "bad_request", "collection must be text and ground true or false")
        if len(self.running) >= MAX_REQUESTS:
            return _refuse(429, "busy", "the kiosk is answering other questions; ask again in a moment")
        rid = secrets.token_hex(8)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item: tuple[str, Any]) -> None:  # from the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, item)

        self.running[rid] = None  # holds the place while submit runs
        before = self.engine.status()  # what is ahead of this question
        try:
            req = await run_in_threadpool(
                self.engine.submit, messages=[{"role": "user", "content": question}],
                request_id=f"kiosk/{rid}", ground=ground, collection=collection or None,
                on_text=lambda piece: put(("text", piece)), on_done=lambda r: put(("done", r)))
        except BaseException:
            self.running.pop(rid, None)
            raise
        self.running[rid] = req
        return StreamingResponse(self._events(rid, req, events, before), media_type="text/event-stream",
                                 headers={"x-accel-buffering": "no"})

    async def _events(self, rid: str, req, events: asyncio.Queue, before: dict):
        """The answer as server-sent events; the request is cancelled if the
        page goes away before it ends."""
        try:
            yield _sse("start", {"id": rid, "slots": before["slots"], "slots_busy": before["slots_busy"],
                                 "queue_depth": before["queue_depth"]})
            g = req.grounded
            if g is not None:
                yield _sse("sources", {"grounding": g.label, "terms": g.terms,
                                       "sources": [_source(h) for h in g.sources]})
            while True:
                try:
                    kind, value = await asyncio.wait_for(events.get(), KEEPALIVE_S)
                except asyncio.TimeoutError:
                    yield ": still working\n\n"
                    continue
                if kind == "text":
                    yield _sse("text", {"text": value})
                else:
                    yield _sse("done", _done(value))
                    return
        finally:
            req.cancel()  # a no-op once it has ended
            self.running.pop(rid, None)


def _source(hit) -> dict[str, Any]:
    return {"collection": hit.collection, "file": hit.file, "heading": hit.heading or None,
            "page": hit.page, "passage": hit.text}


def _done(r: Result) -> dict[str, Any]:
    return {"status": r.status, "error": r.error, "finish_reason": r.finish_reason,
            "grounding": r.grounding, "prompt_tokens": r.prompt_tokens, "answer_tokens": len(r.tokens),
            "retry_after_s": r.retry_after if r.status == BUSY else None,
            "queued_ms": round(1000 * r.queued_s),
            "first_token_ms": None if r.ttft_s is None else round(1000 * r.ttft_s),
            "total_ms": round(1000 * r.total_s)}


def _sse(event: str, data: dict[str, Any]) -> str:
    # json.dumps escapes newlines, so one data line always holds the whole event
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def _refuse(status: int, code: str, message: str) -> Response:
    return JSONResponse({"error": code, "message": message}, status_code=status)


async def _json_body(request: Request) -> dict | Response:
    """The request's JSON object, read up to MAX_BODY bytes. Only JSON is
    taken (a form posted from another site cannot be), and a request from
    another origin is refused."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return _refuse(415, "bad_request", "send JSON (Content-Type: application/json)")
    origin = request.headers.get("origin")
    if origin is not None and origin.split("://", 1)[-1] != request.headers.get("host"):
        return _refuse(403, "bad_request", "requests from other sites are refused")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > MAX_BODY:
            return _refuse(413, "bad_request", f"the request is over {MAX_BODY // 1024} KiB")
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return _refuse(400, "bad_request", "the request is not JSON")
    if not isinstance(obj, dict):
        return _refuse(400, "bad_request", "the request must be a JSON object")
    return obj


class _SecurityHeaders:
    """Adds HEADERS to every response (an ASGI wrapper: it leaves streaming alone)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                message["headers"] = list(message.get("headers", [])) + [
                    (k.encode(), v.encode()) for k, v in HEADERS.items() if k.encode() not in have]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def wait_healthy(url: str, timeout: float) -> bool:
    """Whether the kiosk at `url` answers its health check within `timeout` s."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url.rstrip("/") + "/healthz", timeout=1) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.1)
    return False
