"""Start a command inside (most of) a systemd unit's sandbox, without systemd.

The lab guest has no systemd as PID 1, so ``tests/lab/test_lab_deb.py`` cannot ``systemctl
start`` the installed unit. This script rebuilds what can be rebuilt with the kernel's own
tools, so that the installed daemon is proven to work inside the confinement the unit asks
for, not only next to it. Three stages, each exec'ing the next (the order systemd uses: mounts,
then credentials, then the system call filter, which would refuse the earlier steps):

1. ``mounts`` (run under ``unshare --mount``): ProtectSystem=strict (every mount read-only but
   /dev, /proc, /sys), ProtectKernelTunables (/sys and /proc/sys read-only), ReadWritePaths,
   StateDirectory and RuntimeDirectory writable, PrivateTmp (new /tmp and /var/tmp),
   ProtectHome (/home, /root, /run/user empty), ProtectKernelModules (/lib/modules empty);
2. ``setpriv``: CapabilityBoundingSet, NoNewPrivileges;
3. ``seccomp`` (python3-seccomp): SystemCallFilter (the groups expanded by the guest's own
   ``systemd-analyze syscall-filter``) with SystemCallErrorNumber, RestrictAddressFamilies,
   MemoryDenyWriteExecute, SystemCallArchitectures=native (libseccomp's default).

Not rebuilt (a real systemd proves them, in the Vagrant VMs): the device policy, ProtectProc,
ProtectClock's device rule, RestrictNamespaces, RestrictSUIDSGID, LockPersonality, UMask and
the environment (the caller sets those two).

Usage (by the test): python3 sandbox.py mounts SPEC.json -- CMD...   (SPEC: see ``plan``)
Only the standard library and python3-seccomp are imported: the command runs without the
source tree on the path.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import subprocess
import sys
from typing import Any

PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
AF_MAX = 46


def _mount(*args: str) -> None:
    subprocess.run(["mount", *args], check=True)


def _mount_points() -> list[str]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].encode().decode("unicode_escape")
            points.append(point)
    return points


def _under(path: str, roots: tuple[str, ...]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def mounts(spec: dict[str, Any]) -> None:
    """Stage 1, in a new mount namespace (``unshare --mount --propagation private``)."""
    api = ("/dev", "/proc", "/sys")
    writable = tuple(spec["writable"])
    # ProtectSystem=strict: everything read-only but the API file systems
    for point in _mount_points():
        if not _under(point, api):
            _mount("-o", "remount,bind,ro", point)
    # ProtectKernelTunables=yes: /sys (with its sub-mounts) and /proc/sys read-only
    if spec["protect_kernel_tunables"]:
        _mount("--bind", "/proc/sys", "/proc/sys")
        _mount("-o", "remount,bind,ro", "/proc/sys")
        for point in _mount_points():
            if _under(point, ("/sys",)) and not _under(point, writable):
                _mount("-o", "remount,bind,ro", point)
    # ReadWritePaths=, StateDirectory=, RuntimeDirectory=: writable again (a self bind mount
    # is a mount of its own, whose flag is independent of the read-only parent)
    for path in writable:
        _mount("--bind", path, path)
        _mount("-o", "remount,bind,rw", path)
    if spec["private_tmp"]:
        for path in ("/tmp", "/var/tmp"):
            if os.path.isdir(path):
                _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", path)
    for path in spec["inaccessible"]:  # ProtectHome=yes, ProtectKernelModules=yes
        if os.path.isdir(path):
            _mount("-t", "tmpfs", "-o", "mode=000,ro", "tmpfs", path)


def seccomp_filters(spec: dict[str, Any]) -> None:
    """Stage 3: load the filters in this process (they survive exec)."""
    import seccomp

    eperm = seccomp.ERRNO(errno.EPERM)
    if spec["address_families"]:
        fams = set(spec["address_families"])
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        refuse = seccomp.ERRNO(errno.EAFNOSUPPORT)
        for fam in range(AF_MAX):
            if fam not in fams:
                f.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.EQ, fam))
        f.add_rule(refuse, "socket", seccomp.Arg(0, seccomp.GE, AF_MAX))
        f.load()
    if spec["memory_deny_write_execute"]:
        f = seccomp.SyscallFilter(defaction=seccomp.ALLOW)
        wx = PROT_WRITE | PROT_EXEC
        f.add_rule(eperm, "mmap", seccomp.Arg(2, seccomp.MASKED_EQ, wx, wx))
        f.add_rule(eperm, "mprotect", seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.add_rule(eperm, "pkey_mprotect",
                   seccomp.Arg(2, seccomp.MASKED_EQ, PROT_EXEC, PROT_EXEC))
        f.add_rule(eperm, "shmat", seccomp.Arg(2, seccomp.MASKED_EQ, SHM_EXEC, SHM_EXEC))
        f.load()
    # the allow list last: it refuses seccomp() itself, and so any later filter
    base = seccomp.SyscallFilter(defaction=seccomp.ERRNO(spec["errno"]))
    for name in sorted(set(spec["syscalls"])):
        # a name this architecture lacks is skipped (systemd does the same)
        with contextlib.suppress(RuntimeError, ValueError, OSError):
            base.add_rule(seccomp.ALLOW, name)
    base.load()


def main(argv: list[str]) -> int:
    stage, spec_path, sep, *cmd = argv
    assert sep == "--" and cmd, "usage: sandbox.py mounts|seccomp SPEC -- CMD..."
    with open(spec_path) as f:
        spec = json.load(f)
    if stage == "mounts":
        mounts(spec)
        caps = ",".join(["-all", *("+" + c for c in spec["capabilities"])])
        nnp = ["--no-new-privs"] if spec["no_new_privileges"] else []
        os.execvp("setpriv", ["setpriv", "--bounding-set", caps, "--inh-caps", "-all", *nnp,
                              "--", sys.executable, os.path.abspath(__file__), "seccomp",
                              spec_path, "--", *cmd])
    if stage == "seccomp":
        seccomp_filters(spec)
        os.execv(cmd[0], cmd)
    raise SystemExit(f"unknown stage {stage}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
