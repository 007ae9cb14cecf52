"""docs/operations.md documents exactly the keys and defaults of the loader (no drift)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from targetmirror.config.loader import DEFAULTS

DOC = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def render(value: Any) -> str:
    """How the reference table shows a default."""
    if value is None:
        return "required"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, list):
        return f"`{json.dumps(value)}`"
    return '`""`' if value == "" else f"`{value}`"


def test_reference_table_matches_defaults() -> None:
    rows = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"^\| `([a-z_.\[\]]+)` \| (.+?) \| (.+) \|$", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    keys = [k for k, _, _ in DEFAULTS]
    assert sorted(rows) == sorted(keys), "docs and loader list different keys"
    for key, value, meaning in DEFAULTS:
        assert rows[key] == (render(value), meaning), key
