"""Run one command as a child subreaper that reaps every orphaned descendant.

libvirtd double-forks the QEMU processes it starts (its capability probes and the VMs), so they
are re-parented to PID 1 when they end. On hosts where PID 1 is not an init that reaps (a
container's process manager), they stay zombies; libvirtd then waits in vain for a probe it
killed to disappear ("kill painfully", seconds each time), fails the probe, and probes again on
the next call: every `vagrant up` step hangs. Run as ``python3 reaper.py CMD ARGS...``: this
process marks itself PR_SET_CHILD_SUBREAPER, so orphans come to it instead, and it reaps them;
SIGTERM/SIGINT/SIGHUP are passed on to CMD, and it exits with CMD's status once CMD is gone.
Standalone (stdlib only), so it can be started by path.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

PR_SET_CHILD_SUBREAPER = 36


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: reaper.py CMD [ARGS...]", file=sys.stderr)
        return 2
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        print(f"reaper.py: prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(err)}", file=sys.stderr)
        return 1
    pid = os.fork()
    if pid == 0:  # the command
        try:
            os.execvp(argv[0], argv)  # noqa: S606  # nosec B606: our argv, no shell
        finally:
            os._exit(127)

    def forward(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    while True:
        try:
            done, status = os.wait()
        except ChildProcessError:
            return 1
        except InterruptedError:
            continue
        if done == pid:
            return os.waitstatus_to_exitcode(status) & 0xFF


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
