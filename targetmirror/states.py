"""What a mirror's state means for each of its legs, for the faces (shell, CLI) and the
metrics: derived from the mirror's state table (``targetmirror/mirror/policy.py``), so no face
imports the daemon and no face keeps its own copy of the table."""

from __future__ import annotations

from targetmirror.mirror import policy
from targetmirror.mirror.state import State

MIRROR_STATES: tuple[str, ...] = tuple(s.value for s in policy.STATES)
LEG_STATES: tuple[str, ...] = policy.LEG_ROLES
LEG_HEALTH: tuple[str, ...] = policy.LEG_HEALTH
STEADY_STATES: frozenset[str] = frozenset(s.value for s in policy.STEADY)
"""Mirror states that are where a mirror rests (green in the shell when healthy); the others
are transitional."""


def leg_states(state: str) -> tuple[str, str]:
    """What each leg is doing in a mirror state (A, B), with no leg failed."""
    try:
        view = policy.View(State(state))
    except ValueError:
        return "unknown", "unknown"
    return policy.leg_role(view, policy.LEG_A), policy.leg_role(view, policy.LEG_B)
