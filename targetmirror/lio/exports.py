"""Which iSCSI targets export ``user:mirror`` backstores (read-only view for the shell)."""

from __future__ import annotations

from targetmirror.config.cfgstring import SUBTYPE
from targetmirror.errors import LioError
from targetmirror.lio import rts


def list_exports() -> list[tuple[str, int, str]]:
    """``(target IQN, LUN number, backstore name)`` for every LUN backed by ``user:mirror``."""
    root = rts.root()
    try:
        out = []
        for target in root.targets:
            for tpg in target.tpgs:
                for lun in tpg.luns:
                    so = lun.storage_object
                    if so.plugin == "user" and str(so.config or "").startswith(SUBTYPE + "/"):
                        out.append((str(target.wwn), int(lun.lun), str(so.name)))
    except rts.failures() as exc:
        raise LioError(str(exc)) from exc
    return sorted(out)
