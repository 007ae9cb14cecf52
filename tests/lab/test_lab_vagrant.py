"""The Vagrant lab's provisioning scripts, run in the QEMU guest (they cannot run Vagrant here).

target.sh installs the commands, writes a YAML file and applies it; initiator.sh logs the
guest's own initiator in; demo.sh splits the group, backs up the split-off copy and rejoins.
Only what the guest lacks (systemd, network) is switched off through their environment.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.mirrord import REPO, Mirrord

pytestmark = pytest.mark.lab

MiB = guest.MiB
IQN = f"{guest.IQN_PREFIX}:vagrant"
PORTAL = f"{guest.PORTAL_IP}:{guest.PORTAL_PORT}"


def test_provision_scripts_in_guest(mirrord: Mirrord, tmp_path: Path) -> None:
    env = dict(os.environ, TM_SRC=str(REPO), TM_PORTAL=PORTAL, TM_TARGET_IQN=IQN,
               TM_INITIATORS=guest.initiator_name(), TM_SIZE="32M",
               TM_ETC=str(tmp_path / "etc"), TM_BIN=str(tmp_path / "bin"),
               TM_IMAGES=str(tmp_path / "images"), TM_STATE_DIR=str(mirrord.state_dir),
               TM_SOCKET=mirrord.socket, TM_INSTALL_PACKAGES="0", TM_START_DAEMON="0",
               TM_BACKUP_DIR=str(tmp_path))
    provision = REPO / "vagrant" / "provision"

    def sh(script: str) -> str:
        proc = subprocess.run(["sh", str(provision / script)], env=env,
                                    capture_output=True, text=True, timeout=600, check=False)
        print(f"--- {script} ---\n{proc.stdout}\n{proc.stderr}")
        assert proc.returncode == 0, f"{script} failed: {proc.stderr[-2000:]}"
        return proc.stdout

    out = sh("target.sh")
    assert "plan (" in out and "applied" in out
    assert (tmp_path / "etc" / "targetmirror.yaml").exists()
    for name in ("data", "logs"):
        mirrord.wait_serving(name)
    assert mirrord.ctl_json("status")["groups"] == {"app": ["data", "logs"]}

    sh("initiator.sh")
    data = os.urandom(MiB)
    guest.dd_write(guest.find_scsi_disk(IQN, 0), 8 * MiB, data)
    assert guest.find_scsi_disk(IQN, 1)

    out = sh("demo.sh")
    backups = list(tmp_path.glob("data-*.img"))
    assert len(backups) == 1, out
    with backups[0].open("rb") as f:
        f.seek(8 * MiB)
        assert f.read(MiB) == data, "the backup lacks what the initiator wrote before the split"
    st = {m["name"]: m["state"] for m in mirrord.ctl_json("status")["mirrors"]}
    assert st == {"data": "mirrored", "logs": "mirrored"}
    guest.iscsi_logout(IQN, PORTAL)
