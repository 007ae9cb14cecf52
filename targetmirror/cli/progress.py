"""Progress bars for the long copies (``sync``, ``repair``, ``rejoin``, ``verify``) on a
terminal, read from the daemon's ``status`` (the same ``resync`` numbers ``status`` shows as
Cpy% and ETA).  tqdm draws them (Debian: python3-tqdm); off a terminal, or with ``--json``,
the commands print only their result."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from targetmirror.client import Client, copy_progress
from targetmirror.errors import MirrorError

POLL = 0.5
"""Seconds between two status reads while a bar is shown."""


def wanted(args: Any, stream: TextIO | None = None) -> bool:
    """A bar only for a person watching: a terminal, no --json, waiting for the end."""
    return (not getattr(args, "json", False) and not getattr(args, "no_wait", False)
            and (stream or sys.stderr).isatty())


class Bar:
    """One tqdm bar in bytes whose total may only become known after the copy started."""

    def __init__(self, desc: str, stream: TextIO | None = None) -> None:
        from tqdm import tqdm

        self._bar = tqdm(total=None, unit="B", unit_scale=True, desc=desc,
                         file=stream or sys.stderr, dynamic_ncols=True)

    def show(self, done: int | None, total: int | None) -> None:
        if total and self._bar.total != total:
            self._bar.total = total
            self._bar.refresh()
        if done is not None and done != self._bar.n:
            self._bar.update(done - self._bar.n)
        else:
            self._bar.refresh()

    def finish(self) -> None:
        """The copy is done: the bar shows all of it."""
        if self._bar.total:
            self.show(int(self._bar.total), None)

    def close(self) -> None:
        self._bar.close()


def follow(client: Client, names: Sequence[str], *, busy: Callable[[dict[str, Any]], bool],
           desc: str, timeout: float, stream: TextIO | None = None) -> list[dict[str, Any]]:
    """Show one bar for the copies of ``names`` until ``busy`` is false for all of them;
    return their last status.  A copy that fails, or one still running after ``timeout``
    seconds, raises (the daemon goes on in the background)."""
    bar = Bar(desc, stream)
    deadline = time.monotonic() + timeout
    try:
        while True:
            mirrors: list[dict[str, Any]] = client.status(list(names))["mirrors"]
            pending = [m for m in mirrors if busy(m)]
            failed = [m for m in pending if (m.get("resync") or {}).get("error")]
            if failed:
                raise MirrorError(f"{desc} of {failed[0]['name']} failed: "
                                  f"{failed[0]['resync']['error']}")
            progress = [copy_progress(m) for m in pending]
            known = [p for p in progress if p is not None]
            if known:
                bar.show(sum(d for d, _ in known), sum(t for _, t in known))
            if not pending:
                bar.finish()
                return mirrors
            if time.monotonic() > deadline:
                raise MirrorError(f"{desc} of {', '.join(m['name'] for m in pending)} did not "
                                  f"finish within {timeout:g} s (it goes on in the "
                                  "background)")
            time.sleep(POLL)  # polling the daemon for progress display
    finally:
        bar.close()


def while_running(call: Callable[[], dict[str, Any]], client: Client, name: str, *,
                  desc: str, stream: TextIO | None = None) -> dict[str, Any]:
    """Run ``call`` (an operation that answers only when it is done, like ``verify``) in a
    thread and show a bar from the mirror's ``resync`` status while it runs (elapsed time
    only, when the daemon reports no progress for it); return its result or raise its error."""
    result: list[dict[str, Any]] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(call())
        except BaseException as exc:  # handed to the calling thread
            error.append(exc)

    worker = threading.Thread(target=run, name=desc, daemon=True)
    worker.start()
    bar = Bar(desc, stream)
    try:
        while worker.is_alive():
            worker.join(POLL)
            try:
                m = client.mirror(name)
            except MirrorError:
                continue
            progress = copy_progress(m) if (m.get("resync") or {}).get("kind") == desc else None
            bar.show(*(progress or (None, None)))
    finally:
        bar.close()
    if error:
        raise error[0]
    return result[0]
