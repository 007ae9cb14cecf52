"""The daemon's local control API: a Unix socket speaking one JSON object per line.

Request:  ``{"v": 1, "op": "<name>", ...arguments}``
Response: ``{"v": 1, "ok": true, "result": {...}}`` or
          ``{"v": 1, "ok": false, "error": {"code": "<stable code>", "message": "..."}}``

Only root may talk to it: the socket lives in a 0700 directory, is itself 0600, and every
connection's peer credentials (SO_PEERCRED) are checked, so a permission slip on the directory
is not enough to control mirrors.  Requests are bounded in size; anything that is not a valid
request gets a ``protocol`` error and changes nothing.

A client cannot tie the daemon up either: at most :data:`MAX_CONNECTIONS` connections are
served at once (one more is answered ``busy`` and closed), and a connection that sends part of
a request and then nothing for :data:`IDLE_TIMEOUT` seconds is closed without running it (an
operation that takes long, such as ``rejoin --wait``, is not idle: the timeout only covers
waiting for a request).  A handler that fails in a way it did not foresee answers ``internal``
and logs the traceback, instead of leaving the client without a reply.

Error codes are the ``.code`` of :mod:`targetmirror.errors` plus ``protocol``, ``permission``,
``busy`` and ``internal``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
from collections.abc import Callable
from typing import Any

from targetmirror.errors import TargetMirrorError

log = logging.getLogger("targetmirror.control")

VERSION = 1
MAX_REQUEST = 64 * 1024
MAX_CONNECTIONS = 32
"""Connections served at once; the CLI opens one per command."""
IDLE_TIMEOUT = 30.0
"""Seconds a connection may wait between bytes of an unfinished request."""
DEFAULT_SOCKET = "/run/targetmirror/control.sock"

Handler = Callable[[dict[str, Any]], dict[str, Any]]


class ProtocolError(TargetMirrorError):
    """A request that is not valid JSON, too large, or of an unknown version or operation."""

    code = "protocol"


def _error(code: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "ok": False, "error": {"code": code, "message": message}}


def handle_line(line: bytes, handlers: dict[str, Handler]) -> dict[str, Any]:
    """Decode one request, run its handler, and return the response object (pure logic)."""
    try:
        req = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return _error("protocol", f"request is not JSON: {exc}")
    if not isinstance(req, dict):
        return _error("protocol", "request must be a JSON object")
    if req.get("v") != VERSION:
        return _error("protocol", f"unsupported protocol version {req.get('v')!r}; "
                                  f"this daemon speaks {VERSION}")
    op = req.get("op")
    handler = handlers.get(op) if isinstance(op, str) else None
    if handler is None:
        return _error("protocol", f"unknown operation {op!r}; expected one of "
                                  f"{', '.join(sorted(handlers))}")
    try:
        return {"v": VERSION, "ok": True, "result": handler(req)}
    except TargetMirrorError as exc:
        return _error(exc.code, str(exc))
    except (TypeError, ValueError, KeyError) as exc:
        return _error("protocol", f"bad arguments for {op}: {exc}")
    except Exception as exc:  # a bug, but the client still deserves an answer
        log.exception("control operation %s failed", op)
        return _error("internal", f"{op} failed unexpectedly ({type(exc).__name__}: {exc}); "
                                  "see the daemon's log")


class ControlServer:
    """Serve :func:`handle_line` on a Unix socket, one thread per connection."""

    def __init__(self, path: str, handlers: dict[str, Handler], *,
                 allowed_uids: tuple[int, ...] = (0,), max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        self.path = path
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self._slots = threading.BoundedSemaphore(max_connections)
        self.handlers = handlers
        self.allowed_uids = allowed_uids
        directory = os.path.dirname(path) or "."
        os.makedirs(directory, mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)
        if os.path.exists(path):
            os.unlink(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.sock.listen(16)
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()
        log.info("control socket %s", self.path)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            if not self._slots.acquire(blocking=False):
                log.warning("refused a control connection: %d already open",
                            self.max_connections)
                with conn:
                    conn.settimeout(1.0)
                    self._send(conn, _error("busy", "too many control connections; try again"))
                continue
            threading.Thread(target=self._serve_slot, args=(conn,), daemon=True).start()

    def _serve_slot(self, conn: socket.socket) -> None:
        try:
            self._serve(conn)
        finally:
            self._slots.release()

    def _peer_uid(self, conn: socket.socket) -> int:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return int(uid)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            uid = self._peer_uid(conn)
            if uid not in self.allowed_uids:
                log.warning("refused control connection from uid %d", uid)
                self._send(conn, _error("permission", "only root may control targetmirrord"))
                return
            buf = b""
            while True:
                conn.settimeout(self.idle_timeout)
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    if buf:
                        log.warning("closed a control connection: %d bytes of a request, "
                                    "then nothing for %.0f s", len(buf), self.idle_timeout)
                        self._send(conn, _error("protocol", "request not finished (no "
                                                            "newline) in time"))
                    return
                except OSError:
                    return
                conn.settimeout(None)  # a handler may take long; sending its reply must not
                if not chunk:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    if line.strip():
                        self._send(conn, handle_line(line, self.handlers))
                if len(buf) > MAX_REQUEST:
                    self._send(conn, _error("protocol", f"request larger than {MAX_REQUEST} "
                                                        "bytes"))
                    return

    @staticmethod
    def _send(conn: socket.socket, obj: dict[str, Any]) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(json.dumps(obj).encode() + b"\n")


def call(path: str, op: str, sock_timeout: float = 7200.0, **args: Any) -> dict[str, Any]:
    """Client side: send one request and return its ``result``, raising on an error reply.

    ``sock_timeout`` only bounds the wait for the reply; operations take their own ``timeout``
    argument (how long the daemon waits for a split or rejoin to finish)."""
    from targetmirror.errors import DeviceError

    req = {"v": VERSION, "op": op, **args}
    buf = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(sock_timeout)
            s.connect(path)
            # A daemon that refuses us (permissions) answers and closes at once; our send may
            # then fail, but its answer is still there to read.
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                s.sendall(json.dumps(req).encode() + b"\n")
            while b"\n" not in buf:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise DeviceError(f"cannot reach targetmirrord at {path}: {exc.strerror or exc} "
                          "(is it running?)") from exc
    if not buf:
        raise DeviceError(f"targetmirrord at {path} closed the connection without answering")
    try:
        resp = json.loads(buf)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"daemon sent a malformed reply: {buf[:200]!r}") from exc
    if not resp.get("ok"):
        err = resp.get("error", {})
        exc2 = TargetMirrorError(err.get("message", "unknown error"))
        exc2.code = err.get("code", "error")
        raise exc2
    result = resp.get("result", {})
    assert isinstance(result, dict)
    return result
