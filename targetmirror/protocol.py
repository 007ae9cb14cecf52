"""The control protocol of ``targetmirrord``: one module that the daemon, the client, the CLI
and the shell share, so no face imports ``targetmirror.daemon``.

A Unix socket speaking one JSON object per line:

Request:  ``{"v": 1, "op": "<name>", ...arguments}``
Response: ``{"v": 1, "ok": true, "result": {...}}`` or
          ``{"v": 1, "ok": false, "error": {"code": "<stable code>", "message": "..."}}``

Error codes are the ``.code`` of the classes in :mod:`targetmirror.errors`; :func:`call` raises
the same class on the client that the daemon raised (``except MirrorError`` works in a client),
via :func:`error_for`.  The server side (socket, permissions, limits, dispatch) is
:mod:`targetmirror.daemon.control`.
"""

from __future__ import annotations

import contextlib
import json
import socket
from typing import Any

from targetmirror.errors import (
    AccessDenied,
    ConfigError,
    DeviceError,
    InternalError,
    LioError,
    MirrorBusy,
    MirrorError,
    ProtocolError,
    RingError,
    StoreError,
    TargetMirrorError,
)

VERSION = 1
MAX_REQUEST = 64 * 1024
"""Largest request line the daemon reads, in bytes."""
DEFAULT_SOCKET = "/run/targetmirror/control.sock"

#: error code on the wire -> the exception class the client raises for it
ERROR_CLASSES: dict[str, type[TargetMirrorError]] = {
    cls.code: cls for cls in (ConfigError, MirrorError, LioError, StoreError, DeviceError,
                              RingError, ProtocolError, AccessDenied, MirrorBusy, InternalError)}


def error_reply(code: str, message: str) -> dict[str, Any]:
    return {"v": VERSION, "ok": False, "error": {"code": code, "message": message}}


def error_for(code: str, message: str) -> TargetMirrorError:
    """The exception a client raises for an error reply: the class whose ``code`` it is
    (:data:`ERROR_CLASSES`), else a :class:`TargetMirrorError` carrying the code."""
    cls = ERROR_CLASSES.get(code)
    if cls is not None:
        return cls(message)
    exc = TargetMirrorError(message)
    exc.code = code
    return exc


def call(path: str, op: str, sock_timeout: float = 7200.0, **args: Any) -> dict[str, Any]:
    """Send one request and return its ``result``, raising the daemon's error as the same
    exception class (see :func:`error_for`).

    ``sock_timeout`` only bounds the wait for the reply; operations take their own ``timeout``
    argument (how long the daemon waits for a split or rejoin to finish)."""
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
                          "(is it running? 'systemctl status targetmirrord')") from exc
    if not buf:
        raise DeviceError(f"targetmirrord at {path} closed the connection without answering")
    try:
        resp = json.loads(buf)
    except json.JSONDecodeError as exc:
        raise ProtocolError(f"daemon sent a malformed reply: {buf[:200]!r}") from exc
    if not isinstance(resp, dict):
        raise ProtocolError(f"daemon sent a reply that is not an object: {buf[:200]!r}")
    if not resp.get("ok"):
        err = resp.get("error")
        if not isinstance(err, dict):
            err = {}
        raise error_for(str(err.get("code", "error")), str(err.get("message", "unknown error")))
    result = resp.get("result", {})
    if not isinstance(result, dict):
        raise ProtocolError(f"daemon sent a result that is not an object: {buf[:200]!r}")
    return result
