"""From a YAML file alone: `targetmirror apply` against the real kernel.

Two mirrors in a consistency group, exported as two LUNs of one iSCSI target with an ACL that
needs mutual CHAP; the initiator logs in (and is refused without the secrets), sees both LUNs
and writes a pattern that lands on both images; status and list show the same mirrors; a group
split and rejoin work on the group the file made; a second apply changes nothing (configfs is
byte-for-byte the same); a bad file changes nothing; dropping one mirror from the file removes
exactly that one, while a backstore made by hand survives every apply; after a "reboot" (daemon
stopped, LIO cleared) `targetmirrord --config` restores the file before serving, with the same
unit serial, and the initiator reads its data back.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.lab import guest
from tests.lab.mirrord import REPO, Mirrord, cli, python_env

pytestmark = pytest.mark.lab

MiB = guest.MiB
IQN = f"{guest.IQN_PREFIX}:cfg"
PORTAL = f"{guest.PORTAL_IP}:{guest.PORTAL_PORT}"
CHAP = {"chap_user": "labhost", "chap_password": "lab-secret-0001",
        "mutual_chap_user": "labtarget", "mutual_chap_password": "lab-secret-0002"}
SKIP_DIRS = {"statistics", "fabric_statistics"}
#: session bookkeeping (sequence numbers move with NOP pings), not configuration
SKIP_FILES = {"info", "dynamic_sessions"}


def configfs_tree(root: Path = guest.CONFIGFS / "target") -> dict[str, str]:
    """Every directory, link (with its target) and attribute value under target/.

    Statistics (I/O counters) and session bookkeeping are left out: they change with every
    command, not with apply.
    Files that cannot be read (write-only controls) are recorded as such.
    """
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        rel = os.path.relpath(dirpath, root)
        out[rel + "/"] = "dir"
        for name in sorted(filenames + [d for d in os.listdir(dirpath)
                                        if os.path.islink(os.path.join(dirpath, d))]):
            if name in SKIP_FILES:
                continue
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                out[f"{rel}/{name}"] = "-> " + os.path.realpath(path)
                continue
            try:
                with open(path, "rb") as f:
                    out[f"{rel}/{name}"] = f.read(4096).decode(errors="replace")
            except OSError as exc:
                out[f"{rel}/{name}"] = f"unreadable: {exc.errno}"
    return out


def write_config(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def login_with_chap() -> None:
    """Discover, show that a login without credentials is refused, then log in with them."""
    assert IQN in guest.iscsi_discover(PORTAL)
    node = ["iscsiadm", "-m", "node", "-T", IQN, "-p", PORTAL]
    refused = guest.run([*node, "--login"], check=False)
    assert refused.returncode != 0, "the target let an initiator in without CHAP"
    for key, value in (("authmethod", "CHAP"), ("username", CHAP["chap_user"]),
                       ("password", CHAP["chap_password"]),
                       ("username_in", CHAP["mutual_chap_user"]),
                       ("password_in", CHAP["mutual_chap_password"])):
        guest.run([*node, "-o", "update", "-n", f"node.session.auth.{key}", "-v", value])
    guest.run([*node, "--login"])


def test_apply_from_yaml(mirrord: Mirrord, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    # made by hand, before and outside the file: apply must never touch it
    cli("create", "hand", "--size", "16M", "--image-a", str(images / "hand-a.img"),
        "--image-b", str(images / "hand-b.img"), "--create-images")
    mirrord.wait_serving("hand")

    doc: dict[str, Any] = {
        "daemon": {"state_dir": str(mirrord.state_dir), "control_socket": mirrord.socket,
                   "log_level": "debug"},
        "image_dirs": [str(images)],
        "mirrors": [
            {"name": "cfg_m1", "size": "32M", "image_a": str(images / "m1-a.img"),
             "image_b": str(images / "m1-b.img"), "create_images": True},
            {"name": "cfg_m2", "size": "32M", "image_a": str(images / "m2-a.img"),
             "image_b": str(images / "m2-b.img"), "create_images": True,
             "region_size": "128K"},
        ],
        "groups": [{"name": "cg", "mirrors": ["cfg_m1", "cfg_m2"]}],
        "exports": [{
            "target": IQN, "portals": [PORTAL],
            "luns": [{"lun": 0, "mirror": "cfg_m1"}, {"lun": 1, "mirror": "cfg_m2"}],
            "acls": [{"initiator": guest.initiator_name(), **CHAP}],
        }],
    }
    cfg = write_config(tmp_path / "targetmirror.yaml", doc)

    first = cli("apply", "--config", str(cfg))
    print(first.stdout)
    assert "applied" in first.stdout
    assert "lab-secret" not in first.stdout, "CHAP secrets must not be printed"
    for name in ("cfg_m1", "cfg_m2"):
        mirrord.wait_serving(name)

    # -- the initiator: refused without CHAP, in with it; both LUNs, a pattern on each -------
    login_with_chap()
    pattern = {0: os.urandom(MiB), 1: os.urandom(MiB)}
    for lun, data in pattern.items():
        dev = guest.find_scsi_disk(IQN, lun)
        guest.dd_write(dev, 4 * MiB, data)
        assert guest.dd_read(dev, 4 * MiB, MiB) == data
    for lun, name in ((0, "m1"), (1, "m2")):
        for leg in ("a", "b"):
            with open(images / f"{name}-{leg}.img", "rb") as f:
                f.seek(4 * MiB)
                assert f.read(MiB) == pattern[lun], f"pattern missing on {name}-{leg}"

    # -- status and list agree with the file --------------------------------------------------
    status = mirrord.ctl_json("status")
    states = {m["name"]: m for m in status["mirrors"]}
    assert states["cfg_m1"]["state"] == states["cfg_m2"]["state"] == "mirrored"
    assert states["cfg_m2"]["bitmap"]["region_size"] == 128 * 1024
    assert status["groups"] == {"cg": ["cfg_m1", "cfg_m2"]}
    listed = {m["name"]: m for m in json.loads(
        cli("list", "--config", str(cfg), "--json").stdout)["mirrors"]}
    assert set(listed) == {"hand", "cfg_m1", "cfg_m2"}
    assert listed["cfg_m1"]["managed_by_apply"] and listed["cfg_m2"]["managed_by_apply"]
    assert not listed["hand"]["managed_by_apply"]
    assert listed["cfg_m2"]["exports"] == [{"target": IQN, "lun": 1}]
    assert listed["cfg_m1"]["group"] == "cg" and listed["cfg_m1"]["state"] == "mirrored"
    table = cli("list", "--config", str(cfg)).stdout
    print(table)
    assert f"{IQN} LUN 0" in table

    # the group the file made splits both mirrors at one instant, and rejoins
    split = mirrord.ctl_json("split", "--group", "cg")["split"]
    assert {m["name"] for m in split} == {"cfg_m1", "cfg_m2"}
    assert all(m["state"] == "split" and m["split"]["a_status"] in (
        "consistent", "crash-consistent") for m in split), split
    rejoined = mirrord.ctl_json("rejoin", "--group", "cg")["rejoin"]
    assert all(m["state"] == "mirrored" for m in rejoined)

    # -- a second apply changes nothing --------------------------------------------------------
    before = configfs_tree()
    second = cli("apply", "--config", str(cfg))
    assert second.stdout.strip() == f"nothing to change: LIO matches {cfg}", second.stdout
    assert configfs_tree() == before

    # -- a bad file changes nothing ------------------------------------------------------------
    bad = json.loads(json.dumps(doc))
    bad["exports"][0]["luns"][1]["lun"] = 0
    bad["mirrors"][0]["colour"] = "red"
    bad_path = write_config(tmp_path / "bad.yaml", bad)
    refused = cli("apply", "--config", str(bad_path), check=False)
    assert refused.returncode == 1
    assert f"{bad_path}: exports[0].luns[1].lun: expected a LUN number not used before" \
        in refused.stderr, refused.stderr
    assert f"{bad_path}: mirrors[0].colour: expected no such key" in refused.stderr
    assert configfs_tree() == before

    # -- drop cfg_m2 from the file: only it goes -----------------------------------------------
    guest.iscsi_logout(IQN, PORTAL)
    doc["mirrors"].pop(1)
    doc["groups"] = []
    doc["exports"][0]["luns"].pop(1)
    write_config(cfg, doc)
    third = cli("apply", "--config", str(cfg))
    print(third.stdout)
    assert "- backstore cfg_m2" in third.stdout and "- group cg" in third.stdout
    so_dir = guest.CONFIGFS / "target" / "core"
    names = {p.name for p in so_dir.glob("user_*/*") if p.is_dir()}
    assert "cfg_m2" not in names and {"cfg_m1", "hand"} <= names, names
    tpg = guest.CONFIGFS / "target" / "iscsi" / IQN / "tpgt_1"
    assert sorted(p.name for p in (tpg / "lun").iterdir()) == ["lun_0"]
    assert (images / "m2-a.img").exists() and (images / "m2-b.img").exists()
    guest.wait_for(lambda: "cfg_m2" not in {m["name"] for m in mirrord.ctl_json("status")
                                            ["mirrors"]},
                   timeout=30, what="the daemon to let go of cfg_m2")
    assert mirrord.ctl_json("status")["groups"] == {}
    assert cli("apply", "--config", str(cfg)).stdout.startswith("nothing to change")

    # the initiator still reaches the remaining LUN, with the pattern intact
    login_with_chap()
    dev = guest.find_scsi_disk(IQN, 0)
    assert guest.dd_read(dev, 4 * MiB, MiB) == pattern[0]
    guest.iscsi_logout(IQN, PORTAL)

    # -- a "reboot": daemon stopped, LIO empty; `targetmirrord --config` restores the file ----
    serial = listed["cfg_m1"]["wwn"]
    assert mirrord.stop() == 0
    guest.clear_lio()
    assert not (guest.CONFIGFS / "target" / "iscsi" / IQN).exists()
    log_path = tmp_path / "restored.log"
    with log_path.open("ab") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "targetmirror.daemon.main", "--config", str(cfg),
             "--rescan-interval", "1", "--log-level", "debug"],
            cwd=REPO, env=python_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
        guest.wait_for(lambda: "serving cfg_m1:" in log_path.read_text()
                       or daemon.poll() is not None, timeout=120,
                       what="targetmirrord --config to restore and serve cfg_m1")
        assert daemon.poll() is None, log_path.read_text()
        restored = {m["name"]: m for m in json.loads(
            cli("list", "--config", str(cfg), "--json").stdout)["mirrors"]}
        assert set(restored) == {"cfg_m1"}
        assert restored["cfg_m1"]["wwn"] == serial, "the unit serial must survive a restore"
        assert restored["cfg_m1"]["managed_by_apply"]
        login_with_chap()
        assert guest.dd_read(guest.find_scsi_disk(IQN, 0), 4 * MiB, MiB) == pattern[0]
        guest.iscsi_logout(IQN, PORTAL)
        assert cli("apply", "--config", str(cfg)).stdout.startswith("nothing to change")
    finally:
        daemon.send_signal(signal.SIGTERM)
        status = daemon.wait(timeout=60)
        text = log_path.read_text(errors="replace")
        print(f"--- targetmirrord --config log ---\n{text[-4000:]}")
    assert status == 0 and "Traceback" not in text
