"""systemd readiness notification (``Type=notify``) without a library: one datagram.

The protocol is a single ``READY=1`` (or ``STOPPING=1``, ``STATUS=...``) datagram to the Unix
socket named by ``$NOTIFY_SOCKET`` (a leading '@' means the abstract namespace).  Outside systemd
the variable is unset and this does nothing.
"""

from __future__ import annotations

import os
import socket


def notify(state: str) -> bool:
    """Send ``state`` to systemd; return False when not running under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        s.connect(addr)
        s.sendall(state.encode())
    return True
