"""Sizes as people write them (``4096``, ``512M``, ``10G``, ``2TiB``: binary units, like LVM and
targetcli), parsed and shown by one pair of functions for the CLI, the YAML file and the
daemon's options."""

from __future__ import annotations

import argparse
import re

UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_SIZE = re.compile(r"\s*(\d+)\s*([kmgt]?)(?:i?b)?\s*", re.IGNORECASE)
SIZE_EXPECTED = "a size in bytes or with a unit (4096, 512M, 10G, 2TiB)"


def parse_size(value: object) -> int | None:
    """An int, or a string like ``512M`` / ``1G`` / ``2TiB`` -> bytes; None if neither."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m:
            return int(m.group(1)) * UNITS[m.group(2).lower()]
    return None


def size_arg(text: str) -> int:
    """:func:`parse_size` as an argparse ``type=`` (a usage error names what was expected)."""
    size = parse_size(text)
    if size is None:
        raise argparse.ArgumentTypeError(f"expected {SIZE_EXPECTED}, got {text!r}")
    return size


def human_size(size: int) -> str:
    """The largest unit that divides ``size`` exactly: ``10G``, ``512M``, ``4097``."""
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return str(size)
