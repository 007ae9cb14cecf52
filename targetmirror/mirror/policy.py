"""The mirror's lifecycle as one table: every state, every transition, every leg rule.

Everything that decides *where* I/O goes and *which* lifecycle step may happen lives here, as
pure code over small values (no I/O, no threads, no clock), in the spirit of h11's
``_state.py``: the rest of ``targetmirror/mirror`` asks this module and carries out the answer.

* :data:`TRANSITIONS` -- ``(state, event) -> next state``.  :func:`next_state` raises
  :class:`IllegalTransition` for anything not in the table, so a code path that tries a
  transition the design does not have fails loudly instead of leaving a mirror half-way.
* :data:`OWNED` -- the durable records that belong to a state.  The transition that leaves
  the state clears them (a split record does not outlive the split; a sync cursor does not
  outlive the sync), see :func:`leaving`.
* :func:`write_legs`, :func:`read_legs`, :func:`complete_legs` -- the leg rules per state.
* :func:`refusal` -- which lifecycle operation each state (and leg health) allows; the reason
  is the admin's error message.
* :func:`lane_allowed` -- when the express lane may serve without admission.
* :data:`STATES`, :func:`leg_health` -- the labels metrics, the shell and the docs show,
  derived from the same table (a test loops over every state).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from targetmirror.errors import MirrorError
from targetmirror.mirror.state import State

LEG_A, LEG_B = 1, 2
BOTH = LEG_A | LEG_B
NONE = 0
LEG_NAMES = {LEG_A: "a", LEG_B: "b"}
LEG_BITS = {"a": LEG_A, "b": LEG_B}


class IllegalTransition(MirrorError):
    """A transition the state table does not have (a bug, or a refused request)."""

    code = "state"


class Event(StrEnum):
    """What moves a mirror from one state to another."""

    PREPARE_SPLIT = "prepare-split"
    """The split is durably requested, before the instant (one-way or not)."""
    ABORT_SPLIT = "abort-split"
    """A group peer could not split: undo the request; the instant was never taken."""
    DRAINED = "drained"
    """The last pre-split write finished and A is durable: A is the point-in-time copy."""
    DRAINED_ONE_WAY = "drained-one-way"
    """The last pre-split write of a one-way split finished: volume 2 writes B only."""
    INTERRUPTED_DRAIN = "interrupted-drain"
    """Found at open: the daemon stopped during a drain (A is crash-consistent)."""
    INTERRUPTED_DRAIN_ONE_WAY = "interrupted-drain-one-way"
    START_REJOIN = "start-rejoin"
    START_RECOVERY = "start-recovery"
    """Found at open after an unclean stop while mirrored: marked regions are copied B -> A."""
    START_REPAIR = "start-repair"
    """A failed leg is back (reopened or replaced): copy what it missed."""
    START_SYNC = "start-sync"
    COPY_DONE = "copy-done"
    """A rejoin, repair or recovery copied every marked region."""
    SYNC_DONE = "sync-done"


S = State
TRANSITIONS: dict[tuple[State, Event], State] = {
    (S.MIRRORED, Event.PREPARE_SPLIT): S.SPLITTING,
    (S.SPLITTING, Event.ABORT_SPLIT): S.MIRRORED,
    (S.SPLITTING, Event.DRAINED): S.SPLIT,
    (S.SPLITTING, Event.DRAINED_ONE_WAY): S.ONE_WAY,
    (S.SPLITTING, Event.INTERRUPTED_DRAIN): S.SPLIT,
    (S.SPLITTING, Event.INTERRUPTED_DRAIN_ONE_WAY): S.ONE_WAY,
    (S.SPLIT, Event.START_REJOIN): S.REJOINING,
    (S.ONE_WAY, Event.START_REJOIN): S.REJOINING,
    (S.MIRRORED, Event.START_RECOVERY): S.REJOINING,
    (S.MIRRORED, Event.START_REPAIR): S.REJOINING,
    (S.SPLIT, Event.START_REPAIR): S.REJOINING,
    (S.ONE_WAY, Event.START_REPAIR): S.REJOINING,
    (S.REJOINING, Event.START_REPAIR): S.REJOINING,
    (S.SYNCING, Event.START_REPAIR): S.SYNCING,
    (S.MIRRORED, Event.START_SYNC): S.SYNCING,
    (S.REJOINING, Event.COPY_DONE): S.MIRRORED,
    (S.SYNCING, Event.SYNC_DONE): S.MIRRORED,
}
"""Every transition there is.  Leg failure is not a transition: it is a fact recorded beside
the state (``failed``), and the leg rules below subtract failed legs in every state."""

OWNED: dict[str, frozenset[State]] = {
    "split": frozenset({S.SPLITTING, S.SPLIT, S.ONE_WAY}),
    "sync_cursor": frozenset({S.SYNCING}),
    "resync_from": frozenset({S.REJOINING}),
    "resync_kind": frozenset({S.REJOINING}),
}
"""Durable record -> the states it belongs to.  Outside them it holds its default."""

STATES: tuple[State, ...] = tuple(State)
"""Every state, in the order metrics and docs list them."""
STEADY: frozenset[State] = frozenset({S.MIRRORED, S.SPLIT, S.ONE_WAY})
"""States a mirror rests in; the others are on their way somewhere (a drain, a copy)."""

# What each state means for I/O; see docs/lifecycle.md for the admin's version of this table.
DESCRIPTION: dict[State, str] = {
    S.MIRRORED: "every write goes to A and B",
    S.SPLITTING: "pre-split writes still reach A and B; post-split writes go to B",
    S.SPLIT: "A is a frozen point-in-time copy; writes go to B (marked)",
    S.ONE_WAY: "volume 1 writes A and B; volume 2 writes B (marked)",
    S.REJOINING: "marked regions are copied to the stale leg; writes go to both",
    S.SYNCING: "B is filled from A; reads come from A; writes go to both",
}


@dataclass(frozen=True)
class View:
    """What the leg rules and refusals depend on: a snapshot of one mirror."""

    state: State
    failed: int = NONE
    """Failed legs (LEG_A | LEG_B)."""
    one_way: bool = False
    """The current (or draining) split is one-way."""
    split_epoch: int | None = None
    """The epoch of the split in SPLITTING (commands tagged before it are pre-split)."""
    resync_from: str = "b"
    """In REJOINING: the leg copied from (the complete one)."""
    resync_kind: str = "rejoin"


def next_state(state: State, event: Event) -> State:
    """The state ``event`` leads to from ``state``; raise if the table has no such edge."""
    try:
        return TRANSITIONS[(state, event)]
    except KeyError:
        raise IllegalTransition(f"no transition {event} from state {state}") from None


def leaving(state: State, new: State) -> list[str]:
    """The records a transition ``state -> new`` must reset (they belong to ``state`` only)."""
    return [rec for rec, owners in OWNED.items() if state in owners and new not in owners]


def source_leg(view: View) -> int:
    """The complete leg a copy reads from in REJOINING/SYNCING (before failures)."""
    if view.state == S.SYNCING:
        return LEG_A
    return LEG_A if view.resync_from == "a" else LEG_B


def complete_legs(view: View) -> int:
    """Legs that hold a complete copy of the LUN's current data (failed ones excluded)."""
    s = view.state
    if s == S.MIRRORED:
        mask = BOTH
    elif s in (S.SYNCING, S.REJOINING):
        mask = source_leg(view)
    else:  # SPLITTING, SPLIT, ONE_WAY: B has every write, A not those after the instant
        mask = LEG_B
    return mask & ~view.failed


def read_legs(view: View) -> list[int]:
    """Legs a read may come from, preferred first: complete copies only.  While mirrored B is
    preferred (it is the leg that stays live at a split, so a split changes nothing a reader
    can see) and A is the fallback."""
    if view.state == S.MIRRORED:
        order = [LEG_B, LEG_A]
    else:
        order = [complete_legs(View(view.state, NONE, view.one_way, view.split_epoch,
                                    view.resync_from, view.resync_kind))]
    return [leg for leg in order if not view.failed & leg]


def write_legs(view: View, tag: int, volume: int = 1) -> int:
    """The legs a command admitted with ring tag ``tag`` through ``volume`` writes.

    Only a split in progress looks at the tag: a command queued before the instant (tag below
    the split epoch) is pre-split and writes both legs; a later one writes B alone -- or both
    after a one-way split, for volume 1.  Every other state writes both legs (a copy in
    progress must not miss a write; see docs/lifecycle.md)."""
    s = view.state
    if s == S.SPLITTING:
        pre = view.split_epoch is None or tag < view.split_epoch
        legs = BOTH if pre or (view.one_way and volume == 1) else LEG_B
    elif s == S.SPLIT:
        legs = LEG_B
    elif s == S.ONE_WAY:
        legs = BOTH if volume == 1 else LEG_B
    else:
        legs = BOTH
    return legs & ~view.failed


def exact_marks(view: View, legs: int) -> bool:
    """True if a write to ``legs`` must mark its regions exactly (64 KiB), not its whole
    write-intent extent: it reaches one leg only, or a copy is running that must copy only
    what changed."""
    return legs != BOTH or view.state != S.MIRRORED


def lane_allowed(view: View) -> bool:
    """The express lane (no admission, no range lock, no marking) may run only where nothing
    could tell the difference: mirrored, or fully split (A frozen, not one-way), with no
    failed leg.  The mirror checks the rest (nothing in flight, bitmap settled)."""
    if view.failed:
        return False
    return view.state == S.MIRRORED or (view.state == S.SPLIT and not view.one_way)


def lane_writes(view: View) -> int:
    """The legs the express lane writes in a state where it may run."""
    return BOTH if view.state == S.MIRRORED else LEG_B


class Op(StrEnum):
    """Lifecycle operations; one at a time per mirror (see ``Mirror``'s operation slot)."""

    SPLIT = "split"
    REJOIN = "rejoin"
    SYNC = "sync"
    VERIFY = "verify"
    REPAIR = "repair"
    RECOVERY = "recovery"


def refusal(view: View, op: Op, *, repair: bool = False, leg: str | None = None,
            replace: bool = False) -> str | None:
    """Why ``op`` may not start in ``view``, or None if it may.

    ``repair`` is verify's flag (copy B over A where they differ); ``leg``/``replace`` are
    repair's.  The text completes "mirror NAME ..." in an error message."""
    s = view.state
    failed = sorted(LEG_NAMES[b] for b in (LEG_A, LEG_B) if view.failed & b)
    if op == Op.SPLIT:
        if s == S.SYNCING:
            return ("is still in its initial sync: B is not a full copy yet, so a split would "
                    "not give a usable A")
        if s != S.MIRRORED:
            return f"is {s}, not mirrored; rejoin it before splitting again"
        if failed:
            return (f"is DEGRADED (leg {', '.join(failed).upper()} failed); repair it before "
                    "splitting")
        return None
    if op == Op.REJOIN:
        if s not in (S.SPLIT, S.ONE_WAY, S.REJOINING) or (
                s == S.REJOINING and view.resync_kind != "rejoin"):
            return f"is {s}; only a split mirror can be rejoined"
        if failed:
            return f"has a failed leg ({', '.join(failed)}); use repair"
        return None
    if op == Op.SYNC:
        if s not in (S.MIRRORED, S.SYNCING):
            return f"is {s}; an initial sync starts from a mirrored mirror"
        if failed:
            return f"has a failed leg ({', '.join(failed)}); use repair"
        return None
    if op == Op.VERIFY:
        if repair and s != S.MIRRORED:
            return f"is {s}: repair needs a mirrored mirror (a split copy is never modified)"
        if s not in (S.MIRRORED, S.SPLIT, S.ONE_WAY):
            return f"is {s}; verify when it is mirrored or split"
        if failed:
            return (f"is DEGRADED (leg {', '.join(failed).upper()} failed); repair it first")
        return None
    if op == Op.REPAIR:
        return _repair_refusal(view, leg, replace, failed)
    if op == Op.RECOVERY:
        return None if s == S.MIRRORED and not failed else f"is {s}"
    raise IllegalTransition(f"unknown operation {op!r}")


def _repair_refusal(view: View, leg: str | None, replace: bool,
                    failed: list[str]) -> str | None:
    s = view.state
    if leg is None:
        if not failed:
            return "has no failed leg (name one with --leg to replace a healthy leg's image)"
        if len(failed) > 1:
            return "has both legs failed; no complete copy is left to repair from"
        leg = failed[0]
    if leg not in LEG_BITS:
        return f"has no leg {leg!r}: expected 'a' or 'b'"
    bit = LEG_BITS[leg]
    if not view.failed & bit and not replace:
        return f"has leg {leg.upper()} healthy (not failed)"
    if view.failed & ~bit & BOTH:
        return "has the other leg failed too; no complete copy to repair from"
    if s == S.SPLITTING:
        return "is splitting; repair when the split is done"
    source = complete_legs(View(s, NONE, view.one_way, view.split_epoch, view.resync_from,
                                view.resync_kind))
    if source & bit and not source & ~bit:
        held = "the only complete copy" if s != S.SYNCING else "the only complete copy (the " \
            "initial sync reads it)"
        return (f"is {s} and leg {leg.upper()} held {held}; there is nothing to repair it "
                "from")
    return None


LEG_ROLES = ("in-sync", "live", "draining", "frozen", "one-way", "resyncing", "syncing",
             "failed")
"""Every value :func:`leg_role` can return."""
_ROLES: dict[State, tuple[str, str]] = {
    S.MIRRORED: ("in-sync", "in-sync"),
    S.SPLITTING: ("draining", "live"),
    S.SPLIT: ("frozen", "live"),
    S.ONE_WAY: ("one-way", "live"),
    S.SYNCING: ("live", "syncing"),
}


def leg_role(view: View, leg: int) -> str:
    """What one leg does in the mirror's state, for status, metrics and the shell: ``in-sync``
    (mirrored), ``live`` (the complete copy that serves), ``draining`` / ``frozen`` /
    ``one-way`` (A during and after a split), ``resyncing`` (the destination of a rejoin,
    repair or recovery), ``syncing`` (B during the initial sync) or ``failed``."""
    if view.failed & leg:
        return "failed"
    if view.state == S.REJOINING:
        return "live" if source_leg(view) & leg else "resyncing"
    return _ROLES[view.state][0 if leg == LEG_A else 1]


LEG_HEALTH = ("ok", "resyncing", "failed")
"""Every value :func:`leg_health` can return."""


def leg_health(view: View, leg: int) -> str:
    """``failed``, ``resyncing`` (not a complete copy: it must be copied to, whether the copy
    runs now or waits for a resume or repair) or ``ok`` (a split-off A is ok: it is what it
    should be)."""
    role = leg_role(view, leg)
    if role == "failed":
        return "failed"
    return "resyncing" if role in ("resyncing", "syncing") else "ok"


def health(view: View) -> str:
    """``ok``, ``degraded`` (a leg failed, a complete one serves) or ``failed`` (none)."""
    if not view.failed:
        return "ok"
    return "degraded" if complete_legs(view) else "failed"


def table_markdown() -> str:
    """The transition table as Markdown (docs/architecture.md embeds it; a test checks the
    docs hold the current one)."""
    lines = ["| from | event | to |", "|---|---|---|"]
    for (src, ev), dst in TRANSITIONS.items():
        lines.append(f"| `{src}` | {ev} | `{dst}` |")
    return "\n".join(lines)
