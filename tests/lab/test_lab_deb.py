"""The Debian package, installed in the guest, serving a real initiator through two "reboots".

``dev/deb.sh`` builds ``build/deb/targetmirror_*.deb`` on the host (dev/test.sh does it before
pytest); the guest installs it from the repository share with ``dpkg -i`` (no network: every
dependency is in the lab image) and from then on runs only the installed commands
(``/usr/bin/targetmirrord``, ``/usr/bin/targetmirror``), never the source tree.

The guest has no systemd, so this test plays the boot sequence the unit's ordering implies,
reading the installed unit file (``UnitRun``):

1. ``rtslib-fb-targetctl.service``: ``targetctl restore`` (it clears LIO first);
2. ``modprobe@target_core_user`` / ``modprobe@iscsi_target_mod`` (the unit's Wants=);
3. targetmirrord.service: its State/RuntimeDirectory with their modes, its UMask, systemd's
   environment (no PYTHONPATH; NOTIFY_SOCKET and WATCHDOG_USEC from WatchdogSec, answered by
   this test as systemd would), and its sandbox as far as the kernel's own tools rebuild it
   (``tests/lab/sandbox.py``: the mount namespace of ProtectSystem=strict & co., the
   capability bounding set and no-new-privileges through setpriv, the system call filter,
   address families and W^X through seccomp); then its ExecStart, which applies
   /etc/targetmirror/targetmirror.yaml. The installed unit also passes the guest's own
   ``systemd-analyze verify``.

A shutdown is the reverse: targetmirrord stops (SIGTERM), then ``targetctl clear``. Both ways of
a boot are proven: (a) saveconfig.json has our objects too (the restore makes them, apply finds
nothing to change); (b) it does not (apply makes them again). Either way the LUNs are served by
the installed daemon, another owner's saved objects survive, and the initiator reads back what
it wrote before the "reboot". What sandbox.py cannot rebuild (the device policy, ProtectProc,
RestrictNamespaces, ...) is proven under a real systemd by the Vagrant VMs; the unit's rating by
tests/test_systemd_unit.py (systemd-analyze security).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.lab import guest

pytestmark = pytest.mark.lab

MiB = guest.MiB
REPO = Path(__file__).resolve().parents[2]
UNIT_PATH = Path("/lib/systemd/system/targetmirrord.service")
CONFIG_PATH = Path("/etc/targetmirror/targetmirror.yaml")
STATE_DIR = Path("/var/lib/targetmirror")
IMAGES = STATE_DIR / "images"  # the default image directory: writable inside the sandbox
#: where this test plays systemd (/tmp is private to the unit, as /run/systemd is not)
SYSTEMD_RUN = Path("/run/tm-lab-systemd")
SANDBOX = Path(__file__).resolve().parent / "sandbox.py"
PORTAL = f"{guest.PORTAL_IP}:{guest.PORTAL_PORT}"
IQN = f"{guest.IQN_PREFIX}:deb"
OTHER_IQN = f"{guest.IQN_PREFIX}:other"
#: systemd's environment for a system service (no PYTHONPATH: the installed package only)
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: capability numbers (linux/capability.h) of those the unit may keep
CAP_BITS = {"CAP_NET_ADMIN": 12, "CAP_SYS_ADMIN": 21}


def installed_env(**extra: str) -> dict[str, str]:
    return {"PATH": SYSTEMD_PATH, "LANG": "C.UTF-8", **extra}


def tm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """The installed ``targetmirror`` command."""
    proc = subprocess.run(["/usr/bin/targetmirror", *args], env=installed_env(),
                          capture_output=True, text=True, timeout=180, check=False)
    if check and proc.returncode != 0:
        raise guest.GuestError(f"targetmirror {shlex.join(args)}: {proc.stderr}")
    return proc


class Unit:
    """The keys of an installed unit file (a key may repeat; an empty value resets it)."""

    def __init__(self, path: Path) -> None:
        self.keys: dict[tuple[str, str], list[str]] = {}
        section = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            values = self.keys.setdefault((section, key.strip()), [])
            if value.strip():
                values.append(value.strip())
            else:
                values.clear()

    def get(self, section: str, key: str) -> list[str]:
        return self.keys.get((section, key), [])

    def one(self, section: str, key: str) -> str:
        (value,) = self.get(section, key)
        return value

    def words(self, section: str, key: str) -> list[str]:
        return [w for v in self.get(section, key) for w in v.split()]


def _cap_bits(names: list[str]) -> list[str]:
    return [n.removeprefix("CAP_").lower() for n in names]


def expand_syscalls(group: str, seen: set[str] | None = None) -> set[str]:
    """The system calls of a systemd group, nested groups included (systemd-analyze)."""
    seen = set() if seen is None else seen
    out = guest.run(["systemd-analyze", "syscall-filter", "--no-pager", group]).stdout
    names: set[str] = set()
    for line in out.splitlines()[1:]:
        word = line.strip()
        if not word or word.startswith("#"):
            continue
        if word.startswith("@"):
            if word not in seen:
                seen.add(word)
                names |= expand_syscalls(word, seen)
        else:
            names.add(word)
    return names


def sandbox_spec(unit: Unit) -> dict[str, Any]:
    """What tests/lab/sandbox.py rebuilds of the unit's [Service] sandbox."""
    import errno as errnos

    def yes(key: str) -> bool:
        return unit.one("Service", key) == "yes"

    syscalls: set[str] = set()
    for entry in unit.get("Service", "SystemCallFilter"):
        deny = entry.startswith("~")
        names = set().union(*(expand_syscalls(g) if g.startswith("@") else {g}
                              for g in entry.lstrip("~").split()))
        syscalls = syscalls - names if deny else syscalls | names
    assert unit.one("Service", "ProtectSystem") == "strict"
    assert unit.one("Service", "SystemCallArchitectures") == "native"
    inaccessible = []
    if yes("ProtectHome"):
        inaccessible += ["/home", "/root", "/run/user"]
    if yes("ProtectKernelModules"):
        inaccessible += ["/usr/lib/modules"]
    return {
        # "-": skipped when missing, as systemd does
        "writable": [*(p.lstrip("-") for p in unit.words("Service", "ReadWritePaths")
                       if not p.startswith("-") or os.path.exists(p[1:])),
                     *(f"/var/lib/{d}" for d in unit.words("Service", "StateDirectory")),
                     *(f"/run/{d}" for d in unit.words("Service", "RuntimeDirectory"))],
        "protect_kernel_tunables": yes("ProtectKernelTunables"),
        "private_tmp": yes("PrivateTmp"),
        "inaccessible": inaccessible,
        "capabilities": _cap_bits(unit.words("Service", "CapabilityBoundingSet")),
        "no_new_privileges": yes("NoNewPrivileges"),
        "syscalls": sorted(syscalls),
        "errno": getattr(errnos, unit.one("Service", "SystemCallErrorNumber")),
        "address_families": [getattr(socket, f) for f in
                             unit.words("Service", "RestrictAddressFamilies")],
        "memory_deny_write_execute": yes("MemoryDenyWriteExecute"),
    }


class UnitRun:
    """targetmirrord started the way systemd starts the installed unit (see the docstring)."""

    def __init__(self, unit: Unit, log_path: Path) -> None:
        self.unit = unit
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        SYSTEMD_RUN.mkdir(mode=0o700, exist_ok=True)
        self.notify_path = SYSTEMD_RUN / "notify"
        self.spec_path = SYSTEMD_RUN / "sandbox.json"
        self.notify: socket.socket | None = None
        self.messages: list[str] = []

    def boot_dependencies(self) -> None:
        """What the unit pulls in before it starts: modprobe@X.service for each X."""
        for dep in self.unit.words("Unit", "Wants"):
            if dep.startswith("modprobe@") and dep.endswith(".service"):
                module = dep.removeprefix("modprobe@").removesuffix(".service")
                guest.run(["modprobe", "-abq", module])  # modprobe@.service's ExecStart
        assert "sys-kernel-config.mount" in self.unit.words("Unit", "Requires")
        assert os.path.ismount("/sys/kernel/config")

    def _directories(self) -> None:
        for key, base in (("StateDirectory", "/var/lib"), ("RuntimeDirectory", "/run")):
            mode = int(self.unit.one("Service", key + "Mode"), 8)
            for name in self.unit.words("Service", key):
                path = Path(base) / name
                path.mkdir(parents=True, exist_ok=True)
                os.chmod(path, mode)  # systemd also fixes the mode of an existing one

    def start(self) -> None:
        s = self.unit
        assert s.one("Service", "Type") == "notify"
        self._directories()
        for pre in s.get("Service", "ExecStartPre"):
            # only "+" commands so far: systemd runs them outside the sandbox, as root
            assert pre.startswith("+"), pre
            guest.run(shlex.split(pre[1:]), timeout=60)
        # systemd sets up the namespace of each command when it starts it (after ExecStartPre)
        self.spec_path.write_text(json.dumps(sandbox_spec(s)))
        argv = shlex.split(s.one("Service", "ExecStart"))
        assert argv[0] == "/usr/bin/targetmirrord"
        wrap = ["unshare", "--mount", "--propagation", "private", "--", "/usr/bin/python3",
                str(SANDBOX), "mounts", str(self.spec_path), "--"]
        umask = int(s.one("Service", "UMask"), 8)
        watchdog_usec = int(s.one("Service", "WatchdogSec")) * 1_000_000
        if self.notify is None:
            self.notify_path.unlink(missing_ok=True)
            self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.notify.bind(str(self.notify_path))
        self.messages = []
        env = installed_env(NOTIFY_SOCKET=str(self.notify_path),
                            WATCHDOG_USEC=str(watchdog_usec))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([*wrap, *argv], env=env, stdout=log,
                                         stderr=subprocess.STDOUT, cwd="/",
                                         preexec_fn=lambda: os.umask(umask))
        self.expect("READY=1", timeout=300)  # TimeoutStartSec

    def expect(self, prefix: str, *, timeout: float) -> str:
        """Wait for the daemon's next sd_notify datagram that starts with ``prefix``."""
        assert self.notify is not None and self.proc is not None
        self.notify.settimeout(1.0)
        deadline = time.monotonic() + timeout
        while True:
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                exited = self.proc.poll()
                if exited is None and time.monotonic() < deadline:
                    continue
                why = f"it exited with {exited}" if exited is not None else f"{timeout} s"
                raise guest.GuestError(f"no {prefix} from targetmirrord ({why}):\n"
                                       f"{self.log()[-3000:]}") from None
            self.messages.append(msg)
            if msg.startswith(prefix):
                return msg

    def capabilities(self) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
        raise AssertionError("no CapEff")

    def stop(self) -> int:
        """systemctl stop: SIGTERM (KillSignal), then the exit status."""
        assert self.proc is not None
        assert self.unit.one("Service", "KillSignal") == "SIGTERM"
        self.proc.send_signal(signal.SIGTERM)
        status = self.proc.wait(int(self.unit.one("Service", "TimeoutStopSec")))
        self.expect("STOPPING=1", timeout=5)
        return status

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def reset_netlink_features() -> None:
    """A fresh boot: no process has told TCM-USER that it answers netlink events.

    tcmu-runner (which other lab tests run in this same boot) sets a module-global flag with
    SET_FEATURES; from then on the kernel waits for a netlink reply on every enable of a device
    without nl_reply_supported=-1 -- which rtslib does not save, so ``targetctl restore`` would
    hang before targetmirrord runs. At a real boot the flag is clear; put it back.
    """
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST

    from targetmirror.tcmu import layout as L
    from targetmirror.tcmu.netlink import NETLINK_GENERIC, TcmuGenlMessage, resolve_family

    family_id, _ = resolve_family()
    msg = TcmuGenlMessage()
    msg["cmd"] = L.CMD_SET_FEATURES
    msg["version"] = L.GENL_VERSION
    msg["attrs"] = [("TCMU_ATTR_SUPP_KERN_CMD_REPLY", 0)]
    msg["header"]["type"] = family_id
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg.encode()
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_GENERIC) as s:
        s.bind((0, 0))
        s.settimeout(10)
        s.send(bytes(msg.data))
        ack = s.recv(4096)
    error = int.from_bytes(ack[16:20], "little", signed=True)  # nlmsgerr.error after the header
    assert error == 0, f"SET_FEATURES refused: {error}"


def targetctl(*args: str) -> str:
    return guest.run(["targetctl", *args], timeout=300).stdout


def so_names() -> set[str]:
    return {p.name for p in (guest.CONFIGFS / "target" / "core").glob("*_*/*") if p.is_dir()}


def read_back(patterns: dict[int, bytes]) -> None:
    guest.iscsi_login(IQN, PORTAL)
    for lun, data in patterns.items():
        dev = guest.find_scsi_disk(IQN, lun)
        assert guest.dd_read(dev, 8 * MiB, len(data)) == data, f"LUN {lun} lost its data"
    guest.iscsi_logout(IQN, PORTAL)


def test_installed_package_serves_through_two_reboots(lio: Any, tmp_path: Path) -> None:
    debs = sorted((REPO / "build" / "deb").glob("targetmirror_*.deb"))
    assert len(debs) == 1, ("build the package first: sudo bash dev/deb.sh (dev/test.sh does); "
                            f"found {debs}")
    # -- install: dpkg -i from the share; the lab image has every dependency -----------------
    installed = guest.run(["dpkg", "-i", str(debs[0])], timeout=600)
    print(installed.stdout)
    try:
        _installed_package_serves(tmp_path)
    finally:
        guest.iscsi_logout_all()
        # later tests of this boot run the tree's daemon, which would pick up the default
        # configuration file and state directory: leave neither behind
        CONFIG_PATH.unlink(missing_ok=True)
        shutil.rmtree(STATE_DIR, ignore_errors=True)
        shutil.rmtree("/run/targetmirror", ignore_errors=True)
        shutil.rmtree(SYSTEMD_RUN, ignore_errors=True)
        purge = guest.run(["dpkg", "--purge", "targetmirror"], check=False, timeout=300)
        assert purge.returncode == 0, purge.stdout + purge.stderr
        assert not Path("/usr/bin/targetmirrord").exists()


def _installed_package_serves(tmp_path: Path) -> None:
    status = guest.run(["dpkg-query", "-W", "-f=${Status} ${Version}", "targetmirror"]).stdout
    assert status.startswith("install ok installed"), status
    files = guest.run(["dpkg", "-L", "targetmirror"]).stdout.split()
    assert UNIT_PATH.exists() and str(UNIT_PATH) in files
    assert "/usr/share/dbus-1/system.d/targetmirror.conf" in files
    # the package is this tree: every module it installed is byte-for-byte the source's
    site = "/usr/lib/python3/dist-packages/"
    modules = [f for f in files if f.startswith(site + "targetmirror/") and f.endswith(".py")]
    assert len(modules) > 40, modules
    for f in modules:
        rel = f.removeprefix(site)
        assert Path(f).read_bytes() == (REPO / rel).read_bytes(), f"{f} is not the tree's {rel}"
    probe = subprocess.run(
        ["python3", "-c", "import targetmirror, targetmirror.express as e; "
         "print(targetmirror.__file__, e.available(), e.WHY_NOT)"],
        env=installed_env(), capture_output=True, text=True, check=True, cwd="/")
    print(probe.stdout)
    assert probe.stdout.split()[:2] == [site + "targetmirror/__init__.py", "True"], probe.stdout
    version = subprocess.run(["/usr/bin/targetmirrord", "--version"], env=installed_env(),
                             capture_output=True, text=True, check=True).stdout
    assert version.startswith("targetmirrord ")

    unit = Unit(UNIT_PATH)
    after = unit.words("Unit", "After")
    assert "rtslib-fb-targetctl.service" in after and "rtslib-fb-targetctl.service" in \
        unit.words("Unit", "PartOf")

    # -- someone else's LIO objects, saved before targetmirror was configured: saveconfig B ----
    other = guest.create_fileio("other", tmp_path / "other.img", 16 * MiB)
    guest.export_iscsi(other, iqn=OTHER_IQN)
    saved_without_ours = tmp_path / "saveconfig-without-ours.json"
    targetctl("save", str(saved_without_ours))

    # -- the configuration file, where the unit's daemon finds it -----------------------------
    images = IMAGES
    doc = {
        "image_dirs": [str(images)],
        "mirrors": [
            {"name": "deb_m1", "size": "32M", "image_a": str(images / "m1-a.img"),
             "image_b": str(images / "m1-b.img"), "create_images": True},
            {"name": "deb_m2", "size": "32M", "image_a": str(images / "m2-a.img"),
             "image_b": str(images / "m2-b.img"), "create_images": True},
        ],
        "groups": [{"name": "deb_g", "mirrors": ["deb_m1", "deb_m2"]}],
        "exports": [{"target": IQN, "portals": [PORTAL],
                     "luns": [{"lun": 0, "mirror": "deb_m1"}, {"lun": 1, "mirror": "deb_m2"}],
                     "acls": [{"initiator": guest.initiator_name()}]}],
    }
    CONFIG_PATH.parent.mkdir(parents=True, exist_ok=True)
    CONFIG_PATH.write_text(yaml.safe_dump(doc, sort_keys=False))

    # the guest's own systemd-analyze on the installed unit (man pages are not installed in
    # the lab image: --man=no; tests/test_systemd_unit.py checks them on the host)
    verify = guest.run(["systemd-analyze", "verify", "--man=no", str(UNIT_PATH)], check=False)
    assert verify.returncode == 0 and not (verify.stdout + verify.stderr).strip(), \
        verify.stdout + verify.stderr

    run = UnitRun(unit, tmp_path / "targetmirrord.log")
    try:
        # -- first boot: nothing saved of ours; the daemon applies the file -------------------
        run.boot_dependencies()
        run._directories()
        IMAGES.mkdir(mode=0o700, exist_ok=True)
        run.start()
        # really inside the sandbox: its own mount namespace, /tmp private, /usr read-only
        pid = run.proc.pid
        assert os.readlink(f"/proc/{pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert not Path(f"/proc/{pid}/root{tmp_path}").exists(), "PrivateTmp not in effect"
        status_lines = Path(f"/proc/{pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status_lines and "Seccomp:\t2" in status_lines, status_lines
        kept = unit.words("Service", "CapabilityBoundingSet")
        assert run.capabilities() == sum(1 << CAP_BITS[c] for c in kept), \
            (hex(run.capabilities()), kept)
        assert run.expect("WATCHDOG=1", timeout=30) == "WATCHDOG=1"
        served = json.loads(tm("status", "--json").stdout)
        assert {m["name"]: m["state"] for m in served["mirrors"]} == {
            "deb_m1": "mirrored", "deb_m2": "mirrored"}
        assert served["groups"] == {"deb_g": ["deb_m1", "deb_m2"]}
        wwns = {m["name"]: m["wwn"] for m in json.loads(tm("list", "--json").stdout)["mirrors"]}
        patterns = {0: os.urandom(MiB), 1: os.urandom(MiB)}
        guest.iscsi_login(IQN, PORTAL)
        for lun, data in patterns.items():
            guest.dd_write(guest.find_scsi_disk(IQN, lun), 8 * MiB, data)
        guest.iscsi_logout(IQN, PORTAL)
        saved_with_ours = tmp_path / "saveconfig-with-ours.json"
        targetctl("save", str(saved_with_ours))
        assert "deb_m1" in saved_with_ours.read_text()
        assert "deb_m1" not in saved_without_ours.read_text()

        # state files under the unit's UMask and StateDirectoryMode: root's alone
        assert stat.S_IMODE(STATE_DIR.stat().st_mode) == 0o700
        made = list(STATE_DIR.rglob("*"))
        assert any(p.name == "apply-manifest.json" for p in made), made
        for p in made:
            mode = stat.S_IMODE(p.stat().st_mode)
            assert mode & 0o077 == 0, f"{p} is {oct(mode)}"
        for leg in ("m1-a", "m1-b"):
            assert stat.S_IMODE((images / f"{leg}.img").stat().st_mode) == 0o600

        for way, saved in (("a: saveconfig.json has our objects", saved_with_ours),
                           ("b: saveconfig.json lacks them", saved_without_ours)):
            print(f"-- reboot, {way}")
            # shutdown: this unit stops first (it is ordered after), then targetctl clear
            assert run.stop() == 0, run.log()[-3000:]
            targetctl("clear")
            assert not so_names()
            # boot: rtslib-fb-targetctl.service, then this unit
            reset_netlink_features()
            targetctl("restore", str(saved))
            restored = so_names()
            assert "other" in restored
            assert ("deb_m1" in restored) == (saved is saved_with_ours), restored
            run.boot_dependencies()
            run.start()
            listed = {m["name"]: m for m in json.loads(tm("list", "--json").stdout)["mirrors"]}
            assert set(listed) == {"deb_m1", "deb_m2"}, listed
            for name, m in listed.items():
                assert m["managed_by_apply"] and m["wwn"] == wwns[name], m
            served = json.loads(tm("status", "--json").stdout)
            assert {m["name"]: m["state"] for m in served["mirrors"]} == {
                "deb_m1": "mirrored", "deb_m2": "mirrored"}, served
            assert tm("apply").stdout.startswith("nothing to change"), "apply and LIO differ"
            assert "other" in so_names() and (guest.CONFIGFS / "target" / "iscsi" /
                                              OTHER_IQN).exists()
            read_back(patterns)
        assert run.stop() == 0
    finally:
        if run.proc is not None and run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()
        text = run.log() if run.log_path.exists() else ""
        print(f"--- targetmirrord (installed) log ---\n{text[-6000:]}")
    assert "Traceback" not in text
    assert "not applied" not in text, "the configuration failed to apply at a boot"
