"""The management face against the real kernel, in one boot: two mirrors in a consistency group
exported over iSCSI; the shell and the CLI agree; a split, a backup and a rejoin run from the
shell (one-shot mode) and are checked by the bytes on the images; Prometheus metrics show the
split; targetcli lists and creates ``user:mirror`` over D-Bus -- once with the daemon owning
``org.kernel.TCMUService1``, once registered through tcmu-runner's HandlerManager1 -- and
``saveconfig`` / ``clearconfig`` / ``restoreconfig`` keep our backstores working."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.lab import guest
from tests.lab.mirrord import REPO, Mirrord, python_env
from tests.lab.test_lab_mirror import Lun

pytestmark = pytest.mark.lab

MiB = guest.MiB
METRICS = "127.0.0.1:9745"
SYSTEM_BUS = Path("/run/dbus/system_bus_socket")


def shell(daemon: Mirrord, *words: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """``targetmirror-shell --socket S WORDS`` one-shot, as an admin's script would run it."""
    proc = subprocess.run([sys.executable, "-m", "targetmirror.shell.main", "--socket",
                           daemon.socket, *words], cwd=REPO, env=python_env(),
                          capture_output=True, text=True, timeout=600, check=False)
    if check and proc.returncode != 0:
        raise guest.GuestError(f"targetmirror-shell {' '.join(words)} failed "
                               f"({proc.returncode}): {proc.stderr.strip()}")
    return proc


def targetcli(*words: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return guest.run(["targetcli", *words], check=check, timeout=300)


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    # curl is not in the guest image; urllib is the same HTTP GET
    with urllib.request.urlopen(f"http://{METRICS}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def _read(path: Path, offset: int, n: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(n)


def start_system_bus() -> int:
    """A system dbus-daemon (the guest has no systemd), with our policy installed."""
    guest.run(["dbus-uuidgen", "--ensure"])
    Path("/run/dbus").mkdir(parents=True, exist_ok=True)
    for stale in (Path("/run/dbus/pid"), SYSTEM_BUS):  # left by an earlier bus in this boot
        stale.unlink(missing_ok=True)
    policy_dir = Path("/etc/dbus-1/system.d")
    policy_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "etc" / "dbus-1" / "targetmirror.conf", policy_dir / "targetmirror.conf")
    out = guest.run(["dbus-daemon", "--system", "--fork", "--print-pid"]).stdout
    guest.wait_for(SYSTEM_BUS.exists, timeout=30, what="the system bus socket")
    return int(out.split()[0])


def restart(daemon: Mirrord, expect: str) -> None:
    assert daemon.stop() == 0
    mark = len(daemon.log_text())
    daemon.start()
    guest.wait_for(lambda: expect in daemon.log_text()[mark:], timeout=60,
                   what=f"targetmirrord to log {expect!r}")


def make_images(tmp_path: Path, name: str, size: int) -> str:
    paths = []
    for leg in ("a", "b"):
        p = tmp_path / f"{name}-{leg}.img"
        with p.open("wb") as f:
            f.truncate(size)
        paths.append(str(p))
    return f"a={paths[0]};b={paths[1]}"


def test_face_shell_metrics_targetcli(mirrord: Mirrord, tmp_path: Path) -> None:
    bus_pid = start_system_bus()
    try:
        _run(mirrord, tmp_path)
    finally:
        stop_system_bus(bus_pid)


def _exited(pid: int) -> bool:
    """Gone, or a zombie nobody reaps (it was daemonized under the lab's init)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def stop_system_bus(pid: int) -> None:
    os.kill(pid, 15)
    guest.wait_for(lambda: _exited(pid), timeout=30, what="dbus-daemon to exit")
    for path in (Path("/run/dbus/pid"), SYSTEM_BUS):
        path.unlink(missing_ok=True)


def _run(mirrord: Mirrord, tmp_path: Path) -> None:
    mirrord.extra_args = ["--metrics-address", METRICS]
    restart(mirrord, "D-Bus: serving org.kernel.TCMUService1")

    # -- two mirrors in a group, exported, an initiator logged in -----------------------------
    l0 = Lun("f0", tmp_path, 32 * MiB, mirrord)
    l1 = Lun("f1", tmp_path, 32 * MiB, mirrord)
    mirrord.ctl("group", "create", "fg", "f0", "f1")
    d0, d1 = os.urandom(MiB), os.urandom(MiB)
    guest.dd_write(l0.dev, 0, d0)
    guest.dd_write(l1.dev, 0, d1)

    # -- the shell and the CLI show the same state --------------------------------------------
    ls = shell(mirrord, "ls").stdout
    print(ls)
    assert "f0" in ls and "f1" in ls and "mirrored, epoch 0" in ls
    assert "f0:mirrored f1:mirrored" in ls
    exports = shell(mirrord, "/exports", "status").stdout
    assert f"{l0.iqn} lun0 -> user:mirror/f0" in exports
    for name in ("f0", "f1"):
        from_shell = json.loads(shell(mirrord, f"/mirrors/{name}", "status", "json=true").stdout)
        from_cli = mirrord.ctl_json("status", name)["mirrors"][0]
        for key in ("state", "epoch", "split", "image_a", "image_b", "size"):
            assert from_shell[key] == from_cli[key], key
        # The write-intent clear pass may run between the two reads (marked and syncs move
        # on their own once the writes stop); the bitmap's shape may not.
        for key in ("region_size", "regions"):
            assert from_shell["bitmap"][key] == from_cli["bitmap"][key], key

    before = scrape()
    epoch0 = metric(before, "targetmirror_mirror_epoch", mirror="f0")
    a_bytes0 = metric(before, "targetmirror_bytes_total", mirror="f0", direction="write",
                      leg="a")
    assert a_bytes0 >= MiB
    assert metric(before, "targetmirror_mirror_state", mirror="f0",
                  state="mirrored") == 1

    # -- split the group from the shell, write on, back up, metrics show it --------------------
    out = shell(mirrord, "/groups/fg", "split").stdout
    assert out.count("consistent") >= 2
    a0, a1 = os.urandom(MiB), os.urandom(MiB)
    guest.dd_write(l0.dev, 0, a0)                 # post-split: B only
    guest.dd_write(l1.dev, 2 * MiB, a1)
    assert _read(l0.a, 0, MiB) == d0 and _read(l0.b, 0, MiB) == a0
    assert _read(l1.a, 0, MiB) == d1 and _read(l1.a, 2 * MiB, MiB) != a1

    dest = tmp_path / "f0-backup.img"
    out = shell(mirrord, "/mirrors/f0", "backup", f"to={dest}").stdout
    assert "backed up f0" in out and "stays split" in out
    assert _read(dest, 0, MiB) == d0 and dest.stat().st_size == l0.size

    s = scrape()
    assert metric(s, "targetmirror_mirror_state", mirror="f0",
                  state="split") == 1
    assert metric(s, "targetmirror_mirror_epoch", mirror="f0") == epoch0 + 1
    assert metric(s, "targetmirror_leg_state", mirror="f0", leg="a",
                  state="frozen") == 1
    assert metric(s, "targetmirror_bitmap_dirty_regions", mirror="f0") >= 1
    assert metric(s, "targetmirror_bytes_total", mirror="f0", direction="write",
                  leg="b") >= metric(s, "targetmirror_bytes_total", mirror="f0",
                                     direction="write", leg="a") + MiB
    assert metric(s, "targetmirror_commands_total", mirror="f0", direction="write") > \
        metric(before, "targetmirror_commands_total", mirror="f0", direction="write")
    assert metric(s, "targetmirror_split_info", mirror="f0", a_status="consistent",
                  epoch=str(int(epoch0 + 1))) == 1
    print(f"metrics: f0 write commands {metric(s, 'targetmirror_commands_total', mirror='f0', direction='write')}, "  # noqa: E501
          f"latency count {metric(s, 'targetmirror_command_latency_seconds_count', mirror='f0', direction='write')}")  # noqa: E501

    # -- rejoin from the shell ---------------------------------------------------------------------
    out = shell(mirrord, "/groups/fg", "rejoin").stdout
    assert out.count("mirrored again") == 2
    assert l0.images_identical() and l1.images_identical()
    assert _read(l0.a, 0, MiB) == a0 and _read(l1.a, 2 * MiB, MiB) == a1
    s = scrape()
    assert metric(s, "targetmirror_mirror_state", mirror="f0",
                  state="mirrored") == 1
    assert metric(s, "targetmirror_bitmap_dirty_regions", mirror="f0") == 0

    # -- targetcli, we own org.kernel.TCMUService1 ---------------------------------------------
    listing = targetcli("ls", "/backstores").stdout
    print(listing)
    assert "user:mirror" in listing
    cfg0 = make_images(tmp_path, "tc0", 16 * MiB)
    bad = targetcli("/backstores/user:mirror", "create", "name=tcbad", "size=16M",
                    "cfgstring=a=/nope-a.img;b=/nope-b.img", check=False)
    assert "cfgstring invalid" in bad.stdout + bad.stderr
    assert "tcbad" not in targetcli("ls", "/backstores").stdout
    targetcli("/backstores/user:mirror", "create", "name=tc0", "size=16M", f"cfgstring={cfg0}",
              "hw_max_sectors=2048")
    mirrord.wait_serving("tc0")
    assert "tc0" in targetcli("ls", "/backstores/user:mirror").stdout
    assert mirrord.ctl_json("status", "tc0")["mirrors"][0]["state"] == "mirrored"

    # -- saveconfig, clearconfig, restoreconfig: our settings and our data come back -------------
    l0.logout()
    l1.logout()
    saved = tmp_path / "saveconfig.json"
    targetcli("saveconfig", f"savefile={saved}")
    conf = json.loads(saved.read_text())
    sos = {so["name"]: so for so in conf["storage_objects"]}
    assert sos["tc0"]["config"] == f"mirror/{cfg0}" and sos["tc0"]["hw_max_sectors"] == 2048
    assert sos["f0"]["config"].startswith("mirror/a=") and sos["f0"]["size"] == 32 * MiB
    assert sos["f0"]["hw_max_sectors"] == 2048
    mark = len(mirrord.log_text())
    targetcli("clearconfig", "confirm=True")
    guest.wait_for(lambda: "stopped serving f0" in mirrord.log_text()[mark:], timeout=60,
                   what="the daemon to let go of f0")
    targetcli("restoreconfig", str(saved))
    guest.wait_for(lambda: _all_served(mirrord), timeout=60,
                   what="the daemon to serve the restored backstores")
    st = mirrord.ctl_json("status", "f0")["mirrors"][0]
    assert st["state"] == "mirrored" and st["epoch"] == epoch0 + 2   # durable state kept
    l0.login()
    assert guest.dd_read(l0.dev, 0, MiB) == a0                         # and the data
    l0.logout()

    # -- targetcli with tcmu-runner running: we register through its HandlerManager1 ------------
    runner = guest.TcmuRunner(tmp_path / "tcmu-runner-log")
    assert mirrord.stop() == 0
    runner.start()
    try:
        guest.wait_for(lambda: _bus_has("org.kernel.TCMUService1"), timeout=60,
                       what="tcmu-runner to own org.kernel.TCMUService1")
        restart_mark = len(mirrord.log_text())
        mirrord.start()
        guest.wait_for(lambda: "registered user:mirror with tcmu-runner" in
                       mirrord.log_text()[restart_mark:], timeout=60,
                       what="RegisterHandler to succeed")
        listing = targetcli("ls", "/backstores").stdout
        print(listing)
        assert "user:mirror" in listing
        cfg1 = make_images(tmp_path, "tc1", 16 * MiB)
        bad = targetcli("/backstores/user:mirror", "create", "name=tcbad", "size=16M",
                        "cfgstring=a=/nope-a.img;b=/nope-b.img",
                        "control=nl_reply_supported=-1", check=False)
        assert "cfgstring invalid" in bad.stdout + bad.stderr   # forwarded CheckConfig
        # tcmu-runner answers the enable of a subtype it does not know with -ENOENT, so a
        # user:mirror made while it runs carries nl_reply_supported=-1 (docs/systemd.md)
        targetcli("/backstores/user:mirror", "create", "name=tc1", "size=16M",
                  f"cfgstring={cfg1}", "hw_max_sectors=2048", "control=nl_reply_supported=-1")
        mirrord.wait_serving("tc1")
        assert mirrord.ctl_json("status", "tc1")["mirrors"][0]["state"] == "mirrored"
        assert "tc1" in targetcli("ls", "/backstores/user:mirror").stdout
    finally:
        # Delete our backstores while the daemon still answers netlink: restored ones lack
        # nl_reply_supported=-1, and tcmu-runner has run, so the kernel waits for a reply.
        if mirrord.alive():
            targetcli("clearconfig", "confirm=True", check=False)
        status = runner.stop()
        print(f"--- tcmu-runner (exit {status}) ---\n{runner.log_text()[-3000:]}")


def _bus_has(name: str) -> bool:
    from jeepney import new_method_call
    from jeepney.bus_messages import message_bus
    from jeepney.io.blocking import open_dbus_connection

    with open_dbus_connection(bus="SYSTEM") as conn:
        reply = conn.send_and_get_reply(new_method_call(message_bus, "NameHasOwner", "s",
                                                        (name,)), timeout=10)
    return bool(reply.body[0])


def _all_served(daemon: Mirrord) -> bool:
    try:
        names = {m["name"] for m in daemon.ctl_json("status")["mirrors"]}
    except guest.GuestError:
        return False
    return {"f0", "f1", "tc0"} <= names
