"""Which iSCSI targets export ``user:mirror`` backstores (read-only view for the shell)."""

from __future__ import annotations

from targetmirror.config.cfgstring import SUBTYPE
from targetmirror.errors import LioError


def list_exports() -> list[tuple[str, int, str]]:
    """``(target IQN, LUN number, backstore name)`` for every LUN backed by ``user:mirror``."""
    try:
        import rtslib_fb

        root = rtslib_fb.RTSRoot()
        out = []
        for target in root.targets:
            for tpg in target.tpgs:
                for lun in tpg.luns:
                    so = lun.storage_object
                    if so.plugin == "user" and str(so.config or "").startswith(SUBTYPE + "/"):
                        out.append((str(target.wwn), int(lun.lun), str(so.name)))
    except ImportError as exc:
        raise LioError("rtslib-fb is not installed") from exc
    except (rtslib_fb.RTSLibError, OSError) as exc:
        raise LioError(str(exc)) from exc
    return sorted(out)
