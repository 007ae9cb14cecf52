"""Waiting with one deadline: the loop the daemon's operations (split, rejoin, sync, repair)
and the CLI (a new backstore until the daemon serves it) each had a copy of."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def wait_events(events: Iterable[tuple[str, threading.Event]], timeout: float,
                late: Callable[[str], Exception], *,
                check: Callable[[], None] | None = None, poll: float = 0.2) -> None:
    """Wait until every event is set, all within ``timeout`` seconds in total.

    ``late(name)`` is raised for the first event still unset at the deadline.  ``check`` (if
    given) runs every ``poll`` seconds while waiting and raises to stop early (a copy that
    failed need not be waited for until the deadline)."""
    deadline = time.monotonic() + timeout
    for name, event in events:
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            if event.wait(min(poll, remaining) if check is not None else remaining):
                break
            if check is not None:
                check()
            if time.monotonic() >= deadline:
                raise late(name)


def retry(fn: Callable[[], T], timeout: float, retry_on: type[Exception] | tuple[
        type[Exception], ...], *, interval: float = 0.2) -> T:
    """``fn()`` until it does not raise ``retry_on``, for at most ``timeout`` seconds; the
    last error is raised when time is up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except retry_on:
            if time.monotonic() + interval > deadline:
                raise
        time.sleep(interval)  # polling something that takes a moment to appear
