"""Randomized proof of the split: A is exactly the writes queued before the instant.

Each trial serves a fresh mirror (two small image files with a recognisable initial content)
through the real DeviceRunner, SCSI layer and Mirror on the in-process kernel double, has several
threads queue overlapping WRITE(10)/WRITE(16)s and READs, and splits at a random moment while
they are still queueing.  Leg I/O is randomly delayed (perturbation, never synchronisation) and
the worker count is random, so commands complete in a random order.  The ring order is recorded
by the kernel double; the split returns its instant as a ring position, and because a trial's
ring never wraps, "queued before the instant" is simply ``head_after <= ring_head``.

After everything completed and the split is complete:

(a) A == the initial content with every WRITE queued before the instant applied in ring order;
(b) B == the initial content with every WRITE applied in ring order;
(c) every command completed GOOD;
(d) A is frozen and the durable state says split / consistent;
(e) a READ of a block that no write could have touched while the READ was outstanding returned
    exactly the block's content at that time (reads of blocks with a concurrent write are not
    judged: either version, or a mix, is allowed).

The consistency-group variant splits two mirrors at once while writer threads run *dependent*
chains across them (write on one LUN, wait for the acknowledgement, then write on the other):
each A copy must hold a prefix of every chain.

Environment:
  TARGETMIRROR_SPLIT_TRIALS      trials of the single-mirror checker (default 1000)
  TARGETMIRROR_CG_TRIALS         trials of the group checker (default 300)
  TARGETMIRROR_SPLIT_SEED        master seed (default: random, printed)
  TARGETMIRROR_SPLIT_TRIAL_SEED  run only the trial with this seed (printed on failure)
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from targetmirror import express as express_mod
from targetmirror.daemon.split import split
from targetmirror.errors import StoreError
from targetmirror.mirror.state import State, StateStore
from tests.daemon.splitrig import (
    BS,
    Queued,
    RigDevice,
    apply_writes,
    block,
    diff_blocks,
    initial_image,
    make_device,
    read10,
    read16,
    shared_clock,
    write10,
    write16,
)

GOOD = 0
TIMEOUT = 20.0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value, 0) if value else default


@dataclass
class Cmd:
    kind: str  # "write" | "read"
    lba: int
    blocks: int
    long: bool  # 16-byte CDB
    fua: bool
    wait: bool  # wait for this command's completion before queueing the next


def _submit(dev: RigDevice, writer: int, seq: int, c: Cmd) -> Queued:
    if c.kind == "write":
        payload = b"".join(block(writer, seq, i, c.lba + i) for i in range(c.blocks))
        cdb = (write16 if c.long else write10)(c.lba, c.blocks, c.fua)
        return dev.uio.submit("write", cdb, c.lba, c.blocks, payload, label=f"w{writer}.s{seq}")
    cdb = (read16 if c.long else read10)(c.lba, c.blocks)
    return dev.uio.submit("read", cdb, c.lba, c.blocks, data_in_len=c.blocks * BS,
                          label=f"r{writer}.s{seq}")


def _run_threads(targets: list[Callable[[], None]]) -> list[BaseException]:
    errors: list[BaseException] = []

    def wrap(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                fn()
            except BaseException as exc:
                errors.append(exc)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
        if t.is_alive():
            errors.append(AssertionError(f"thread {t.name} still running after {TIMEOUT * 2}s"))
    return errors


# -- checks shared by both checkers ----------------------------------------------------------

def check_device(dev: RigDevice, res: dict[str, Any], initial: bytes,
                 store: StateStore | None) -> dict[str, int]:
    """Assertions (a)-(e) for one split device; returns counters for the trial summary."""
    log = dev.uio.log
    reaped = dev.uio.reaped
    ring_head = res["ring_head"]
    # The ring never wrapped, so ring positions are monotonic and map to "queued before".
    assert dev.producer.pads == 0, "the trial's ring wrapped; make the ring bigger"
    heads = [q.head_after for q in log]
    assert heads == sorted(heads) and len(set(heads)) == len(heads)
    assert ring_head == 0 or ring_head in heads, f"ring_head {ring_head} is no queue boundary"
    pre = [q for q in log if q.head_after <= ring_head]
    assert pre == log[:len(pre)]

    # (c) every command completed GOOD
    missing = [q.label for q in log if q.cmd_id not in reaped]
    assert not missing, f"never completed: {missing}"
    bad = {q.label: reaped[q.cmd_id][1].status for q in log
           if reaped[q.cmd_id][1].status != GOOD}
    assert not bad, f"commands not GOOD: {bad}"

    writes = [q for q in log if q.kind == "write"]
    pre_writes = [q for q in pre if q.kind == "write"]
    a_now = dev.image_bytes("a")
    b_now = dev.image_bytes("b")
    # (a) A holds exactly the pre-split writes, in ring order
    want_a = apply_writes(initial, pre_writes)
    assert a_now == want_a, (
        f"A is not the pre-split writes ({len(pre_writes)} of {len(writes)} writes, ring_head "
        f"{ring_head}): {diff_blocks(a_now, want_a)}")
    # (b) B holds every write, in ring order
    want_b = apply_writes(initial, writes)
    assert b_now == want_b, f"B is not every write in ring order: {diff_blocks(b_now, want_b)}"

    # (d) A is frozen, the durable state says split/consistent
    assert dev.mirror.split_complete.is_set()
    assert dev.a.frozen
    with pytest.raises(StoreError):
        dev.a.writev(0, [memoryview(bytes(BS))])
    st = store.load(dev.mirror.name) if store is not None else dev.mirror.st
    assert st is not None
    assert st.state == State.SPLIT, st
    assert st.split is not None
    assert st.split.a_status == "consistent", st.split
    assert st.split.instant_wall is not None
    assert st.split.pre_split_drained is not None
    assert 0 <= st.split.pre_split_drained <= len(pre_writes), st.split
    assert dev.mirror.status()["writes_in_flight"] == 0
    assert dev.mirror.locks.held() == 0

    # (e) reads that no write overlapped in time return the exact content of their blocks
    strict = 0
    for r in log:
        if r.kind != "read":
            continue
        r_reaped, comp = reaped[r.cmd_id]
        data = comp.data_in
        assert len(data) == r.blocks * BS, (r.label, len(data))
        for i in range(r.blocks):
            lba = r.lba + i
            on_lba = [w for w in writes if w.lba <= lba < w.lba + w.blocks]
            # Every write to lba up to the last one acknowledged before the read was queued
            # is on B (overlapping writes are applied in ring order); no write queued after the
            # read was acknowledged can be.
            done = [k for k, w in enumerate(on_lba) if reaped[w.cmd_id][0] < r.queued_at]
            k_min = done[-1] + 1 if done else 0
            k_max = sum(1 for w in on_lba if w.queued_at < r_reaped)
            if k_min != k_max:
                continue  # a write may have been in flight: not judged
            strict += 1
            want = (on_lba[k_min - 1].payload[(lba - on_lba[k_min - 1].lba) * BS:][:BS]
                    if k_min else initial[lba * BS:(lba + 1) * BS])
            got = data[i * BS:(i + 1) * BS]
            assert got == want, (f"{r.label} read lba {lba}: got {diff_blocks(got, want)} "
                                 f"(k={k_min})")
    return {"commands": len(log), "writes": len(writes), "pre_writes": len(pre_writes),
            "drained": st.split.pre_split_drained, "strict_reads": strict}


# -- the single-mirror checker -----------------------------------------------------------------

def split_trial(seed: int, directory: str, store: StateStore, name: str) -> dict[str, int]:
    """One randomized trial; raises AssertionError (with the seed) on any violation."""
    rng = random.Random(seed)
    nblocks = rng.choice([64, 128, 256])
    workers = rng.choice([0, 2, 3, 4])
    span = min(nblocks, rng.choice([12, 24, 48])) if rng.random() < 0.7 else nblocks
    plans: list[list[Cmd]] = []
    for _w in range(rng.randint(2, 4)):
        cmds = []
        for _s in range(rng.randint(2, 7)):
            n = rng.randint(1, 8)
            cmds.append(Cmd(kind="read" if rng.random() < 0.25 else "write",
                            lba=rng.randrange(0, span - n + 1), blocks=n,
                            long=rng.random() < 0.5, fua=rng.random() < 0.05,
                            wait=rng.random() < 0.3))
        plans.append(cmds)
    total = sum(len(p) for p in plans)
    split_after = rng.choice([0, total, *(rng.randint(0, total) for _ in range(4))])
    max_delay = rng.choice([0.0, 50e-6, 300e-6])
    # Pauses between a writer's commands spread the queueing over the time a split takes, so
    # the instant lands in the middle of the stream (perturbation, not synchronisation).
    gap = rng.choice([0.0, 20e-6, 100e-6, 400e-6])
    gaps = random.Random(rng.getrandbits(64))
    fast = rng.random() < 0.5
    express = fast and rng.random() < 0.5  # the compiled lane serves part of the trial
    loop = express and rng.random() < 0.5  # ... waiting for commands in C (its wait loop)
    dev = make_device(directory, "t", nblocks, workers=workers, store=store,
                      rng=random.Random(rng.getrandbits(64)), max_delay=max_delay,
                      p_delay=0.5, mirror_name=name, fast=fast, express=express, loop=loop)
    initial = initial_image(nblocks)
    results: list[dict[str, Any]] = []
    try:
        def writer(w: int, cmds: list[Cmd]) -> Callable[[], None]:
            def run() -> None:
                ids = []
                for s, c in enumerate(cmds):
                    if gap and gaps.random() < 0.7:
                        time.sleep(gaps.random() * gap)
                    q = _submit(dev, w, s, c)
                    ids.append(q.cmd_id)
                    if c.wait:
                        assert dev.uio.wait_reaped([q.cmd_id], TIMEOUT), f"w{w}.s{s} hung"
                assert dev.uio.wait_reaped(ids, TIMEOUT), f"writer {w} hung"
            return run

        def splitter() -> None:
            assert dev.uio.wait_queued(split_after, TIMEOUT)
            results.extend(split([dev.served]))

        errors = _run_threads([splitter, *(writer(w, p) for w, p in enumerate(plans))])
        if errors:
            raise errors[0]
        assert dev.mirror.split_complete.wait(TIMEOUT), (
            f"split never completed: {dev.mirror.status()}")
        (res,) = results
        assert res["name"] == name and res["epoch"] == 1
        stats = check_device(dev, res, initial, store)
        stats["workers"] = workers
        dev.close()  # the lane's counters are final once its C call returned
        lane = dev.extra["commands"].lane
        stats["express_served"] = lane.served if express and lane is not None else 0
        stats["loop_served"] = lane.served if loop and lane is not None else 0
        return stats
    finally:
        dev.close()


def _trial_seeds(count: int) -> tuple[int, list[int]]:
    one = os.environ.get("TARGETMIRROR_SPLIT_TRIAL_SEED")
    if one:
        return int(one, 0), [int(one, 0)]
    master = _env_int("TARGETMIRROR_SPLIT_SEED", random.SystemRandom().getrandbits(32))
    rng = random.Random(master)
    return master, [rng.getrandbits(48) for _ in range(count)]


def run_trials(trial: Callable[[int, str, StateStore, str], dict[str, int]], count: int,
               directory: str, label: str) -> dict[str, int]:
    """Run ``count`` trials, reusing one image directory and one state store."""
    master, seeds = _trial_seeds(count)
    print(f"{label}: master seed {master:#x}, {len(seeds)} trials "
          f"(TARGETMIRROR_SPLIT_SEED={master:#x} to repeat)")
    store = StateStore(os.path.join(directory, "state"))
    totals: dict[str, int] = {}
    t0 = time.perf_counter()
    for i, seed in enumerate(seeds):
        name = f"m{i:06d}"
        try:
            stats = trial(seed, directory, store, name)
        except BaseException as exc:
            raise AssertionError(
                f"{label} trial {i} failed: rerun with TARGETMIRROR_SPLIT_TRIAL_SEED={seed:#x} "
                f"(master seed {master:#x}): {exc}") from exc
        for k, v in stats.items():
            totals[k] = totals.get(k, 0) + v
        for f in os.listdir(store.directory):  # keep the store small: state is checked
            if f.startswith(name):
                os.unlink(os.path.join(store.directory, f))
    elapsed = time.perf_counter() - t0
    totals["trials"] = len(seeds)
    print(f"{label}: {len(seeds)} trials in {elapsed:.1f}s ({len(seeds) / elapsed:.0f}/s): "
          f"{totals}")
    return totals


def test_split_checker(tmp_path):
    totals = run_trials(split_trial, _env_int("TARGETMIRROR_SPLIT_TRIALS", 1000),
                        str(tmp_path), "split checker")
    if totals["trials"] >= 200:
        # The random moments must actually exercise the interesting cases.
        assert totals["drained"] > 0, "no trial had a pre-split write in flight at the instant"
        assert 0 < totals["pre_writes"] < totals["writes"]
        assert totals["strict_reads"] > 0
        if express_mod.available():
            assert totals["express_served"] > 0, "the express lane never served a command"
            assert totals["loop_served"] > 0, "the lane's wait loop never served a command"


# -- the consistency-group checker ---------------------------------------------------------------

def group_trial(seed: int, directory: str, store: StateStore, name: str) -> dict[str, int]:
    """Two mirrors split by one split([d1, d2]) while chains of dependent writes cross them."""
    rng = random.Random(seed)
    nblocks = 128
    nchains = rng.randint(2, 4)
    steps = rng.randint(3, 10)
    clock = shared_clock()
    jitter = random.Random(rng.getrandbits(64))
    max_delay = rng.choice([0.0, 50e-6, 200e-6])
    fast = [rng.random() < 0.5 for _ in range(2)]
    devs = [make_device(directory, f"g{k}", nblocks, workers=rng.choice([0, 2, 4]), store=store,
                        rng=jitter, max_delay=max_delay, p_delay=0.5,
                        mirror_name=f"{name}-{k}", clock=clock, fast=fast[k],
                        express=fast[k] and rng.random() < 0.5, loop=rng.random() < 0.5)
            for k in range(2)]
    # Every (chain, step) writes its own 1-3 blocks of a slot of 4: presence is unambiguous.
    slots = [rng.sample(range(nblocks // 4), nblocks // 4) for _ in devs]
    plan: list[list[tuple[int, int, int]]] = []  # chain -> [(lun, lba, blocks)]
    for _c in range(nchains):
        chain = []
        for _s in range(steps):
            lun = rng.randrange(2)
            chain.append((lun, slots[lun].pop() * 4 + rng.randrange(2), rng.randint(1, 2)))
        plan.append(chain)
    total = nchains * steps
    split_after = rng.randint(0, total)
    queued = threading.Semaphore(0)
    results: list[dict[str, Any]] = []
    recs: dict[tuple[int, int], tuple[int, Queued]] = {}
    try:
        def chain_writer(c: int) -> Callable[[], None]:
            def run() -> None:
                for s, (lun, lba, n) in enumerate(plan[c]):
                    q = _submit(devs[lun], c, s, Cmd("write", lba, n, bool(s % 2), False, True))
                    recs[c, s] = (lun, q)
                    queued.release()
                    # the acknowledgement: the "kernel" reaped the completion
                    assert devs[lun].uio.wait_reaped([q.cmd_id], TIMEOUT), f"c{c}.s{s} hung"
            return run

        def splitter() -> None:
            for _ in range(split_after):
                assert queued.acquire(timeout=TIMEOUT)
            results.extend(split([d.served for d in devs]))

        errors = _run_threads([splitter, *(chain_writer(c) for c in range(nchains))])
        if errors:
            raise errors[0]
        for d in devs:
            assert d.mirror.split_complete.wait(TIMEOUT), f"{d.name}: {d.mirror.status()}"
        by_name = {r["name"]: r for r in results}
        assert len(by_name) == 2
        initial = initial_image(nblocks)
        stats: dict[str, int] = {}
        for d in devs:
            for k, v in check_device(d, by_name[d.mirror.name], initial, store).items():
                stats[k] = stats.get(k, 0) + v
        # The group property: every A holds a prefix of every chain, B all of it.
        images = {(d_i, leg): d.image_bytes(leg) for d_i, d in enumerate(devs) for leg in "ab"}
        prefix_lengths = []
        for c in range(nchains):
            present = []
            for s in range(steps):
                lun, q = recs[c, s]
                a = images[lun, "a"][q.lba * BS:q.lba * BS + len(q.payload)]
                b = images[lun, "b"][q.lba * BS:q.lba * BS + len(q.payload)]
                assert b == q.payload, f"chain {c} step {s} missing on B of LUN {lun}"
                present.append(a == q.payload)
            k = present.index(False) if False in present else steps
            assert all(present[:k]) and not any(present[k:]), (
                f"chain {c}: A copies hold steps {[s for s in range(steps) if present[s]]}, "
                f"not a prefix (LUNs {[recs[c, s][0] for s in range(steps)]})")
            prefix_lengths.append(k)
        # one instant for the group: one lock-holding period, the group recorded durably
        assert len({r["locks_held_seconds"] for r in results}) == 1
        for d in devs:
            st = store.load(d.mirror.name)
            assert st is not None and st.split is not None
            assert st.split.group == sorted(x.name for x in devs)
        stats["partial_chains"] = sum(1 for k in prefix_lengths if 0 < k < steps)
        stats["express_served"] = sum(d.extra["commands"].lane.served for d in devs
                                      if d.served.runner.express is not None)
        return stats
    finally:
        for d in devs:
            d.close()


def test_group_split_checker(tmp_path):
    totals = run_trials(group_trial, _env_int("TARGETMIRROR_CG_TRIALS", 300),
                        str(tmp_path), "group split checker")
    if totals["trials"] >= 100:
        assert totals["partial_chains"] > 0, "no split landed in the middle of a chain"

