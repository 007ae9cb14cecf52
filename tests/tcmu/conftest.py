"""Fixtures shared by the tcmu tests."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest

from .producer import Producer


@pytest.fixture
def producer() -> Iterator[Producer]:
    """A kernel double with a 4 KiB ring and a 64 KiB data area of 4 KiB blocks."""
    p = Producer()
    yield p
    if not p.buf.closed:
        # BufferError: a test kept a view alive; the map goes with it
        with contextlib.suppress(BufferError):
            p.buf.close()
