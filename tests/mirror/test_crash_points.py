"""Crash-point test: power loss at >= 1,000 random points during mixed I/O, split, rejoin and
write-intent clearing; after reopening (and the automatic resync) no acknowledged-and-flushed
write is lost, A and B agree wherever the state says they must, and verify finds nothing.

What "acknowledged and flushed" means (SBC): a FUA write once acknowledged; every write
acknowledged before an acknowledged SYNCHRONIZE CACHE; with the write cache off, every
acknowledged write.  For each 512-byte block the live leg must then hold the data of the last
such write to it, or of a *later* write to it (acknowledged or in flight: those may or may not
have reached the medium) -- never older data, never data no write ever carried.

The machine is simulated by tests/mirror/powerloss.py (durable copy + page cache per file,
including the bitmap and the state document).  Each trial is one seeded random workload, cut at
a random operation; the workload issues commands one at a time (so the order of acknowledgements
is exact), while the split completion and the rejoin/recovery copier run in their own threads
as in the daemon.

    TARGETMIRROR_CRASH_TRIALS=20000 pytest tests/mirror/test_crash_points.py -s   # long mode
    TARGETMIRROR_CRASH_TRIAL_SEED=0x... pytest ...                                # replay one
"""

from __future__ import annotations

import os
import random
import threading
import time
from dataclasses import dataclass, field

from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import State
from tests.mirror.powerloss import PowerLoss, SimFS, SimImage, SimStateStore, is_power_loss

BS = 512
RS = 4096
NREG = 48
SIZE = NREG * RS
NBLK = SIZE // BS
OPS = 70
MAX_TICK = 420


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value, 0) if value else default


@dataclass
class Model:
    """Per block: every write to it in issue order, and the last durable one."""

    history: list[list[int]] = field(default_factory=lambda: [[-1] for _ in range(NBLK)])
    durable: list[int] = field(default_factory=lambda: [-1] * NBLK)
    """Index into history[block] of the last acknowledged-and-flushed write (0: the zeros)."""
    acked_unflushed: set[tuple[int, int]] = field(default_factory=set)
    pre_split: list[int] | None = None
    """At a completed split: the seq each block held on A (every pre-split write was acked)."""

    def issue(self, seq: int, lba: int, blocks: int) -> None:
        for b in range(lba, lba + blocks):
            self.history[b].append(seq)

    def ack(self, lba: int, blocks: int, durable: bool) -> None:
        for b in range(lba, lba + blocks):
            if durable:
                self.durable[b] = len(self.history[b]) - 1
                self.acked_unflushed.discard((b, len(self.history[b]) - 1))
            else:
                self.acked_unflushed.add((b, len(self.history[b]) - 1))

    def flushed(self) -> None:
        for b, i in self.acked_unflushed:
            self.durable[b] = max(self.durable[b], i)
        self.acked_unflushed.clear()

    def allowed(self, block: int) -> set[int]:
        h = self.history[block]
        return set(h[max(self.durable[block], 0):])


def block_data(seq: int, lba: int) -> bytes:
    """A block that names its write and its address (never all zeros)."""
    head = f"seq={seq:08d} lba={lba:06d};".encode()
    return (head * (BS // len(head) + 1))[:BS]


def seq_of(data: bytes, lba: int) -> int | None:
    if data == bytes(BS):
        return -1
    try:
        seq = int(data[4:12])
    except ValueError:
        return None
    return seq if data == block_data(seq, lba) else None


def open_mirror(fs: SimFS, wi_extent: int = RS) -> Mirror:
    return Mirror("m", SimImage(fs, "/sim/a.img", SIZE), SimImage(fs, "/sim/b.img", SIZE),
                  size=SIZE, block_size=BS, store=SimStateStore(fs), region_size=RS,
                  wi_interval=None, leg_timeout=None, wi_extent=wi_extent)


def wait_or_crash(ev: threading.Event, fs: SimFS, what: str) -> None:
    deadline = time.monotonic() + 20
    while not ev.wait(0.002):
        if fs.crashed:
            raise PowerLoss
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not finish")


def workload(m: Mirror, fs: SimFS, rng: random.Random, model: Model, stats: dict[str, int],
             write_cache: bool) -> None:
    m.write_cache = write_cache
    seq = 0
    for _ in range(OPS):
        r = rng.random()
        state = m.state
        if r < 0.06 and state == State.MIRRORED and not _alive(m):
            m.prepare_split(["m"])
            m.begin_split()
            m.record_instant()
            m.boundary_passed()
            wait_or_crash(m.split_complete, fs, "split")
            model.pre_split = [model.history[b][-1] for b in range(NBLK)]
            stats["splits"] += 1
        elif r < 0.10 and state == State.SPLIT:
            m.rejoin()
            stats["rejoins"] += 1
        elif r < 0.15:
            m.clear_write_intent()
            stats["clear_passes"] += 1
        elif r < 0.25:
            m.flush()  # SYNCHRONIZE CACHE
            model.flushed()
        else:
            seq += 1
            blocks = rng.choice((1, 1, 2, 8, 8, 16))
            lba = rng.randrange(NBLK - blocks + 1)
            fua = rng.random() < 0.2
            data = b"".join(block_data(seq, lba + i) for i in range(blocks))
            model.issue(seq, lba, blocks)
            io = m.admit(m.epoch, (lba * BS, (lba + blocks) * BS))
            try:
                io.write(lba * BS, [memoryview(data)], fua)
            finally:
                io.finish()
            model.ack(lba, blocks, fua or not write_cache)
            stats["writes"] += 1
        if m.rejoin_complete.is_set() and m.state == State.MIRRORED:
            model.pre_split = None
    # no crash yet: the power goes now


def trial(seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    stats = dict.fromkeys(("writes", "splits", "rejoins", "clear_passes", "durable_checked",
                           "blocks_checked", "resync_bytes", "crashed_in_workload",
                           "recovery_resyncs", "recoveries", "recovery_bytes"), 0)
    fs = SimFS(rng)
    # exact write-intent bits, or extents of 4 regions (the product's 4 MiB extents, scaled
    # to this small image): marking more must never lose anything either
    wi_extent = rng.choice((RS, 4 * RS))
    m = open_mirror(fs, wi_extent)
    fs.crash_at = fs.ops + rng.randint(1, MAX_TICK)
    model = Model()
    write_cache = rng.random() < 0.8
    try:
        workload(m, fs, rng, model, stats, write_cache)
        fs.power_off()
    except PowerLoss:
        stats["crashed_in_workload"] = 1
    except BaseException as exc:
        if not is_power_loss(exc):
            raise
        stats["crashed_in_workload"] = 1
    split_done = model.pre_split is not None and m.split_complete.is_set()
    m._abandon()
    fs2 = fs.reboot()

    # -- recovery: reopen; a rejoin or recovery resync runs by itself -------------------------
    m2 = open_mirror(fs2, wi_extent)
    try:
        was = m2.state
        m2.resume()
        if was == State.REJOINING:
            assert m2.rejoin_complete.wait(20), m2.status()
            rec = m2.st.last_recovery if m2.st.last_recovery else m2.st.last_rejoin
            assert rec is not None
            stats["resync_bytes"] += rec["bytes_copied"]
            stats["recovery_resyncs"] += 1
            if m2.st.last_recovery is not None:  # mirrored at the crash: write-intent resync
                stats["recoveries"] += 1
                stats["recovery_bytes"] += m2.st.last_recovery["bytes_copied"]
        a, b = m2.a.bytes(), m2.b.bytes()  # type: ignore[attr-defined]
        # every acknowledged-and-flushed write is on the live leg, and nothing else is there
        for blk in range(NBLK):
            got = seq_of(b[blk * BS:(blk + 1) * BS], blk)
            allowed = model.allowed(blk)
            assert got is not None, f"block {blk}: garbage on B"
            assert got in allowed, (f"block {blk}: B holds write {got}, allowed {sorted(allowed)}"
                                    f" (durable index {model.durable[blk]})")
            if model.durable[blk] > 0:
                stats["durable_checked"] += 1
        stats["blocks_checked"] += NBLK
        if m2.state == State.MIRRORED:
            assert a == b, "A != B while mirrored"
        else:
            assert m2.state == State.SPLIT, m2.state
            assert m2.a.frozen
            if split_done and model.pre_split is not None:
                for blk in range(NBLK):
                    got = seq_of(a[blk * BS:(blk + 1) * BS], blk)
                    assert got == model.pre_split[blk], f"split copy A block {blk}: {got}"
        v = m2.verify()
        assert v["mismatches"] == 0, v
    finally:
        m2.close()
    return stats


def _quiet_power_loss(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None and is_power_loss(args.exc_value):
        return
    threading.__excepthook__(args)


def test_no_flushed_write_is_lost_at_any_crash_point() -> None:
    count = _env_int("TARGETMIRROR_CRASH_TRIALS", 1000)
    one = os.environ.get("TARGETMIRROR_CRASH_TRIAL_SEED")
    master = _env_int("TARGETMIRROR_CRASH_SEED", random.SystemRandom().getrandbits(32))
    rng = random.Random(master)
    seeds = [int(one, 0)] if one else [rng.getrandbits(48) for _ in range(count)]
    totals: dict[str, int] = {}
    old_hook = threading.excepthook
    threading.excepthook = _quiet_power_loss
    t0 = time.perf_counter()
    try:
        for i, seed in enumerate(seeds):
            try:
                stats = trial(seed)
            except BaseException as exc:
                raise AssertionError(
                    f"crash trial {i} failed: rerun with TARGETMIRROR_CRASH_TRIAL_SEED={seed:#x} "
                    f"(master {master:#x}): {exc!r}") from exc
            for k, v in stats.items():
                totals[k] = totals.get(k, 0) + v
    finally:
        threading.excepthook = old_hook
    el = time.perf_counter() - t0
    print(f"\ncrash points: {len(seeds)} trials in {el:.1f} s (master seed {master:#x}); "
          f"{totals['crashed_in_workload']} cut mid-workload; {totals['writes']} writes, "
          f"{totals['splits']} splits, {totals['rejoins']} rejoins, {totals['clear_passes']} "
          f"clear passes; {totals['durable_checked']} durably-acknowledged blocks checked of "
          f"{totals['blocks_checked']}; {totals['recovery_resyncs']} resyncs after a crash "
          f"(recovery or resumed rejoin) copied "
          f"{totals['resync_bytes']} bytes in all = "
          f"{totals['resync_bytes'] / max(1, totals['recovery_resyncs']) / SIZE:.1%} of the "
          f"image per resync; of them {totals['recoveries']} write-intent recoveries (mirrored "
          f"at the crash) copied {totals['recovery_bytes'] / max(1, totals['recoveries']):.0f} "
          f"bytes each on average of a {SIZE}-byte image")
    assert totals["crashed_in_workload"] >= min(len(seeds), 1000) * 0.5


def test_the_checker_catches_a_lost_flushed_write(monkeypatch) -> None:
    """The checker itself: with fdatasync made a no-op, flushed writes are lost and it fails."""
    from tests.mirror.powerloss import SimFile

    monkeypatch.setattr(SimFile, "sync", lambda self: None)
    failures = 0
    for seed in range(40):
        try:
            trial(seed)
        except AssertionError:
            failures += 1
    assert failures > 0


def _alive(m: Mirror) -> bool:
    return m.tasks.alive("copy")

