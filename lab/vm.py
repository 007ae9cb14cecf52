"""Boot the lab guest once, run one command in it, and bring back its exit status.

The protocol between host and guest is deliberately dumb, so that it still works when the
guest is half broken:

* before boot the host writes the command as ``lab-cmd.sh`` into the writable output share;
* the guest's PID 1 (``lab/tm-lab-init``) runs it with the repository (read-only share) as cwd,
  then writes ``lab-exit-status`` into the output share, prints :data:`EXIT_MARKER` on the
  serial console, and powers off;
* the host reads the console from QEMU's stdout (to a log file, optionally echoed), enforces
  the time limit, and kills QEMU on every way out, including its own death (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lab import GUEST_OUT, GUEST_SRC, REPO_ROOT, LabError
from lab.image import GUEST_INIT_PATH, Image

QEMU = "qemu-system-x86_64"

#: Printed by tm-lab-init after the command ends; the file is the primary channel.
EXIT_MARKER = re.compile(r"@@tm-lab: exit status (\d+)")
BOOT_MARKER = re.compile(r"@@tm-lab: init up after ([0-9.]+)s")

CMD_FILE = "lab-cmd.sh"
STATUS_FILE = "lab-exit-status"
CONSOLE_LOG = "console.log"
QEMU_STDERR = "qemu-stderr.log"

#: Environment every guest command gets; callers may add more.
GUEST_ENV: dict[str, str] = {
    "TARGETMIRROR_IN_GUEST": "1",
    "TARGETMIRROR_LAB_OUT": GUEST_OUT,
    "PYTHONPATH": GUEST_SRC,
    # The repository share is read-only: do not even try to write __pycache__ there.
    "PYTHONDONTWRITEBYTECODE": "1",
    "PYTHONUNBUFFERED": "1",
    "HOME": "/root",
    "TERM": "dumb",
    # Hypothesis' default database (.hypothesis in the cwd) is on the read-only share.
    "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis",  # nosec B108
}

DEFAULT_MEMORY = "3G"
DEFAULT_CPUS = 2

#: A scratch disk (guest ``/dev/vdb``) for tests whose images do not fit guest tmpfs, which
#: lives in the guest's RAM (half of it by default: 1.5 GiB of 3 GiB).  It is a sparse raw file
#: made in the output folder for each boot and deleted after it, so it costs host disk only
#: for what a test writes.  Raising guest RAM instead would slow every boot's page clearing
#: under TCG and still cap images at half the RAM.  ``TARGETMIRROR_LAB_SCRATCH_GB=0``: none.
SCRATCH_FILE = "scratch.raw"
SCRATCH_GB = int(os.environ.get("TARGETMIRROR_LAB_SCRATCH_GB", "4"))

_PR_SET_PDEATHSIG = 1


@dataclass
class RunResult:
    """What a guest run produced; ``status`` is the command's exit status."""

    status: int
    out_dir: Path
    console_log: Path
    duration_s: float
    boot_s: float | None

    def console_tail(self, lines: int = 60) -> str:
        return _tail(self.console_log, lines)


def qemu_available() -> bool:
    return shutil.which(QEMU) is not None


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _die_with_parent() -> None:
    """In the QEMU child: get SIGKILL when the Python parent dies, however it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def guest_script(cmd: Sequence[str], env: Mapping[str, str] | None = None,
                 cwd: str = GUEST_SRC) -> str:
    """The shell script the guest runs: environment, cwd, then exec of the command."""
    lines = ["# written by the targetmirror lab host (lab/vm.py); run by tm-lab-init"]
    for key, value in {**GUEST_ENV, **(env or {})}.items():
        lines.append(f"export {key}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(cwd)} || exit 126")
    lines.append("exec " + shlex.join(cmd))
    return "\n".join(lines) + "\n"


def qemu_argv(image: Image, *, repo: Path, out_dir: Path, memory: str = DEFAULT_MEMORY,
              cpus: int = DEFAULT_CPUS, interactive: bool = False,
              extra_append: str = "", scratch: Path | None = None) -> list[str]:
    """The QEMU command line: TCG (this host's KVM cannot boot a stock kernel), no network,
    a throwaway snapshot of the image, the repository read-only and an output share."""
    append = (f"root=/dev/vda rw console=ttyS0 init={GUEST_INIT_PATH} quiet loglevel=1 "
              "panic=1 fsck.mode=skip mitigations=off nokaslr " + extra_append).strip()
    serial = (["-serial", "mon:stdio"] if interactive
              else ["-chardev", "stdio,id=con0,signal=off", "-serial", "chardev:con0"])
    return [
        QEMU,
        "-machine", "q35", "-accel", "tcg,thread=multi", "-cpu", "max",
        "-smp", str(cpus), "-m", memory,
        "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
        "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", append,
        "-drive", f"file={image.disk},format=raw,if=virtio,snapshot=on,cache=unsafe",
        *(["-drive", f"file={scratch},format=raw,if=virtio,cache=unsafe"] if scratch else []),
        "-virtfs", f"local,path={repo},mount_tag=src,security_model=none,readonly=on",
        "-virtfs", f"local,path={out_dir},mount_tag=out,security_model=none",
        *serial,
    ]


class _ConsoleReader(threading.Thread):
    """Copies QEMU's stdout (the guest console) to the log and, optionally, to a stream."""

    def __init__(self, src: IO[bytes], log: Path, echo: IO[str] | None) -> None:
        super().__init__(name="lab-console", daemon=True)
        self.src = src
        self.log = log
        self.echo = echo
        self.exit_status: int | None = None
        self.boot_s: float | None = None
        self.last = collections.deque[str](maxlen=200)

    def run(self) -> None:
        with self.log.open("w", encoding="utf-8", errors="replace") as fh:
            for raw in iter(self.src.readline, b""):
                line = raw.decode("utf-8", errors="replace").replace("\r", "")
                if not line.endswith("\n"):
                    line += "\n"
                fh.write(line)
                fh.flush()
                self.last.append(line)
                if self.echo is not None:
                    self.echo.write(line)
                    self.echo.flush()
                if m := EXIT_MARKER.search(line):
                    self.exit_status = int(m.group(1))
                elif m := BOOT_MARKER.search(line):
                    self.boot_s = float(m.group(1))


def run(cmd: Sequence[str], *, image: Image, out_dir: Path, repo: Path = REPO_ROOT,
        timeout: float = 600.0, env: Mapping[str, str] | None = None,
        echo: IO[str] | None = None, memory: str = DEFAULT_MEMORY,
        cpus: int = DEFAULT_CPUS) -> RunResult:
    """Boot the guest, run ``cmd`` in it (cwd = the repository), return its exit status.

    The console goes to ``out_dir/console.log`` (and to ``echo`` if given). Raises
    :class:`LabError` when the guest does not report an exit status within ``timeout``
    seconds or dies without one.
    """
    if not qemu_available():
        raise LabError(f"{QEMU} not found; run lab/install-host-deps.sh")
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (STATUS_FILE, CONSOLE_LOG, QEMU_STDERR, "dmesg.txt"):
        (out_dir / stale).unlink(missing_ok=True)
    (out_dir / CMD_FILE).write_text(guest_script(cmd, env))
    scratch = _make_scratch(out_dir)

    argv = qemu_argv(image, repo=repo.resolve(), out_dir=out_dir, memory=memory, cpus=cpus,
                     scratch=scratch)
    console = out_dir / CONSOLE_LOG
    start = time.monotonic()
    with (out_dir / QEMU_STDERR).open("wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, preexec_fn=_die_with_parent)
        assert proc.stdout is not None
        reader = _ConsoleReader(proc.stdout, console, echo)
        reader.start()
        try:
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill(proc)
                reader.join(timeout=5)
                raise LabError(f"lab guest timed out after {timeout:.0f} s running "
                               f"{shlex.join(cmd)[:120]} (console: {console})",
                               "".join(reader.last)[-6000:]) from None
        finally:
            _kill(proc)
            reader.join(timeout=5)
            proc.stdout.close()
            if scratch is not None:
                scratch.unlink(missing_ok=True)
    duration = time.monotonic() - start

    status = _read_status(out_dir / STATUS_FILE)
    if status is None:
        status = reader.exit_status
    if status is None:
        tail = "".join(reader.last)[-6000:]
        qerr = _tail(out_dir / QEMU_STDERR, 20)
        if qerr:
            tail += "\n--- qemu stderr ---\n" + qerr
        raise LabError(f"lab guest ended without an exit status (qemu status "
                       f"{proc.returncode}; console: {console})", tail)
    return RunResult(status=status, out_dir=out_dir, console_log=console,
                     duration_s=duration, boot_s=reader.boot_s)


def shell(*, image: Image, out_dir: Path, repo: Path = REPO_ROOT,
          memory: str = DEFAULT_MEMORY, cpus: int = DEFAULT_CPUS) -> int:
    """Boot the guest with an interactive bash on the terminal (Ctrl-A X quits QEMU)."""
    if not qemu_available():
        raise LabError(f"{QEMU} not found; run lab/install-host-deps.sh")
    out_dir = out_dir.resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STATUS_FILE).unlink(missing_ok=True)
    (out_dir / CMD_FILE).write_text(guest_script(["/bin/bash", "-l"], {"TERM": "vt100"}))
    argv = qemu_argv(image, repo=repo.resolve(), out_dir=out_dir, memory=memory, cpus=cpus,
                     interactive=True)
    proc = subprocess.Popen(argv, preexec_fn=_die_with_parent)
    try:
        proc.wait()
    finally:
        _kill(proc)
    return _read_status(out_dir / STATUS_FILE) or 0


def _make_scratch(out_dir: Path) -> Path | None:
    """A fresh, sparse scratch disk for one boot (see :data:`SCRATCH_GB`)."""
    if SCRATCH_GB <= 0:
        return None
    path = out_dir / SCRATCH_FILE
    path.unlink(missing_ok=True)
    with path.open("wb") as f:
        f.truncate(SCRATCH_GB << 30)
    return path


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            print(f"[lab] qemu pid {proc.pid} did not die", file=sys.stderr)


def _read_status(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.lstrip("-").isdigit() else None
