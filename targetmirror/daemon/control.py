"""The daemon's side of the control API (:mod:`targetmirror.protocol` has the wire format, the
client and the error classes): a Unix socket speaking one JSON object per line.

Only root may talk to it: the socket lives in a 0700 directory, is itself 0600, and every
connection's peer credentials (SO_PEERCRED) are checked, so a permission slip on the directory
is not enough to control mirrors.  Requests are bounded in size; anything that is not a valid
request gets a ``protocol`` error and changes nothing.

A request's arguments are checked against its handler's signature before the handler runs
(configshell-fb's ``assert_params`` is the model): an unknown or missing argument, or one of
the wrong JSON type for the handler's annotation, is a ``protocol`` error naming it, and the
handler is not called.  A handler is then a plain method with keyword arguments; an exception
it did not foresee (a ``KeyError`` or ``TypeError`` deep inside, i.e. a bug) answers
``internal`` and logs the traceback, instead of passing for the client's bad arguments.

A client cannot tie the daemon up either: at most :data:`MAX_CONNECTIONS` connections are
served at once (one more is answered ``busy`` and closed), and a connection that sends part of
a request and then nothing for :data:`IDLE_TIMEOUT` seconds is closed without running it (an
operation that takes long, such as ``rejoin --wait``, is not idle: the timeout only covers
waiting for a request).

Error codes are the ``.code`` of :mod:`targetmirror.errors` (``protocol``, ``permission``,
``busy`` and ``internal`` included).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import logging
import os
import socket
import struct
import threading
import types
import typing
from collections.abc import Callable
from typing import Any

from targetmirror.errors import ProtocolError, TargetMirrorError
from targetmirror.protocol import DEFAULT_SOCKET, MAX_REQUEST, VERSION
from targetmirror.protocol import error_reply as _error

log = logging.getLogger("targetmirror.control")

MAX_CONNECTIONS = 32
"""Connections served at once; the CLI opens one per command."""
IDLE_TIMEOUT = 30.0
"""Seconds a connection may wait between bytes of an unfinished request."""

Handler = Callable[..., dict[str, Any]]
"""An operation: keyword arguments (the request's, checked first), a JSON-able result."""

_ENVELOPE = ("v", "op")


def _describe(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint) or (Any,)
        plural = {str: "strings", int: "integers", float: "numbers", bool: "booleans"}
        return f"a list of {plural.get(item, _describe(item))}" if item is not Any else "a list"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            dict: "an object"}.get(hint, str(hint))


def _conforms(value: Any, hint: Any) -> bool:
    """Whether a JSON value fits a handler's annotation (the few shapes handlers use)."""
    if hint is Any:
        return True
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_conforms(value, a) for a in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is list or hint is list:
        (item,) = typing.get_args(hint) or (Any,)
        return isinstance(value, list) and all(_conforms(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


@functools.lru_cache(maxsize=256)
def _signature(handler: Handler) -> tuple[dict[str, inspect.Parameter], dict[str, Any], bool]:
    sig = inspect.signature(handler)
    try:
        hints = typing.get_type_hints(handler)
    except (NameError, TypeError):  # an annotation that does not resolve: names only
        hints = {}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    params = {n: p for n, p in sig.parameters.items()
              if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                            inspect.Parameter.KEYWORD_ONLY)}
    return params, hints, open_ended


def check_arguments(op: str, handler: Handler, args: dict[str, Any]) -> None:
    """Raise :class:`ProtocolError` naming every argument of ``args`` that ``handler`` does not
    take, every one it needs and lacks, and every one of the wrong JSON type."""
    params, hints, open_ended = _signature(handler)
    problems = []
    if not open_ended:
        problems += [f"unknown argument {k!r} (it takes "
                     f"{', '.join(params) or 'none'})" for k in args if k not in params]
    problems += [f"missing argument {n!r}" for n, p in params.items()
                 if p.default is inspect.Parameter.empty and n not in args]
    for k, v in args.items():
        hint = hints.get(k)
        if k in params and hint is not None and not _conforms(v, hint):
            shown = json.dumps(v)
            problems.append(f"{k}: expected {_describe(hint)}, got "
                            f"{shown if len(shown) <= 40 else shown[:37] + '...'}")
    if problems:
        raise ProtocolError(f"bad arguments for {op}: {'; '.join(problems)}")


def handle_line(line: bytes, handlers: dict[str, Handler]) -> dict[str, Any]:
    """Decode one request, check its arguments, run its handler, and return the response
    object (pure logic)."""
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
    args = {k: v for k, v in req.items() if k not in _ENVELOPE}
    try:
        check_arguments(str(op), handler, args)
        return {"v": VERSION, "ok": True, "result": handler(**args)}
    except TargetMirrorError as exc:
        return _error(exc.code, str(exc))
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


__all__ = ["DEFAULT_SOCKET", "MAX_REQUEST", "ControlServer", "Handler",
           "check_arguments", "handle_line"]
