"""Lab (issue 16): the operator's face against the real kernel, in one boot.

* ``targetmirrord --config`` with a file whose entry for one mirror is broken (``sise:``):
  it starts, the good mirror serves I/O to a real initiator over iSCSI on both legs, the bad
  one answers NOT READY (04/03) with reason ``config`` in ``status``, ``status --check`` exits
  2; SIGHUP with a file that is still broken keeps everything running; SIGHUP with the
  corrected file serves the refused mirror, and the initiator writes through it to both legs.
* ``targetmirror`` bad inputs against the real LIO: each is one line on stderr and exit 1,
  and configfs and the image directory are byte-for-byte what they were -- also when a later
  step of a ``create --create-images`` fails: the kernel refuses the portal (its port is held
  by another listener), or the daemon does not answer for ``--initial-sync``; the images, the
  backstore and the target it made are taken back.
"""

from __future__ import annotations

import json
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.lab import guest
from tests.lab.mirrord import Mirrord, cli
from tests.lab.test_lab_badinput import check_condition, sg_raw
from tests.lab.test_lab_config import configfs_tree

pytestmark = pytest.mark.lab

MiB = guest.MiB
SIZE = 16 * MiB
IQN = f"{guest.IQN_PREFIX}:operator"
PORTAL = f"{guest.PORTAL_IP}:{guest.PORTAL_PORT}"


def _doc(images: Path, daemon: Mirrord, *, typo: bool) -> dict[str, Any]:
    bad: dict[str, Any] = {"name": "op_bad", "image_a": str(images / "bad-a.img"),
                           "image_b": str(images / "bad-b.img"), "create_images": True}
    bad["sise" if typo else "size"] = "16M"
    return {
        "daemon": {"state_dir": str(daemon.state_dir), "control_socket": daemon.socket},
        "image_dirs": [str(images)],
        "mirrors": [{"name": "op_good", "size": "16M", "image_a": str(images / "good-a.img"),
                     "image_b": str(images / "good-b.img"), "create_images": True}, bad],
        "exports": [{"target": IQN, "portals": [PORTAL],
                     "luns": [{"lun": 0, "mirror": "op_good"}, {"lun": 1, "mirror": "op_bad"}],
                     "acls": [{"initiator": guest.initiator_name()}]}],
    }


def _write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _lun_disk(lun: int) -> str:
    """/dev/sdX of a LUN, also when it reports no capacity (a NOT READY unit)."""
    name = guest.wait_for(lambda: (guest._session_disks(IQN, lun) or [None])[0], timeout=60,
                          what=f"LUN {lun} as a disk")
    return guest.ensure_dev_node(name)


def _at(path: Path, offset: int, length: int = 512) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(length)


def _status(daemon: Mirrord) -> dict[str, Any]:
    return {m["name"]: m for m in daemon.ctl_json("status")["mirrors"]}


def test_daemon_serves_the_good_mirror_refuses_the_bad_one_and_reloads(
        lio: object, tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    daemon = Mirrord(tmp_path / "targetmirrord.log")
    cfg = _write(tmp_path / "targetmirror.yaml", _doc(images, daemon, typo=False))
    # a first start with the good file makes the backstores and the export (what a boot
    # restores); then the file gets a typo and the daemon restarts with it
    daemon.extra_args = ["--config", str(cfg), "--no-dbus"]
    daemon.start()
    daemon.wait_serving("op_good")
    daemon.wait_serving("op_bad")
    assert daemon.stop() == 0
    _write(cfg, _doc(images, daemon, typo=True))
    assert cli("validate", str(cfg), check=False).returncode == 1
    daemon.start()
    try:
        daemon.wait_serving("op_good")
        guest.wait_for(lambda: "cannot serve op_bad" in daemon.log_text(), timeout=60,
                       what="targetmirrord to refuse op_bad")
        log = daemon.log_text()
        assert f"{cfg}: mirrors[1].sise: expected no such key (did you mean size?" in log
        st = _status(daemon)
        assert st["op_good"]["state"] == "mirrored"
        assert st["op_bad"]["state"] == "not-ready" and st["op_bad"]["reason_code"] == "config"
        assert "mirrors[1].sise" in st["op_bad"]["reason"]
        check = daemon.ctl("status", "--check", check=False)
        assert check.returncode == 2, check
        assert "op_bad: NOT READY (config)" in check.stdout
        assert f"configuration {cfg}: 1 problem, refusing op_bad" in check.stdout

        guest.iscsi_login(IQN)
        good = guest.find_scsi_disk(IQN, 0)
        data = bytes(range(256)) * (MiB // 256)
        guest.dd_write(good, 2 * MiB, data)
        assert guest.dd_read(good, 2 * MiB, MiB) == data
        for leg in ("a", "b"):
            assert _at(images / f"good-{leg}.img", 2 * MiB, MiB) == data, leg
        bad = _lun_disk(1)
        payload = tmp_path / "payload"
        payload.write_bytes(b"\x42" * 512)
        for cdb, kw in (("28 00 00 00 00 00 00 00 01 00", {"data_in": 512}),
                        ("2a 00 00 00 00 08 00 00 01 00", {"data_out": payload})):
            rc, out = sg_raw(bad, cdb, **kw)  # type: ignore[arg-type]
            assert rc != 0
            check_condition(out, "not ready", "manual intervention required")
        assert _at(images / "bad-b.img", 8 * 512) == bytes(512), "a refused LUN wrote"

        # SIGHUP with a file that is still broken: logged, the running configuration kept
        broken = _doc(images, daemon, typo=True)
        broken["mirrors"][0]["region_size"] = 3000
        _write(cfg, broken)
        mark = len(daemon.log_text())
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        guest.wait_for(lambda: "keeping the running configuration" in daemon.log_text()[mark:],
                       timeout=30, what="the reload of a broken file to be refused")
        st = _status(daemon)
        assert st["op_bad"]["reason_code"] == "config" and st["op_good"]["state"] == "mirrored"
        assert guest.dd_read(good, 2 * MiB, MiB) == data

        # SIGHUP with the corrected file: op_bad is opened and serves, to both legs
        _write(cfg, _doc(images, daemon, typo=False))
        assert cli("validate", str(cfg)).stdout.startswith(f"{cfg}: valid: 2 mirrors")
        daemon.proc.send_signal(signal.SIGHUP)
        guest.wait_for(lambda: _status(daemon)["op_bad"]["state"] == "mirrored", timeout=60,
                       what="op_bad to be served after the reload")
        assert "reloaded: applied" in daemon.log_text()[mark:]
        assert daemon.ctl("status", "--check").returncode == 0
        rc, out = sg_raw(bad, "2a 00 00 00 00 08 00 00 01 00", data_out=payload)
        assert rc == 0, out
        for leg in ("a", "b"):
            assert _at(images / f"bad-{leg}.img", 8 * 512) == b"\x42" * 512, leg
        rc, out = sg_raw(bad, "28 00 00 00 00 08 00 00 01 00", data_in=512)
        assert rc == 0, out
        guest.iscsi_logout(IQN)
    finally:
        status = daemon.stop()
        text = daemon.log_text()
        print(f"--- targetmirrord log (exit status {status}) ---\n{text[-6000:]}")
    assert status == 0 and "Traceback" not in text


def test_bad_cli_input_is_one_line_and_changes_nothing(mirrord: Mirrord,
                                                       tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    host = guest.initiator_name()
    # someone's real export, with an ACL, that the bad inputs must not disturb
    cli("create", "op_keep", "--size", "16M", "--image-a", str(images / "keep-a.img"),
        "--image-b", str(images / "keep-b.img"), "--create-images", "--iqn", IQN,
        "--initiator", host)
    mirrord.wait_serving("op_keep")
    before, files = configfs_tree(), sorted(p.name for p in images.iterdir())

    def create(*extra: str) -> list[str]:
        return ["create", "op_x", "--size", "16M", "--image-a", str(images / "x-a.img"),
                "--image-b", str(images / "x-b.img"), "--create-images", *extra]

    iqn2 = f"{guest.IQN_PREFIX}:operator2"
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    busy_port = listener.getsockname()[1]
    cases = [
        (create("--iqn", iqn2, "--initiator", host, "--portal", "10.0.0.1"),
         "targetmirror: config: --portal 10.0.0.1: expected IP:PORT with a numeric IP"),
        (["create", "bad name!", "--size", "16M", "--image-a", str(images / "x-a.img"),
          "--image-b", str(images / "x-b.img"), "--create-images"],
         "targetmirror: config: name 'bad name!': expected a name of letters"),
        (create("--iqn", iqn2), f"targetmirror: config: --iqn {iqn2}: expected --initiator"),
        (create("--iqn", IQN, "--demo-mode", "--lun", "1"),
         f"targetmirror: config: target {IQN} TPG 1 has ACLs"),
        (create("--iqn", IQN, "--initiator", host),
         f"targetmirror: config: target {IQN} TPG 1 has a LUN 0 already"),
        # the kernel refuses the portal (its port is taken by another listener) after the
        # images, the backstore, the target and its TPG were made: all are taken back
        (create("--iqn", iqn2, "--initiator", host, "--portal", f"127.0.0.1:{busy_port}"),
         f"targetmirror: lio: exporting op_x as {iqn2} LUN 0 failed: "),
        # the daemon does not answer for --initial-sync after the backstore was made
        (create("--initial-sync", "--socket", str(tmp_path / "nope.sock")),
         f"targetmirror: device: cannot reach targetmirrord at {tmp_path}/nope.sock"),
        (["delete", "op_keep", "--iqn", iqn2],
         f"targetmirror: lio: no iSCSI target {iqn2} (nothing was deleted)"),
        (["status", "--socket", str(tmp_path / "nope.sock")],
         f"targetmirror: device: cannot reach targetmirrord at {tmp_path}/nope.sock"),
    ]
    try:
        _run_cases(cases, before, files, images)
    finally:
        listener.close()
    shell = mirrord.ctl_json("status")  # the daemon still serves the kept mirror
    assert {m["name"]: m["state"] for m in shell["mirrors"]} == {"op_keep": "mirrored"}
    listed = json.loads(cli("list", "--json").stdout)["mirrors"]
    assert [m["name"] for m in listed] == ["op_keep"]
    cli("delete", "op_keep", "--iqn", IQN)


def _run_cases(cases: list[tuple[list[str], str]], before: dict[str, str], files: list[str],
               images: Path) -> None:
    for argv, line in cases:
        proc = cli(*argv, check=False)
        print(f"$ targetmirror {' '.join(argv)}\n{proc.stderr}")
        assert proc.returncode == 1, (argv, proc.stdout, proc.stderr)
        assert proc.stderr.startswith(line) and proc.stderr.count("\n") == 1, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        assert configfs_tree() == before, f"LIO changed by: {argv}"
        assert sorted(p.name for p in images.iterdir()) == files, f"files changed by: {argv}"
