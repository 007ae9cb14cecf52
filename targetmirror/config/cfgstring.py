"""The cfgstring of a ``user:mirror`` backstore: which two images back the LUN.

The kernel carries it in ``dev_config`` and in the UIO device's name
(``tcm-user/<hba>/<dev>/mirror/<cfgstring>``).  ``dev_config`` may not contain ',' (the control
file's separator) nor ':' (rtslib refuses it), and is at most 255 bytes with the subtype, so the
format is ``;``-separated ``key=value`` pairs::

    a=/srv/images/db-a.raw;b=/srv/images/db-b.raw

Keys: ``a`` and ``b`` (required): absolute paths of the two images; ``direct`` (optional, 0/1):
open with O_DIRECT where the backing allows it; ``region`` (optional): the change bitmap's region
size in bytes (a power of two >= 4096) for a new mirror (an existing mirror keeps the region size
its saved state records).

A leg may instead be an RBD image in a Ceph cluster: ``a=rbd/POOL/IMAGE`` or
``a=rbd/POOL/NAMESPACE/IMAGE`` (see :mod:`targetmirror.store.rbd`).  How that leg reaches its
cluster is given by optional per-leg keys, each only for an RBD leg: ``a_conf`` (ceph.conf path,
default /etc/ceph/ceph.conf), ``a_id`` (cephx client name without ``client.``, default admin),
``a_keyring`` (keyring path, default what ceph.conf says), ``a_timeout`` (seconds, 1-300,
default 10: an unreachable cluster fails the leg after this); likewise ``b_*``.  Both legs may
be RBD (two pools or two clusters), or one of them.

A read-only *snapshot* LUN exports a split mirror's image A so a backup tool can read it over
iSCSI (claim 5): ``snapshot=/srv/images/db-a.raw``; or an RBD snapshot taken by
``targetmirror backup --rbd-snapshot``: ``snapshot=rbd/POOL/IMAGE@SNAP`` (with ``conf``, ``id``,
``keyring`` keys as above, unprefixed).  The daemon serves it write-protected, and
only while the mirror owning that image is split.

A *volume 2* LUN (one-way cut-over, claim 4) is a second export of an existing mirror through a
second backstore: ``mirror=NAME;volume=2``, where NAME is the mirror's own backstore (volume 1).
Both are served by one mirror; after ``targetmirror split --one-way NAME`` writes through
volume 1 still reach A and B, writes through volume 2 reach B only.

Parsing is pure; :func:`check_images` then checks the paths on this host (exists, file or
block device, not the same image twice, big enough) so that ``targetmirror create`` and the
D-Bus CheckConfig give the admin the reason
before LIO ever sees the device.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from targetmirror.errors import ConfigError
from targetmirror.store.rbd import (
    DEFAULT_CLIENT,
    DEFAULT_CONF,
    DEFAULT_TIMEOUT,
    CephAccess,
    is_rbd,
    parse_name,
)

MAX_DEV_CONFIG = 255
SUBTYPE = "mirror"
FORBIDDEN = {",": "a comma", ":": "a colon", "\n": "a newline", "\0": "a NUL byte"}
CEPH_KEYS = ("conf", "id", "keyring", "timeout")
KEYS = {"a", "b", "direct", "region"} | {f"{leg}_{k}" for leg in "ab" for k in CEPH_KEYS}
SNAPSHOT_KEY = "snapshot"


@dataclass(frozen=True, slots=True)
class MirrorSpec:
    """What a cfgstring names: the two images and how to open them."""

    image_a: str
    image_b: str
    direct: bool = False
    region_size: int | None = None
    """None: the daemon's default (64 KiB)."""
    ceph_a: CephAccess | None = None
    """How leg A reaches its cluster, when A is an RBD image (``rbd/...``)."""
    ceph_b: CephAccess | None = None

    def access(self, leg: str) -> CephAccess | None:
        """The cluster access of leg ``a`` or ``b`` (None for a file or block device)."""
        image = self.image_a if leg == "a" else self.image_b
        if not is_rbd(image):
            return None
        return (self.ceph_a if leg == "a" else self.ceph_b) or CephAccess()

    def to_cfgstring(self) -> str:
        """The canonical cfgstring for this spec (round-trips through :func:`parse`)."""
        text = f"a={self.image_a};b={self.image_b}"
        if self.direct:
            text += ";direct=1"
        if self.region_size is not None:
            text += f";region={self.region_size}"
        for leg in "ab":
            acc = self.access(leg)
            if acc is not None:
                text += ceph_items(acc, f"{leg}_")
        return text


def ceph_items(acc: CephAccess, prefix: str) -> str:
    """``;a_conf=...;a_id=...`` for the non-default parts of ``acc``."""
    text = ""
    if acc.conf != DEFAULT_CONF:
        text += f";{prefix}conf={acc.conf}"
    if acc.client != DEFAULT_CLIENT:
        text += f";{prefix}id={acc.client}"
    if acc.keyring:
        text += f";{prefix}keyring={acc.keyring}"
    if acc.timeout != DEFAULT_TIMEOUT:
        text += f";{prefix}timeout={acc.timeout}"
    return text


def ceph_access(values: dict[str, str], prefix: str, leg: str) -> CephAccess:
    """Build a :class:`CephAccess` from ``PREFIXconf`` ... keys (``leg`` names it in errors)."""
    conf = values.get(f"{prefix}conf", DEFAULT_CONF)
    _check_path(f"{prefix}conf", conf)
    client = values.get(f"{prefix}id", DEFAULT_CLIENT)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", client):
        raise ConfigError(f"cfgstring key '{prefix}id': expected a cephx client name without "
                          f"'client.' (letters, digits, '_', '.', '-'), got {client!r}")
    keyring = values.get(f"{prefix}keyring", "")
    if keyring:
        _check_path(f"{prefix}keyring", keyring)
    text = values.get(f"{prefix}timeout", str(DEFAULT_TIMEOUT))
    timeout = int(text) if text.isdigit() else 0
    if not 1 <= timeout <= 300:
        raise ConfigError(f"cfgstring key '{prefix}timeout': expected whole seconds 1-300 for "
                          f"{leg}, got {text!r}")
    return CephAccess(conf, client, keyring, timeout)


@dataclass(frozen=True, slots=True)
class SnapshotSpec:
    """A read-only export of one image (a split mirror's A)."""

    image: str
    ceph: CephAccess | None = None
    """For an RBD snapshot (``rbd/POOL/IMAGE@SNAP``): how to reach its cluster."""

    def to_cfgstring(self) -> str:
        text = f"{SNAPSHOT_KEY}={self.image}"
        if self.ceph is not None:
            text += ceph_items(self.ceph, "")
        return text


@dataclass(frozen=True, slots=True)
class VolumeSpec:
    """A second LUN of an existing mirror (one-way cut-over)."""

    mirror: str
    volume: int = 2

    def to_cfgstring(self) -> str:
        return f"{MIRROR_KEY}={self.mirror};{VOLUME_KEY}={self.volume}"


MIRROR_KEY = "mirror"
VOLUME_KEY = "volume"
_MIRROR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def parse_volume(body: str) -> VolumeSpec:
    """``mirror=NAME;volume=2`` (keys in any order, both required, nothing else)."""
    values = _pairs(body, {MIRROR_KEY, VOLUME_KEY},
                    where=f"a volume cfgstring; expected {MIRROR_KEY}=NAME;{VOLUME_KEY}=2")
    for key in (MIRROR_KEY, VOLUME_KEY):
        if key not in values:
            raise ConfigError(f"cfgstring lacks key '{key}' (expected "
                              f"{MIRROR_KEY}=NAME;{VOLUME_KEY}=2)")
    if not _MIRROR_NAME.fullmatch(values[MIRROR_KEY]):
        raise ConfigError(f"cfgstring key '{MIRROR_KEY}': {values[MIRROR_KEY]!r} is not a "
                          "mirror name (letters, digits, '_', '.', '-')")
    if values[VOLUME_KEY] != "2":
        raise ConfigError(f"cfgstring key '{VOLUME_KEY}': expected 2 (volume 1 is the "
                          f"mirror's own backstore), got {values[VOLUME_KEY]!r}")
    return VolumeSpec(values[MIRROR_KEY], 2)


def _check_path(key: str, path: str) -> str:
    if not path.startswith("/"):
        raise ConfigError(f"cfgstring key '{key}': expected an absolute path, got {path!r}")
    parts = path.split("/")[1:]
    if any(p in ("", ".", "..") for p in parts):
        raise ConfigError(f"cfgstring key '{key}': path {path!r} must be normalised "
                          "(no '.', '..' or empty components)")
    for ch in ";=":
        if ch in path:
            raise ConfigError(f"cfgstring key '{key}': path {path!r} may not contain {ch!r}")
    return path


def parse_any(cfgstring: str) -> MirrorSpec | SnapshotSpec | VolumeSpec:
    """Parse any form of cfgstring."""
    body = cfgstring[len(SUBTYPE) + 1:] if cfgstring.startswith(SUBTYPE + "/") else cfgstring
    keys = {item.partition("=")[0] for item in body.split(";")}
    if keys & {MIRROR_KEY, VOLUME_KEY}:
        for ch, name in FORBIDDEN.items():
            if ch in body:
                raise ConfigError(f"cfgstring may not contain {name}: {body!r}")
        return parse_volume(body)
    if body.startswith(SNAPSHOT_KEY + "="):
        for ch, name in FORBIDDEN.items():
            if ch in body:
                raise ConfigError(f"cfgstring may not contain {name}: {body!r}")
        first, _, rest = body.partition(";")
        image = first[len(SNAPSHOT_KEY) + 1:]
        if is_rbd(image):
            parsed = parse_name(image, f"cfgstring key '{SNAPSHOT_KEY}'")
            if not parsed.snapshot:
                raise ConfigError(f"cfgstring key '{SNAPSHOT_KEY}': an RBD snapshot LUN needs "
                                  f"rbd/POOL/IMAGE@SNAP, got {image!r}")
            values = _pairs(rest, set(CEPH_KEYS))
            return SnapshotSpec(image, ceph_access(values, "", "the snapshot"))
        if rest:
            raise ConfigError(f"a snapshot cfgstring takes only {SNAPSHOT_KEY}=PATH: {body!r}")
        return SnapshotSpec(_check_path(SNAPSHOT_KEY, image))
    return parse(cfgstring)


def _pairs(text: str, allowed: set[str], where: str | None = None) -> dict[str, str]:
    """``key=value;...`` into a dict: every key in ``allowed``, none twice, empty items skipped.
    ``where`` names the kind of cfgstring in the unknown-key error."""
    values: dict[str, str] = {}
    for item in text.split(";"):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"cfgstring item {item!r}: expected key=value")
        if key not in allowed:
            if where is not None:
                raise ConfigError(f"cfgstring key {key!r} is not allowed in {where}")
            raise ConfigError(f"cfgstring key {key!r} is unknown here; expected one of "
                              f"{', '.join(sorted(allowed))}")
        if key in values:
            raise ConfigError(f"cfgstring key {key!r} is given twice")
        values[key] = value
    return values


def parse(cfgstring: str) -> MirrorSpec:
    """Parse a cfgstring (without the ``mirror/`` subtype prefix) into a :class:`MirrorSpec`."""
    if cfgstring.startswith(SUBTYPE + "/"):
        cfgstring = cfgstring[len(SUBTYPE) + 1:]
    for ch, name in FORBIDDEN.items():
        if ch in cfgstring:
            raise ConfigError(f"cfgstring may not contain {name} (the kernel's dev_config "
                              f"does not allow it): {cfgstring!r}")
    if len(SUBTYPE) + 1 + len(cfgstring) > MAX_DEV_CONFIG:
        raise ConfigError(f"cfgstring is {len(cfgstring)} characters; with 'mirror/' it must "
                          f"fit the kernel's {MAX_DEV_CONFIG}-byte dev_config")
    values = _pairs(cfgstring, KEYS)
    for key in ("a", "b"):
        if key not in values:
            raise ConfigError(f"cfgstring lacks key '{key}' (expected a=PATH;b=PATH)")
    direct = values.get("direct", "0")
    if direct not in ("0", "1"):
        raise ConfigError(f"cfgstring key 'direct': expected 0 or 1, got {direct!r}")
    region: int | None = None
    if "region" in values:
        text = values["region"]
        region = int(text) if text.isdigit() else 0
        if region < 4096 or region & (region - 1):
            raise ConfigError(f"cfgstring key 'region': expected a power of two >= 4096, "
                              f"got {text!r}")
    legs: dict[str, str] = {}
    access: dict[str, CephAccess | None] = {}
    for leg in "ab":
        value = values[leg]
        if is_rbd(value):
            rname = parse_name(value, f"cfgstring key '{leg}'")
            if rname.snapshot:
                raise ConfigError(f"cfgstring key '{leg}': a leg cannot be a snapshot "
                                  f"({value!r})")
            legs[leg] = str(rname)
            access[leg] = ceph_access(values, f"{leg}_", f"leg {leg}")
        else:
            legs[leg] = _check_path(leg, value)
            extra = sorted(k for k in values if k.startswith(f"{leg}_"))
            if extra:
                raise ConfigError(f"cfgstring key {extra[0]!r}: only for an RBD leg "
                                  f"({leg}=rbd/POOL/IMAGE), but {leg} is the path {value!r}")
            access[leg] = None
    a, b = legs["a"], legs["b"]
    if a == b and (not is_rbd(a) or access["a"] == access["b"]):
        raise ConfigError(f"cfgstring names the same image for a and b: {a}")
    return MirrorSpec(a, b, direct == "1", region, access["a"], access["b"])


def check_images(spec: MirrorSpec, size: int | None = None) -> None:
    """Check on this host that both images exist, are usable and distinct, and hold ``size``."""
    ids = []
    for key, path in (("a", spec.image_a), ("b", spec.image_b)):
        if is_rbd(path):
            # reached over the network by the daemon; its open reports a missing image
            ids.append((-1, -1, hash(path)))
            continue
        try:
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"image {key} {path}: {exc.strerror}") from exc
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ConfigError(f"image {key} {path}: expected a regular file or block device")
        ids.append((st.st_dev, st.st_ino, st.st_rdev))
        if size is not None and stat.S_ISREG(st.st_mode) and st.st_size < size:
            raise ConfigError(f"image {key} {path}: has {st.st_size} bytes, the LUN needs {size}")
    if ids[0] == ids[1] and not is_rbd(spec.image_a):
        raise ConfigError(f"images a and b are the same file: {spec.image_a}, {spec.image_b}")


def image_identity(path: str) -> tuple[object, ...] | None:
    """What makes two paths the same image: (device, inode) of a file, the device number of a
    block device; None when the path cannot be stat'ed (it cannot be served either)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISBLK(st.st_mode):
        return ("blk", st.st_rdev)
    return (st.st_dev, st.st_ino)


def check_confined(key: str, path: str, image_dirs: tuple[str, ...]) -> str:
    """Return *path* resolved (symlinks, ``..``) if it lies inside one of *image_dirs*.

    The daemon applies this to every cfgstring it serves — also to backstores made by hand with
    targetcli, which never went through the configuration loader — so a LUN cannot be pointed
    at a file outside the directories the admin set aside for images.  *image_dirs* must be
    resolved already.  Raises :class:`ConfigError` naming the key, the path and what it
    resolves to.
    """
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, d]) == d for d in image_dirs):
        via = "" if real == os.path.normpath(path) else f" (it resolves to {real})"
        raise ConfigError(f"image {key} {path}{via} is outside the image directories "
                          f"({', '.join(image_dirs) or 'none'})")
    return real
