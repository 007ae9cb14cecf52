"""The Vagrant lab for real: a target VM and initiator VMs on a private network, iSCSI across it.

`vagrant up` (vagrant-libvirt, QEMU; software emulation where the host has no usable KVM) of the
project's own vagrant/Vagrantfile with the baked box of lab/vagrant/box.py, provisioned by the
project's own scripts, then every check from the initiators over the private network:

* the provisioning: the daemon serves before `apply`, the initiators (provisioned first, on
  purpose) waited for the target, their logins are automatic;
* ext4 + fio with verify on the mirrored LUN from initiator1; `split --group` under that load;
  initiator2 reads the split-off copy through a snapshot export (byte-equal to image A on the
  target, and its ext4 holds the file written before the split); backup; rejoin; A == B again;
* the target's state scraped from an initiator through the Prometheus endpoint;
* kill -9 of targetmirrord with fio running on an initiator: systemd restarts it (Type=notify,
  the unit's hardening in force), fio finishes with nothing lost or corrupt;
* demo.sh twice (idempotent).

Everything is torn down (`vagrant destroy -f`, libvirtd stopped by pid) whatever happens. The
time of each phase is printed and written to lab-out/vagrant/timings.json.

Skipped only where vagrant-libvirt cannot be installed (not root, no apt-get), with the reason;
with CI=true that is an error instead. TARGETMIRROR_VAGRANT_INITIATORS=1 brings up one
initiator (it then also reads the snapshot).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import pytest

from lab import REPO_ROOT, LabError
from lab.vagrant import box as vbox
from lab.vagrant import host

pytestmark = pytest.mark.vagrant

# As in vagrant/Vagrantfile.
TARGET_IP = "192.168.56.10"
PORTAL = f"{TARGET_IP}:3260"
IQN_BASE = "iqn.2026-01.org.targetmirror.vagrant"
TARGET_IQN = f"{IQN_BASE}:target"
SNAP_IQN = f"{IQN_BASE}:data-snap"
METRICS_URL = f"http://{TARGET_IP}:9745/metrics"
IMAGES = "/var/lib/targetmirror/images"
MNT = "/mnt/data"

N_INITIATORS = int(os.environ.get("TARGETMIRROR_VAGRANT_INITIATORS", "2"))
OUT = REPO_ROOT / "lab-out" / "vagrant"

T = TypeVar("T")


@dataclass
class Lab:
    vagrant: host.Vagrant
    initiators: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    notes: dict[str, object] = field(default_factory=dict)

    @property
    def reader(self) -> str:
        """The initiator that reads the snapshot export (the second one when there is one)."""
        return self.initiators[-1]

    def sh(self, machine: str, script: str, *, timeout: float = 600) -> str:
        return self.vagrant.ssh(machine, script, timeout=timeout).stdout

    def phase(self, name: str) -> object:
        return host.timed(self.timings, name)


def wait_until(check: Callable[[], T | None], *, timeout: float, what: str,
               interval: float = 2.0) -> T:
    """Poll an observable condition (a VM's state over ssh) until it holds, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _skip_or_fail(why: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Vagrant lab unavailable on a CI host (CI=true): {why}")
    pytest.skip(f"Vagrant lab unavailable: {why}")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    timings: dict[str, float] = {}
    with host.timed(timings, "host_packages"):
        why = host.install_host_deps()
    if why is not None:
        _skip_or_fail(why)
    OUT.mkdir(parents=True, exist_ok=True)
    # One Vagrant lab per host at a time: the VMs' names and networks are fixed.
    host.lab_root().mkdir(parents=True, exist_ok=True)
    lock = (host.lab_root() / ".lock").open("w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    started = time.monotonic()
    load_before = host.load_average()
    with host.timed(timings, "box_build"):
        box = vbox.ensure_box()
    libvirtd = host.Libvirtd(OUT / "libvirt")
    initiators = [f"initiator{i}" for i in range(1, N_INITIATORS + 1)]
    machines = ["target", *initiators]
    v = host.Vagrant(box, logfile=OUT / "vagrant.log")
    v.logfile.write_text("")
    lab = Lab(v, initiators, timings)
    try:
        with host.timed(timings, "libvirtd_start"):
            libvirtd.start()
        with host.timed(timings, "box_add"):
            v.destroy_leftovers()
            lab.notes["box_added"] = v.add_box()
            lab.notes["pool_seeded"] = v.seed_pool()
        # Boot all VMs in parallel (as `vagrant up` does), then provision the initiators
        # *before* the target, concurrently: they must wait for its portal.
        with host.timed(timings, "up_boot"):
            v.run(["up", "--no-provision", *machines], timeout=2400)
        v.write_ssh_config(machines)
        with host.timed(timings, "provision"):
            procs = {m: subprocess.Popen(["vagrant", "provision", m], env=v.env,
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True) for m in initiators}
            lab.notes["target_provision"] = v.run(["provision", "target"], timeout=1800).stdout
            for m, p in procs.items():
                out, _ = p.communicate(timeout=1800)
                with v.logfile.open("a") as fh:
                    fh.write(f"\n$ vagrant provision {m}\n{out}# status {p.returncode}\n")
                lab.notes[f"{m}_provision"] = out
                if p.returncode != 0:
                    raise LabError(f"vagrant provision {m} failed ({p.returncode})",
                                   "\n".join(out.splitlines()[-40:]))
        yield lab
    finally:
        with host.timed(timings, "destroy"):
            try:
                v.run(["destroy", "-f"], timeout=600, check=False)
            finally:
                libvirtd.stop()
        timings["total"] = round(time.monotonic() - started, 1)
        result = {"timings_s": timings, "initiators": len(initiators),
                  "load_before": load_before, "load_after": host.load_average(),
                  "box": box.digest, "box_build_s": box.timings(),
                  "notes": {k: v for k, v in lab.notes.items()
                            if not isinstance(v, str) or not k.endswith("_provision")}}
        (OUT / "timings.json").write_text(json.dumps(result, indent=2) + "\n")
        print("\nVagrant lab phases (s): " + ", ".join(f"{k} {t:.0f}" for k, t in
                                                    timings.items()))
        print(f"load average before {load_before}, after {host.load_average()}")
        lock.close()


def _disk(lab: Lab, machine: str, iqn: str, lun: int) -> str:
    """The block device of LUN ``lun`` of ``iqn`` on ``machine`` (udev's by-path link)."""
    link = f"/dev/disk/by-path/ip-{PORTAL}-iscsi-{iqn}-lun-{lun}"

    def find() -> str | None:
        out = lab.vagrant.ssh(machine, f"udevadm settle; readlink -f {link}", check=False)
        dev = out.stdout.strip()
        return dev if out.returncode == 0 and dev.startswith("/dev/sd") else None
    return wait_until(find, timeout=120, what=f"{link} on {machine}")


def _fio(size: str, name: str) -> str:
    """A fio job that writes at random with checksums and reads every block back (verify).

    No runtime cap: a job stopped by one skips its verify phase. verify_backlog reads back
    while writing, so the job mixes reads and writes for its whole life.
    """
    return (f"fio --name={name} --filename={MNT}/{name}.dat --size={size} --bs=16k "
            "--rw=randwrite --ioengine=libaio --iodepth=4 --direct=1 --verify=crc32c "
            "--verify_fatal=1 --do_verify=1 --verify_backlog=64 --output-format=json "
            f"--output=/var/tmp/{name}.json")


def _fio_result(lab: Lab, proc: subprocess.Popen[str], name: str) -> dict[str, object]:
    status = proc.wait(timeout=900)
    log = (OUT / f"{name}.out").read_text()
    report = lab.sh(lab.initiators[0], f"cat /var/tmp/{name}.json")
    assert status == 0, f"fio {name} failed on initiator1 ({status}): {log}\n{report[-3000:]}"
    job = json.loads(report[report.index("{"):])["jobs"][0]
    assert job["error"] == 0, f"fio {name}: error {job['error']}"
    written, read_back = int(job["write"]["io_bytes"]), int(job["read"]["io_bytes"])
    assert written > 0, f"fio {name} wrote nothing"
    # Every block written was read back and its checksum checked.
    assert read_back >= written, f"fio {name}: verified {read_back} of {written} bytes"
    return {"written": written, "read_back": read_back}


def _fio_running(lab: Lab, name: str) -> bool:
    out = lab.vagrant.ssh(lab.initiators[0], f"pgrep -f 'fio --name={name}' >/dev/null && "
                          f"test -s {MNT}/{name}.dat", check=False)
    return out.returncode == 0


def _status(lab: Lab) -> dict[str, str]:
    out = lab.sh("target", "targetmirror status --json")
    return {m["name"]: m["state"] for m in json.loads(out)["mirrors"]}


def _span_s(text: str) -> float:
    """A systemd time span as `systemctl show` prints it ("0", "30s", "1min 30s", "500ms")."""
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
    total = 0.0
    for num, unit in re.findall(r"(\d+(?:\.\d+)?)\s*(us|ms|min|s|h)?", text):
        total += float(num) * units[unit or "us"]
    return total


def _sha(lab: Lab, machine: str, path: str) -> str:
    return lab.sh(machine, f"sha256sum {path}").split()[0]


# --------------------------------------------------------------------------- the checks


def test_provisioned_daemon_before_apply_and_logins_automatic(lab: Lab) -> None:
    with lab.phase("check_provisioned"):
        out = str(lab.notes["target_provision"])
        assert "applied" in out or "nothing to change" in out, out[-2000:]
        unit = lab.sh("target", "systemctl show targetmirrord -p ActiveState -p Type "
                      "-p SubState")
        assert "ActiveState=active" in unit and "Type=notify" in unit, unit
        assert _status(lab) == {"data": "mirrored", "logs": "mirrored"}
        # The initiators were provisioned before the target: they had to wait for it.
        for m in lab.initiators:
            log = str(lab.notes[f"{m}_provision"])
            assert "waiting for " + TARGET_IQN in log, log[-2000:]
            assert "logged in to " + TARGET_IQN in log, log[-2000:]
            sessions = lab.sh(m, "iscsiadm -m session")
            assert f"{PORTAL},1 {TARGET_IQN}" in sessions, sessions
            node = lab.sh(m, f"iscsiadm -m node -T {TARGET_IQN} -p {PORTAL}")
            assert re.search(r"^node\.startup = automatic$", node, re.M), node
            for lun in (0, 1):
                _disk(lab, m, TARGET_IQN, lun)
        # Where a VM's boot goes under software emulation (for the closing numbers).
        lab.notes["boot_target"] = lab.vagrant.ssh("target", "systemd-analyze; systemd-analyze "
                                                   "blame --no-pager | head -8",
                                                   check=False).stdout
        # A second run of each script changes nothing and succeeds.
        lab.vagrant.run(["provision", "target", lab.initiators[0]], timeout=1200)
        assert _status(lab) == {"data": "mirrored", "logs": "mirrored"}


def test_split_under_fio_snapshot_read_over_network_backup_rejoin(lab: Lab) -> None:
    i1 = lab.initiators[0]
    with lab.phase("check_split_snapshot_backup_rejoin"):
        dev = _disk(lab, i1, TARGET_IQN, 0)
        lab.sh(i1, f"""set -e
            mkfs.ext4 -q -F -E lazy_itable_init=0,lazy_journal_init=0 {dev}
            mkdir -p {MNT} && mount {dev} {MNT}
            head -c 4194304 /dev/urandom > {MNT}/before-split.bin
            sync""")
        marker = _sha(lab, i1, f"{MNT}/before-split.bin")
        fio = lab.vagrant.spawn(i1, _fio("48M", "split"), OUT / "split.out")
        try:
            wait_until(lambda: _fio_running(lab, "split"), timeout=300, what="fio writing")
            out = lab.sh("target", "targetmirror split --group app")
            assert _fio_running(lab, "split"), "fio had finished before the split: no load"
            lab.notes["split"] = out.strip()
            assert _status(lab) == {"data": "split", "logs": "split"}
            lab.sh("target", f"targetmirror export-snapshot data --iqn {SNAP_IQN} "
                   f"--portal {PORTAL} --initiator {IQN_BASE}:{lab.reader}")
            # The split-off copy, read over the network by the other initiator...
            reader = lab.reader
            lab.sh(reader, f"""set -e
                iscsiadm -m discovery -t sendtargets -p {PORTAL} >/dev/null
                iscsiadm -m node -T {SNAP_IQN} -p {PORTAL} --login""")
            snap = _disk(lab, reader, SNAP_IQN, 0)
            lab.sh(reader, f"dd if={snap} of=/var/tmp/snap.img bs=1M iflag=direct status=none",
                   timeout=900)
            snap_sha = _sha(lab, reader, "/var/tmp/snap.img")
            # ... is image A on the target, byte for byte (A is frozen while split) ...
            assert snap_sha == _sha(lab, "target", f"{IMAGES}/data-a.img")
            # ... and a crash-consistent ext4 with the file written before the split.
            fsck = lab.vagrant.ssh(reader, "e2fsck -fy /var/tmp/snap.img", check=False)
            assert fsck.returncode in (0, 1), f"e2fsck: {fsck.returncode}\n{fsck.stdout}"
            lab.sh(reader, "mkdir -p /mnt/snap && mount -o loop,ro /var/tmp/snap.img /mnt/snap")
            assert _sha(lab, reader, "/mnt/snap/before-split.bin") == marker
            lab.sh(reader, f"""set -e
                umount /mnt/snap; rm -f /var/tmp/snap.img
                iscsiadm -m node -T {SNAP_IQN} -p {PORTAL} --logout
                iscsiadm -m node -T {SNAP_IQN} -p {PORTAL} -o delete""")
            lab.sh("target", f"targetmirror delete data_snap --iqn {SNAP_IQN}")
        finally:
            lab.notes["fio_split"] = _fio_result(lab, fio, "split")
        lab.sh("target", "targetmirror backup data --to /var/tmp/data-backup.img", timeout=900)
        assert _sha(lab, "target", "/var/tmp/data-backup.img") == snap_sha
        out = lab.sh("target", "targetmirror rejoin --group app", timeout=1800)
        lab.notes["rejoin"] = out.strip()
        assert _status(lab) == {"data": "mirrored", "logs": "mirrored"}
        lab.sh(i1, f"umount {MNT}")
        lab.sh("target", "targetmirror verify data", timeout=900)
        assert _sha(lab, "target", f"{IMAGES}/data-a.img") == \
            _sha(lab, "target", f"{IMAGES}/data-b.img")


def _samples(text: str, metric: str) -> list[tuple[dict[str, str], float]]:
    """The samples of ``metric`` in a Prometheus text exposition: (labels, value)."""
    out = []
    for labels, value in re.findall(rf"^{metric}\{{([^}}]*)\}} (\S+)$", text, re.M):
        out.append((dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return out


def test_status_and_metrics_scraped_over_network(lab: Lab) -> None:
    with lab.phase("check_metrics"):
        status = lab.sh("target", "targetmirror status")
        assert "data" in status and "mirrored" in status, status
        scrape = ("python3 -c 'import sys, urllib.request; "
                  f'sys.stdout.write(urllib.request.urlopen("{METRICS_URL}", timeout=30)'
                  ".read().decode())'")
        for m in lab.initiators:
            text = lab.sh(m, scrape)
            # A Prometheus state set: the state's label is named after the metric
            # (prometheus_client's StateSetMetricFamily), not "state" as docs/metrics.md says.
            states = {(lb["mirror"], lb.get("state") or lb.get("targetmirror_mirror_state")): v
                      for lb, v in _samples(text, "targetmirror_mirror_state")}
            assert states.get(("data", "mirrored")) == 1 and \
                states.get(("logs", "mirrored")) == 1, f"from {m}: {states}"
            writes = [v for lb, v in _samples(text, "targetmirror_commands_total")
                      if lb.get("mirror") == "data" and lb.get("direction") == "write"]
            assert writes and max(writes) > 0, f"from {m}: no writes counted for data"


def test_kill9_daemon_under_fio_systemd_restarts_it(lab: Lab) -> None:
    i1 = lab.initiators[0]
    props = "-p MainPID -p NRestarts -p ActiveState -p Type -p WatchdogUSec -p NoNewPrivileges"

    def show() -> dict[str, str]:
        out = lab.sh("target", f"systemctl show targetmirrord {props}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    with lab.phase("check_kill9_restart"):
        dev = _disk(lab, i1, TARGET_IQN, 0)
        lab.sh(i1, f"mount {dev} {MNT}")
        before = show()
        assert before["ActiveState"] == "active" and before["Type"] == "notify", before
        fio = lab.vagrant.spawn(i1, _fio("32M", "kill9"), OUT / "kill9.out")
        try:
            wait_until(lambda: _fio_running(lab, "kill9"), timeout=300, what="fio writing")
            t0 = time.monotonic()
            lab.sh("target", f"kill -9 {before['MainPID']}")

            def restarted() -> dict[str, str] | None:
                now = show()
                return now if now["ActiveState"] == "active" and now["MainPID"] not in (
                    "0", before["MainPID"]) else None
            after = wait_until(restarted, timeout=300, what="systemd to restart targetmirrord")
            lab.notes["restart_s"] = round(time.monotonic() - t0, 1)
            assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1, (before, after)
        finally:
            lab.notes["fio_kill9"] = _fio_result(lab, fio, "kill9")
        pid = after["MainPID"]
        proc_status = lab.sh("target", f"cat /proc/{pid}/status")
        assert re.search(r"^NoNewPrivs:\s+1$", proc_status, re.M), proc_status
        watchdog_s = _span_s(after.get("WatchdogUSec", "0"))
        lab.notes["watchdog"] = after.get("WatchdogUSec")
        security = lab.vagrant.ssh("target", "systemd-analyze security targetmirrord "
                                   "--no-pager | tail -1", check=False).stdout.strip()
        lab.notes["systemd_analyze_security"] = security
        lab.sh(i1, f"umount {MNT}")
        assert _status(lab) == {"data": "mirrored", "logs": "mirrored"}
        if watchdog_s > 0:
            # The daemon keeps the watchdog fed: it outlives its period without a restart.
            wait_s = watchdog_s * 1.5
            up = lab.sh("target", f"sleep {wait_s:.0f}; systemctl show targetmirrord "
                        "-p MainPID -p NRestarts", timeout=wait_s + 120)
            assert f"MainPID={pid}" in up and f"NRestarts={after['NRestarts']}" in up, up
        journal = lab.sh("target", "journalctl -u targetmirrord --no-pager -o cat | tail -40")
        assert "SIGKILL" in journal or "status=9/KILL" in journal or "killed" in journal, journal


def test_demo_script_twice(lab: Lab) -> None:
    with lab.phase("check_demo_twice"):
        for _ in range(2):
            out = lab.sh("target", "sh /vagrant/vagrant/provision/demo.sh", timeout=900)
            assert "split-off copy of data saved as" in out, out
        assert _status(lab) == {"data": "mirrored", "logs": "mirrored"}
        backups = lab.sh("target", "ls /var/tmp/data-2*.img").split()
        assert len(backups) == 2, backups
