"""A real HTTP fault proxy for scenario 4: sits on loopback in front of the S3 server.

Clients (s3fs/botocore in the trainer and its dataloader workers) talk to ``endpoint``; every
request is forwarded to the upstream S3 server unchanged (the Host header too, so signatures
stay valid) unless a fault is armed. An armed fault starts at the first request that reaches
the proxy after arming, so it always hits the stream, and lasts ``seconds``:

- ``error``: answer 503 SlowDown and 500 InternalError, alternately, without asking upstream;
- ``reset``: reset the connection (TCP RST): before the answer, or half-way through its body;
- ``slow``: hold every answer for ``delay_s`` before sending it;
- ``restart``: call ``on_start`` (the test stops the real server there and starts it again later);
  while upstream refuses connections the proxy resets its clients' connections.

``Fault.recovery_s`` is how long the stream stalled: from the first faulted request to the first
answer passed through unharmed after the fault ended.
"""

from __future__ import annotations

import http.client
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade"}
_ERRORS = (
    (503, "SlowDown", "Please reduce your request rate."),
    (500, "InternalError", "We encountered an internal error. Please try again."),
)


@dataclass
class Fault:
    """One armed fault and what it did."""

    kind: str
    seconds: float
    delay_s: float = 0.0
    on_start: Callable[[], None] | None = None
    started: float | None = None
    """Monotonic time of the first request it hit."""
    hits: int = 0
    """Requests it faulted."""
    recovered: float | None = None
    """Monotonic time of the first unharmed answer after it ended."""
    done: threading.Event = field(default_factory=threading.Event)

    def active(self, now: float) -> bool:
        return self.started is not None and now < self.started + self.seconds

    @property
    def recovery_s(self) -> float:
        assert self.started is not None and self.recovered is not None, "fault never hit or never recovered"
        return self.recovered - self.started


class FaultProxy:
    """A threaded HTTP/1.1 proxy on 127.0.0.1 in front of ``upstream`` (``http://host:port``)."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.fault: Fault | None = None
        self.passed = 0
        """Answers passed through unharmed."""
        self._lock = threading.Lock()
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def arm(
        self, kind: str, seconds: float, delay_s: float = 0.0, on_start: Callable[[], None] | None = None
    ) -> Fault:
        """Fault the requests of ``seconds`` from the next one on; returns the fault to watch."""
        if kind not in ("error", "reset", "slow", "restart"):
            raise ValueError(f"unknown fault kind {kind!r}")
        fault = Fault(kind, seconds, delay_s, on_start)
        with self._lock:
            self.fault = fault
        return fault

    def disarm(self, fault: Fault) -> None:
        """Withdraw ``fault`` if it is still the armed one."""
        with self._lock:
            if self.fault is fault:
                self.fault = None

    def _fault_for_request(self) -> Fault | None:
        """The fault this request meets (starting an armed one), or None."""
        with self._lock:
            fault = self.fault
            if fault is None or fault.recovered is not None:
                return None
            now = time.monotonic()
            if fault.started is None:
                fault.started = now
                if fault.on_start is not None:
                    fault.on_start()
            if fault.active(now):
                fault.hits += 1
                return fault
            return None

    def _refused(self) -> None:
        with self._lock:
            if self.fault is not None and self.fault.recovered is None:
                self.fault.hits += 1

    def _answered(self) -> None:
        with self._lock:
            self.passed += 1
            fault = self.fault
            now = time.monotonic()
            ended = fault is not None and fault.started is not None and not fault.active(now)
            if fault is not None and ended and fault.recovered is None:
                fault.recovered = now
                fault.done.set()


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: object, client_address: object) -> None:
        pass  # connections this proxy resets on purpose end in errors; they are the point


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"
    _upstream: http.client.HTTPConnection | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._proxy()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _proxy(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        fault = self.owner._fault_for_request()
        if fault is not None and fault.kind == "error":
            self._send_error(_ERRORS[fault.hits % len(_ERRORS)])
            return
        if fault is not None and fault.kind == "reset" and fault.hits % 2:
            self._reset()
            return
        try:
            status, reason, headers, payload = self._forward(body)
        except OSError:  # upstream down (restart): look like a server that went away
            self.owner._refused()
            self._close_upstream()
            self._reset()
            return
        if fault is not None and fault.kind == "slow":
            time.sleep(fault.delay_s)
        self.send_response_only(status, reason)
        head = self.command == "HEAD"  # its Content-Length is the object's, from upstream
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP and (head or name.lower() != "content-length"):
                self.send_header(name, value)
        if not head:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if fault is not None and fault.kind == "reset" and len(payload) > 1:
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self._reset()
            return
        if self.command != "HEAD":
            self.wfile.write(payload)
        if fault is None:
            self.owner._answered()

    def _forward(self, body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        if self._upstream is None:
            self._upstream = http.client.HTTPConnection(*self.owner.upstream, timeout=30)
        connection = self._upstream
        connection.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
        for name, value in self.headers.items():
            if name.lower() not in _HOP_BY_HOP:
                connection.putheader(name, value)
        connection.endheaders(body)
        response = connection.getresponse()
        payload = response.read()
        if response.will_close:
            self._close_upstream()
        return response.status, response.reason, response.getheaders(), payload

    def _close_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
            self._upstream = None

    def _send_error(self, error: tuple[int, str, str]) -> None:
        status, code, message = error
        xml = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>"
        payload = ('<?xml version="1.0" encoding="UTF-8"?>' + xml).encode()
        self.send_response_only(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _reset(self) -> None:
        """Drop the client connection with a TCP RST, as a crashed server or middlebox would."""
        self.wfile.flush()
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close_connection = True
        self._close_upstream()
        self.connection.close()
