"""``targetmirrord`` as a child process inside the lab guest, with its log on tmpfs.

Lab tests start the real daemon (from the shared source tree, under the guest's Debian python3),
create ``user:mirror`` backstores with the real ``targetmirror`` CLI, and wait for the daemon's
log to say it serves them.  Stopping sends SIGTERM and returns the exit status, which tests
assert is 0 (a clean shutdown that answered every in-flight command).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.lab import guest

REPO = Path(__file__).resolve().parents[2]


def python_env() -> dict[str, str]:
    """Environment for our commands: the source tree first on the path."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


def cli(*args: str, check: bool = True, timeout: float = 120
        ) -> subprocess.CompletedProcess[str]:
    """Run ``targetmirror ARGS`` (the real CLI) and return its result."""
    proc = subprocess.run([sys.executable, "-m", "targetmirror.cli", *args], cwd=REPO,
                          env=python_env(), capture_output=True, text=True, timeout=timeout,
                          check=False)
    if check and proc.returncode != 0:
        raise guest.GuestError(f"targetmirror {' '.join(args)} failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")
    return proc


class Mirrord:
    """The daemon under test."""

    def __init__(self, log_path: Path, *, workers: int = 2) -> None:
        self.log_path = log_path
        self.workers = workers
        self.extra_args: list[str] = []
        """More targetmirrord arguments for the next :meth:`start` (e.g. --metrics-address)."""
        self.state_dir = log_path.parent / "mirrord-state"
        self.socket = str(log_path.parent / "mirrord-run" / "control.sock")
        self.proc: subprocess.Popen[bytes] | None = None
        self._mark = 0

    def start(self) -> None:
        mark = len(self.log_text())
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the daemon
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "targetmirror.daemon.main", "--log-level", "debug",
             "--workers", str(self.workers), "--rescan-interval", "1",
             "--state-dir", str(self.state_dir), "--control-socket", self.socket,
             *self.extra_args],
            cwd=REPO, env=python_env(), stdout=self.log, stderr=subprocess.STDOUT)
        # only this run's lines count (a restart appends to the same log)
        self._mark = mark
        guest.wait_for(lambda: ("serving" in self.log_text()[mark:]
                                and os.path.exists(self.socket))
                       or self.proc.poll() is not None,
                       timeout=60, what="targetmirrord to start")
        if self.proc.poll() is not None:
            raise guest.GuestError(f"targetmirrord exited at start:\n{self.log_text()}")

    def ctl(self, command: str, *args: str, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        """Run ``targetmirror COMMAND --socket <ours> ARGS`` (daemon commands)."""
        return cli(command, "--socket", self.socket, *args, check=check)

    def ctl_json(self, command: str, *args: str, timeout: float = 120) -> dict:
        """Like :meth:`ctl` with ``--json``; returns the parsed answer."""
        import json

        return json.loads(cli(command, "--socket", self.socket, "--json", *args,
                              timeout=timeout).stdout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_serving(self, name: str, timeout: float = 60) -> None:
        """Wait until the daemon logs that it serves backstore ``name``."""
        guest.wait_for(lambda: f"serving {name}:" in self.log_text()[self._mark:],
                       timeout=timeout,
                       what=f"targetmirrord to serve {name}")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill9(self) -> int | None:
        """SIGKILL the daemon (no clean-up at all) and reap it; returns its status (-9)."""
        if self.proc is None:
            return None
        self.proc.kill()
        self.proc.wait(30)
        self.log.close()
        return self.proc.returncode

    def stop(self, timeout: float = 60) -> int | None:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
