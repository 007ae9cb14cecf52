"""Regenerate the committed seeds: random inputs, kept greedily while they add line coverage.

Random bytes already decode to plausible maps and CDBs (see ``harness.Source``); the seeds give
libFuzzer a start past the "mailbox refused" and "opcode unknown" walls and keep the corpus
replay in the test suite meaningful without atheris.  Deterministic (fixed random seed).

    python3 tests/fuzz/make_seeds.py [--count 2000] [--keep 24]
"""

from __future__ import annotations

import argparse
import random
import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.fuzz.harness import TARGETS  # noqa: E402

CORPUS = Path(__file__).resolve().parent / "corpus"


def lines_hit(target: str, data: bytes) -> set[tuple[str, int]]:
    hit: set[tuple[str, int]] = set()

    def tracer(frame: types.FrameType, _e: str, _a: object) -> object:
        if "/targetmirror/" not in frame.f_code.co_filename:
            return None

        def local(f: types.FrameType, event: str, _x: object) -> object:
            if event == "line":
                hit.add((f.f_code.co_filename, f.f_lineno))
            return local

        return local

    sys.settrace(tracer)
    try:
        TARGETS[target](data)
    finally:
        sys.settrace(None)
    return hit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--keep", type=int, default=24)
    opts = ap.parse_args()
    for target in TARGETS:
        rng = random.Random(f"targetmirror-{target}")
        candidates = []
        for _ in range(opts.count):
            data = rng.randbytes(rng.randint(16, 512))
            candidates.append((data, lines_hit(target, data)))
        seen: set[tuple[str, int]] = set()
        kept: list[bytes] = []
        while len(kept) < opts.keep:
            data, new = max(((d, h - seen) for d, h in candidates), key=lambda x: len(x[1]))
            if not new:
                break
            kept.append(data)
            seen |= new
        out = CORPUS / target
        out.mkdir(parents=True, exist_ok=True)
        for old in out.iterdir():
            old.unlink()
        for i, data in enumerate(kept):
            (out / f"seed-{i:02d}").write_bytes(data)
        print(f"{target}: {len(kept)} seeds, {sum(map(len, kept))} bytes, {len(seen)} lines")


if __name__ == "__main__":
    main()
