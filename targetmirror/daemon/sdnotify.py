"""systemd readiness notification (``Type=notify``) without a library: one datagram.

The protocol is a single ``READY=1`` (or ``STOPPING=1``, ``STATUS=...``, ``WATCHDOG=1``)
datagram to the Unix socket named by ``$NOTIFY_SOCKET`` (a leading '@' means the abstract
namespace).  Outside systemd the variable is unset and this does nothing.

``WatchdogSec=`` in the unit sets ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, the process meant);
:func:`watchdog_interval` turns them into how often ``WATCHDOG=1`` must be sent, as
``sd_watchdog_enabled(3)`` does.  Who sends it, and when it is withheld, is
:mod:`targetmirror.daemon.watchdog`'s business.
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


def watchdog_interval() -> float | None:
    """Seconds between two ``WATCHDOG=1`` (half of ``$WATCHDOG_USEC``, as systemd advises), or
    None when systemd's watchdog is off for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None  # meant for another process (we were started by the service's main one)
    return int(usec) / 2e6
