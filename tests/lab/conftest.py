"""Fixtures for lab tests (they run inside the QEMU guest; see lab/pytest_plugin.py).

On the host these fixtures are never set up: the lab plugin replays the guest's results
instead. Used outside the guest they fail with a clear message.

* ``lab_kernel`` (session): modules loaded, configfs mounted, console quiet.
* ``lio`` (function): a clean LIO and initiator before and after the test.
* ``tcmu_runner`` (function): a running tcmu-runner (``guest.TcmuRunner``), stopped after.
* ``mirrord`` (function): targetmirrord running (``tests.lab.mirrord.Mirrord``) on a clean LIO;
  at teardown it must exit 0 on SIGTERM with no traceback in its log.

Scratch files belong on guest tmpfs: pytest's ``tmp_path`` already is (/tmp is tmpfs there).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.lab import guest
from tests.lab.mirrord import Mirrord


@dataclass(frozen=True)
class LabKernel:
    """What the session fixture set up."""

    release: str
    initiator_name: str


@pytest.fixture(scope="session")
def lab_kernel() -> Iterator[LabKernel]:
    """Load the LIO/TCMU/iSCSI modules and mount configfs once per guest session."""
    guest.require_guest("the lab_kernel fixture")
    guest.setup_kernel()
    yield LabKernel(release=guest.kernel_release(), initiator_name=guest.initiator_name())
    guest.iscsi_logout_all()
    guest.clear_lio()


@pytest.fixture
def lio(lab_kernel: LabKernel) -> Iterator[LabKernel]:
    """Start and end the test with no iSCSI sessions and no LIO objects."""
    guest.iscsi_logout_all()
    guest.clear_lio()
    yield lab_kernel
    guest.iscsi_logout_all()
    guest.clear_lio()


@pytest.fixture
def tcmu_runner(lab_kernel: LabKernel, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[guest.TcmuRunner]:
    """A running tcmu-runner (handlers: Debian's plus our compiled `file`), log on tmpfs."""
    runner = guest.TcmuRunner(tmp_path_factory.mktemp("tcmu-runner-log"))
    runner.start()
    try:
        yield runner
    finally:
        status = runner.stop()
        log = runner.log_text()
        Path(runner.log_dir, "exit-status").write_text(f"{status}\n")
        if log:
            print(f"--- tcmu-runner log (exit status {status}) ---\n{log[-4000:]}")


@pytest.fixture
def mirrord(lio: LabKernel, tmp_path: Path) -> Iterator[Mirrord]:
    """targetmirrord serving this test's mirrors; its log is printed at teardown."""
    daemon = Mirrord(tmp_path / "targetmirrord.log")
    daemon.start()
    try:
        yield daemon
    finally:
        guest.iscsi_logout_all()
        status = daemon.stop()
        log = daemon.log_text()
        print(f"--- targetmirrord log (exit status {status}) ---\n{log[-6000:]}")
        assert status == 0, "targetmirrord did not shut down cleanly on SIGTERM"
        assert "Traceback" not in log, "targetmirrord logged a traceback"
