"""Real-kernel proof of the split (issue 4): A holds exactly the pre-split writes.

Writers on the initiator side (``tests/lab/seqwriter.py``) put sequence-numbered, timestamped,
checksummed 4 KiB blocks on the iSCSI disks while ``targetmirror split`` runs; every block is
written at most once, so after logout each block of images A and B is matched to the one write
that could have put it there, and the write log says when that write was issued and acked.

Clocks.  ``t_issue``/``t_return`` bracket the CLI call (monotonic and wall); the daemon records
the split instant as ``instant_wall`` (time.time() right after reading the ring head, inside the
ring lock).  The writer takes ``issue`` just *before* pwrite and ``ack`` just *after* it returns,
so "acked before the instant" and "issued after the instant" are conservative on both sides.

What must hold (the claims of docs/architecture.md):

* nothing in A was issued after ``t_return`` (or after the instant);
* everything acked before ``t_issue`` (or before the instant) is in A;
* B holds every acked write, and A and B hold nothing else (unwritten blocks are zero);
* every block is a whole, valid write (no torn blocks);
* per dependent-write chain, the writes present in A are a prefix of the chain -- also across
  the two LUNs of a consistency group.

The ``mirrord`` fixture (tests/lab/conftest.py) starts targetmirrord and checks its clean exit.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from tests.lab import guest
from tests.lab.mirrord import Mirrord
from tests.lab.seqwriter import BLOCK, Decoded, SeqWriter, Write, scan_image
from tests.lab.test_lab_mirror import Lun

pytestmark = pytest.mark.lab

MiB = guest.MiB
SIZE = 64 * MiB
NUM_BLOCKS = SIZE // BLOCK


class Clock:
    """Both clocks at one moment."""

    def __init__(self) -> None:
        self.mono = time.monotonic()
        self.wall = time.time()


def _timed_split(daemon: Mirrord, *args: str) -> tuple[Clock, Clock, dict[str, Any]]:
    t_issue = Clock()
    res = daemon.ctl_json("split", *args)
    t_return = Clock()
    return t_issue, t_return, res


def _match(luns: list[Lun], writes: list[Write]) -> dict[str, set[int]]:
    """Decode both images of each LUN (LUN i = writer target i); every non-zero block must be
    exactly one logged write to that block of that LUN.  Returns "NAME.A"/"NAME.B" -> seqs."""
    by_key = {(w.target, w.block): w for w in writes}
    found: dict[str, set[int]] = {}
    for target, lun in enumerate(luns):
        for leg, img in (("A", lun.a), ("B", lun.b)):
            key = f"{lun.name}.{leg}"
            seqs: set[int] = set()
            for blk, d in scan_image(img, NUM_BLOCKS).items():
                assert isinstance(d, Decoded), f"{key} block {blk}: {d}"
                w = by_key.get((target, blk))
                assert w is not None, f"{key} block {blk} holds {d}, but no write went there"
                assert (d.seq, d.thread, d.step, d.target, d.block, d.built) == \
                    (w.seq, w.thread, w.step, w.target, w.block, w.built), \
                    f"{key} block {blk} holds {d}, the log says {w}"
                seqs.add(d.seq)
            found[key] = seqs
    return found


def _check_chains(writer: SeqWriter, in_a: set[int]) -> dict[str, int]:
    """Per thread (a chain of dependent writes): the writes in A are a prefix of the chain."""
    cut = 0
    for thread, chain in writer.chains().items():
        present = [w.seq in in_a for w in chain]
        k = present.index(False) if False in present else len(present)
        later = [w.step for w, p in zip(chain, present, strict=True) if p and w.step > k]
        assert not later, (
            f"chain {thread}: write {k} (seq {chain[k].seq}) is missing from A but later "
            f"writes {later[:5]} are there: dependent-write order broken")
        if 0 < k < len(chain):
            cut += 1
    return {"chains": len(writer.chains()), "chains_cut_mid_way": cut}


def _check_times(label: str, writes: list[Write], in_a: set[int], t_issue: Clock,
                 t_return: Clock, instant_wall: float) -> dict[str, int]:
    assert t_issue.wall <= instant_wall <= t_return.wall, \
        f"{label}: instant {instant_wall} outside the CLI call [{t_issue.wall}, {t_return.wall}]"
    late = [w for w in writes if w.seq in in_a and w.issue_mono >= t_return.mono]
    assert not late, f"{label}: A holds writes issued after the split returned: {late[:3]}"
    after_instant = [w for w in writes if w.seq in in_a and w.issue_wall > instant_wall]
    assert not after_instant, \
        f"{label}: A holds writes issued after the split instant: {after_instant[:3]}"
    early = [w for w in writes if w.ack_mono is not None and w.ack_mono < t_issue.mono]
    missing = [w for w in early if w.seq not in in_a]
    assert not missing, f"{label}: writes acked before the split was asked for are not in A: " \
        f"{missing[:3]}"
    missing = [w for w in writes if w.ack_wall is not None and w.ack_wall < instant_wall
               and w.seq not in in_a]
    assert not missing, f"{label}: writes acked before the split instant are not in A: " \
        f"{missing[:3]}"
    straddling = [w for w in writes if w.issue_wall <= instant_wall
                  and (w.ack_wall is None or w.ack_wall >= instant_wall)]
    window = [w for w in writes if w.issue_mono < t_return.mono
              and w.ack_mono is not None and w.ack_mono > t_issue.mono]
    return {
        "writes": len(writes),
        "in_A": len(in_a),
        "acked_before_t_issue": len(early),
        "issued_after_t_return": sum(w.issue_mono >= t_return.mono for w in writes),
        "in_flight_at_instant": len(straddling),
        "in_flight_at_instant_in_A": sum(w.seq in in_a for w in straddling),
        "overlapping_split_call": len(window),
        "overlapping_split_call_in_A": sum(w.seq in in_a for w in window),
    }


def _split_summary(st: dict[str, Any]) -> dict[str, Any]:
    sp = st["split"]
    return {k: sp.get(k) for k in ("epoch", "a_status", "drain_seconds", "pre_split_drained",
                                   "instant_wall", "completed_wall", "group")}


def test_split_under_load_a_is_exactly_the_pre_split_writes(mirrord: Mirrord,
                                                            tmp_path: Path) -> None:
    lun = Lun("p_single", tmp_path, SIZE, mirrord)
    writer = SeqWriter([lun.dev], threads=8, num_blocks=NUM_BLOCKS,
                       log_path=tmp_path / "single-writes.jsonl")
    writer.start()
    try:
        writer.wait_acked(300, timeout=120)
        t_issue, t_return, res = _timed_split(mirrord, "p_single")
        at_return = writer.acked
        writer.wait_acked(at_return + 300, timeout=120)
    finally:
        writes = writer.stop()
    assert not writer.errors, writer.errors
    st = mirrord.ctl_json("status", "p_single")["mirrors"][0]
    lun.logout()

    split_st = res["split"][0]
    assert split_st["state"] == "split" and split_st["split"]["a_status"] == "consistent"
    assert st["state"] == "split" and st["writes_in_flight"] == 0
    sp = split_st["split"]
    assert sp["completed_wall"] <= t_return.wall

    assert all(w.acked for w in writes), [w for w in writes if not w.acked][:3]
    found = _match([lun], writes)
    in_a, in_b = found["p_single.A"], found["p_single.B"]
    assert in_b == {w.seq for w in writes}, \
        f"B lacks {len({w.seq for w in writes} - in_b)} acked writes"
    stats = _check_times("p_single", writes, in_a, t_issue, t_return, sp["instant_wall"])
    stats.update(_check_chains(writer, in_a))
    assert stats["acked_before_t_issue"] >= 300 and stats["issued_after_t_return"] > 0
    assert 0 < stats["in_A"] < stats["writes"]
    summary = {"test": "single", **stats, "split": _split_summary(split_st),
               "split_call_seconds": t_return.mono - t_issue.mono,
               "instant_after_call_s": sp["instant_wall"] - t_issue.wall,
               "writes_per_second": len(writes) / (writer.stopped_mono - writer.started_mono)}
    print("SPLIT-PROOF", json.dumps(summary))
    lun.delete()


def test_group_split_keeps_dependent_writes_across_luns(mirrord: Mirrord,
                                                        tmp_path: Path) -> None:
    names = ["p_grp1", "p_grp2"]
    luns = [Lun(n, tmp_path, SIZE, mirrord) for n in names]
    mirrord.ctl("group", "create", "pgrp", *names)
    # 6 chains: write on LUN1, wait for the ack, write on LUN2, wait, LUN1 again, ...
    writer = SeqWriter([lun.dev for lun in luns], threads=6, num_blocks=NUM_BLOCKS,
                       log_path=tmp_path / "group-writes.jsonl")
    writer.start()
    try:
        writer.wait_acked(300, timeout=120)
        t_issue, t_return, res = _timed_split(mirrord, "--group", "pgrp")
        at_return = writer.acked
        writer.wait_acked(at_return + 200, timeout=120)
    finally:
        writes = writer.stop()
    assert not writer.errors, writer.errors
    status = mirrord.ctl_json("status", *names)
    for lun in luns:
        lun.logout()

    assert status["groups"].get("pgrp") == names
    by_name = {m["name"]: m for m in status["mirrors"]}
    for n in names:
        m = by_name[n]
        assert m["state"] == "split", m
        assert m["split"]["a_status"] == "consistent"
        assert m["split"]["group"] == sorted(names), m["split"]
        assert m["epoch"] == 1
    instants = [by_name[n]["split"]["instant_wall"] for n in names]
    assert max(instants) - min(instants) < 0.5, f"group members split apart: {instants}"

    assert all(w.acked for w in writes)
    found = _match(luns, writes)
    in_a = found["p_grp1.A"] | found["p_grp2.A"]
    in_b = found["p_grp1.B"] | found["p_grp2.B"]
    assert in_b == {w.seq for w in writes}, "B copies lack acked writes"
    stats: dict[str, Any] = {}
    for target, n in enumerate(names):
        mine = [w for w in writes if w.target == target]
        stats[n] = _check_times(n, mine, found[f"{n}.A"], t_issue, t_return,
                                by_name[n]["split"]["instant_wall"])
        assert stats[n]["in_A"] > 0
    stats.update(_check_chains(writer, in_a))
    assert sum(w.issue_mono >= t_return.mono for w in writes) > 0
    summary = {"test": "group", "writes": len(writes), "in_A": len(in_a), **stats,
               "split": {n: _split_summary(by_name[n]) for n in names},
               "instant_spread_s": max(instants) - min(instants),
               "split_call_seconds": t_return.mono - t_issue.mono,
               "result_states": [m["state"] for m in res["split"]],
               "writes_per_second": len(writes) / (writer.stopped_mono - writer.started_mono)}
    print("SPLIT-PROOF", json.dumps(summary))
    for lun in luns:
        lun.delete()


def test_control_separate_splits_do_break_dependent_writes(mirrord: Mirrord,
                                                           tmp_path: Path) -> None:
    """Negative control for the test above: splitting the two LUNs one after the other (two
    CLI calls, seconds apart under TCG) instead of as a group lets chains advance in between,
    and the prefix checker must see it.  Shows the group test can fail."""
    names = ["p_sep1", "p_sep2"]
    luns = [Lun(n, tmp_path, SIZE, mirrord) for n in names]
    writer = SeqWriter([lun.dev for lun in luns], threads=6, num_blocks=NUM_BLOCKS)
    writer.start()
    try:
        writer.wait_acked(200, timeout=120)
        mirrord.ctl_json("split", names[0])
        writer.wait_acked(writer.acked + 60, timeout=120)  # chains move on between the splits
        mirrord.ctl_json("split", names[1])
        writer.wait_acked(writer.acked + 60, timeout=120)
    finally:
        writes = writer.stop()
    assert not writer.errors, writer.errors
    for lun in luns:
        lun.logout()
    found = _match(luns, writes)
    in_a = found["p_sep1.A"] | found["p_sep2.A"]
    assert found["p_sep1.B"] | found["p_sep2.B"] == {w.seq for w in writes}
    with pytest.raises(AssertionError, match="dependent-write order broken") as exc:
        _check_chains(writer, in_a)
    print("SPLIT-PROOF", json.dumps({"test": "control", "writes": len(writes),
                                     "in_A": len(in_a), "caught": str(exc.value)[:200]}))
    for lun in luns:
        lun.delete()
