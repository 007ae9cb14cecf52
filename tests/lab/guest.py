"""Helpers for tests that run inside the lab guest (``TARGETMIRROR_IN_GUEST=1``).

Everything here drives the real kernel: module loading, configfs through rtslib-fb, iSCSI
exports on 127.0.0.1, the open-iscsi initiator, and tcmu-runner. The guest has no udev, so
block devices are found through sysfs.

Importable on the host too (pytest imports conftest files there), so rtslib is imported lazily
and nothing runs at import time.

Typical use in a lab test::

    so = guest.create_fileio("demo", tmp_path / "demo.img", 64 * guest.MiB)
    with guest.iscsi_disk(so) as dev:          # export, log in, find /dev/sdX
        guest.write_at(dev, 0, b"x" * 4096)
    # logged out and unexported here
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import stat
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MiB = 1024 * 1024

IN_GUEST: bool = os.environ.get("TARGETMIRROR_IN_GUEST") == "1"

#: Kernel modules every lab test may need (LIO core and backstores, TCMU, the iSCSI target
#: and initiator, the loopback fabric, SCSI disks and generic devices, device-mapper).
MODULES: tuple[str, ...] = (
    "configfs", "target_core_mod", "target_core_file", "target_core_iblock",
    "target_core_user", "uio", "iscsi_target_mod", "tcm_loop",
    "scsi_transport_iscsi", "iscsi_tcp", "sd_mod", "sg", "dm_mod",
)

CONFIGFS = Path("/sys/kernel/config")
INITIATOR_NAME_FILE = Path("/etc/iscsi/initiatorname.iscsi")
PORTAL_IP = "127.0.0.1"
PORTAL_PORT = 3260
#: Target IQNs made by :func:`export_iscsi` start with this (one target per export).
IQN_PREFIX = "iqn.2024-01.org.targetmirror.lab"

#: Always part of a user: backstore's control string. Once tcmu-runner has started, the kernel
#: waits uninterruptibly for a netlink reply on every device enable unless this is set.
NL_REPLY_CONTROL = "nl_reply_supported=-1"


class GuestError(RuntimeError):
    """A guest-side step (command, device lookup, daemon) failed."""


def require_guest(what: str = "this helper") -> None:
    """Fail loudly when guest-only code runs on the host (a test lacking ``@pytest.mark.lab``)."""
    if not IN_GUEST:
        raise GuestError(f"{what} only works inside the lab guest: mark the test "
                         "with @pytest.mark.lab and run it through the lab plugin")


def run(cmd: Sequence[str], *, check: bool = True, timeout: float = 120.0,
        input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output; on failure raise with the command and output."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout,
                              input=input, check=False)
    except subprocess.TimeoutExpired as exc:
        raise GuestError(f"timed out after {timeout} s: {shlex.join(cmd)}") from exc
    if check and proc.returncode != 0:
        raise GuestError(f"{shlex.join(cmd)} failed with status {proc.returncode}\n"
                         f"stdout: {proc.stdout.strip()}\nstderr: {proc.stderr.strip()}")
    return proc


def wait_for(predicate: Any, *, timeout: float, interval: float = 0.05, what: str = "condition"
             ) -> Any:
    """Poll ``predicate()`` until it returns something truthy; return that or raise."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise GuestError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------- kernel


def load_modules(modules: Sequence[str] = MODULES) -> None:
    """modprobe the modules (one modprobe call: each process start is slow under TCG)."""
    require_guest("load_modules")
    run(["modprobe", "-a", *modules])


def mount_configfs() -> None:
    if not os.path.ismount(CONFIGFS):
        run(["mount", "-t", "configfs", "configfs", str(CONFIGFS)])


def setup_kernel() -> None:
    """Modules, configfs, quiet console, loopback up. Idempotent."""
    require_guest("setup_kernel")
    load_modules()
    mount_configfs()
    run(["dmesg", "-n", "1"])
    run(["ip", "link", "set", "lo", "up"])


def kernel_release() -> str:
    return os.uname().release


def initiator_name() -> str:
    """The guest's iSCSI initiator name (fixed by the image build)."""
    for line in INITIATOR_NAME_FILE.read_text().splitlines():
        if line.startswith("InitiatorName="):
            return line.split("=", 1)[1].strip()
    raise GuestError(f"no InitiatorName in {INITIATOR_NAME_FILE}")


SCRATCH_DISK = Path("/dev/vdb")
SCRATCH_MOUNT = Path("/mnt/scratch")


def scratch_dir() -> Path:
    """A directory on the lab's scratch disk (ext4 on /dev/vdb, made at first use per boot),
    for images too big for tmpfs; see ``lab/vm.py`` SCRATCH_GB."""
    require_guest("scratch_dir")
    if not os.path.ismount(SCRATCH_MOUNT):
        if not SCRATCH_DISK.is_block_device():
            raise GuestError(f"no scratch disk {SCRATCH_DISK} (TARGETMIRROR_LAB_SCRATCH_GB=0?)")
        run(["mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=1,lazy_journal_init=1",
             str(SCRATCH_DISK)], timeout=300)
        SCRATCH_MOUNT.mkdir(parents=True, exist_ok=True)
        run(["mount", "-o", "noatime", str(SCRATCH_DISK), str(SCRATCH_MOUNT)])
    return SCRATCH_MOUNT


# --------------------------------------------------------------------------- LIO / rtslib


def create_fileio(name: str, path: Path | str, size: int, *, write_back: bool = False) -> Any:
    """A kernel fileio backstore on ``path`` (created/extended to ``size`` bytes)."""
    from rtslib_fb import FileIOStorageObject

    path = Path(path)
    with path.open("ab") as fh:
        if fh.tell() < size:
            fh.truncate(size)
    return FileIOStorageObject(name, str(path), size=size, write_back=write_back)


def create_user_backstore(name: str, subtype: str, cfgstring: str, size: int, *,
                          hw_max_sectors: int = 2048, control: str = "",
                          wwn: str | None = None) -> Any:
    """A ``user:<subtype>`` (TCMU) backstore with config ``<subtype>/<cfgstring>``.

    ``nl_reply_supported=-1`` is always added to ``control`` (see :data:`NL_REPLY_CONTROL`);
    ``control`` may add more comma-separated ``key=value`` pairs (e.g. ``max_data_area_mb=64``).
    The kernel forbids ',' and ':' in the config string.
    """
    from rtslib_fb import UserBackedStorageObject

    if "," in cfgstring or ":" in cfgstring:
        raise ValueError(f"',' and ':' are not allowed in a TCMU config string: {cfgstring!r}")
    ctl = NL_REPLY_CONTROL + ("," + control if control else "")
    return UserBackedStorageObject(name, config=f"{subtype}/{cfgstring}", size=size,
                                   wwn=wwn, hw_max_sectors=hw_max_sectors, control=ctl)


def create_user_file(name: str, path: Path | str, size: int, **kwargs: Any) -> Any:
    """tcmu-runner's ``user:file`` backstore on ``path`` (needs :class:`TcmuRunner` running).

    The file is created with ``size`` bytes first: the example handler does not size it.
    """
    path = Path(path)
    with path.open("ab") as fh:
        if fh.tell() < size:
            fh.truncate(size)
    return create_user_backstore(name, "file", str(path), size, **kwargs)


def uio_device_for(so_name: str) -> Path | None:
    """/dev/uioN of the user backstore named ``so_name`` (name ``tcm-user/<hba>/<name>/...``)."""
    for entry in Path("/sys/class/uio").glob("uio*"):
        try:
            parts = (entry / "name").read_text().strip().split("/")
        except OSError:
            continue
        if len(parts) >= 3 and parts[0] == "tcm-user" and parts[2] == so_name:
            return Path("/dev") / entry.name
    return None


@dataclass
class IscsiExport:
    """One iSCSI target (one TPG, one portal) exporting one storage object as ``lun``."""

    iqn: str
    lun: int
    portal: str
    target: Any = field(repr=False)
    storage_object: Any = field(repr=False)

    def delete(self) -> None:
        """Remove the target (TPG, portal, LUN, ACL); the storage object stays."""
        self.target.delete()


def export_iscsi(so: Any, *, iqn: str | None = None, lun: int = 0, acl: bool = True,
                 ip: str = PORTAL_IP, port: int = PORTAL_PORT) -> IscsiExport:
    """Export ``so`` over iSCSI on ``ip:port`` with no authentication.

    With ``acl`` the guest's own initiator gets a node ACL mapping ``lun``; without it the TPG
    runs in demo mode (any initiator, read-write).
    """
    from rtslib_fb import LUN, TPG, FabricModule, MappedLUN, NetworkPortal, NodeACL, Target

    iqn = iqn or f"{IQN_PREFIX}:{_iqn_safe(so.name)}"
    target = Target(FabricModule("iscsi"), wwn=iqn)
    try:
        tpg = TPG(target, 1)
        tpg.set_attribute("authentication", "0")
        if acl:
            tpg.set_attribute("generate_node_acls", "0")
        else:
            tpg.set_attribute("generate_node_acls", "1")
            tpg.set_attribute("demo_mode_write_protect", "0")
            tpg.set_attribute("cache_dynamic_acls", "1")
        NetworkPortal(tpg, ip, port)
        tpg_lun = LUN(tpg, lun=lun, storage_object=so)
        if acl:
            node = NodeACL(tpg, initiator_name())
            MappedLUN(node, lun, tpg_lun)
        tpg.enable = True
    except BaseException:
        target.delete()
        raise
    return IscsiExport(iqn=iqn, lun=lun, portal=f"{ip}:{port}", target=target,
                       storage_object=so)


def _iqn_safe(name: str) -> str:
    return re.sub(r"[^a-z0-9.-]", "-", name.lower())


def clear_lio() -> None:
    """Delete every LIO target and storage object (rtslib's clear_existing)."""
    from rtslib_fb import RTSRoot

    RTSRoot().clear_existing(confirm=True)


# --------------------------------------------------------------------------- initiator


def iscsid_running() -> bool:
    try:
        pid = int(Path("/run/iscsid.pid").read_text().strip())
    except (OSError, ValueError):
        return False
    return Path(f"/proc/{pid}").exists()


def start_iscsid() -> None:
    """Start open-iscsi's iscsid (it daemonizes) unless it runs already."""
    require_guest("start_iscsid")
    if iscsid_running():
        return
    Path("/run/lock/iscsi").mkdir(parents=True, exist_ok=True)
    run(["iscsid"])
    wait_for(iscsid_running, timeout=10, what="iscsid")


def iscsi_discover(portal: str = f"{PORTAL_IP}:{PORTAL_PORT}") -> list[str]:
    """SendTargets discovery; returns the target IQNs offered on ``portal``."""
    start_iscsid()
    out = run(["iscsiadm", "-m", "discovery", "-t", "st", "-p", portal]).stdout
    return [line.split()[-1] for line in out.splitlines() if line.strip()]


def iscsi_login(iqn: str, portal: str = f"{PORTAL_IP}:{PORTAL_PORT}") -> None:
    """Discover and log in to ``iqn`` on ``portal``."""
    targets = iscsi_discover(portal)
    if iqn not in targets:
        raise GuestError(f"{iqn} not offered by {portal} (discovered: {targets})")
    run(["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--login"])


def iscsi_logout(iqn: str, portal: str = f"{PORTAL_IP}:{PORTAL_PORT}") -> None:
    """Log out of ``iqn`` and forget its node record; waits until its disks are gone."""
    disks = _session_disks(iqn)
    run(["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "--logout"], check=False)
    run(["iscsiadm", "-m", "node", "-T", iqn, "-p", portal, "-o", "delete"], check=False)
    wait_for(lambda: not any(Path("/sys/block", d).exists() for d in disks),
             timeout=30, what=f"disks of {iqn} to go away")


def iscsi_logout_all() -> None:
    """Log out of every session (cleanup between tests); never raises."""
    if iscsid_running():
        run(["iscsiadm", "-m", "node", "--logoutall=all"], check=False)
        run(["iscsiadm", "-m", "node", "-o", "delete"], check=False)


def _sessions(iqn: str) -> list[Path]:
    """sysfs device folders of the iSCSI sessions logged in to ``iqn``."""
    found = []
    for sess in Path("/sys/class/iscsi_session").glob("session*"):
        try:
            if (sess / "targetname").read_text().strip() == iqn:
                found.append((sess / "device").resolve())
        except OSError:
            continue
    return found


def _session_disks(iqn: str, lun: int | None = None) -> list[str]:
    """Block device names (sdX) of ``iqn``'s sessions, optionally only for ``lun``."""
    names = []
    for sess in _sessions(iqn):
        for block in sess.glob("target*/*:*:*:*/block/*"):
            h_c_t_l = block.parent.parent.name
            if lun is None or h_c_t_l.rsplit(":", 1)[-1] == str(lun):
                names.append(block.name)
    return sorted(names)


def ensure_dev_node(name: str) -> str:
    """/dev/<name> for a block device in /sys/block, made with mknod if devtmpfs lacks it."""
    dev = Path("/dev") / name
    major, minor = (int(x) for x in (Path("/sys/block") / name / "dev").read_text().split(":"))
    if dev.exists():
        st = dev.stat()
        if stat.S_ISBLK(st.st_mode) and os.major(st.st_rdev) == major \
                and os.minor(st.st_rdev) == minor:
            return str(dev)
        dev.unlink()
    os.mknod(dev, 0o660 | stat.S_IFBLK, os.makedev(major, minor))
    return str(dev)


def find_scsi_disk(iqn: str, lun: int = 0, *, timeout: float = 30.0) -> str:
    """/dev/sdX of ``lun`` of the logged-in target ``iqn`` (waits for the SCSI scan)."""
    def ready() -> str | None:
        names = _session_disks(iqn, lun)
        if len(names) != 1:
            return None
        try:
            size = Path("/sys/block", names[0], "size").read_text().strip()
        except OSError:
            # the session already lists the disk but the block device is not (or no longer)
            # registered: a scan still in progress, or an old disk of a re-login going away
            return None
        return names[0] if size != "0" else None

    name = wait_for(ready, timeout=timeout, what=f"LUN {lun} of {iqn} to appear as a disk")
    return ensure_dev_node(name)


@contextlib.contextmanager
def iscsi_disk(so: Any, *, lun: int = 0, acl: bool = True, iqn: str | None = None
               ) -> Iterator[str]:
    """Export ``so`` over iSCSI, log in, yield its /dev/sdX; log out and unexport after."""
    export = export_iscsi(so, iqn=iqn, lun=lun, acl=acl)
    try:
        iscsi_login(export.iqn, export.portal)
        try:
            yield find_scsi_disk(export.iqn, lun)
        finally:
            iscsi_logout(export.iqn, export.portal)
    finally:
        export.delete()


# --------------------------------------------------------------------------- raw I/O


def dd_write(dev: str, offset: int, data: bytes, *, block: int = 4096) -> None:
    """Write ``data`` at byte ``offset`` with O_DIRECT dd (offset/length multiples of block)."""
    if offset % block or len(data) % block:
        raise ValueError("offset and length must be multiples of the block size")
    _dd(["dd", f"of={dev}", f"bs={block}", f"seek={offset // block}",
         f"count={len(data) // block}", "oflag=direct", "conv=notrunc,fsync", "status=none"],
        data)


def dd_read(dev: str, offset: int, length: int, *, block: int = 4096) -> bytes:
    """Read ``length`` bytes at ``offset`` with O_DIRECT dd."""
    if offset % block or length % block:
        raise ValueError("offset and length must be multiples of the block size")
    return _dd(["dd", f"if={dev}", f"bs={block}", f"skip={offset // block}",
                f"count={length // block}", "iflag=direct", "status=none"], b"")


def _dd(cmd: list[str], data: bytes) -> bytes:
    proc = subprocess.run(cmd, input=data, capture_output=True, timeout=120, check=False)
    if proc.returncode != 0:
        raise GuestError(f"{shlex.join(cmd)} failed: {proc.stderr.decode(errors='replace')}")
    return proc.stdout


def drop_caches() -> None:
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


# --------------------------------------------------------------------------- tcmu-runner


class TcmuRunner:
    """tcmu-runner as a child process, with its log in ``log_dir``.

    Starting it sets the kernel's module-wide "netlink replies supported" flag for the rest of
    the boot; every user: backstore must then carry ``nl_reply_supported=-1`` (the helpers
    above always add it).
    """

    def __init__(self, log_dir: Path | str, *, debug: bool = False) -> None:
        self.log_dir = Path(log_dir)
        self.debug = debug
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise GuestError("tcmu-runner is not running")
        return self.proc.pid

    def start(self, *, timeout: float = 30.0) -> None:
        """Start and wait until it listens for netlink device events."""
        require_guest("TcmuRunner.start")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        cmd = ["tcmu-runner", "-l", str(self.log_dir)] + (["-d"] if self.debug else [])
        with (self.log_dir / "stdout.log").open("ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)

        def ready() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise GuestError(f"tcmu-runner exited with {self.proc.returncode}:\n"
                                 + self.log_text()[-3000:])
            return self._has_genl_socket()

        wait_for(ready, timeout=timeout, what="tcmu-runner to open its netlink socket")

    def _has_genl_socket(self) -> bool:
        """True once the process holds a NETLINK_GENERIC socket (libtcmu's event channel)."""
        inodes = set()
        fd_dir = Path(f"/proc/{self.pid}/fd")
        try:
            for fd in fd_dir.iterdir():
                with contextlib.suppress(OSError):
                    target = os.readlink(fd)
                    if target.startswith("socket:["):
                        inodes.add(target[8:-1])
        except OSError:
            return False
        for line in Path("/proc/net/netlink").read_text().splitlines()[1:]:
            cols = line.split()
            if len(cols) >= 10 and cols[1] == "16" and cols[9] in inodes:
                return True
        return False

    def has_open(self, so_name: str) -> bool:
        """True when the runner has the uio device of backstore ``so_name`` open."""
        uio = uio_device_for(so_name)
        if uio is None:
            return False
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{self.pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    if os.readlink(fd) == str(uio):
                        return True
        return False

    def wait_for_device(self, so_name: str, *, timeout: float = 30.0) -> None:
        """Wait until the runner has opened backstore ``so_name``'s uio device."""
        wait_for(lambda: self.has_open(so_name), timeout=timeout,
                 what=f"tcmu-runner to open the uio device of {so_name}")

    def log_text(self) -> str:
        parts = []
        for name in ("stdout.log", "tcmu-runner.log"):
            with contextlib.suppress(OSError):
                parts.append((self.log_dir / name).read_text(errors="replace"))
        return "\n".join(parts)

    def stop(self, *, timeout: float = 15.0) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        if self.proc is None:
            return None
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=timeout)
        return proc.returncode

    def __enter__(self) -> TcmuRunner:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
