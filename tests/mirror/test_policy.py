"""The state table (targetmirror/mirror/policy.py): its own consistency, over every state.

These are the rules every other part of the mirror trusts, so they are checked exhaustively
(every state x tag x volume x failed legs), not by example.
"""

from __future__ import annotations

import itertools
import pathlib

import pytest

from targetmirror.mirror import policy
from targetmirror.mirror.policy import (
    BOTH,
    LEG_A,
    LEG_B,
    NONE,
    TRANSITIONS,
    Event,
    IllegalTransition,
    Op,
    View,
)
from targetmirror.mirror.state import MirrorState, State

ROOT = pathlib.Path(__file__).resolve().parents[2]
FAILED = (NONE, LEG_A, LEG_B, BOTH)


def views() -> list[View]:
    out = []
    for state, failed, one_way, source in itertools.product(
            policy.STATES, FAILED, (False, True), ("a", "b")):
        out.append(View(state, failed, one_way, 5 if state == State.SPLITTING else None,
                        source, "repair" if source == "a" else "rejoin"))
    return out


def test_every_state_is_described_and_reachable_from_mirrored():
    assert set(policy.DESCRIPTION) == set(State)
    reach = {State.MIRRORED}
    while True:
        more = {dst for (src, _), dst in TRANSITIONS.items() if src in reach} - reach
        if not more:
            break
        reach |= more
    assert reach == set(State)


def test_a_transition_not_in_the_table_raises_and_names_itself():
    for state, event in itertools.product(State, Event):
        if (state, event) in TRANSITIONS:
            assert policy.next_state(state, event) == TRANSITIONS[(state, event)]
        else:
            with pytest.raises(IllegalTransition, match=f"{event} from state {state}"):
                policy.next_state(state, event)


def test_records_are_owned_by_the_states_that_use_them_and_cleared_on_leaving():
    fields = set(MirrorState.__dataclass_fields__)
    assert set(policy.OWNED) <= fields
    for (src, _ev), dst in TRANSITIONS.items():
        cleared = set(policy.leaving(src, dst))
        for rec, owners in policy.OWNED.items():
            assert (rec in cleared) == (src in owners and dst not in owners)
    # the two records the issue names: a rejoin or sync ends with neither left behind
    assert "split" in policy.leaving(State.SPLIT, State.REJOINING)
    assert "sync_cursor" in policy.leaving(State.SYNCING, State.MIRRORED)


@pytest.mark.parametrize("view", views(), ids=lambda v: f"{v.state}-f{v.failed}-"
                         f"{'ow' if v.one_way else 'n'}-{v.resync_from}")
def test_leg_rules_hold_in_every_state(view: View):
    complete = policy.complete_legs(view)
    healthy = View(view.state, NONE, view.one_way, view.split_epoch, view.resync_from,
                   view.resync_kind)
    assert complete & view.failed == 0
    # without failures some leg is always complete; with both failed none is
    assert policy.complete_legs(healthy) != NONE
    if view.failed == BOTH:
        assert complete == NONE
    # reads only from complete legs; every complete leg can be read while mirrored
    reads = policy.read_legs(view)
    assert all(leg & complete == leg for leg in reads)
    assert set(reads) == {leg for leg in (LEG_A, LEG_B) if complete & leg}
    for tag, volume in itertools.product((0, 4, 5, 9), (1, 2)):
        legs = policy.write_legs(view, tag, volume)
        # every write reaches every complete leg: otherwise an acknowledged write could be
        # missing from the copy that serves reads
        assert legs & complete == complete, (tag, volume, legs)
        assert legs & view.failed == NONE
        if view.state == State.SPLIT:
            assert legs & LEG_A == NONE  # the frozen copy is never written
        if view.state == State.SPLITTING and tag < 5:
            assert legs == BOTH & ~view.failed  # pre-split: both legs (claim 1)
    assert policy.health(view) in ("ok", "degraded", "failed")
    for leg in (LEG_A, LEG_B):
        assert policy.leg_role(view, leg) in policy.LEG_ROLES
        assert policy.leg_health(view, leg) in policy.LEG_HEALTH
        # a complete leg is healthy; a failed one says so whatever the state
        if complete & leg:
            assert policy.leg_health(view, leg) == "ok"
        if view.failed & leg:
            assert policy.leg_role(view, leg) == "failed"


def test_post_split_writes_of_a_split_in_progress_go_to_b_only_unless_one_way_volume_1():
    v = View(State.SPLITTING, split_epoch=3)
    assert policy.write_legs(v, 2) == BOTH
    assert policy.write_legs(v, 3) == LEG_B
    assert policy.write_legs(v, 3, volume=2) == LEG_B
    ow = View(State.SPLITTING, one_way=True, split_epoch=3)
    assert policy.write_legs(ow, 3, volume=1) == BOTH
    assert policy.write_legs(ow, 3, volume=2) == LEG_B


def test_tags_matter_only_while_a_split_drains():
    """Defect 1 of issue 15: a tag from an old split sent a write to B alone during an initial
    sync.  Outside SPLITTING the tag is never looked at."""
    for state in State:
        if state == State.SPLITTING:
            continue
        v = View(state, split_epoch=None)
        assert len({policy.write_legs(v, tag, vol) for tag in (0, 7, 99) for vol in (1, 2)
                    if state != State.ONE_WAY or vol == 1}) == 1


ALLOWED = {
    Op.SPLIT: {State.MIRRORED},
    Op.REJOIN: {State.SPLIT, State.ONE_WAY, State.REJOINING},  # a stopped rejoin resumes
    Op.SYNC: {State.MIRRORED, State.SYNCING},
    Op.VERIFY: {State.MIRRORED, State.SPLIT, State.ONE_WAY},
}


@pytest.mark.parametrize("op", list(ALLOWED))
def test_each_operation_is_allowed_exactly_in_its_states(op: Op):
    for state in State:
        why = policy.refusal(View(state), op)
        assert (why is None) == (state in ALLOWED[op]), (state, why)
        degraded = policy.refusal(View(state, failed=LEG_A), op)
        assert degraded is not None  # no lifecycle operation but repair on a failed leg


def test_repair_is_refused_where_the_failed_leg_held_the_only_copy():
    assert policy.refusal(View(State.SPLIT, failed=LEG_B), Op.REPAIR) is not None
    assert policy.refusal(View(State.SYNCING, failed=LEG_A), Op.REPAIR) is not None
    assert policy.refusal(View(State.SPLITTING, failed=LEG_A), Op.REPAIR) is not None
    assert policy.refusal(View(State.MIRRORED, failed=BOTH), Op.REPAIR) is not None
    for state in (State.MIRRORED, State.SPLIT, State.ONE_WAY, State.REJOINING):
        assert policy.refusal(View(state, failed=LEG_A), Op.REPAIR) is None, state
    assert policy.refusal(View(State.SYNCING, failed=LEG_B), Op.REPAIR) is None
    assert policy.refusal(View(State.MIRRORED), Op.REPAIR) is not None  # nothing failed
    assert policy.refusal(View(State.MIRRORED), Op.REPAIR, leg="a", replace=True) is None


def test_the_lane_runs_only_where_nothing_could_tell_the_difference():
    for view in views():
        allowed = policy.lane_allowed(view)
        if allowed:
            assert view.failed == NONE
            assert view.state == State.MIRRORED or (view.state == State.SPLIT
                                                   and not view.one_way)
            assert policy.lane_writes(view) & policy.complete_legs(view) == \
                policy.complete_legs(view)


def test_the_architecture_doc_holds_the_current_table():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert policy.table_markdown() in doc, "regenerate the table: policy.table_markdown()"
