"""The data path against the real kernel: a ``user:mirror`` LUN served by targetmirrord.

Each test creates its mirror with the real ``targetmirror`` CLI (rtslib-fb underneath), exports
it over iSCSI on 127.0.0.1, logs in with open-iscsi and drives it with real tools (mkfs.ext4,
fsck, fio with verify, dd), then checks the bytes in *both* image files.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli

pytestmark = pytest.mark.lab

MiB = guest.MiB


class Lun:
    """A mirror created and exported by the CLI, logged in; ``dev`` is its /dev/sdX.

    Shared by the other lab test modules (split, lifecycle)."""

    def __init__(self, name: str, tmp_path: Path, size: int, daemon: Mirrord) -> None:
        self.name = name
        self.iqn = f"{guest.IQN_PREFIX}:{name.replace('_', '-')}"  # no '_' in an IQN
        self.a = tmp_path / f"{name}-a.img"
        self.b = tmp_path / f"{name}-b.img"
        self.size = size
        cli("create", name, "--size", str(size), "--image-a", str(self.a), "--image-b",
            str(self.b), "--create-images", "--iqn", self.iqn, "--initiator",
            guest.initiator_name())
        daemon.wait_serving(name)
        self.dev = ""
        self.login()

    def login(self) -> None:
        guest.iscsi_login(self.iqn)
        self.dev = guest.find_scsi_disk(self.iqn, 0)

    def logout(self) -> None:
        guest.iscsi_logout(self.iqn)

    def delete(self) -> None:
        cli("delete", self.name, "--iqn", self.iqn)

    def images_identical(self) -> bool:
        return _sha256(self.a) == _sha256(self.b)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(4 * MiB):
            h.update(chunk)
    return h.hexdigest()


def _write_tree(root: Path, rng: random.Random) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for i in range(40):
        rel = f"d{i % 5}/sub{i % 3}/f{i}.bin"
        data = rng.randbytes(rng.choice([0, 1, 1000, 4096, 65536, 300_000, 2 * MiB + 17]))
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[rel] = data
    return files


def test_ext4_on_mirror_both_images_hold_the_files(mirrord: Mirrord, tmp_path: Path) -> None:
    lun = Lun("m_ext4", tmp_path, 256 * MiB, mirrord)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    guest.run(["mkfs.ext4", "-q", "-F", lun.dev])  # discards first: UNMAP / WRITE SAME
    guest.run(["mount", lun.dev, str(mnt)])
    files = _write_tree(mnt, random.Random(3))
    guest.run(["sync"])
    guest.run(["umount", str(mnt)])
    guest.run(["fsck.ext4", "-fn", lun.dev])
    # Read back through the initiator, with no page cache in between.
    guest.drop_caches()
    guest.run(["mount", "-o", "ro", lun.dev, str(mnt)])
    for rel, data in files.items():
        assert (mnt / rel).read_bytes() == data, f"{rel} read back wrong through the LUN"
    guest.run(["umount", str(mnt)])
    lun.logout()
    assert lun.images_identical(), "images A and B differ after a mirrored workload"
    # Image A on its own (the future point-in-time copy) is a clean filesystem with the files.
    guest.run(["fsck.ext4", "-fn", str(lun.a)])
    for rel in list(files)[::7]:
        out = subprocess.run(["debugfs", "-R", f"cat /{rel}", str(lun.a)], capture_output=True,
                             check=True, timeout=120).stdout
        assert out == files[rel], f"{rel} in image A differs from what was written"
    lun.delete()


def _fio(dev: str, out: Path, *args: str) -> dict:
    guest.run(["fio", "--output-format=json", f"--output={out}", f"--filename={dev}",
               "--direct=1", "--ioengine=libaio", "--verify=crc32c", "--verify_fatal=1",
               "--do_verify=1", *args], timeout=600)
    return json.loads(out.read_text())


def test_fio_verify_random_and_sequential(mirrord: Mirrord, tmp_path: Path) -> None:
    lun = Lun("m_fio", tmp_path, 256 * MiB, mirrord)
    results = {}
    for name, args in (
        ("rand4k", ("--name=rand4k", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                    "--size=24M", "--randrepeat=0")),
        ("seq1m", ("--name=seq1m", "--rw=write", "--bs=1M", "--iodepth=16", "--size=96M",
                   "--offset=128M")),
    ):
        report = _fio(lun.dev, tmp_path / f"{name}.json", *args)
        job = report["jobs"][0]
        assert job["error"] == 0, f"fio {name} reported error {job['error']}"
        assert job["write"]["io_bytes"] > 0 and job["read"]["io_bytes"] > 0  # wrote + verified
        results[name] = (job["write"]["iops"], job["write"]["bw"])
    print("fio (write phase, with verify):", results)
    lun.logout()
    assert lun.images_identical()
    lun.delete()


def test_session_killed_mid_io_then_login_again(mirrord: Mirrord, tmp_path: Path) -> None:
    lun = Lun("m_kill", tmp_path, 128 * MiB, mirrord)
    stat = Path("/sys/block", Path(lun.dev).name, "stat")

    def writes_done() -> int:
        return int(stat.read_text().split()[4])  # field 5: writes completed

    before = writes_done()
    fio = subprocess.Popen(["fio", "--name=bg", f"--filename={lun.dev}", "--direct=1",
                            "--ioengine=libaio", "--rw=randwrite", "--bs=4k", "--iodepth=16",
                            "--time_based", "--runtime=120", "--output=/dev/null"])
    try:
        guest.wait_for(lambda: writes_done() > before + 500, timeout=60,
                       what="fio to have I/O in flight")
        lun.logout()  # the session goes away with commands queued and in flight
        fio.wait(timeout=120)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert mirrord.alive(), "the daemon died when the session went away"
    lun.login()
    data = os.urandom(MiB)
    guest.dd_write(lun.dev, 8 * MiB, data)
    assert guest.dd_read(lun.dev, 8 * MiB, MiB) == data
    lun.logout()
    assert lun.images_identical(), "an interrupted session left the legs different"
    with lun.b.open("rb") as f:
        f.seek(8 * MiB)
        assert f.read(MiB) == data
    lun.delete()
