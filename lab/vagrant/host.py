"""The host side of the Vagrant lab: libvirtd started by hand, the box added, ``vagrant`` run.

Why this shape:

* Our hosts may have no systemd as PID 1, so nothing starts libvirtd for us: :class:`Libvirtd`
  starts ``virtlogd`` and ``libvirtd`` in the foreground as our own children and stops them by
  their pid (never by name: other work on the host may run its own). A libvirtd that already
  answers is used as it is and left running.
* Vagrant runs against the project's own ``vagrant/Vagrantfile`` unchanged; only its environment
  differs: its own ``VAGRANT_HOME`` in the lab cache (the box store, kept between runs), a fixed
  ``VAGRANT_DOTFILE_PATH`` in the cache (so a run that died is destroyed by the next one), and
  ``TM_BOX`` naming the baked box. Vagrant's network checks (version, box updates) are off.
* vagrant-libvirt copies a new box into libvirt's storage pool through its Ruby client in
  250 KiB pieces, minutes on our hosts; :meth:`Vagrant.seed_pool` puts the volume there with a
  plain sparse copy under the exact name vagrant-libvirt looks for, which then skips its upload.
* Commands in the VMs run over plain ``ssh -F`` with the configuration ``vagrant ssh-config``
  wrote once (every ``vagrant ssh`` would start Ruby and load the plugins again: seconds each).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from lab import REPO_ROOT, LabError
from lab import image as labimage
from lab.vagrant.box import Box

INSTALL_SCRIPT = Path(__file__).resolve().parent / "install-host-deps.sh"
REAPER = Path(__file__).resolve().parent / "reaper.py"
VAGRANT_DIR = REPO_ROOT / "vagrant"
LIBVIRT_URI = "qemu:///system"
POOL = "default"
POOL_DIR = Path("/var/lib/libvirt/images")
#: vagrant-libvirt's domain names: the Vagrantfile's folder name, "_", the machine's name.
DOMAIN_PREFIX = "vagrant_"
MACHINES = ("target", "initiator1", "initiator2")
HOST_TOOLS = ("vagrant", "libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img",
              "dnsmasq", "ssh", "rsync")

Log = Callable[[str], None]


def _stderr_log(msg: str) -> None:
    print(f"[vagrant-lab] {msg}", file=sys.stderr, flush=True)


def lab_root() -> Path:
    return labimage.cache_root() / "vagrant"


def missing_host_tools() -> list[str]:
    return [t for t in HOST_TOOLS if shutil.which(t) is None
            and not Path("/usr/sbin", t).exists()]


def vagrant_libvirt_installed() -> bool:
    gems = Path("/usr/share/rubygems-integration/all/gems")
    return any(gems.glob("vagrant-libvirt-*")) or any(
        Path("/opt/vagrant").glob("embedded/gems/gems/vagrant-libvirt-*")) or any(
        Path.home().glob(".vagrant.d/gems/*/gems/vagrant-libvirt-*"))


def install_host_deps(log: Log = _stderr_log) -> str | None:
    """Install vagrant-libvirt and libvirt (Debian packages); None, or why it cannot be done."""
    if not missing_host_tools() and vagrant_libvirt_installed():
        return None
    if os.geteuid() != 0:
        return "vagrant-libvirt is not installed and installing it needs root"
    if shutil.which("apt-get") is None or shutil.which("dpkg-query") is None:
        return "vagrant-libvirt is not installed and this host has no apt-get (not Debian)"
    log(f"installing the Vagrant lab's host packages ({INSTALL_SCRIPT.name})")
    proc = subprocess.run(["sh", str(INSTALL_SCRIPT)], capture_output=True, text=True,
                          timeout=1800, check=False)
    if proc.returncode != 0:
        return (f"{INSTALL_SCRIPT} failed with status {proc.returncode}: "
                f"{(proc.stderr or proc.stdout).strip()[-800:]}")
    missing = missing_host_tools()
    if missing or not vagrant_libvirt_installed():
        return f"still missing after {INSTALL_SCRIPT.name}: {missing or ['vagrant-libvirt']}"
    return None


def _virsh(*args: str, timeout: float = 60, check: bool = True
           ) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["virsh", "-c", LIBVIRT_URI, *args], capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise LabError(f"virsh {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


class Libvirtd:
    """virtlogd + libvirtd for the lab, started as our children; stopped by pid.

    ``with Libvirtd(logdir) as d:`` starts them unless a libvirtd already answers (which is
    then used and left alone).
    """

    def __init__(self, logdir: Path, *, log: Log = _stderr_log) -> None:
        self.logdir = logdir
        self.log = log
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    @staticmethod
    def answering() -> bool:
        try:
            return _virsh("-q", "version", timeout=15, check=False).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    @staticmethod
    def kvm_device_like_udev(log: Log) -> None:
        """Give /dev/kvm the group and mode Debian's udev rule gives it (root:kvm 0660).

        Without udev it stays root:root 0600. QEMU (probed by libvirtd as root) still opens it,
        so libvirt's capability cache records KVM, but libvirtd then finds /dev/kvm unusable for
        its qemu user, declares the cache stale and probes QEMU again on every call: under
        software emulation each probe costs seconds, and `vagrant up` crawls. (The VMs use
        KVM only where the CPU has vmx/svm: the box's Vagrantfile decides.)
        """
        kvm = Path("/dev/kvm")
        try:
            import grp

            gid = grp.getgrnam("kvm").gr_gid
            st = kvm.stat()
        except (KeyError, OSError):
            return
        if st.st_gid != gid or st.st_mode & 0o777 != 0o660:
            os.chown(kvm, 0, gid)
            kvm.chmod(0o660)
            log("/dev/kvm set to root:kvm 0660 (as udev would)")

    def start(self, timeout: float = 90) -> None:
        self.kvm_device_like_udev(self.log)
        if self.answering():
            self.log("libvirtd already answers: using it (it is left running)")
            return
        Path("/run/libvirt").mkdir(parents=True, exist_ok=True)
        self.logdir.mkdir(parents=True, exist_ok=True)
        for name in ("virtlogd", "libvirtd"):
            exe = shutil.which(name) or f"/usr/sbin/{name}"
            out = (self.logdir / f"{name}.log").open("ab")
            # The foreground form (--daemon would hide the pid we stop it by), libvirtd under
            # our reaper: its QEMU processes are orphaned when they end (see reaper.py).
            cmd = [sys.executable, str(REAPER), exe] if name == "libvirtd" else [exe]
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
            self.procs.append((name, proc))
            out.close()
            how = " under reaper.py" if len(cmd) > 1 else ""
            self.log(f"started {name} (pid {proc.pid}{how})")
        deadline = time.monotonic() + timeout
        while not self.answering():
            for name, p in self.procs:
                if p.poll() is not None:
                    self.stop()
                    raise LabError(f"{name} exited with status {p.returncode}",
                                   labimage._tail(self.logdir / f"{name}.log"))
            if time.monotonic() > deadline:
                self.stop()
                raise LabError(f"libvirtd did not answer within {timeout:.0f} s")
            time.sleep(0.5)

    def stop(self) -> None:
        for name, p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
                self.log(f"stopped {name} (pid {p.pid}, "
                         f"status {p.returncode})")
        self.procs.clear()

    def __enter__(self) -> Libvirtd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Vagrant:
    """``vagrant`` run on the project's Vagrantfile with the lab's environment."""

    def __init__(self, box: Box, *, log: Log = _stderr_log, logfile: Path | None = None) -> None:
        self.box = box
        self.log = log
        root = lab_root()
        self.home = root / "home"
        self.dotfile = root / "run" / ".vagrant"
        self.logfile = logfile or (root / "vagrant.log")
        self.ssh_config = root / "run" / "ssh-config"
        self.dotfile.parent.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, VAGRANT_CWD=str(VAGRANT_DIR), VAGRANT_HOME=str(self.home),
                        VAGRANT_DOTFILE_PATH=str(self.dotfile), TM_BOX=box.name,
                        VAGRANT_DEFAULT_PROVIDER="libvirt", VAGRANT_CHECKPOINT_DISABLE="1",
                        VAGRANT_BOX_UPDATE_CHECK_DISABLE="1", VAGRANT_NO_COLOR="1")

    def run(self, args: Sequence[str], *, timeout: float = 3600, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """``vagrant ARGS``; its output goes to the lab's vagrant log and is returned."""
        cmd = ["vagrant", *args]
        self.log("$ " + " ".join(cmd))
        start = time.monotonic()
        # Live into the log (an `up` takes many minutes: tail the log to follow it), then read
        # back this command's part for the caller.
        with self.logfile.open("a") as fh:
            fh.write(f"\n$ {' '.join(cmd)}\n")
            fh.flush()
            begin = fh.tell()
            try:
                status = subprocess.run(cmd, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                        timeout=timeout, check=False,
                                        stdin=subprocess.DEVNULL).returncode
            except subprocess.TimeoutExpired:
                status = -1
            fh.write(f"# status {status} after {time.monotonic() - start:.1f} s\n")
        with self.logfile.open() as fh:
            fh.seek(begin)
            out = fh.read()
        proc = subprocess.CompletedProcess(cmd, status, out, "")
        if check and status != 0:
            why = "timed out" if status == -1 else f"failed with status {status}"
            raise LabError(f"vagrant {' '.join(args)} {why} (log: {self.logfile})",
                           "\n".join(out.splitlines()[-60:]))
        return proc

    # -- the box

    def box_image(self) -> Path:
        return self.home / "boxes" / self.box.name / "0" / "libvirt" / "box.img"

    def add_box(self) -> bool:
        """Add the box to the lab's Vagrant home unless it is there; True if it was added.
        Boxes of older recipes are removed (from the home and from libvirt's pool)."""
        boxes = self.home / "boxes"
        if boxes.is_dir():
            for old in boxes.iterdir():
                if old.name.startswith("targetmirror-lab-") and old.name != self.box.name:
                    self.log(f"removing old box {old.name}")
                    shutil.rmtree(old, ignore_errors=True)
        if self.box_image().is_file():
            return False
        self.run(["box", "add", "--name", self.box.name, str(self.box.path)], timeout=900)
        return True

    def volume_name(self) -> str:
        """The pool volume name vagrant-libvirt 0.11 looks for (unversioned box: mtime)."""
        mtime = int(self.box_image().stat().st_mtime)
        return f"{self.box.name}_vagrant_box_image_0_{mtime}_box.img"

    def seed_pool(self) -> bool:
        """Put the box's image into libvirt's pool ourselves; True if a copy was made."""
        if _virsh("pool-info", POOL, check=False).returncode != 0:
            POOL_DIR.mkdir(parents=True, exist_ok=True)
            _virsh("pool-define-as", POOL, "dir", "--target", str(POOL_DIR))
        if "running" not in _virsh("pool-info", POOL).stdout:
            _virsh("pool-start", POOL)
        _virsh("pool-refresh", POOL)
        # name and path columns under a two-line header (virsh 9 has no --name here)
        vols = [line.split()[0] for line in _virsh("vol-list", POOL).stdout.splitlines()[2:]
                if line.strip()]
        name = self.volume_name()
        for vol in vols:
            if vol.startswith("targetmirror-lab-") and vol != name and \
                    not vol.startswith(self.box.name + "_vagrant_box_image_"):
                self.log(f"removing old box volume {vol}")
                _virsh("vol-delete", vol, "--pool", POOL, check=False)
        if name in vols:
            return False
        dest = POOL_DIR / name
        tmp = dest.with_name(f".{name}.tmp")
        subprocess.run(["cp", "--sparse=always", str(self.box_image()), str(tmp)], check=True)
        tmp.chmod(0o644)
        os.replace(tmp, dest)
        _virsh("pool-refresh", POOL)
        return True

    # -- machines

    def destroy_leftovers(self) -> None:
        """Tear down what a run that died left: its machines, then any stale lab domain."""
        if self.dotfile.is_dir():
            self.run(["destroy", "-f"], timeout=600, check=False)
        names = _virsh("list", "--all", "--name", check=False).stdout.split()
        for m in MACHINES:
            dom = DOMAIN_PREFIX + m
            if dom in names:
                self.log(f"removing leftover domain {dom}")
                _virsh("destroy", dom, check=False)
                _virsh("undefine", dom, "--remove-all-storage", check=False)

    def write_ssh_config(self, machines: Sequence[str]) -> Path:
        out = self.run(["ssh-config", *machines], timeout=300).stdout
        self.ssh_config.write_text(out)
        return self.ssh_config

    def ssh(self, machine: str, script: str, *, timeout: float = 600, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """Run ``script`` (sh) as root on ``machine``; its stdout/stderr are returned."""
        proc = subprocess.run(self.ssh_cmd(machine), input=script, capture_output=True,
                              text=True, timeout=timeout, check=False)
        with self.logfile.open("a") as fh:
            fh.write(f"\n[{machine}]$ {script.strip()}\n{proc.stdout}{proc.stderr}"
                     f"# status {proc.returncode}\n")
        if check and proc.returncode != 0:
            raise LabError(f"on {machine}: status {proc.returncode} from:\n{script.strip()}",
                           (proc.stdout + proc.stderr)[-3000:])
        return proc

    def ssh_cmd(self, machine: str) -> list[str]:
        return ["ssh", "-F", str(self.ssh_config), "-o", "LogLevel=ERROR",
                "-o", "ServerAliveInterval=15", machine, "sudo", "sh", "-s"]

    def spawn(self, machine: str, script: str, out: Path) -> subprocess.Popen[str]:
        """Start ``script`` on ``machine`` and return at once (e.g. a load to run meanwhile)."""
        fh = out.open("w")
        proc = subprocess.Popen(self.ssh_cmd(machine), stdin=subprocess.PIPE, stdout=fh,
                                stderr=subprocess.STDOUT, text=True)
        assert proc.stdin is not None
        proc.stdin.write(script)
        proc.stdin.close()
        fh.close()
        return proc


@contextlib.contextmanager
def timed(timings: dict[str, float], phase: str, log: Log = _stderr_log) -> Iterator[None]:
    """Record how long ``phase`` took (also when it fails)."""
    start = time.monotonic()
    try:
        yield
    finally:
        timings[phase] = round(time.monotonic() - start, 1)
        log(f"phase {phase}: {timings[phase]:.1f} s")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"

