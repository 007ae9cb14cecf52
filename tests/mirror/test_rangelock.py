"""RangeLock: overlapping ranges take turns in arrival order, disjoint ones never wait."""

from __future__ import annotations

import threading

import pytest

from targetmirror.mirror.rangelock import RangeLock


def test_disjoint_ranges_do_not_block():
    lock = RangeLock()
    t1 = lock.acquire(0, 100)
    t2 = lock.acquire(100, 200)  # touching but not overlapping
    assert lock.held() == 2
    lock.release(t1)
    lock.release(t2)
    assert lock.held() == 0


def test_overlap_waits_for_release():
    lock = RangeLock()
    token = lock.acquire(0, 4096)
    got = threading.Event()
    order = []

    def other():
        with lock.locked(2048, 8192):
            order.append("second")
            got.set()

    t = threading.Thread(target=other)
    t.start()
    # The other thread is queued: it cannot have the lock while we hold ours.
    assert not got.wait(0.05)
    order.append("first")
    lock.release(token)
    t.join()
    assert order == ["first", "second"]


def test_fifo_among_overlapping_waiters():
    """A later arrival that overlaps an earlier *waiter* queues behind it (no starvation)."""
    lock = RangeLock()
    first = lock.acquire(0, 10)
    results = []
    ready = threading.Barrier(2)

    def big():
        ready.wait()
        with lock.locked(0, 100):
            results.append("big")

    tb = threading.Thread(target=big)
    tb.start()
    ready.wait()
    # Wait until "big" is queued (held() counts waiters too).
    while lock.held() < 2:
        threading.Event().wait(0.001)
    # "small" overlaps "big" (waiting) but not "first": it must still go after "big".
    def small():
        with lock.locked(50, 60):
            results.append("small")

    ts = threading.Thread(target=small)
    ts.start()
    while lock.held() < 3:
        threading.Event().wait(0.001)
    lock.release(first)
    tb.join()
    ts.join()
    assert results == ["big", "small"]


def test_release_unknown_token():
    with pytest.raises(RuntimeError):
        RangeLock().release(42)
