"""What every ``targetmirror`` command module shares: size and time parsing, the tables, the
daemon client of a command line, and the one seam to LIO that ``apply``, ``list`` and
``backup --rbd-snapshot`` read through (tests replace :func:`lio_seam`)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from targetmirror.client import Client, status_rows
from targetmirror.protocol import DEFAULT_SOCKET


def lio_seam() -> Any:
    """The rtslib seam apply and list use (tests replace this function with a fake)."""
    from targetmirror.lio.live import RtslibLio

    return RtslibLio()


def table(rows: Sequence[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def client(args: argparse.Namespace) -> Client:
    return Client(args.socket)


def call(args: argparse.Namespace, op: str, **kw: Any) -> dict[str, Any]:
    return client(args).call(op, **kw)


def print_status(mirrors: list[dict[str, Any]]) -> None:
    for row in status_rows(mirrors):
        print(row)


def parse_at(text: str) -> float:
    """``--at``: seconds since the epoch, ``+SECONDS`` from now, or an ISO 8601 local time."""
    if text.startswith("+"):
        return time.time() + float(text[1:])
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected +SECONDS, epoch seconds or an ISO time, got {text!r}") from exc


def daemon_command(sub: Any, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand that talks to targetmirrord: ``--socket`` and ``--json``."""
    sp: argparse.ArgumentParser = sub.add_parser(name, help=help)
    sp.add_argument("--socket", default=DEFAULT_SOCKET,
                    help="targetmirrord's control socket (default %(default)s)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    return sp
