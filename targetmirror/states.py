"""What a mirror's state means for each of its legs: one table that the metrics exporter and
the faces (shell, CLI) share, so neither face imports the daemon to name a leg's state."""

from __future__ import annotations


def leg_states(state: str) -> tuple[str, str]:
    """What each leg is doing in a mirror state (A, B)."""
    return {
        "mirrored": ("in-sync", "in-sync"),
        "splitting": ("draining", "live"),
        "split": ("frozen", "live"),
        "rejoining": ("resyncing", "live"),
        "syncing": ("live", "syncing"),
    }.get(state, ("unknown", "unknown"))


MIRROR_STATES = ("mirrored", "splitting", "split", "rejoining", "syncing")
LEG_STATES = ("in-sync", "live", "draining", "frozen", "resyncing", "syncing")
