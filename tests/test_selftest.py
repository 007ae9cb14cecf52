"""``targetmirror selftest``'s check, on synthetic images: it passes exactly the outcome a
correct split gives, and fails every wrong one (the run itself is proven in the lab:
tests/lab/test_lab_selftest.py)."""

from __future__ import annotations

import random

import pytest

from targetmirror.cli import build_parser
from targetmirror.selftest import BLOCK, MAX_RUN, WINDOW, Write, check, decode, payload, replay

RUN = 0x5EED
BASES = [8, 200]
SIZE_BLOCKS = 300
INSTANT = 1000.0


def history(seed: int = 1, steps: int = 40) -> list[list[Write]]:
    """Two threads' writes: one every 1.0 s of wall time, the instant in the middle; each
    thread has one write in flight across the instant (issued 999.5, acked 1000.5)."""
    rng = random.Random(seed)
    logs: list[list[Write]] = []
    seq = 0
    for t, base in enumerate(BASES):
        log = []
        for step in range(steps):
            n = rng.randint(1, MAX_RUN)
            first = base + rng.randrange(WINDOW - n + 1)
            issue = INSTANT - steps / 2 + step - 0.5 + t * 0.25
            log.append(Write(seq, t, step, first, n, issue_wall=issue, ack_wall=issue + 0.9))
            seq += 1
        logs.append(log)
    return logs


def images(logs: list[list[Write]], cuts: list[int]) -> tuple[bytearray, bytearray]:
    a = bytearray(SIZE_BLOCKS * BLOCK)
    b = bytearray(SIZE_BLOCKS * BLOCK)
    for t, base in enumerate(BASES):
        lo, hi = base * BLOCK, (base + WINDOW) * BLOCK
        a[lo:hi] = replay(logs[t], RUN, base, cuts[t])
        b[lo:hi] = replay(logs[t], RUN, base, len(logs[t]))
    return a, b


def straddling(log: list[Write]) -> int:
    """Index of the write in flight at the instant."""
    return next(i for i, w in enumerate(log) if w.issue_wall <= INSTANT <= (w.ack_wall or 0))


@pytest.mark.parametrize("in_flight_in_a", [False, True])
def test_a_correct_split_passes(in_flight_in_a: bool) -> None:
    logs = history()
    cuts = [straddling(log) + in_flight_in_a for log in logs]
    a, b = images(logs, cuts)
    rep = check(bytes(a), bytes(b), logs, BASES, RUN, INSTANT)
    assert rep.ok, rep.problems
    n = rep.numbers
    assert n["writes"] == n["writes_in_B"] == 80
    assert n["in_flight_at_instant"] == 2 and n["in_flight_in_A"] == 2 * in_flight_in_a
    assert n["acked_before_instant"] + n["in_flight_at_instant"] + \
        n["issued_after_instant"] == 80
    assert n["writes_in_A"] == sum(cuts) and n["overlapping_writes"] > 10


def run_check(mutate) -> list[str]:  # type: ignore[no-untyped-def]
    logs = history()
    a, b = images(logs, [straddling(log) for log in logs])
    mutate(logs, a, b)
    rep = check(bytes(a), bytes(b), logs, BASES, RUN, INSTANT)
    assert not rep.ok
    return rep.problems


def test_a_missing_pre_split_write_fails() -> None:
    def mutate(logs, a, b):  # type: ignore[no-untyped-def]
        lo, hi = BASES[0] * BLOCK, (BASES[0] + WINDOW) * BLOCK
        a[lo:hi] = replay(logs[0], RUN, BASES[0], straddling(logs[0]) - 1)
    assert any("A lacks write" in p and "acknowledged" in p for p in run_check(mutate))


def test_a_post_split_write_in_a_fails() -> None:
    def mutate(logs, a, b):  # type: ignore[no-untyped-def]
        lo, hi = BASES[1] * BLOCK, (BASES[1] + WINDOW) * BLOCK
        a[lo:hi] = replay(logs[1], RUN, BASES[1], straddling(logs[1]) + 2)
    assert any("A holds write" in p and "after the split instant" in p
               for p in run_check(mutate))


def test_a_torn_block_fails() -> None:
    def mutate(logs, a, b):  # type: ignore[no-untyped-def]
        w = logs[0][3]
        off = w.first * BLOCK + 100
        a[off:off + 8] = b"\xff" * 8
    assert any("torn" in p for p in run_check(mutate))


def test_a_lost_earlier_write_under_a_later_one_fails() -> None:
    """A holds the cut's last write, but a block an earlier write put there is zero: not a
    prefix of the thread's writes (a reordered or dropped write)."""
    def mutate(logs, a, b):  # type: ignore[no-untyped-def]
        cut = straddling(logs[0])
        last = logs[0][cut - 1]
        covered = set(range(last.first, last.first + last.nblocks))
        for w in reversed(logs[0][:cut - 1]):
            for blk in range(w.first, w.first + w.nblocks):
                if blk not in covered and decode(a[blk * BLOCK:(blk + 1) * BLOCK]):
                    a[blk * BLOCK:(blk + 1) * BLOCK] = bytes(BLOCK)
                    return
        raise AssertionError("no block to drop")
    assert any("not the window after its first" in p for p in run_check(mutate))


def test_b_missing_a_write_fails() -> None:
    def mutate(logs, a, b):  # type: ignore[no-untyped-def]
        lo, hi = BASES[1] * BLOCK, (BASES[1] + WINDOW) * BLOCK
        b[lo:hi] = replay(logs[1], RUN, BASES[1], len(logs[1]) - 1)
    assert any(p.startswith("B, thread 1") for p in run_check(mutate))


def test_stray_data_outside_the_windows_fails() -> None:
    def mutate(logs, a, b):  # type: ignore[no-untyped-def]
        b[290 * BLOCK:291 * BLOCK] = payload(RUN, 999, 0, 0, 290, 1, 0)
    assert any("outside the writers' windows at block 290" in p for p in run_check(mutate))


def test_another_runs_block_fails() -> None:
    def mutate(logs, a, b):  # type: ignore[no-untyped-def]
        w = logs[0][0]
        a[w.first * BLOCK:(w.first + 1) * BLOCK] = payload(RUN + 1, w.seq, 0, w.step, w.first,
                                                           w.nblocks, 0)
    assert any("another run" in p for p in run_check(mutate))


def test_a_split_not_under_load_proves_nothing() -> None:
    logs = history()
    a, b = images(logs, [len(log) for log in logs])
    rep = check(bytes(a), bytes(b), logs, BASES, RUN, INSTANT + 1e6)
    assert not rep.ok and any("not happen under load" in p for p in rep.problems)


def test_a_failed_write_fails() -> None:
    def mutate(logs, a, b):  # type: ignore[no-untyped-def]
        logs[0][-1].ack_wall = None
        logs[0][-1].error = "[Errno 5] Input/output error"
    assert any("not acknowledged" in p and "Input/output" in p for p in run_check(mutate))


def test_the_cli_has_selftest() -> None:
    args = build_parser().parse_args(["selftest", "--threads", "4", "--writes-before", "50",
                                      "--dir", "/srv/scratch"])
    assert (args.threads, args.before, args.dir, args.size) == (4, 50, "/srv/scratch", "64M")
    assert args.func.__module__ == "targetmirror.selftest"


def test_bad_input_is_one_clear_error_and_makes_nothing(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from targetmirror.errors import DeviceError
    from targetmirror.selftest import SelftestError, main, run

    class NoDaemon:
        def call(self, op: str, **kw: object) -> dict[str, object]:
            raise DeviceError("cannot reach targetmirrord at /run/x.sock: No such file or "
                              "directory (is it running?)")

    def say(text: str) -> None:
        raise AssertionError(f"nothing should run: {text}")

    for size in ("1M", "lots", "16385K"):
        args = build_parser().parse_args(["selftest", "--size", size, "--dir", str(tmp_path)])
        with pytest.raises(SelftestError, match="--size"):
            main(args)
    with pytest.raises(SelftestError, match="--threads 300: expected 1 to 256"):
        run(NoDaemon(), directory=str(tmp_path), size=64 << 20, threads=300, before=1,
            after=1, say=say)
    with pytest.raises(SelftestError, match=r"is it running.*needs the daemon running"):
        run(NoDaemon(), directory=str(tmp_path), size=64 << 20, threads=8, before=1,
            after=1, say=say)
    assert list(tmp_path.iterdir()) == []
