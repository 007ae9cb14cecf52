"""A verify run chunk by chunk (daemon/progress.py) answers exactly what one call answers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from targetmirror.daemon import progress
from targetmirror.daemon.progress import VerifyTable
from targetmirror.errors import MirrorError
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.store.faulty import Fault, FaultPlan, FaultyImage
from targetmirror.store.image import Image

REGION = 4096
SIZE = 300 * REGION


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    monkeypatch.setattr(progress, "CHUNK_REGIONS", 7)  # many chunks, one not full at the end
    paths = []
    for leg in ("a", "b"):
        p = str(tmp_path / f"{leg}.img")
        with open(p, "wb") as f:
            f.truncate(SIZE)
        paths.append(p)
    m = Mirror("v", Image(paths[0]), Image(paths[1]), size=SIZE,
               store=StateStore(str(tmp_path / "state")), region_size=REGION, wi_interval=None)
    # A differs from B behind the mirror's back in regions 3, 50, 51 and 299
    fd = os.open(paths[0], os.O_WRONLY)
    for r in (3, 50, 51, 299):
        os.pwrite(fd, b"X", r * REGION + 100)
    os.close(fd)
    yield m
    m.close()


@pytest.mark.parametrize(("offset", "length", "max_report"), [
    (0, None, 16), (5000, 60 * REGION, 16), (REGION * 50 + 7, 1, 16), (0, None, 2),
    (0, 0, 16), (SIZE - 1, None, 16)])
def test_chunked_verify_equals_one_call(mirror: Mirror, offset: int, length: int | None,
                                        max_report: int) -> None:
    table = VerifyTable()
    got = table.run(mirror, offset=offset, length=length, max_report=max_report)
    want = mirror.verify(offset=offset, length=length, max_report=max_report)
    for key in ("name", "state", "regions_checked", "regions_skipped_changed", "mismatches",
                "first_mismatch_lbas", "repaired", "bytes_compared"):
        assert got[key] == want[key], key
    row = table.get("v")
    assert row is not None and not row["active"]
    assert row["last"]["mismatches"] == want["mismatches"]
    if want["regions_checked"]:
        assert row["bytes_done"] == row["bytes_total"] and row["eta_seconds"] == 0


def test_a_refused_verify_is_the_mirrors_own_error(tmp_path: Path) -> None:
    paths = []
    for leg in ("a", "b"):
        p = str(tmp_path / f"{leg}.img")
        with open(p, "wb") as f:
            f.truncate(SIZE)
        paths.append(p)
    plan = FaultPlan([Fault("write", "eio")])
    m = Mirror("d", Image(paths[0]), FaultyImage(paths[1], plan), size=SIZE,
               store=StateStore(str(tmp_path / "state")), region_size=REGION, wi_interval=None)
    try:
        m.write(0, [memoryview(b"w" * 512)], False)
        assert m.health == "degraded"
        table = VerifyTable()
        with pytest.raises(MirrorError, match="DEGRADED"):
            table.run(m)
        row = table.get("d")
        assert row is not None and not row["active"] and "DEGRADED" in row["error"]
        with pytest.raises(MirrorError, match="must not be negative"):
            table.run(m, offset=-1)
    finally:
        m.close()
