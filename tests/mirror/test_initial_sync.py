"""Initial sync (claim 2): B is filled from A online; reads come from A until it is done; a
restart resumes from the persisted cursor."""

from __future__ import annotations

import os
import random
import threading

import pytest

from targetmirror.errors import MirrorError
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import State, StateStore
from targetmirror.store.image import Image

SIZE = 8 << 20


def make(tmp_path, data: bytes):
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(data)
    with open(b, "wb") as f:
        f.truncate(SIZE)
    store = StateStore(str(tmp_path / "state"))
    return a, b, store


def open_mirror(a, b, store):
    return Mirror("m", Image(str(a)), Image(str(b)), size=SIZE, store=store)


def test_sync_under_concurrent_writes_ends_identical(tmp_path):
    data = os.urandom(SIZE)
    a, b, store = make(tmp_path, data)
    m = open_mirror(a, b, store)
    m.initial_sync(rate=16e6)  # slow enough that the writer overlaps the copy
    assert m.state == State.SYNCING
    # reads during the sync see A's data although B is still empty
    buf = bytearray(4096)
    m.read(SIZE - 4096, [memoryview(buf)])
    assert bytes(buf) == data[-4096:]
    rng = random.Random(5)
    expected = bytearray(data)
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            off = rng.randrange(SIZE // 4096) * 4096
            payload = rng.randbytes(4096)
            io = m.admit(m.epoch, (off, off + 4096))
            try:
                io.write(off, [memoryview(payload)], False)
            finally:
                io.finish()
            expected[off:off + 4096] = payload

    t = threading.Thread(target=writer)
    t.start()
    assert m.sync_complete.wait(60)
    stop.set()
    t.join()
    assert m.state == State.MIRRORED
    m.close()
    assert a.read_bytes() == bytes(expected)
    assert b.read_bytes() == bytes(expected)
    assert store.load("m").last_sync["bytes_copied"] == SIZE


def test_sync_resumes_after_restart(tmp_path):
    data = os.urandom(SIZE)
    a, b, store = make(tmp_path, data)
    m = open_mirror(a, b, store)
    m.initial_sync(rate=2e6)  # 4 s in all; the first cursor save comes at half-way
    # stop part-way (a daemon shutdown), as soon as the cursor has moved at least once
    while store.load("m").sync_cursor == 0:
        m.copier.stop.wait(0.01)
    m.close()
    st = store.load("m")
    assert st.state == State.SYNCING and 0 < st.sync_cursor < SIZE
    m2 = open_mirror(a, b, store)
    m2.resume()
    assert m2.sync_complete.wait(60)
    m2.close()
    assert b.read_bytes() == data
    last = store.load("m").last_sync
    assert last["resumed_at"] == st.sync_cursor
    assert last["bytes_copied"] == SIZE - st.sync_cursor


def test_split_refused_during_sync(tmp_path):
    a, b, store = make(tmp_path, os.urandom(SIZE))
    m = open_mirror(a, b, store)
    m.initial_sync(rate=1e6)
    with pytest.raises(MirrorError, match="initial sync"):
        m.check_can_split()
    with pytest.raises(MirrorError):
        m.initial_sync()
    m.close()
