"""A hostile fake Ray head on 127.0.0.1: raw sockets in threads, so it misbehaves byte by byte.

Each route is a function that writes whatever it likes to the client socket: huge bodies, one byte
per second, gzip bombs, non-standard JSON. Handlers stop when the client hangs up or the head is
closed. Loopback only (the tests' network rule).
"""

from __future__ import annotations

import json
import socket
import socketserver
import threading
import zlib
from collections.abc import Callable
from typing import Any

Route = Callable[["HostileHead", socket.socket], None]
CHUNK = 64 * 1024
MB = 2**20


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(30)
        data = b""
        while b"\r\n\r\n" not in data and len(data) < 64 * 1024:
            got = sock.recv(4096)
            if not got:
                return
            data += got
        head, _, rest = data.partition(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        path = request_line.split(" ")[1].split("?")[0]
        length = next(
            (int(h.split(":", 1)[1]) for h in header_lines if h.lower().startswith("content-length:")), 0
        )
        while len(rest) < length:  # drain a request body
            got = sock.recv(4096)
            if not got:
                return
            rest += got
        head_server = self.server.head
        head_server.requests.append(path)
        route = head_server.routes.get(path)
        try:
            if route is None:
                send(sock, 404, b'{"error": "no such route"}')
            else:
                route(head_server, sock)
        except OSError:  # the client gave up (what most tests want): nothing more to do
            pass


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    head: HostileHead


class HostileHead:
    """``with HostileHead() as head: head.routes["/api/cluster_status"] = big_body(200 * MB)``."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[str] = []
        self.stop = threading.Event()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.head = self
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> HostileHead:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._server.shutdown()
        self._server.server_close()


def send(sock: socket.socket, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
    lines = [f"HTTP/1.1 {status} X", f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def json_body(payload: Any) -> Route:
    """A JSON answer; Python's encoder writes inf and nan as the non-standard Infinity and NaN."""
    body = json.dumps(payload).encode()

    def route(head: HostileHead, sock: socket.socket) -> None:
        send(sock, 200, body, {"Content-Type": "application/json"})

    return route


def big_body(size: int, *, declare_length: bool = False, block: bytes = b"x" * CHUNK) -> Route:
    """``size`` bytes of ``block`` repeated, close-delimited (or with a true Content-Length)."""

    def route(head: HostileHead, sock: socket.socket) -> None:
        framing = f"Content-Length: {size}" if declare_length else "Connection: close"
        sock.sendall(f"HTTP/1.1 200 OK\r\n{framing}\r\nContent-Type: text/plain\r\n\r\n".encode())
        sent = 0
        while sent < size and not head.stop.is_set():
            piece = block[: size - sent]
            sock.sendall(piece)
            sent += len(piece)

    return route


def trickle(*, in_headers: bool = False, interval: float = 1.0) -> Route:
    """One byte every ``interval`` seconds, for ever: in the body, or already in the status line."""

    def route(head: HostileHead, sock: socket.socket) -> None:
        if not in_headers:
            sock.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n")
        byte = b"H" if in_headers else b"["
        while not head.stop.wait(interval):
            sock.sendall(byte)

    return route


def endless_headers(head: HostileHead, sock: socket.socket) -> None:
    """A status line, then header lines for ever (as fast as the client reads them)."""
    sock.sendall(b"HTTP/1.1 200 OK\r\n")
    line = b"X-Junk: " + b"j" * 1000 + b"\r\n"
    while not head.stop.is_set():
        sock.sendall(line * 64)


def silent(head: HostileHead, sock: socket.socket) -> None:
    """Accept the request and never answer (a hung server)."""
    head.stop.wait()


_BOMBS: dict[int, bytes] = {}


def gzip_bomb(size: int) -> Route:
    """``size`` bytes of zeros gzipped (about 1000:1), sent with ``Content-Encoding: gzip``."""
    if size not in _BOMBS:
        z = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
        zeros = bytes(MB)
        _BOMBS[size] = b"".join(z.compress(zeros) for _ in range(size // MB)) + z.flush()
    body = _BOMBS[size]

    def route(head: HostileHead, sock: socket.socket) -> None:
        send(sock, 200, body, {"Content-Encoding": "gzip", "Content-Type": "application/json"})

    return route
