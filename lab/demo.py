"""The end-to-end demo, run inside the lab guest (``sudo bash dev/demo.sh`` boots it).

It tells the product's story against the real kernel, step by step, and checks each step:
a mirrored LUN over iSCSI with ext4 on it, a split while a writer is busy, the split copy
exported read-only and fsck'ed, and the two images compared.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli

MiB = 1 << 20


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def sh(*cmd: str) -> str:
    out = guest.run(list(cmd), timeout=600).stdout
    if out.strip():
        print(out.rstrip())
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def main() -> int:
    guest.setup_kernel()
    guest.iscsi_logout_all()
    guest.clear_lio()
    work = Path(tempfile.mkdtemp(prefix="demo-"))
    daemon = Mirrord(work / "targetmirrord.log")
    step("start targetmirrord (serves every user:mirror TCMU device)")
    daemon.start()
    iqn = f"{guest.IQN_PREFIX}:demo"
    a, b = work / "demo-a.img", work / "demo-b.img"
    mnt = work / "mnt"
    mnt.mkdir()
    try:
        step("targetmirror create: a 256 MiB user:mirror LUN on two images, exported over "
             "iSCSI")
        print(cli("create", "demo", "--size", "256M", "--image-a", str(a), "--image-b", str(b),
                  "--create-images", "--iqn", iqn, "--initiator",
                  guest.initiator_name()).stdout.strip())
        daemon.wait_serving("demo")
        guest.iscsi_login(iqn)
        dev = guest.find_scsi_disk(iqn)
        print(f"logged in with open-iscsi: {dev}")
        step("mkfs.ext4, mount, write files (every write goes to A and B)")
        sh("mkfs.ext4", "-q", "-F", dev)
        sh("mount", dev, str(mnt))
        for i in range(20):
            (mnt / f"before-{i}.bin").write_bytes(os.urandom(256 * 1024))
        sh("sync")
        step("split while a writer keeps writing: no I/O pause")
        stop = threading.Event()

        def writer() -> None:
            n = 0
            while not stop.is_set():
                (mnt / f"during-{n}.bin").write_bytes(os.urandom(64 * 1024))
                n += 1

        t = threading.Thread(target=writer)
        t.start()
        print(daemon.ctl("split", "demo").stdout.rstrip())
        stop.set()
        t.join()
        (mnt / "after.txt").write_text("written after the split: only on B\n")
        sh("sync")
        step("targetmirror status")
        print(daemon.ctl("status").stdout.rstrip())
        step("export the split copy (image A) read-only and fsck it over iSCSI")
        snap_iqn = f"{guest.IQN_PREFIX}:demo-snap"
        print(daemon.ctl("export-snapshot", "demo", "--iqn", snap_iqn, "--initiator",
                         guest.initiator_name()).stdout.strip())
        daemon.wait_serving("demo_snap")
        guest.iscsi_login(snap_iqn)
        snap = guest.find_scsi_disk(snap_iqn)
        # A was taken while ext4 was mounted: like after a power cut, the journal needs a replay
        # that a read-only device cannot take; -n checks it as it is.
        fsck = subprocess.run(["fsck.ext4", "-fn", snap], capture_output=True, text=True,
                              check=False)
        print(fsck.stdout.rstrip()[-600:])
        files = subprocess.run(["debugfs", "-R", "ls -l /", snap], capture_output=True,
                               text=True, check=False).stdout
        n_before = files.count("before-")
        print(f"split copy holds {n_before} of 20 pre-split files; "
              f"'after.txt' present: {'after.txt' in files}")
        assert n_before == 20 and "after.txt" not in files
        guest.iscsi_logout(snap_iqn)
        cli("delete", "demo_snap", "--iqn", snap_iqn)
        step("targetmirror backup: copy A to a file, replay its journal as a restore would, "
             "and check it is clean")
        copy = work / "backup.img"
        print(daemon.ctl("backup", "demo", "--to", str(copy)).stdout.rstrip())
        subprocess.run(["e2fsck", "-fy", str(copy)], capture_output=True, check=False)
        sh("e2fsck", "-fn", str(copy))  # raises unless clean
        step("unmount and log out; compare the images")
        sh("umount", str(mnt))
        sh("fsck.ext4", "-fn", dev)
        guest.iscsi_logout(iqn)
        print(f"image A sha256 {sha(a)}  (frozen at the split)")
        print(f"image B sha256 {sha(b)}  (live: has the post-split writes)")
        cli("delete", "demo", "--iqn", iqn)
        step("demo finished: every check passed")
        return 0
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)
        guest.iscsi_logout_all()
        status = daemon.stop()
        print(f"targetmirrord exited with status {status}")


if __name__ == "__main__":
    sys.exit(main())
