"""How long a leg may take: the ``deadlines`` of the YAML file and targetmirrord's flags.

A slow leg is not a failed leg (issue 19).  Each kind of leg call has its own deadline, and
only a data call or a flush that stays unanswered past its deadline fails the leg; a discard
or zeroing piece that is slow is logged and counted, never failed.  The mirror enforces them
(:class:`targetmirror.mirror.legs.Deadlines`); this module is where an admin's values come
from and are checked:

* the file's top-level ``deadlines:`` mapping sets them for every mirror of the daemon;
* a mirror's own ``deadlines:`` (``mirrors[].deadlines``) overrides any of them for it;
* ``targetmirrord --leg-timeout/--flush-timeout/--discard-timeout/--discard-piece`` replace the
  file's daemon-wide values (a mirror's own entry still wins for that mirror).

Values are checked here with messages that name the key and what was expected, so
``targetmirror validate`` reports a bad deadline like any other problem and the daemon never
builds a mirror from one.  The result is a plain mapping of the keys that were *given*; the
mirror's own defaults fill in the rest, so a default lives in one place
(``targetmirror/mirror/legs.py``; :data:`DEFAULTS` repeats it for the reference table and a
test keeps the two equal).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from targetmirror.errors import ConfigError
from targetmirror.units import human_size, parse_size

if TYPE_CHECKING:
    from targetmirror.mirror.legs import Deadlines

NEVER = "never"
"""The value that turns a failure deadline off (the leg is then never failed for time)."""

MAX_SECONDS = 3600.0
"""No deadline is longer than an hour: a larger number is a unit mistake (ms for s)."""
PIECE_MIN = 4096
PIECE_MAX = 1 << 30

#: key -> (default as the file writes it, meaning); the order is the reference table's.
DEFAULTS: dict[str, tuple[Any, str]] = {
    "read": (20, "seconds a data read may go unanswered before its leg is failed (or never); "
             "keep it below LIO's cmd_time_out (30 s) so the other leg answers in time"),
    "write": (20, "the same for a data write"),
    "per_mib": (1.0, "seconds added to the read and write deadlines per MiB beyond the first "
                "(a large transfer on a busy device is not a dead device)"),
    "flush": (60, "seconds a flush (fdatasync: SYNCHRONIZE CACHE, FUA) may go unanswered "
              "before its leg is failed (or never)"),
    "discard": (30, "a discard or zeroing piece slower than this is logged and counted as "
                "slow; it never fails a leg (a failed piece is written as zeros instead)"),
    "piece": ("64M", "discards and zeroing are cut into calls of at most this size (4K-1G, a "
              "multiple of 4K), each with its own deadline"),
    "slow": (1.0, "a leg with a call older than this many seconds is reported slow (status, "
             "metrics); only reported, never failed"),
}
KEYS = tuple(DEFAULTS)
FAILING = ("read", "write", "flush", "discard")
"""The keys that take ``never``."""

FLAGS = {"leg_timeout": ("read", "write"), "flush_timeout": ("flush",),
         "discard_timeout": ("discard",), "discard_piece": ("piece",)}
"""targetmirrord's flags (argparse dest) -> the keys each one sets."""


def expected(key: str) -> str:
    """What a value of ``key`` must be, as a problem line says it."""
    if key in FAILING:
        return f"seconds (a number above 0, at most {MAX_SECONDS:g}) or {NEVER}"
    if key == "per_mib":
        return "seconds per MiB (a number from 0 to 60)"
    if key == "slow":
        return f"seconds (a number above 0, at most {MAX_SECONDS:g})"
    return (f"a size from {human_size(PIECE_MIN)} to {human_size(PIECE_MAX)}, a multiple of "
            "4K (e.g. 64M)")


def check_value(key: str, raw: object) -> float | int | None:
    """The value of one key, or raise :class:`ConfigError` saying what was expected.

    Seconds come back as float (``never`` as None), ``piece`` as bytes."""
    if key == "piece":
        size = parse_size(raw)
        if size is None or not PIECE_MIN <= size <= PIECE_MAX or size % 4096:
            raise ConfigError(expected(key))
        return size
    if key in FAILING and isinstance(raw, str) and raw.strip().lower() == NEVER:
        return None
    value = _number(raw)
    if value is None:
        raise ConfigError(expected(key))
    if not (0 <= value <= 60 if key == "per_mib" else 0 < value <= MAX_SECONDS):
        raise ConfigError(expected(key))
    return value


def _number(raw: object) -> float | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, (int, float)):
        value = float(raw)
    elif isinstance(raw, str):
        try:
            value = float(raw.strip().removesuffix("s"))
        except ValueError:
            return None
    else:
        return None
    return value if math.isfinite(value) else None


def check_mapping(raw: object, key: str, error: Callable[[str, str, object, bool], None]
                  ) -> dict[str, float | int | None] | None:
    """Check a ``deadlines:`` mapping of the file; report each problem through
    ``error(key_path, expected, got, show_got)`` and return the valid values given (None: the
    mapping itself is not one)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        error(key, "a mapping of " + ", ".join(KEYS), raw, True)
        return None
    out: dict[str, float | int | None] = {}
    for k, v in raw.items():
        if k not in DEFAULTS:
            error(f"{key}.{k}", "no such key (known keys here: " + ", ".join(KEYS) + ")", None,
                  False)
            continue
        try:
            out[str(k)] = check_value(str(k), v)
        except ConfigError as exc:
            error(f"{key}.{k}", str(exc), v, True)
    return out


def from_flags(args: Mapping[str, str | None]) -> dict[str, float | int | None]:
    """The values targetmirrord's flags give (argparse dest -> text; None: not given);
    raise :class:`ConfigError` naming the flag for a bad one."""
    out: dict[str, float | int | None] = {}
    for dest, keys in FLAGS.items():
        text = args.get(dest)
        if text is None:
            continue
        flag = "--" + dest.replace("_", "-")
        try:
            value = check_value(keys[0], text)
        except ConfigError as exc:
            raise ConfigError(f"{flag}: expected {exc}, got {text!r}") from None
        for k in keys:
            out[k] = value
    return out


def merged(*layers: Mapping[str, float | int | None]) -> dict[str, float | int | None]:
    """Later layers win, key by key."""
    out: dict[str, float | int | None] = {}
    for layer in layers:
        out.update(layer)
    return out


def build(values: Mapping[str, float | int | None]) -> Deadlines:
    """The mirror's :class:`~targetmirror.mirror.legs.Deadlines` for ``values`` (the keys not
    given keep the mirror's defaults)."""
    from targetmirror.mirror.legs import Deadlines

    given: dict[str, Any] = dict(values)
    return Deadlines(**given)


def describe(values: Mapping[str, float | int | None]) -> str:
    """``read 20 s, write 20 s, ..., piece 64M`` for a log line."""
    parts = []
    for k in KEYS:
        if k not in values:
            continue
        v = values[k]
        if k == "piece":
            parts.append(f"piece {human_size(int(v or 0))}")
        elif v is None:
            parts.append(f"{k} {NEVER}")
        else:
            parts.append(f"{k} {v:g} s")
    return ", ".join(parts) or "none set"


__all__ = ["DEFAULTS", "FLAGS", "KEYS", "NEVER", "build", "check_mapping", "check_value",
           "describe", "from_flags", "merged"]
