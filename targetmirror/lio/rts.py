"""The one door to rtslib-fb: its module, LIO's root and the iSCSI fabric, each failure turned
into a :class:`~targetmirror.errors.LioError` that says what is missing.

rtslib-fb mounts configfs and loads ``target_core_mod`` / ``iscsi_target_mod`` itself when it
can; where it cannot (a container, a host without the modules) it fails with an ``OSError``
(``FileNotFoundError: /proc/modules``) or ``RTSLibError("Cannot mount configfs")``.  Both
become one line naming the cause and the fix, never a traceback.
"""

from __future__ import annotations

from typing import Any

from targetmirror.errors import LioError

FIX = ("LIO (the kernel's SCSI target) is not available on this host: load it with "
       "'modprobe -a target_core_mod target_core_user iscsi_target_mod' and mount configfs "
       "('mount -t configfs none /sys/kernel/config'); a container needs the host's LIO")


def module() -> Any:
    """``rtslib_fb`` (Debian: python3-rtslib-fb)."""
    try:
        import rtslib_fb
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise LioError("rtslib-fb is not installed (apt-get install python3-rtslib-fb, or "
                       "pip install rtslib-fb)") from exc
    return rtslib_fb


def failures() -> tuple[type[BaseException], ...]:
    """What an rtslib call raises when LIO refuses or is not there."""
    return (module().RTSLibError, OSError)


def root() -> Any:
    """LIO's root object (``RTSRoot``): every storage object and target."""
    rts = module()
    try:
        return rts.RTSRoot()
    except (rts.RTSLibError, OSError) as exc:
        raise LioError(f"{FIX} ({_why(exc)})") from exc


def iscsi() -> Any:
    """The iSCSI fabric module (loads ``iscsi_target_mod`` when it can)."""
    rts = module()
    root()  # configfs and target_core_mod first, with their own message
    try:
        return rts.FabricModule("iscsi")
    except (rts.RTSLibError, OSError) as exc:
        raise LioError(f"the iSCSI target (iscsi_target_mod) is not available: {_why(exc)}; "
                       "modprobe iscsi_target_mod") from exc


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.strerror or exc}: {exc.filename}"
    return str(exc) or type(exc).__name__
