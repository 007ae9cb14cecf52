"""Project-wide pytest set-up.

Its main job is the real-kernel lab: tests marked ``lab`` run inside a QEMU guest (see
lab/pytest_plugin.py). The same file is loaded by the guest's pytest, where the plugin only
records results for the host.

``ceph_cluster`` (session) is a disposable one-mon, one-OSD Ceph cluster on 127.0.0.1
(tests/cephcluster.py), started in a temporary directory on first use and wiped at the end of the
session; tests that use it are skipped, with the reason, only where the Ceph packages or the
librbd binding are absent.  ``rbd_image`` makes a fresh, uniquely named image in it.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterator
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


@pytest.fixture(scope="session")
def ceph_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A throw-away Ceph cluster (memstore OSD, no cephx, loopback only) for the session."""
    from tests import cephcluster

    why = cephcluster.missing()
    if why is not None:
        pytest.skip(why)
    cluster = cephcluster.CephCluster(tmp_path_factory.mktemp("ceph"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.wipe()


_image_ids = itertools.count(1)


@pytest.fixture
def rbd_image(ceph_cluster: object) -> Callable[[int], str]:
    """``make(size) -> "rbd/rbd/img-N"``: a new image of ``size`` bytes in the session cluster."""
    from tests.cephcluster import CephCluster

    assert isinstance(ceph_cluster, CephCluster)

    def make(size: int) -> str:
        name = f"img-{next(_image_ids)}"
        ceph_cluster.create_image(name, size)
        return ceph_cluster.spec(name)
    return make
