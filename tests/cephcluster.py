"""A disposable one-monitor, one-OSD Ceph cluster on 127.0.0.1, for tests and benchmarks.

Started by hand (no systemd, no containers, no mgr: RBD I/O does not need one) in a scratch
directory, without cephx, on loopback only; :meth:`CephCluster.wipe` stops the daemons and
removes the directory.  With ``paxos propose interval = 0.05`` the path from an empty directory
to a usable ``rbd`` pool takes well under two seconds on the project's 2-core machines.

The OSD's object store is memstore by default (fast; data lives in the OSD's memory and
survives a *clean* stop only) or bluestore on a sparse file.  :meth:`kill_osd` SIGKILLs the OSD
so tests can show what an unreachable cluster does to a leg; :meth:`start_osd` brings it back.

The host tests, the lab test (the cluster runs inside the guest, which has no network) and
benchmarks/rbd_leg.py share this module.  Ports are chosen free at start, so two clusters (or a
leftover one) never collide.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import uuid
from pathlib import Path

BINARIES = ("ceph-mon", "ceph-osd", "monmaptool", "ceph", "rbd")


def missing() -> str | None:
    """Why no cluster can be started here (None: it can)."""
    absent = [b for b in BINARIES if shutil.which(b) is None]
    if absent:
        return (f"Ceph is not installed ({', '.join(absent)} missing): install ceph-mon ceph-osd "
                "ceph-common python3-rbd python3-rados (lab/install-host-deps.sh does)")
    try:
        import rados  # noqa: F401
        import rbd  # noqa: F401
    except ImportError:
        return ("librbd's Python binding is not importable from this interpreter: it exists only "
                "for Debian's /usr/bin/python3 (dev/bootstrap.sh makes .venv from it with "
                "--system-site-packages)")
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class CephCluster:
    """One mon (``a``) and one OSD (``0``) in ``root``; pool ``rbd`` ready after :meth:`start`."""

    def __init__(self, root: Path, *, objectstore: str = "memstore") -> None:
        self.root = Path(root)
        self.objectstore = objectstore
        self.conf = self.root / "ceph.conf"
        self.fsid = str(uuid.uuid4())
        self.pool = "rbd"
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    # -- set-up --------------------------------------------------------------------------------
    def _write_conf(self) -> None:
        d = self.root
        v2, v1 = _free_port(), _free_port()
        self.mon_host = f"[v2:127.0.0.1:{v2},v1:127.0.0.1:{v1}]"
        lines = [
            "[global]",
            f"fsid = {self.fsid}",
            "mon initial members = a",
            f"mon host = {self.mon_host}",
            "public addr = 127.0.0.1",
            "cluster addr = 127.0.0.1",
            "ms bind ipv6 = false",
            "auth cluster required = none",
            "auth service required = none",
            "auth client required = none",
            "osd pool default size = 1",
            "osd pool default min size = 1",
            "mon allow pool size one = true",
            "mon allow pool delete = true",
            "mon warn on pool no redundancy = false",
            "osd pool default pg num = 8",
            "osd pool default pgp num = 8",
            "osd pool default pg autoscale mode = off",
            "osd crush chooseleaf type = 0",
            f"run dir = {d}/run",
            f"admin socket = {d}/run/$cluster-$name.$pid.$cctid.asok",
            f"pid file = {d}/run/$cluster-$name.pid",
            f"log file = {d}/log/$cluster-$name.log",
            f"mon data = {d}/mon/$cluster-$id",
            f"osd data = {d}/osd/$cluster-$id",
            "keyring = /dev/null",
            "mon memory target = 268435456",
            "osd memory target = 536870912",
            "osd memory cache min = 67108864",
            "bluestore cache autotune = false",
            "bluestore cache size = 67108864",
            "osd op num shards = 1",
            "osd op num threads per shard = 2",
            "ms async op threads = 1",
            "mon data avail warn = 2",
            "mon data avail crit = 1",
            "debug ms = 0",
            "paxos propose interval = 0.05",
            "paxos min wait = 0.001",
            "log to stderr = false",
            "err to stderr = true",
            "",
            "[osd]",
            f"osd objectstore = {self.objectstore}",
            "memstore device bytes = 4294967296",
            "memstore page set = true",
            "bluestore block create = true",
            "bluestore block size = 4294967296",
            "bluestore fsck on mount = false",
            "osd journal size = 64",
            "osd fast shutdown = false",
            "",
        ]
        self.conf.write_text("\n".join(lines))

    def _run(self, *argv: str, timeout: float = 120) -> str:
        out = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                             check=False)
        if out.returncode:
            raise RuntimeError(f"{' '.join(argv)} failed ({out.returncode}): "
                               f"{out.stderr.strip()[-2000:]}")
        return out.stdout

    def ceph(self, *args: str, timeout: float = 120) -> str:
        """Run the ``ceph`` CLI against this cluster (always with a timeout: without a mgr some
        commands never return)."""
        return self._run("ceph", "-c", str(self.conf), "--connect-timeout", "60", *args,
                         timeout=timeout)

    def _spawn(self, name: str, *argv: str) -> None:
        log = open(self.root / "log" / f"{name}.stderr", "ab")  # noqa: SIM115 -- child owns it
        try:
            self._procs[name] = subprocess.Popen([*argv, "-f", "-c", str(self.conf)],
                                                 stdin=subprocess.DEVNULL,
                                                 stdout=log, stderr=log)
        finally:
            log.close()

    def start(self) -> CephCluster:
        """Create and start the cluster; return once pool ``rbd`` takes I/O."""
        for sub in ("run", "log", "mon", "osd/ceph-0"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self._write_conf()
        monmap = self.root / "monmap"
        self._run("monmaptool", "--create", "--fsid", self.fsid, "--addv", "a", self.mon_host,
                  str(monmap))
        self._run("ceph-mon", "--mkfs", "-i", "a", "--monmap", str(monmap), "-c", str(self.conf))
        self._spawn("mon.a", "ceph-mon", "-i", "a")
        self.osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", self.osd_uuid).strip()
        if osd_id != "0":
            raise RuntimeError(f"expected OSD id 0, the monitor gave {osd_id!r}")
        self._run("ceph-osd", "-i", "0", "--mkfs", "--osd-uuid", self.osd_uuid, "-c",
                  str(self.conf), timeout=120)
        self.start_osd()
        self.ceph("osd", "pool", "create", self.pool, "8", "8")
        self._run("rbd", "-c", str(self.conf), "pool", "init", self.pool, timeout=120)
        return self

    def start_osd(self) -> None:
        """Start (or restart) OSD 0."""
        self._spawn("osd.0", "ceph-osd", "-i", "0")

    def kill_osd(self) -> None:
        """SIGKILL OSD 0 and reap it: I/O to the pool blocks from now on until it is back."""
        proc = self._procs.pop("osd.0", None)
        if proc is not None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)

    def pause_osd(self) -> None:
        """SIGSTOP OSD 0: the cluster stops answering, nothing is lost (unlike a kill, after
        which memstore rolls back to its last clean stop)."""
        self._procs["osd.0"].send_signal(signal.SIGSTOP)

    def resume_osd(self) -> None:
        """SIGCONT OSD 0: it answers again, with every write it had acknowledged."""
        self._procs["osd.0"].send_signal(signal.SIGCONT)

    # -- clients -------------------------------------------------------------------------------
    def spec(self, image: str, *, namespace: str = "") -> str:
        """The leg spec (cfgstring form) of ``image`` in pool ``rbd`` of this cluster."""
        body = f"rbd/{self.pool}/{namespace + '/' if namespace else ''}{image}"
        return body

    def create_image(self, name: str, size: int, *, features: int | None = None) -> None:
        """Create an RBD image of ``size`` bytes in pool ``rbd`` (``features``: librbd's
        feature bits, e.g. 1 for layering only, without exclusive-lock; default: the
        cluster's default set)."""
        import rados
        import rbd

        with rados.Rados(conffile=str(self.conf)) as cluster:
            cluster.conf_set("client_mount_timeout", "60")
            with cluster.open_ioctx(self.pool) as ioctx:
                rbd.RBD().create(ioctx, name, size, old_format=False, features=features)

    # -- tear-down -----------------------------------------------------------------------------
    def stop(self) -> None:
        """SIGTERM every daemon (clean stop), wait for each."""
        for name in ("osd.0", "mon.a"):
            proc = self._procs.pop(name, None)
            if proc is None:
                continue
            proc.send_signal(signal.SIGCONT)  # a paused daemon cannot act on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)

    def wipe(self) -> None:
        """Stop the cluster and delete its directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, daemon: str = "osd.0", n: int = 4000) -> str:
        path = self.root / "log" / f"ceph-{daemon}.log"
        return path.read_text(errors="replace")[-n:] if path.exists() else ""

