"""backup --rbd-snapshot's core against a real disposable cluster: a snapshot of a split A holds
the split instant's data, is recorded in the image's metadata, listed, and pruned to a count
(snapshots somebody else made are left alone)."""

from __future__ import annotations

import json
import random

import pytest

from targetmirror import rbdbackup
from targetmirror.errors import MirrorError
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.store.image import Image
from targetmirror.store.rbd import CephAccess, RbdImage
from tests.mirror.test_rejoin import post_write, split

MiB = 1 << 20
SIZE = 4 * MiB


def test_snapshots_of_split_a_recorded_listed_pruned(ceph_cluster, rbd_image, tmp_path):
    acc = CephAccess(conf=str(ceph_cluster.conf))
    spec = rbd_image(SIZE)
    rng = random.Random(5)
    initial = rng.randbytes(SIZE)
    a = RbdImage(spec, acc)
    a.writev(0, [memoryview(initial)])
    a.create_snapshot("someone-elses")
    (tmp_path / "b.img").write_bytes(initial)
    m = Mirror("m", a, Image(str(tmp_path / "b.img")), size=SIZE, block_size=512,
               store=StateStore(str(tmp_path / "state")), region_size=64 * 1024)
    taken: list[tuple[str, bytes]] = []
    epochs: list[int] = []
    try:
        with pytest.raises(MirrorError, match="not a usable copy"):
            rbdbackup.take(spec, acc, mirror="m", split={"epoch": 1, "a_status": None})
        for cycle in range(3):
            split(m)
            at_split = bytearray(SIZE)
            m.a.readv(0, [memoryview(at_split)])
            post_write(m, cycle * MiB, bytes([cycle + 1]) * 4096)   # B only, after the instant
            res = rbdbackup.take(spec, acc, mirror="m", split=m.status()["split"], keep=2)
            snap = res["rbd_snapshot"]
            assert snap.startswith(f"tm-m-e{m.epoch}-")
            assert res["record"]["epoch"] == m.epoch and res["record"]["mirror"] == "m"
            taken.append((snap, bytes(at_split)))
            epochs.append(m.epoch)
            with pytest.raises(MirrorError, match="already has snapshot"):
                rbdbackup.take(spec, acc, mirror="m", split=m.status()["split"], keep=2)
            m.rejoin()                                   # right away: the snapshot stays
            assert m.rejoin_complete.wait(60)
            if cycle == 2:
                assert res["pruned"] == [taken[0][0]]
            else:
                assert res["pruned"] == []
        listed = rbdbackup.list_snapshots(spec, acc)
        assert [s["snapshot"] for s in listed] == [taken[1][0], taken[2][0]]
        assert [s["epoch"] for s in listed] == epochs[1:]
        # each snapshot holds exactly its split instant's data, not what came after
        for snap, data in taken[1:]:
            ro = RbdImage(f"{spec}@{snap}", acc, readonly=True)
            try:
                out = bytearray(SIZE)
                ro.readv(0, [memoryview(out)])
                assert bytes(out) == data
            finally:
                ro.close()
        names = [s["name"] for s in a.snapshots()]
        assert "someone-elses" in names and taken[0][0] not in names
        meta = a.metadata()
        assert rbdbackup.META_PREFIX + taken[0][0] not in meta
        assert json.loads(meta[rbdbackup.META_PREFIX + taken[2][0]])["epoch"] == epochs[2]
    finally:
        m.close()


def test_a_file_leg_is_refused(tmp_path):
    with pytest.raises(MirrorError, match="not an RBD image"):
        rbdbackup.take(str(tmp_path / "a.img"), CephAccess(), mirror="m",
                       split={"epoch": 1, "a_status": "consistent"})


class _SplitClient:
    """The daemon's answers for a mirror that is already split (the CLI glue is under test)."""

    def __init__(self, image_a: str) -> None:
        self.st = {"name": "m", "state": "split", "size": SIZE, "image_a": image_a,
                   "split": {"epoch": 4, "instant_wall": 1_790_000_000.0,
                             "a_status": "consistent"}}

    def mirror(self, name: str) -> dict:
        return self.st


def test_cli_backup_rbd_snapshot_and_listing(ceph_cluster, rbd_image, monkeypatch, capsys,
                                             tmp_path):
    """``backup --rbd-snapshot`` finds A's cluster in the backstore's cfgstring (as LIO holds
    it), takes the snapshot with the keep count from the config file, and ``rbd-snapshots``
    lists it."""
    from targetmirror import cli
    from targetmirror.client import Client
    from targetmirror.config.plan import BackstoreState
    from tests.config.fakelio import FakeLio

    spec = rbd_image(SIZE)
    lio = FakeLio()
    lio.state.backstores["m"] = BackstoreState(
        SIZE, f"a={spec};b=/srv/m-b.img;a_conf={ceph_cluster.conf}", "serial")
    lio.state.backstores["plain"] = BackstoreState(SIZE, "a=/srv/p-a.img;b=/srv/p-b.img", "s")
    monkeypatch.setattr(cli.common, "lio_seam", lambda: lio)
    fake = _SplitClient(spec)
    monkeypatch.setattr(Client, "mirror", lambda self, name: fake.mirror(name))
    assert cli.main(["backup", "m", "--rbd-snapshot", "--json", "--keep", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rbd_snapshot"] == "tm-m-e4-20260921T141320Z" and out["epoch"] == 4
    assert cli.main(["rbd-snapshots", "m", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["snapshots"]
    assert [(s["snapshot"], s["epoch"]) for s in listed] == [(out["rbd_snapshot"], 4)]
    assert cli.main(["backup", "plain", "--rbd-snapshot"]) == 1
    assert "is not an RBD image" in capsys.readouterr().err
