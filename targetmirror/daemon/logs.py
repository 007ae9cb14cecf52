"""Logging for a daemon that runs under systemd: to stderr, one line per record.

Each line starts with a ``<N>`` syslog priority prefix, which journald (SyslogLevelPrefix=yes, the
default) turns into the record's PRIORITY and strips; run by hand the prefix is harmless.  Extra
context (device, epoch) is rendered as ``key=value`` pairs so it can be grepped and, later,
forwarded as structured journal fields.
"""

from __future__ import annotations

import logging
import sys

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}

FIELDS = ("device", "epoch", "leg")


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


def setup(level: str = "info") -> None:
    """Send the root logger to stderr with :class:`JournalFormatter`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JournalFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
