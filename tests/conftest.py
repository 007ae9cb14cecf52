"""Project-wide pytest set-up.

Its one job so far is the real-kernel lab: tests marked ``lab`` run inside a QEMU guest (see
lab/pytest_plugin.py). The same file is loaded by the guest's pytest, where the plugin only
records results for the host.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The repository root must be importable (for `lab` and `tests.lab.guest`) however pytest was
# started: `python3 -m pytest` adds the cwd, a bare `pytest` does not.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from lab import pytest_plugin as _lab_plugin  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    _lab_plugin.addoption(parser)


def pytest_configure(config: pytest.Config) -> None:
    _lab_plugin.configure(config)
