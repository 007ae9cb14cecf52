"""Opening a mirror: whatever is on disk, a state that can be served.

Every on-disk state a daemon can leave -- a clean close, SIGTERM or kill -9 at any point, a
power cut -- opens (the model-based test reopens from every one):

* no state document: a new mirror, ``mirrored``;
* ``splitting``: the daemon stopped during a drain.  Nothing after the instant was ever written
  to A, and every write acknowledged before it reached A, so A is crash-consistent as of the
  instant: it is flushed and the split recorded (a one-way split becomes ``one-way``);
* a missing or damaged bitmap while split/one-way/rejoining: every region is marked, so a
  rejoin copies everything (B may differ from A anywhere);
* ``clean: false`` (an unclean stop) while mirrored: a mirrored write may be torn between the
  legs, but its region is marked; the mirror becomes ``rejoining`` (kind ``recovery``) *before*
  anything is served, so reads come from B until A has the marked regions again.  A missing
  bitmap after an unclean stop marks every region.

Each step is a transition of the table, saved before it is used (``Records``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from targetmirror.errors import MirrorError, StoreError
from targetmirror.mirror.policy import LEG_A, Event
from targetmirror.mirror.state import MirrorState, SplitRecord, State

if TYPE_CHECKING:
    from targetmirror.mirror.mirror import Mirror

log = logging.getLogger("targetmirror.mirror")


def load(m: Mirror) -> MirrorState:
    """The saved state of ``m`` (made and saved if there is none), checked against its legs;
    a leg that ``repair --replace`` replaced is swapped in."""
    store = m.records.store
    st = store.load(m.name) if store else None
    if st is None:
        st = MirrorState(m.name, image_a=m.legs.a.path, image_b=m.legs.b.path,
                         region_size=m.bitmap.region_size if m.bitmap else m.region_size)
        if store:
            store.save(st)
        return st
    for leg, saved_path in ((1, st.image_a), (2, st.image_b)):
        img = m.legs.image(leg)
        if img.path != saved_path and st.replaced.get(img.path) == saved_path:
            # repair --replace put another image in this leg's place: open that one
            new = img.reopen(saved_path)
            img.close()
            m.legs.images[leg] = new
    if (st.image_a, st.image_b) != (m.legs.a.path, m.legs.b.path):
        raise MirrorError(f"mirror {m.name}: its saved state is for images "
                          f"a={st.image_a} b={st.image_b}, not a={m.legs.a.path} "
                          f"b={m.legs.b.path}; refusing to guess which copy is which")
    return st


def settle(m: Mirror) -> None:
    """Turn an interrupted drain into a split and make the bitmap safe to serve from, then
    note the open (``clean: false``) and start a recovery after an unclean stop."""
    st = m.records.current
    if st.state == State.SPLITTING:
        _finish_interrupted_drain(m, st)
        st = m.records.current
    if st.state == State.SPLIT:
        m.legs.a.freeze()
        m.splits.complete.set()
    bm = m.bitmap
    if bm is not None and bm.created and st.state in (State.SPLIT, State.ONE_WAY,
                                                      State.REJOINING):
        # B may differ from A anywhere: without its bitmap a rejoin must copy everything
        log.warning("%s: the change bitmap is missing or damaged while %s; marking every "
                    "region, so the rejoin will copy the whole image", m.name, st.state)
        bm.sync(bm.mark_all())
    if m.records.store is None or bm is None:
        return
    m.unclean_start = not st.clean
    if m.unclean_start:
        log.warning("%s: the last stop was unclean (crash or kill); %d region(s) marked",
                    m.name, bm.count)
        if bm.created and st.state in (State.MIRRORED, State.SYNCING) and m.write_intent:
            log.warning("%s: the write-intent bitmap is missing after an unclean stop: "
                        "every region will be resynced", m.name)
            bm.sync(bm.mark_all())
    failed = bool(st.failed)

    def opened(new: MirrorState) -> None:
        new.clean = False

    if st.state == State.MIRRORED and bm.count and not failed:
        log.warning("%s: resyncing %d marked region(s) B -> A before A is trusted again",
                    m.name, bm.count)

        def recovery(new: MirrorState) -> None:
            new.clean = False
            new.resync_from = "b"
            new.resync_kind = "recovery"
        m.records.transition(Event.START_RECOVERY, recovery)
    else:
        m.records.commit(opened)


def _finish_interrupted_drain(m: Mirror, st: MirrorState) -> None:
    rec = st.split or SplitRecord(st.epoch, time.time())
    if rec.one_way:
        def one_way(new: MirrorState) -> None:
            assert new.split is not None
            new.split.a_status = "one-way"
        m.records.transition(Event.INTERRUPTED_DRAIN_ONE_WAY, one_way)
        return
    try:
        m.legs.a.flush()
    except StoreError as exc:
        # A cannot be made durable: the split copy is lost, but B (the live copy) must still
        # be served.  The failure is recorded like any other leg failure (A failed, lost).
        m.legs.fail(LEG_A, exc)

    def crash_consistent(new: MirrorState) -> None:
        split = new.split or SplitRecord(st.epoch, time.time())
        if not split.a_status.startswith("lost"):
            split.a_status = "crash-consistent"
        split.completed_wall = time.time()
        new.split = split
    m.records.transition(Event.INTERRUPTED_DRAIN, crash_consistent)
    log.warning("%s: split of epoch %d was still draining when the daemon stopped; A is "
                "crash-consistent as of the instant%s", m.name, rec.epoch,
                "" if rec.instant_wall else " (instant not recorded: between the request and "
                "the stop)")
