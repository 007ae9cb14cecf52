"""The fuzz targets in the normal test suite: the committed seeds replayed, and a short
coverage-guided run (a few seconds per target) when atheris is installed.

The long run is ``benchmarks/fuzz.py --seconds N``; the hypothesis properties over the same
targets are in ``tests/scsi/test_scsi_dispatch_fuzz.py`` and ``tests/tcmu/test_ring_fuzz.py``.
"""

from __future__ import annotations

import re
import subprocess  # nosec B404 - runs the repository's own script
import sys
from pathlib import Path

import pytest

from .harness import OUTCOMES, TARGETS

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(__file__).resolve().parent / "corpus"
SEEDS = sorted((t, p) for t in TARGETS for p in (CORPUS / t).iterdir())


@pytest.mark.parametrize(("target", "seed"), SEEDS, ids=[f"{t}/{p.name}" for t, p in SEEDS])
def test_seed_replays_clean(target: str, seed: Path) -> None:
    TARGETS[target](seed.read_bytes())


def test_seeds_reach_the_interesting_code() -> None:
    """The seeds are not all refused at the door: commands are fetched, bad entries answered,
    commands run to GOOD, to CHECK CONDITION and through the fast path."""
    OUTCOMES.clear()
    for target, seed in SEEDS:
        TARGETS[target](seed.read_bytes())
    for outcome in ("Command", "BadEntry", "Tmr", "GOOD", "CHECK CONDITION", "fast path",
                    "ring refused", "fetch refused"):
        assert OUTCOMES[outcome] > 0, (outcome, OUTCOMES)


def test_short_coverage_guided_run(tmp_path: Path) -> None:
    pytest.importorskip("atheris")
    proc = subprocess.run(  # nosec B603 - fixed argument list, no shell
        [sys.executable, str(ROOT / "benchmarks" / "fuzz.py"), "--seconds", "3",
         "--corpus-out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for target in TARGETS:
        m = re.search(rf"^{target}: (\d+) executions in 3 s, (\d+) exec/s, cov (\d+) edges",
                      proc.stdout, re.M)
        assert m is not None, proc.stdout
        assert int(m.group(1)) > 0 and int(m.group(3)) > 0
