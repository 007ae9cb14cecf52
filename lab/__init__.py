"""The real-kernel lab: a throwaway QEMU guest running Debian's kernel with LIO, TCMU and
open-iscsi, so tests can push real SCSI commands through our handler.

The host side is pure stdlib and has three parts:

* :mod:`lab.image` builds (and caches) the guest disk image, kernel and initrd;
* :mod:`lab.vm` boots the guest once, runs one command in it and brings back its exit status
  and console log;
* :mod:`lab.pytest_plugin` lets ``pytest -m lab`` on the host run the ``lab`` tests inside one
  guest boot and report their outcomes as if they had run locally.

``python3 -m lab --help`` is the command-line face of the first two.
"""

from __future__ import annotations

from pathlib import Path

#: The repository root: the folder the guest sees read-only at :data:`GUEST_SRC`.
REPO_ROOT = Path(__file__).resolve().parent.parent

#: Where the repository is mounted inside the guest (also the guest's cwd and PYTHONPATH).
GUEST_SRC = "/src"

#: Where the writable output share is mounted inside the guest.
GUEST_OUT = "/out"


class LabError(RuntimeError):
    """The lab itself failed (build, boot, timeout, guest crash), as opposed to a test failing.

    ``log_tail`` carries the last lines of the relevant log so that a CI failure can be read
    without digging for artifacts.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail

    def __str__(self) -> str:
        base = super().__str__()
        if self.log_tail:
            return f"{base}\n--- log tail ---\n{self.log_tail}"
        return base


__all__ = ["GUEST_OUT", "GUEST_SRC", "REPO_ROOT", "LabError"]
