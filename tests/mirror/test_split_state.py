"""Mirror-level split mechanics without a ring: admission, drain, freeze, durable state, resume.

The ring loop's part (the instant's ring position) is simulated by calling the mirror's split
steps in the order ``daemon/split.py`` and the runner do: prepare_split, begin_split (the
instant), boundary_passed (every command queued before the instant has been admitted).
"""

from __future__ import annotations

import json
import os
import threading

import pytest

from targetmirror.errors import MirrorError, StoreError
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import State, StateStore
from targetmirror.store.image import Image

BS = 512
SIZE = 64 * BS


def _images(tmp_path):
    paths = []
    for leg in ("a", "b"):
        p = tmp_path / f"{leg}.img"
        with open(p, "wb") as f:
            f.truncate(SIZE)
        paths.append(str(p))
    return paths


def _read(path: str, lba: int, n: int = 1) -> bytes:
    with open(path, "rb") as f:
        f.seek(lba * BS)
        return f.read(n * BS)


@pytest.fixture
def rig(tmp_path):
    pa, pb = _images(tmp_path)
    store = StateStore(str(tmp_path / "state"))
    made: list[Mirror] = []

    def mirror() -> Mirror:
        m = Mirror("m", Image(pa), Image(pb), size=SIZE, store=StateStore(store.directory))
        made.append(m)
        return m

    yield mirror, store, pa, pb
    for m in made:
        m.close()


def _state_doc(store: StateStore) -> dict:
    with open(os.path.join(store.directory, "m.json"), encoding="utf-8") as f:
        return json.load(f)


def test_pre_split_write_drains_to_a_then_a_freezes(rig):
    new, store, pa, pb = rig
    m = new()
    pre = m.admit(m.epoch, (0, 4 * BS))          # queued before the instant
    m.prepare_split(["m"])
    tag = m.begin_split()
    m.record_instant()
    assert tag == 1 and m.st.split is not None and m.st.split.instant_wall is not None
    post = m.admit(tag, (2 * BS, 6 * BS))       # queued after it, overlapping
    m.boundary_passed()
    assert pre.both and not post.both
    assert m.status()["pre_split_in_flight"] == 1
    assert not m.split_complete.is_set()
    assert _state_doc(store)["state"] == "splitting"

    post_done = threading.Event()

    def run_post() -> None:
        post.write(2 * BS, [memoryview(b"P" * 4 * BS)], False)
        post.finish()
        post_done.set()

    t = threading.Thread(target=run_post)
    t.start()
    assert not post_done.wait(0.2), "the post-split write did not wait for the pre-split one"
    pre.write(0, [memoryview(b"Q" * 4 * BS)], False)
    pre.finish()
    assert post_done.wait(10)
    t.join()
    assert m.split_complete.wait(10)
    assert _read(pa, 0, 6) == b"Q" * 4 * BS + bytes(2 * BS)
    assert _read(pb, 0, 6) == b"Q" * 2 * BS + b"P" * 4 * BS
    assert m.a.frozen
    with pytest.raises(StoreError):
        m.a.writev(0, [memoryview(bytes(BS))])
    doc = _state_doc(store)
    assert doc["state"] == "split" and doc["epoch"] == 1
    assert doc["split"]["a_status"] == "consistent" and doc["split"]["pre_split_drained"] == 1


def test_reads_and_non_writes_do_not_hold_up_the_split(rig):
    new, _store, _pa, _pb = rig
    m = new()
    read_io = m.admit(m.epoch, None)             # a READ admitted before the instant
    m.prepare_split(["m"])
    m.begin_split()
    m.boundary_passed()
    assert m.split_complete.wait(10)
    assert m.st.split is not None and m.st.split.pre_split_drained == 0
    read_io.finish()


def test_abort_split_restores_the_mirror(rig):
    new, store, pa, pb = rig
    m = new()
    m.prepare_split(["m", "other"])
    assert _state_doc(store)["state"] == "splitting"
    m.abort_split()
    assert m.state == State.MIRRORED and m.epoch == 0 and m.st.split is None
    doc = _state_doc(store)
    assert doc["state"] == "mirrored" and doc["epoch"] == 0 and doc["split"] is None
    m.write(0, [memoryview(b"W" * BS)], False)
    assert _read(pa, 0) == _read(pb, 0) == b"W" * BS
    m.check_can_split()


def test_split_twice_is_refused(rig):
    new, store, _pa, _pb = rig
    m = new()
    m.prepare_split(["m"])
    m.begin_split()
    m.boundary_passed()
    assert m.split_complete.wait(10)
    before = _state_doc(store)
    with pytest.raises(MirrorError):
        m.check_can_split()
    with pytest.raises(MirrorError):
        m.prepare_split(["m"])
    assert _state_doc(store) == before and m.epoch == 1 and m.split_complete.is_set()


def _files(store: StateStore, *paths: str) -> dict[str, bytes]:
    out = {}
    for p in [*paths, *(os.path.join(store.directory, n) for n in os.listdir(store.directory))]:
        with open(p, "rb") as f:
            out[p] = f.read()
    return out


def test_rejoin_or_split_during_a_split_drain_is_refused_and_changes_nothing(rig):
    """While a pre-split write is still draining (SPLITTING), a rejoin and a second split are
    refused with the mirror's stable error code, and neither the state file, the bitmap nor
    an image changes; the drain then completes as if nothing had been asked."""
    new, store, pa, pb = rig
    m = new()
    pre = m.admit(m.epoch, (0, 2 * BS))
    m.prepare_split(["m"])
    m.begin_split()
    m.boundary_passed()
    assert m.state == State.SPLITTING and not m.split_complete.is_set()
    before = _files(store, pa, pb)
    for attempt in (lambda: m.rejoin(), lambda: m.rejoin(full=True), m.check_can_split,
                    lambda: m.prepare_split(["m"])):
        with pytest.raises(MirrorError) as err:
            attempt()
        assert err.value.code == "mirror"
        assert _files(store, pa, pb) == before
        assert m.state == State.SPLITTING and m.epoch == 1
    pre.write(0, [memoryview(b"D" * 2 * BS)], False)
    pre.finish()
    assert m.split_complete.wait(10)
    assert _read(pa, 0, 2) == _read(pb, 0, 2) == b"D" * 2 * BS
    assert _state_doc(store)["state"] == "split"


def test_completed_split_survives_a_restart(rig):
    new, store, pa, pb = rig
    m = new()
    m.write(0, [memoryview(b"1" * BS)], False)
    m.prepare_split(["m"])
    m.begin_split()
    m.record_instant()
    m.boundary_passed()
    assert m.split_complete.wait(10)
    m.close()
    m2 = new()
    assert m2.state == State.SPLIT and m2.epoch == 1 and m2.split_complete.is_set()
    assert m2.a.frozen
    assert m2.st.split is not None and m2.st.split.a_status == "consistent"
    m2.write(0, [memoryview(b"2" * BS)], False)  # untagged writes take the current epoch
    assert _read(pa, 0) == b"1" * BS and _read(pb, 0) == b"2" * BS
    assert _state_doc(store)["split"]["a_status"] == "consistent"


@pytest.mark.parametrize("instant_taken", [True, False], ids=["draining", "before-instant"])
def test_stop_while_splitting_resumes_crash_consistent(rig, instant_taken):
    new, store, pa, _pb = rig
    m = new()
    inflight = m.admit(m.epoch, (0, BS))
    m.prepare_split(["m"])
    if instant_taken:
        m.begin_split()
        m.record_instant()
        m.boundary_passed()
    assert not m.split_complete.is_set()
    assert _state_doc(store)["state"] == "splitting"
    # the daemon dies here; a new one opens the same images and state directory
    m2 = new()
    assert m2.state == State.SPLIT and m2.split_complete.is_set() and m2.a.frozen
    rec = m2.st.split
    assert rec is not None and rec.a_status == "crash-consistent"
    assert (rec.instant_wall is not None) == instant_taken
    assert rec.completed_wall is not None
    doc = _state_doc(store)
    assert doc["state"] == "split" and doc["split"]["a_status"] == "crash-consistent"
    m2.write(0, [memoryview(b"Z" * BS)], False)
    assert _read(pa, 0) == bytes(BS)
    inflight.finish()


def test_saved_state_for_other_images_is_refused(rig, tmp_path):
    new, store, pa, pb = rig
    new().close()
    a, b = Image(pb), Image(pa)
    with pytest.raises(MirrorError):
        Mirror("m", a, b, size=SIZE, store=store)
    a.close()
    b.close()
