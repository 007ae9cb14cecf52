"""Backups into the cluster: an RBD snapshot of a split mirror's image A (claim 5).

After a split, A holds the LUN as of the split instant and is frozen (no write reaches it until
the rejoin), so a snapshot of the RBD image taken at any moment before the rejoin holds exactly
that instant's data.  ``targetmirror backup NAME --rbd-snapshot`` takes one, named
``tm-<mirror>-e<epoch>-<instant UTC>``, and can rejoin right away: the snapshot stays in the
cluster, where it outlives the target host.

Each snapshot is *recorded* in the image's own metadata (``targetmirror.snapshot.<snap>`` ->
JSON: mirror, epoch, split instant, A's status, when it was taken), so the record lives next to
the data, and any host that can reach the cluster can list it.  Snapshots somebody else made
on the image are never listed as ours nor pruned.  Pruning keeps the newest ``keep``
(``mirrors[].rbd_snapshots_keep`` in the config file, or ``--keep``), oldest first out.
"""

from __future__ import annotations

import json
import time
from typing import Any

from targetmirror.errors import MirrorError
from targetmirror.store.rbd import CephAccess, RbdImage, is_rbd

META_PREFIX = "targetmirror.snapshot."


def snapshot_name(mirror: str, epoch: int, instant_wall: float | None) -> str:
    """``tm-db-e7-20261126T010203Z``: mirror, split epoch and instant, sortable by time."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(instant_wall or time.time()))
    return f"tm-{mirror}-e{epoch}-{stamp}"


def _open(image: str, access: CephAccess) -> RbdImage:
    if not is_rbd(image):
        raise MirrorError(f"image A ({image}) is not an RBD image: --rbd-snapshot needs a "
                          "mirror whose image_a is rbd/POOL/IMAGE")
    return RbdImage(image, access)


def list_snapshots(image: str, access: CephAccess) -> list[dict[str, Any]]:
    """Our recorded snapshots of ``image``, oldest first, each with its record."""
    img = _open(image, access)
    try:
        return _recorded(img)
    finally:
        img.close()


def _recorded(img: RbdImage) -> list[dict[str, Any]]:
    meta = img.metadata()
    out = []
    for snap in img.snapshots():
        raw = meta.get(META_PREFIX + snap["name"])
        if raw is None:
            continue
        try:
            record = json.loads(raw)
        except ValueError:
            record = {}
        out.append({"snapshot": snap["name"], "image": img.path, **record})
    return out


def take(image: str, access: CephAccess, *, mirror: str, split: dict[str, Any],
         keep: int = 0) -> dict[str, Any]:
    """Snapshot ``image`` (A of split ``mirror``), record it, prune to ``keep`` (0: keep all).

    ``split`` is the mirror's split record from the daemon's status (epoch, instant_wall,
    a_status).  Returns what was taken and pruned.
    """
    if split.get("a_status") not in ("consistent", "crash-consistent"):
        raise MirrorError(f"image A of {mirror} is not a usable copy: {split.get('a_status')}")
    snap = snapshot_name(mirror, int(split["epoch"]), split.get("instant_wall"))
    img = _open(image, access)
    try:
        if any(s["name"] == snap for s in img.snapshots()):
            raise MirrorError(f"{image} already has snapshot {snap} (this split was backed up)")
        img.create_snapshot(snap)
        record = {"mirror": mirror, "epoch": int(split["epoch"]),
                  "instant_wall": split.get("instant_wall"), "a_status": split["a_status"],
                  "taken_wall": time.time()}
        img.set_metadata(META_PREFIX + snap, json.dumps(record, sort_keys=True))
        pruned = prune(img, keep)
        return {"rbd_snapshot": snap, "rbd_image": image, "record": record, "pruned": pruned,
                "kept": [s["snapshot"] for s in _recorded(img)]}
    finally:
        img.close()


def prune(img: RbdImage, keep: int) -> list[str]:
    """Remove our oldest recorded snapshots beyond ``keep``; return their names."""
    if keep <= 0:
        return []
    ours = _recorded(img)
    gone = []
    for rec in ours[:max(0, len(ours) - keep)]:
        img.remove_snapshot(rec["snapshot"])
        img.remove_metadata(META_PREFIX + rec["snapshot"])
        gone.append(rec["snapshot"])
    return gone
