"""``user:mirror`` backstores in LIO, through rtslib-fb (never hand-written configfs).

Every backstore we create carries ``nl_reply_supported=-1`` in its control string: once
tcmu-runner has run, the kernel otherwise waits (uninterruptibly) for a netlink reply on every
enable, and tcmu-runner answers -ENOENT for subtypes it does not know, failing the enable.
``hw_max_sectors`` defaults to 2048 (1 MiB per command) instead of the kernel's 128, so large
I/O is not chopped into 64 KiB pieces; the SCSI layer reports the same limit in VPD B0.
"""

from __future__ import annotations

from typing import Any

from targetmirror.config.cfgstring import SUBTYPE, MirrorSpec, check_images, parse_any
from targetmirror.errors import LioError
from targetmirror.lio import rts

DEFAULT_HW_MAX_SECTORS = 2048
DEFAULT_CONTROL = "nl_reply_supported=-1"


def find_backstore(name: str) -> Any | None:
    """The ``user:mirror`` storage object called ``name``, or None."""
    for so in rts.root().storage_objects:
        if so.plugin == "user" and so.name == name and str(so.config or "").startswith(
                SUBTYPE + "/"):
            return so
    return None


def create_backstore(name: str, size: int, cfgstring: str, *,
                     hw_max_sectors: int = DEFAULT_HW_MAX_SECTORS, wwn: str | None = None,
                     check: bool = True) -> Any:
    """Create and enable a ``user:mirror`` backstore; roll back if any step fails.

    The cfgstring is parsed and (with ``check``) the images checked on this host first, so a bad
    one is refused with a reason before LIO sees it.
    """
    rtslib = rts.module()
    spec = parse_any(cfgstring)
    if check and isinstance(spec, MirrorSpec):
        check_images(spec, size)
    if find_backstore(name) is not None:
        raise LioError(f"a user:mirror backstore named {name!r} already exists")
    try:
        return rtslib.UserBackedStorageObject(
            name, size=size, config=f"{SUBTYPE}/{spec.to_cfgstring()}", wwn=wwn,
            hw_max_sectors=hw_max_sectors, control=DEFAULT_CONTROL)
    except (rtslib.RTSLibError, OSError) as exc:
        # rtslib removes the half-made object itself when _configure fails; make sure.
        so = find_backstore(name)
        if so is not None:
            so.delete()
        raise LioError(f"creating user:mirror backstore {name!r} failed: {exc}") from exc


def delete_backstore(name: str) -> None:
    """Delete the backstore and every LUN that exports it."""
    so = find_backstore(name)
    if so is None:
        raise LioError(f"no user:mirror backstore named {name!r}")
    try:
        for lun in list(so.attached_luns):
            lun.delete()
        so.delete()
    except rts.failures() as exc:
        raise LioError(f"deleting user:mirror backstore {name!r} failed: {exc}") from exc
