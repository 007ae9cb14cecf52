"""Logging for a daemon that runs under systemd.

Under systemd (its stderr is the journal: ``$JOURNAL_STREAM`` names stderr's device and inode)
every record goes to journald's native socket as one datagram of ``KEY=value`` fields, so the
context is queryable, not just readable::

    journalctl -u targetmirrord TARGETMIRROR_DEVICE=db TARGETMIRROR_EPOCH=3

Fields: ``MESSAGE``, ``PRIORITY`` (syslog level), ``SYSLOG_IDENTIFIER=targetmirrord``,
``TARGETMIRROR_LOGGER``, ``CODE_FILE``/``CODE_LINE``/``CODE_FUNC``, and the record's context as
``TARGETMIRROR_DEVICE``, ``TARGETMIRROR_EPOCH``, ``TARGETMIRROR_LEG`` (``extra={"device": ...}``).
The protocol is journald's documented one (no python3-systemd needed).

Anywhere else (run by hand, in the lab, or if the socket cannot be reached) a line goes to
stderr starting with a ``<N>`` syslog priority prefix, which journald would also turn into
PRIORITY, with the context rendered as ``key=value`` pairs so it can be grepped.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import sys

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

FIELDS = ("device", "epoch", "leg")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "targetmirrord"


class JournalFormatter(logging.Formatter):
    """``<prio>logger: message key=value ...``."""

    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        fields = " ".join(f"{k}={getattr(record, k)}" for k in FIELDS if hasattr(record, k))
        text = f"<{prio}>{record.name}: {record.getMessage()}"
        if fields:
            text += " " + fields
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def encode_fields(fields: dict[str, str]) -> bytes:
    """journald's native datagram: ``KEY=value\\n``, or for a value with a newline
    ``KEY\\n<64-bit little-endian length><value>\\n``."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", "replace")
        if b"\n" in data:
            out += key.encode() + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode() + b"=" + data + b"\n"
    return bytes(out)


class JournalHandler(logging.Handler):
    """Send each record to journald's native socket with structured fields; on a send failure
    fall back to the stderr line (never lose a record because the journal is busy)."""

    def __init__(self, path: str = JOURNAL_SOCKET) -> None:
        super().__init__()
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.fallback = logging.StreamHandler(sys.stderr)
        self.fallback.setFormatter(JournalFormatter())
        self._plain = logging.Formatter()

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self._plain.formatException(record.exc_info)
        out = {"MESSAGE": message, "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
               "SYSLOG_IDENTIFIER": IDENTIFIER, "TARGETMIRROR_LOGGER": record.name,
               "CODE_FILE": record.pathname, "CODE_LINE": str(record.lineno),
               "CODE_FUNC": str(record.funcName)}
        for key in FIELDS:
            if hasattr(record, key):
                out[f"TARGETMIRROR_{key.upper()}"] = str(getattr(record, key))
        return out

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.sock.sendto(encode_fields(self.fields(record)), self.path)
        except OSError:
            self.fallback.emit(record)

    def close(self) -> None:
        self.sock.close()
        super().close()


def journal_stream() -> bool:
    """True when stderr is connected to the journal (systemd sets ``$JOURNAL_STREAM``)."""
    value = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def setup(level: str = "info") -> None:
    """Root logger to the journal (under systemd) or to stderr with :class:`JournalFormatter`."""
    handler: logging.Handler
    if journal_stream() and os.path.exists(JOURNAL_SOCKET):
        handler = JournalHandler()
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
