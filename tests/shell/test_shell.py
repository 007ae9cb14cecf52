"""targetmirror-shell, one-shot mode, against a real control socket served by the daemon's own
handlers over two real mirrors (runner + SCSI + mirror on the kernel double)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from targetmirror import cli
from targetmirror.daemon.control import ControlServer
from targetmirror.daemon.main import Daemon
from targetmirror.mirror.state import StateStore
from targetmirror.shell import main as shell_main
from targetmirror.shell.nodes import mirror_summary
from tests.daemon.splitrig import BS, block, make_device, write10

NBLOCKS = 64
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def rig(tmp_path):
    store = StateStore(str(tmp_path / "state" / "mirrors"))
    devs = [make_device(str(tmp_path), n, NBLOCKS, workers=2, store=store)
            for n in ("m0", "m1")]
    daemon = Daemon(state_dir=str(tmp_path / "state"), control_socket=None)
    for d in devs:
        daemon.devices[d.served.info.name] = d.served
    sock = str(tmp_path / "run" / "control.sock")
    server = ControlServer(sock, daemon.handlers(), allowed_uids=(os.getuid(),))
    server.start()
    yield devs, daemon, sock
    server.close()
    for d in devs:
        d.close()


def sh(capfd, sock: str, *words: str) -> tuple[int, str, str]:
    """Run the real console script one-shot (a child process, as an admin's script would)."""
    del capfd
    proc = subprocess.run([sys.executable, "-m", "targetmirror.shell.main", "--socket", sock,
                           *words], capture_output=True, text=True, timeout=120, check=False,
                          cwd=REPO)
    return proc.returncode, proc.stdout, proc.stderr


def write(dev, lba: int, n: int, seq: int) -> bytes:
    payload = b"".join(block(7, seq, i, lba + i) for i in range(n))
    q = dev.uio.submit("write", write10(lba, n), lba, n, payload)
    assert dev.uio.wait_reaped([q.cmd_id]) and dev.uio.reaped[q.cmd_id][1].status == 0
    return payload


def test_ls_split_backup_rejoin_from_the_shell(rig, capfd, tmp_path):
    (m0, _m1), daemon, sock = rig
    rc, out, _ = sh(capfd, sock, "ls")
    assert rc == 0
    assert "mirrors" in out and "groups" in out and "exports" in out
    assert "m0" in out and "mirrored, epoch 0" in out
    assert m0.a.path in out                          # the leg nodes show their images

    before = write(m0, 0, 4, seq=1)
    rc, out, err = sh(capfd, sock, "/mirrors/m0", "split")
    assert rc == 0, err
    assert "split" in out and "consistent" in out
    assert daemon.ops.status(["m0"])["mirrors"][0]["state"] == "split"
    after = write(m0, 0, 4, seq=2)                   # post-split: B only
    assert m0.image_bytes("a")[: 4 * BS] == before
    assert m0.image_bytes("b")[: 4 * BS] == after

    rc, out, _ = sh(capfd, sock, "/mirrors/m0", "status")
    assert "split, epoch 1, A consistent, 1 dirty regions" in out

    dest = tmp_path / "m0-backup.img"
    rc, out, err = sh(capfd, sock, "/mirrors/m0", "backup", f"to={dest}")
    assert rc == 0, err
    assert "backed up m0 epoch 1" in out and "stays split" in out
    assert dest.read_bytes()[: 4 * BS] == before     # the backup is A as of the split
    assert dest.stat().st_size == NBLOCKS * BS

    rc, out, err = sh(capfd, sock, "/mirrors/m0", "rejoin")
    assert rc == 0, err
    assert "m0: mirrored again (epoch 2)" in out
    assert m0.image_bytes("a") == m0.image_bytes("b")
    assert m0.image_bytes("a")[: 4 * BS] == after


def test_groups_create_split_rejoin_and_delete(rig, capfd):
    (_m0, _m1), daemon, sock = rig
    rc, out, err = sh(capfd, sock, "/groups", "create", "g", "m0", "m1")
    assert rc == 0, err
    assert daemon.groups.all() == {"g": ["m0", "m1"]}
    rc, out, _ = sh(capfd, sock, "ls", "/groups")
    assert "m0:mirrored m1:mirrored" in out

    rc, out, err = sh(capfd, sock, "/groups/g", "split")
    assert rc == 0, err
    st = {m["name"]: m for m in daemon.ops.status()["mirrors"]}
    assert st["m0"]["state"] == st["m1"]["state"] == "split"
    assert st["m0"]["split"]["group"] == st["m1"]["split"]["group"] == ["m0", "m1"]

    rc, out, err = sh(capfd, sock, "/groups/g", "rejoin")
    assert rc == 0, err
    assert out.count("mirrored again") == 2
    rc, out, err = sh(capfd, sock, "/groups", "delete", "g")
    assert rc == 0 and daemon.groups.all() == {}


def test_refusals_are_one_clear_line_and_change_nothing(rig, capfd, tmp_path):
    (_m0, _m1), daemon, sock = rig
    rc, _out, err = sh(capfd, sock, "/mirrors/m0", "rejoin")
    assert rc == 1
    assert err.strip() == ("targetmirror-shell: mirror: mirror m0 is mirrored; only a split "
                           "mirror can be rejoined")
    assert daemon.ops.status(["m0"])["mirrors"][0]["state"] == "mirrored"

    rc, _out, err = sh(capfd, sock, "/mirrors/nope", "status")
    assert rc == 1 and "nope" in err
    rc, _out, err = sh(capfd, sock, "/groups", "create", "g", "m0")
    assert rc == 1 and "two or more" in err and daemon.groups.all() == {}
    rc, _out, err = sh(capfd, sock, "/mirrors/m0", "rejoin", "full=maybe")
    assert rc == 1 and "full=maybe: expected true or false" in err
    rc, _out, err = sh(capfd, sock, "/mirrors/m0", "split", "bogus=1")
    assert rc == 1 and "bogus" in err
    assert daemon.ops.status(["m0"])["mirrors"][0]["state"] == "mirrored"


def test_shell_and_cli_report_the_same_state(rig, capfd):
    (_m0, _m1), _daemon, sock = rig
    assert sh(capfd, sock, "/mirrors/m1", "split")[0] == 0
    rc, shell_out, _ = sh(capfd, sock, "/mirrors/m1", "status", "json=true")
    assert rc == 0
    assert cli.main(["status", "--socket", sock, "--json", "m1"]) == 0
    cli_out = capfd.readouterr().out
    assert json.loads(shell_out) == json.loads(cli_out)["mirrors"][0]
    # and the table is the CLI's table
    _sh_rc, shell_table, _ = sh(capfd, sock, "status")
    assert cli.main(["status", "--socket", sock]) == 0
    assert shell_table == capfd.readouterr().out


def test_daemon_unreachable_is_shown_not_a_traceback(tmp_path, capfd):
    rc, out, err = sh(capfd, str(tmp_path / "none.sock"), "ls")
    assert rc == 0
    assert "cannot reach targetmirrord" in out
    rc, out, err = sh(capfd, str(tmp_path / "none.sock"), "/mirrors", "split", "m0")
    assert rc == 1 and "cannot reach targetmirrord" in err


def test_completion_of_names_and_parameters(rig):
    _devs, _daemon, sock = rig
    shell = shell_main.make_shell(sock, None)
    root = shell._root_node
    mirrors = root.get_node("/mirrors")
    assert mirrors.ui_complete_split({}, "m", "names") == ["m0", "m1"]
    assert mirrors.ui_complete_split({}, "m1", "names") == ["m1"]
    groups = root.get_node("/groups")
    assert groups.ui_complete_create({}, "m", "members") == ["m0", "m1"]
    m0 = root.get_node("/mirrors/m0")
    assert m0.ui_complete_rejoin({}, "f", "full") == ["full="]
    assert {"split", "rejoin", "verify", "sync", "backup", "status"} <= set(m0.list_commands())
    # help is the command's docstring
    assert "point-in-time copy" in m0.get_command_description("split")


@pytest.mark.parametrize("status, health", [
    ({"name": "x", "state": "mirrored", "epoch": 0}, True),
    ({"name": "x", "state": "split", "epoch": 1, "split": {"a_status": "consistent"}}, True),
    ({"name": "x", "state": "splitting", "epoch": 1, "split": {"a_status": "draining"}}, None),
    ({"name": "x", "state": "rejoining", "epoch": 1, "resync": {"kind": "rejoin",
                                                                "error": "EIO"}}, False),
    ({"name": "x", "state": "not-ready", "reason": "image A missing"}, False),
])
def test_ls_health_colours(status, health):
    assert mirror_summary(status)[1] is health


def test_verify_and_sync_from_the_shell(rig, capfd):
    (m0, m1), daemon, sock = rig
    rc, out, err = sh(capfd, sock, "/mirrors/m0", "verify")
    assert rc == 0, err
    assert "m0 (mirrored):" in out and "0 mismatching" in out
    # A differs from B behind the mirror's back: verify says where, exit 1
    with open(m0.a.path, "r+b") as f:
        f.seek(5 * BS)
        f.write(b"\xee" * BS)
    rc, out, err = sh(capfd, sock, "/mirrors/m0", "verify")
    assert rc == 1
    assert "1 mismatching (first at LBA 5)" in out
    assert "A and B differ" in err
    # initial sync copies A over B, online (B starts out different: a new, unfilled leg)
    with open(m1.b.path, "r+b") as f:
        f.write(b"\x55" * (8 * BS))
    assert m1.image_bytes("a") != m1.image_bytes("b")
    rc, out, err = sh(capfd, sock, "/mirrors/m1", "sync")
    assert rc == 0, err
    assert "m1: initial sync complete" in out
    assert m1.image_bytes("a") == m1.image_bytes("b")
    assert daemon.ops.status(["m1"])["mirrors"][0]["state"] == "mirrored"


def test_every_state_of_the_table_has_a_colour_derived_from_it():
    """The shell colours a mirror from the state table (policy.STEADY) and its health, for
    every state the table has: green where it rests healthy, plain on its way, red when a leg
    failed or the split copy is lost."""
    from targetmirror.mirror import policy
    from targetmirror.shell.nodes import mirror_summary

    for state in policy.STATES:
        base = {"name": "m", "state": str(state), "epoch": 1, "health": "ok"}
        text, colour = mirror_summary(base)
        assert text.startswith(str(state))
        assert colour is (True if state in policy.STEADY else None), state
        text, colour = mirror_summary({**base, "health": "degraded",
                                       "failed_legs": {"a": {"reason": "EIO"}}})
        assert colour is False and "DEGRADED (leg A failed)" in text
    _, colour = mirror_summary({"name": "m", "state": "split", "health": "ok",
                                "split": {"a_status": "lost: EIO"}})
    assert colour is False
