"""Long runs of the randomized split checkers (tests/daemon/test_split_checker.py).

    python3 benchmarks/split_checker.py [--trials N] [--group-trials N] [--seed S]

Prints the master seed, trials/s and the summary counters; on a failing trial, the seed that
reproduces it (``TARGETMIRROR_SPLIT_TRIAL_SEED=... python3 -m pytest -k split_checker``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.daemon.test_split_checker import group_trial, run_trials, split_trial


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000, help="single-mirror trials")
    ap.add_argument("--group-trials", type=int, default=2_000, help="consistency-group trials")
    ap.add_argument("--seed", help="master seed (default: random)")
    args = ap.parse_args()
    if args.seed:
        os.environ["TARGETMIRROR_SPLIT_SEED"] = args.seed
    with tempfile.TemporaryDirectory(prefix="split-checker-") as tmp:
        if args.trials:
            run_trials(split_trial, args.trials, tmp, "split checker")
        if args.group_trials:
            run_trials(group_trial, args.group_trials, tmp, "group split checker")
    return 0


if __name__ == "__main__":
    sys.exit(main())
