"""The YAML configuration file: load it over documented defaults and validate all of it.

``/etc/targetmirror/targetmirror.yaml`` (or ``--config F`` / ``$TARGETMIRROR_CONFIG``) describes
the mirrors, consistency groups, iSCSI exports and daemon settings of one host.  It is read with
``yaml.safe_load`` (no arbitrary objects), laid over :data:`DEFAULTS`, and checked *completely*
before anything on the host changes: every problem found is collected, and :func:`load` raises
one :class:`~targetmirror.errors.ConfigFileError` listing them all, each naming the file, the key
path (``mirrors[1].image_b``) and what was expected.  Admins fix a file in one pass instead of
one error per run (the complaint behind ceph-iscsi #65 and #198).

Validation reads the host (does an image exist, where does a symlink point) but never writes.
Image paths are resolved (symlinks and ``..``) before they are compared with the allowed image
directories, so a link inside an allowed directory that points elsewhere is refused; the
resolved path is what the backstore's cfgstring carries, so a symlink swapped later cannot
redirect a running mirror.

The result is a :class:`Config` of frozen dataclasses; a mirror maps onto the cfgstring of its
``user:mirror`` backstore through :meth:`MirrorConfig.spec`.

Why no schema library (measured for issue 16): pydantic v2 is not in Debian bookworm (its
python3-pydantic is 1.10), and the lab guest and the Debian package can use only bookworm's.
jsonschema 4.10 (python3-jsonschema) covers only shape, types, required and unknown keys: the
schema for this file plus the adapter that turns its errors into our
``FILE: key.path: expected ..., got ...`` lines came to 73 lines, against the 60 of
:class:`_Checker`; its own messages ("[] is too short", "300 is greater than the maximum of
255") needed a translation per keyword, a typo of a required key gave two errors, and every
check only we know (sizes with units, names, IQNs, portals, image paths, duplicates, group
members, CHAP) stays here either way.  So the checker stays ours.
"""

from __future__ import annotations

import difflib
import os
import re
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from targetmirror.config.cfgstring import MirrorSpec, parse
from targetmirror.errors import ConfigError, ConfigFileError
from targetmirror.mirror.bitmap import DEFAULT_REGION
from targetmirror.names import IQN_EXPECTED, NAME_EXPECTED, valid_iscsi_name, valid_name
from targetmirror.netaddr import EXPECTED, parse_hostport
from targetmirror.store.rbd import CephAccess, is_rbd, parse_name
from targetmirror.units import human_size, parse_size

DEFAULT_PATH = "/etc/targetmirror/targetmirror.yaml"
ENV_VAR = "TARGETMIRROR_CONFIG"

#: Every key of the file: (key path, default, meaning).  ``[]`` marks a list item; a default
#: of ``None`` means the key is required.  docs/operations.md documents exactly these rows
#: (tests/config/test_docs.py checks it), so the reference cannot drift from the code.
DEFAULTS: tuple[tuple[str, Any, str], ...] = (
    ("daemon.control_socket", "/run/targetmirror/control.sock",
     "Unix socket of targetmirrord's control API (root only)"),
    ("daemon.state_dir", "/var/lib/targetmirror",
     "durable mirror state, change bitmaps, groups and apply's ownership manifest"),
    ("daemon.metrics_address", "",
     "HOST:PORT of the Prometheus endpoint; empty turns it off"),
    ("daemon.log_level", "info", "one of debug, info, warning, error"),
    ("daemon.write_intent_extent", "4M",
     "while mirrored, a write marks this much around it in the bitmap: one bitmap sync per "
     "extent, and a crash or failed leg copies the hot extents whole (a power of two, 4K-1G)"),
    ("image_dirs", ["/var/lib/targetmirror/images"],
     "directories images must resolve into (after symlinks and ..)"),
    ("mirrors", [], "the mirrored LUNs"),
    ("mirrors[].name", None,
     "backstore name: letters, digits, '_', '.', '-' (at most 64 characters)"),
    ("mirrors[].size", None, "LUN size in bytes or with a unit (512M, 10G); a multiple of 512"),
    ("ceph", [], "Ceph clusters that RBD legs live in (docs/rbd.md)"),
    ("ceph[].name", None, "cluster name, referred to by mirrors[].cluster_a/cluster_b"),
    ("ceph[].conf", "/etc/ceph/ceph.conf", "the cluster's ceph.conf (monitors, options)"),
    ("ceph[].client", "admin",
     "cephx user without 'client.' (least caps: mon 'profile rbd', osd 'profile rbd pool=P')"),
    ("ceph[].keyring", "", "that user's keyring file; empty: what ceph.conf says"),
    ("ceph[].timeout", 10,
     "seconds (1-300) an operation may take before the leg fails into degraded mode"),
    ("mirrors[].image_a", None,
     "image A, the leg that is split off: an absolute path, or rbd/POOL[/NAMESPACE]/IMAGE"),
    ("mirrors[].image_b", None,
     "image B, the live leg: an absolute path, or rbd/POOL[/NAMESPACE]/IMAGE"),
    ("mirrors[].cluster_a", "",
     "for an RBD image_a: the ceph entry it lives in (may be left out if there is one)"),
    ("mirrors[].cluster_b", "", "the same for an RBD image_b"),
    ("mirrors[].rbd_snapshots_keep", 0,
     "backup --rbd-snapshot keeps this many snapshots of an RBD image_a, pruning the oldest; "
     "0 keeps all"),
    ("mirrors[].region_size", human_size(DEFAULT_REGION),
     "change-bitmap region: a power of two of at least 4K; fixed once the mirror exists"),
    ("mirrors[].direct", False, "open the images with O_DIRECT"),
    ("mirrors[].create_images", False,
     "create missing image files (sparse, of size); existing ones are never touched"),
    ("groups", [], "consistency groups: mirrors split at one instant"),
    ("groups[].name", None, "group name: letters, digits, '_', '.', '-'"),
    ("groups[].mirrors", None, "two or more mirror names; a mirror is in at most one group"),
    ("exports", [], "iSCSI targets"),
    ("exports[].target", None, "target IQN, e.g. iqn.2026-01.com.example:db (lower case)"),
    ("exports[].portals", ["0.0.0.0:3260"], "IP:PORT list ([IPv6]:PORT for IPv6)"),
    ("exports[].luns", None, "LUNs of the target"),
    ("exports[].luns[].lun", None, "LUN number, 0-255, unique within the target"),
    ("exports[].luns[].mirror", None, "a mirror named under mirrors"),
    ("exports[].acls", None, "initiators allowed to log in (at least one); each sees every LUN"),
    ("exports[].acls[].initiator", None, "initiator IQN"),
    ("exports[].acls[].chap_user", "", "CHAP user name; set it on all ACLs of a target or none"),
    ("exports[].acls[].chap_password", "", "CHAP secret, 12-255 characters"),
    ("exports[].acls[].mutual_chap_user", "",
     "mutual CHAP: the name the target answers with"),
    ("exports[].acls[].mutual_chap_password", "",
     "mutual CHAP secret, 12-255 characters, different from chap_password"),
)

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_WI_EXTENT = 4 << 20
SECTOR = 512
MIN_REGION = 4096
CHAP_MIN, CHAP_MAX = 12, 255
_CHAP_TEXT = re.compile(r"^[!-~]+$")  # printable ASCII, no blanks


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    control_socket: str
    state_dir: str
    metrics_address: str
    log_level: str
    write_intent_extent: int = DEFAULT_WI_EXTENT


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """One mirror; image paths are resolved (absolute, no symlinks)."""

    name: str
    size: int
    image_a: str
    image_b: str
    region_size: int
    direct: bool
    create_images: bool
    ceph_a: CephAccess | None = None
    """How an RBD image_a reaches its cluster (None: a path)."""
    ceph_b: CephAccess | None = None
    rbd_snapshots_keep: int = 0

    def spec(self) -> MirrorSpec:
        """The cfgstring content the ``user:mirror`` backstore carries."""
        region = None if self.region_size == DEFAULT_REGION else self.region_size
        return MirrorSpec(self.image_a, self.image_b, self.direct, region, self.ceph_a,
                          self.ceph_b)

    def cfgstring(self) -> str:
        return self.spec().to_cfgstring()


@dataclass(frozen=True, slots=True)
class GroupConfig:
    name: str
    mirrors: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Chap:
    """CHAP credentials of one ACL (``mutual_*`` empty: one-way CHAP)."""

    user: str
    password: str = field(repr=False)
    mutual_user: str = ""
    mutual_password: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class AclConfig:
    initiator: str
    chap: Chap | None


@dataclass(frozen=True, slots=True)
class ExportConfig:
    target: str
    portals: tuple[tuple[str, int], ...]
    luns: tuple[tuple[int, str], ...]
    """(LUN number, mirror name), sorted by number."""
    acls: tuple[AclConfig, ...]


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    daemon: DaemonSettings
    image_dirs: tuple[str, ...]
    mirrors: tuple[MirrorConfig, ...] = ()
    groups: tuple[GroupConfig, ...] = ()
    exports: tuple[ExportConfig, ...] = ()

    def mirror(self, name: str) -> MirrorConfig:
        for m in self.mirrors:
            if m.name == name:
                return m
        raise KeyError(name)


def default_path() -> str:
    """``$TARGETMIRROR_CONFIG`` if set, else :data:`DEFAULT_PATH`."""
    return os.environ.get(ENV_VAR) or DEFAULT_PATH


def default(key: str) -> Any:
    for k, value, _ in DEFAULTS:
        if k == key:
            return value
    raise KeyError(key)


class _Checker:
    """Collects problems as ``file: key.path: expected ..., got ...`` lines."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.problems: list[str] = []
        self.by_mirror: dict[str, list[str]] = {}
        """A mirror's name -> the problems of its entry."""

    def error(self, key: str, expected: str, got: object = None, *, show: bool = True) -> None:
        text = f"{self.path}: {key}: expected {expected}"
        if show:
            text += f", got {_show(got)}"
        self.problems.append(text)

    def mapping(self, value: object, key: str, allowed: tuple[str, ...],
                required: tuple[str, ...] = ()) -> dict[str, Any] | None:
        if not isinstance(value, dict):
            self.error(key or "(top level)", "a mapping of " + ", ".join(allowed), value)
            return None
        suggested = set()
        for k in value:
            if k not in allowed:
                near = difflib.get_close_matches(str(k), allowed, n=1, cutoff=0.6)
                if near and near[0] not in value:
                    suggested.add(near[0])
                    hint = (f"did you mean {near[0]}?" + (" It is required; " if near[0] in
                                                          required else " "))
                else:
                    hint = ""
                self.error(_join(key, str(k)), f"no such key ({hint}known keys here: "
                           f"{', '.join(allowed)})", show=False)
        for k in required:
            if k not in value and k not in suggested:  # a typo of it was named above
                self.error(_join(key, k), "this key (it is required)", show=False)
        return value

    def seq(self, value: object, key: str, what: str) -> list[Any]:
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(key, f"a list of {what}", value)
            return []
        return value

    def text(self, value: object, key: str, expected: str,
             ok: Callable[[str], bool] = lambda s: bool(s)) -> str | None:
        if not isinstance(value, str) or not ok(value):
            self.error(key, expected, value)
            return None
        return value

    def boolean(self, value: object, key: str) -> bool:
        if not isinstance(value, bool):
            self.error(key, "true or false", value)
            return False
        return value


def _join(base: str, key: str) -> str:
    return f"{base}.{key}" if base else key


def _show(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def load(path: str | None = None) -> Config:
    """Read, parse and validate the file at ``path`` (default :func:`default_path`)."""
    path = path or default_path()
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration file: "
                          f"{exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: expected UTF-8 text: {exc}") from exc
    return loads(text, path)


def loads(text: str, path: str = "<string>") -> Config:
    """Parse and validate YAML ``text``; ``path`` names the file in messages."""
    return validate(parse_yaml(text, path), path)


def parse_yaml(text: str, path: str = "<string>") -> object:
    """The document in ``text`` (``{}`` when empty), read safely and within bounds.

    ``yaml.safe_load`` builds no arbitrary objects, but an alias (``*a``) is a reference that
    a walk over the result follows again each time: nine nested aliases of nine make a billion
    values to validate (the "billion laughs").  So the node graph is composed first, its
    expanded size counted once per node (aliases shared, cycles refused), and a document that
    would expand past :data:`MAX_VALUES` values, or a file past :data:`MAX_BYTES`, is refused
    before anything is built.  A key given twice in one mapping (YAML keeps the last one,
    silently) is refused too."""
    if len(text.encode()) > MAX_BYTES:
        raise ConfigFileError(path, [f"{path}: expected a configuration file of at most "
                                     f"{MAX_BYTES} bytes, got {len(text.encode())}"])
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}
        problems = _yaml_bounds(node, path)
        if problems:
            raise ConfigFileError(path, problems)
        data = loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigFileError(path, [f"{path}: {where}expected valid YAML: {problem}"]) \
            from exc
    finally:
        loader.dispose()
    return data if data is not None else {}


MAX_BYTES = 1 << 20
"""Largest configuration file read (a large site's file is a few hundred KiB at most)."""
MAX_VALUES = 100_000
"""Most values (scalars, lists, mappings) a document may expand to, aliases followed."""


def _yaml_bounds(root: yaml.Node, path: str) -> list[str]:
    """Problems with the composed document's size (aliases expanded) and duplicate keys."""
    sizes: dict[int, int] = {}
    problems: list[str] = []
    active: set[int] = set()

    def line(node: yaml.Node) -> str:
        return f"line {node.start_mark.line + 1}"

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise _Recursive(node)
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            for child in node.value:
                total += size(child)
                if total > MAX_VALUES:
                    break
        elif isinstance(node, yaml.MappingNode):
            seen: dict[object, yaml.Node] = {}
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in seen:
                        problems.append(f"{path}: {line(k)}: expected each key once in a "
                                        f"mapping, got {k.value!r} again (first at "
                                        f"{line(seen[k.value])})")
                    seen[k.value] = k
                total += size(k) + size(v)
                if total > MAX_VALUES:
                    break
        active.discard(key)
        sizes[key] = total
        return total

    try:
        total = size(root)
    except _Recursive as exc:
        return [f"{path}: {line(exc.node)}: expected no recursive YAML alias (an anchor used "
                "inside itself)"]
    except RecursionError:
        return [f"{path}: expected a document nested less deeply"]
    if total > MAX_VALUES:
        return [f"{path}: expected at most {MAX_VALUES} values with YAML aliases expanded, got "
                "more (aliases of aliases multiply; write the values out)"]
    return problems


class _Recursive(Exception):
    def __init__(self, node: yaml.Node) -> None:
        super().__init__()
        self.node = node


@dataclass(frozen=True, slots=True)
class Checked:
    """What :func:`check` found: the valid part of the file and every problem.

    ``config`` holds only what is valid: the mirrors without problems, the groups and exports
    whose mirrors are all among them (an export keeps its LUNs of valid mirrors), the daemon
    settings with the defaults in place of bad values.  ``refused`` names each mirror whose
    entry has problems (by its name, when the name itself is valid) with those problems: the
    daemon serves such a backstore NOT READY, reason ``config``, rather than guess."""

    config: Config
    problems: tuple[str, ...]
    refused: dict[str, tuple[str, ...]]

    @property
    def ok(self) -> bool:
        return not self.problems


def validate(data: object, path: str) -> Config:
    """Check a parsed document completely; raise one error listing every problem."""
    checked = check(data, path)
    if checked.problems:
        raise ConfigFileError(path, list(checked.problems))
    return checked.config


def check(data: object, path: str) -> Checked:
    """Check a parsed document completely; never raises for what the document holds."""
    c = _Checker(path)
    top = c.mapping(data, "", ("daemon", "image_dirs", "ceph", "mirrors", "groups",
                               "exports")) or {}
    daemon = _daemon(c, top.get("daemon", {}))
    dirs = _image_dirs(c, top.get("image_dirs", default("image_dirs")))
    clusters = _clusters(c, c.seq(top.get("ceph"), "ceph", "Ceph clusters"))
    raw_mirrors = c.seq(top.get("mirrors"), "mirrors", "mirrors")
    mirrors = _mirrors(c, raw_mirrors, dirs, clusters)
    # Groups and exports are checked against every mirror the file declares, valid or not, so
    # one bad image gives one message, not one more per reference to its mirror.
    names = {m["name"] for m in raw_mirrors if isinstance(m, dict) and isinstance(
        m.get("name"), str)}
    groups = _groups(c, c.seq(top.get("groups"), "groups", "groups"), names)
    exports = _exports(c, c.seq(top.get("exports"), "exports", "exports"), names)
    valid = {m.name for m in mirrors}
    groups = [g for g in groups if set(g.mirrors) <= valid]
    kept = []
    for e in exports:
        luns = tuple((n, m) for n, m in e.luns if m in valid)
        if luns:
            kept.append(ExportConfig(e.target, e.portals, luns, e.acls))
    config = Config(path, daemon, tuple(dirs), tuple(mirrors), tuple(groups), tuple(kept))
    return Checked(config, tuple(c.problems),
                   {n: tuple(p) for n, p in c.by_mirror.items() if n not in valid})


def summary(config: Config) -> str:
    """One line: what a valid file holds (``targetmirror validate``)."""
    def n(count: int, word: str) -> str:
        return f"{count} {word}{'' if count == 1 else 's'}"

    luns = sum(len(e.luns) for e in config.exports)
    acls = sum(len(e.acls) for e in config.exports)
    return (f"{config.path}: valid: {n(len(config.mirrors), 'mirror')}, "
            f"{n(len(config.groups), 'group')}, {n(len(config.exports), 'export')} "
            f"({n(luns, 'LUN')}, {n(acls, 'ACL')}); image_dirs "
            + (", ".join(config.image_dirs) or "none"))


def _daemon(c: _Checker, raw: object) -> DaemonSettings:
    """The daemon settings; a bad value is reported and its default used in its place."""
    keys = ("control_socket", "state_dir", "metrics_address", "log_level")
    d = c.mapping({} if raw is None else raw, "daemon", (*keys, "write_intent_extent")) or {}
    values = {k: d.get(k, default(f"daemon.{k}")) for k in keys}
    raw_ext = d.get("write_intent_extent", default("daemon.write_intent_extent"))
    extent = parse_size(raw_ext)
    if extent is None or extent < 4096 or extent > 1 << 30 or extent & (extent - 1):
        c.error("daemon.write_intent_extent", "a power of two from 4K to 1G (e.g. 4M)", raw_ext)
        extent = DEFAULT_WI_EXTENT
    checks: dict[str, tuple[str, Callable[[str], bool]]] = {
        "control_socket": ("an absolute path", lambda s: s.startswith("/") and "\0" not in s),
        "state_dir": ("an absolute path", lambda s: s.startswith("/") and "\0" not in s),
        "metrics_address": (f"{EXPECTED}, or an empty string",
                            lambda s: s == "" or parse_hostport(s) is not None),
        "log_level": ("one of " + ", ".join(LOG_LEVELS), lambda s: s in LOG_LEVELS),
    }
    for k, (expected, ok) in checks.items():
        if c.text(values[k], f"daemon.{k}", expected, ok) is None:
            values[k] = default(f"daemon.{k}")
    return DaemonSettings(**values, write_intent_extent=extent)


def _image_dirs(c: _Checker, raw: object) -> list[str]:
    out = []
    for i, d in enumerate(c.seq(raw, "image_dirs", "absolute directory paths")):
        key = f"image_dirs[{i}]"
        if c.text(d, key, "an absolute path", lambda s: s.startswith("/")) is None:
            continue
        real = os.path.realpath(d)
        if not os.path.isdir(real):
            c.error(key, "an existing directory", d)
        out.append(real)
    return out


def _inside(path: str, dirs: list[str]) -> bool:
    return any(os.path.commonpath([path, d]) == d for d in dirs)


def _clusters(c: _Checker, raw: list[Any]) -> dict[str, CephAccess | None]:
    """The ``ceph`` entries by name (None for an entry with problems, already reported)."""
    keys = ("name", "conf", "client", "keyring", "timeout")
    out: dict[str, CephAccess | None] = {}
    for i, item in enumerate(raw):
        key = f"ceph[{i}]"
        e = c.mapping(item, key, keys, ("name",))
        if e is None:
            continue
        n_before = len(c.problems)
        name = c.text(e.get("name"), f"{key}.name", "a name of letters, digits, '_', '.', '-'",
                      valid_name)
        if name is not None and name in out:
            c.error(f"{key}.name", "a cluster name not used before", name)
        conf = c.text(e.get("conf", default("ceph[].conf")), f"{key}.conf",
                      "the absolute path of an existing ceph.conf",
                      lambda s: s.startswith("/") and os.path.isfile(s))
        client = c.text(e.get("client", default("ceph[].client")), f"{key}.client",
                        "a cephx user name without 'client.' (letters, digits, '_', '.', '-')",
                        lambda s: valid_name(s) and not s.startswith("client."))
        keyring = c.text(e.get("keyring", ""), f"{key}.keyring",
                         "empty, or the absolute path of an existing keyring file",
                         lambda s: s == "" or (s.startswith("/") and os.path.isfile(s)))
        timeout = e.get("timeout", default("ceph[].timeout"))
        if isinstance(timeout, bool) or not isinstance(timeout, int) or not 1 <= timeout <= 300:
            c.error(f"{key}.timeout", "whole seconds from 1 to 300", timeout)
        if name is None or name in out:
            continue
        ok = len(c.problems) == n_before
        out[name] = CephAccess(str(conf), str(client), str(keyring), int(timeout)) if ok \
            else None
    return out


def _cluster_of(c: _Checker, m: dict[str, Any], key: str, leg: str, image: object,
                clusters: dict[str, CephAccess | None]) -> tuple[bool, CephAccess | None]:
    """(ok, access) for one leg: the ceph entry an RBD leg names, None for a path leg."""
    ck = f"cluster_{leg}"
    if not (isinstance(image, str) and is_rbd(image)):
        if ck in m:
            c.error(f"{key}.{ck}", f"no {ck} (image_{leg} is not an RBD image "
                    "rbd/POOL/IMAGE)", m[ck])
            return False, None
        return True, None
    if ck not in m:
        if len(clusters) == 1:
            only = next(iter(clusters.values()))
            return only is not None, only  # a broken entry was reported already
        if not clusters:
            return True, CephAccess()
        c.error(f"{key}.{ck}", "the name of the ceph entry image_" + leg + " lives in (there "
                "are several: " + ", ".join(sorted(clusters)) + ")", show=False)
        return False, None
    name = m[ck]
    if not isinstance(name, str) or name not in clusters:
        c.error(f"{key}.{ck}", "the name of an entry under ceph (" +
                (", ".join(sorted(clusters)) or "there are none") + ")", name)
        return False, None
    return clusters[name] is not None, clusters[name]


def _rbd_image(c: _Checker, raw: str, key: str, access: CephAccess | None,
               seen: dict[object, str]) -> str | None:
    """Check an RBD leg's name (the image itself is checked by the daemon when it opens it:
    validation never talks to a cluster, which may be slow or down)."""
    try:
        name = parse_name(raw)
    except ConfigError:
        c.error(key, "rbd/POOL/IMAGE or rbd/POOL/NAMESPACE/IMAGE (names of letters, digits, "
                "'_', '.', '-')", raw)
        return None
    if name.snapshot:
        c.error(key, "an RBD image, not a snapshot (no @)", raw)
        return None
    ident = ("rbd", os.path.realpath(access.conf) if access else "", str(name))
    if ident in seen:
        c.error(key, f"an image no other leg uses ({seen[ident]} names the same image)", raw)
        return None
    seen[ident] = key
    return str(name)


def _mirrors(c: _Checker, raw: list[Any], dirs: list[str],
             clusters: dict[str, CephAccess | None]) -> list[MirrorConfig]:
    keys = ("name", "size", "image_a", "image_b", "region_size", "direct", "create_images",
            "cluster_a", "cluster_b", "rbd_snapshots_keep")
    out: list[MirrorConfig] = []
    seen_names: dict[str, str] = {}
    seen_images: dict[object, str] = {}
    for i, item in enumerate(raw):
        key = f"mirrors[{i}]"
        n_before = len(c.problems)
        mc = _mirror(c, item, key, keys, dirs, clusters, seen_names, seen_images)
        name = item.get("name") if isinstance(item, dict) else None
        if len(c.problems) > n_before:
            if valid_name(name):
                c.by_mirror.setdefault(str(name), []).extend(c.problems[n_before:])
            continue
        if mc is not None:
            out.append(mc)
    return out


def _mirror(c: _Checker, item: object, key: str, keys: tuple[str, ...], dirs: list[str],
            clusters: dict[str, CephAccess | None], seen_names: dict[str, str],
            seen_images: dict[object, str]) -> MirrorConfig | None:
    """One mirror entry: every problem reported; the MirrorConfig only when it has none."""
    m = c.mapping(item, key, keys, ("name", "size", "image_a", "image_b"))
    if m is None:
        return None
    name = c.text(m.get("name"), f"{key}.name", NAME_EXPECTED,
                  valid_name) if "name" in m else None
    if name is not None:
        if name in seen_names:
            c.error(f"{key}.name", f"a name not used before ({seen_names[name]}.name "
                    "has it too)", name)
            name = None
        else:
            seen_names[name] = key
    size = parse_size(m.get("size"))
    if "size" in m and (size is None or size <= 0 or size % SECTOR):
        c.error(f"{key}.size", f"a positive size in bytes or with a unit (512M, 10G), a "
                f"multiple of {SECTOR}", m.get("size"))
        size = None
    region = parse_size(m.get("region_size", default("mirrors[].region_size")))
    if region is None or region < MIN_REGION or region & (region - 1):
        c.error(f"{key}.region_size", f"a power of two of at least {MIN_REGION} (e.g. 64K)",
                m.get("region_size"))
        region = None
    direct = c.boolean(m.get("direct", False), f"{key}.direct")
    create = c.boolean(m.get("create_images", False), f"{key}.create_images")
    keep = m.get("rbd_snapshots_keep", 0)
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 0:
        c.error(f"{key}.rbd_snapshots_keep", "a count of 0 or more (0 keeps all)", keep)
        keep = None
    images: list[str | None] = []
    access: list[CephAccess | None] = []
    for leg in ("image_a", "image_b"):
        ok, acc = _cluster_of(c, m, key, leg[-1], m.get(leg), clusters)
        access.append(acc)
        if leg not in m or not ok:
            images.append(None)
        elif isinstance(m[leg], str) and is_rbd(m[leg]):
            images.append(_rbd_image(c, m[leg], f"{key}.{leg}", acc, seen_images))
        else:
            images.append(_image(c, m[leg], f"{key}.{leg}", dirs, create, size, seen_images))
    a, b = images
    if name is None or size is None or region is None or keep is None or a is None \
            or b is None:
        return None
    mc = MirrorConfig(name, size, a, b, region, direct, create, access[0], access[1], keep)
    try:
        parse(mc.cfgstring())
    except ConfigError as exc:
        c.error(key, f"image paths the kernel's dev_config can carry ({exc})", show=False)
        return None
    return mc


def _image(c: _Checker, raw: object, key: str, dirs: list[str], create: bool,
           size: int | None, seen: dict[object, str]) -> str | None:
    path = c.text(raw, key, "an absolute path", lambda s: s.startswith("/") and "\0" not in s)
    if path is None:
        return None
    real = os.path.realpath(path)
    if not _inside(real, dirs):
        via = "" if real == os.path.normpath(path) else f" (it resolves to {real})"
        c.error(key, "a path inside image_dirs (" + (", ".join(dirs) or "none usable") + ")"
                + via, path)
        return None
    ident: object = real
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if not create:
            c.error(key, "an existing image file or block device (or create_images: true)",
                    path)
            return None
        if not os.path.isdir(os.path.dirname(real)):
            c.error(key, "an image whose directory exists (create_images makes files, not "
                    "directories)", path)
            return None
    except OSError as exc:
        c.error(key, f"an accessible image ({exc.strerror})", path)
        return None
    else:
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            c.error(key, "a regular file or block device", path)
            return None
        if size is not None and stat.S_ISREG(st.st_mode) and st.st_size < size:
            c.error(key, f"an image of at least {size} bytes (the mirror's size); it has "
                    f"{st.st_size}", path)
            return None
        ident = (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else ("blk", st.st_rdev)
    if ident in seen:
        c.error(key, f"an image no other leg uses ({seen[ident]} names the same image)", path)
        return None
    seen[ident] = key
    return real


def _groups(c: _Checker, raw: list[Any], mirrors: set[str]) -> list[GroupConfig]:
    out = []
    names: set[str] = set()
    member_of: dict[str, str] = {}
    for i, item in enumerate(raw):
        key = f"groups[{i}]"
        g = c.mapping(item, key, ("name", "mirrors"), ("name", "mirrors"))
        if g is None:
            continue
        n_before = len(c.problems)
        name = c.text(g.get("name"), f"{key}.name", "a group name of letters, digits, '_', "
                      "'.', '-'", valid_name) if "name" in g else None
        if name is not None and name in names:
            c.error(f"{key}.name", "a group name not used before", name)
        members = g.get("mirrors")
        if "mirrors" in g:
            if (not isinstance(members, list) or len(members) < 2
                    or not all(isinstance(x, str) for x in members)
                    or len(set(members)) != len(members)):
                c.error(f"{key}.mirrors", "a list of two or more distinct mirror names", members)
            else:
                for j, mname in enumerate(members):
                    if mname not in mirrors:
                        c.error(f"{key}.mirrors[{j}]", "the name of a mirror under mirrors",
                                mname)
                    elif mname in member_of:
                        c.error(f"{key}.mirrors[{j}]", f"a mirror in no other group "
                                f"({mname} is in {member_of[mname]} already)", mname)
                    else:
                        member_of[mname] = key
        if len(c.problems) > n_before or name is None or not isinstance(members, list):
            continue
        names.add(name)
        out.append(GroupConfig(name, tuple(members)))
    return out


def _exports(c: _Checker, raw: list[Any], mirrors: set[str]) -> list[ExportConfig]:
    out = []
    targets: dict[str, str] = {}
    for i, item in enumerate(raw):
        key = f"exports[{i}]"
        e = c.mapping(item, key, ("target", "portals", "luns", "acls"),
                      ("target", "luns", "acls"))
        if e is None:
            continue
        n_before = len(c.problems)
        target = c.text(e.get("target"), f"{key}.target", IQN_EXPECTED,
                        valid_iscsi_name) if "target" in e else None
        if target is not None:
            if target in targets:
                c.error(f"{key}.target", f"a target not exported before ({targets[target]} "
                        "has it)", target)
            targets.setdefault(target, key)
        portals: list[tuple[str, int]] = []
        raw_portals = e.get("portals", default("exports[].portals"))
        if not isinstance(raw_portals, list) or not raw_portals:
            c.error(f"{key}.portals", "a non-empty list of IP:PORT", raw_portals)
        else:
            for j, p in enumerate(raw_portals):
                pk = f"{key}.portals[{j}]"
                hp = parse_hostport(p) if isinstance(p, str) else None
                if hp is None:
                    c.error(pk, EXPECTED, p)
                elif hp in portals:
                    c.error(pk, "a portal not listed before", p)
                else:
                    portals.append(hp)
        luns: dict[int, str] = {}
        for j, item_l in enumerate(c.seq(e.get("luns"), f"{key}.luns", "LUNs")):
            lk = f"{key}.luns[{j}]"
            lu = c.mapping(item_l, lk, ("lun", "mirror"), ("lun", "mirror"))
            if lu is None:
                continue
            num = lu.get("lun")
            if "lun" in lu:
                if isinstance(num, bool) or not isinstance(num, int) or not 0 <= num <= 255:
                    c.error(f"{lk}.lun", "a LUN number 0-255", num)
                    num = None
                elif num in luns:
                    c.error(f"{lk}.lun", f"a LUN number not used before in this target "
                            f"(LUN {num} is {luns[num]})", num)
                    num = None
            mname = lu.get("mirror")
            if "mirror" in lu and mname not in mirrors:
                c.error(f"{lk}.mirror", "the name of a mirror under mirrors", mname)
                mname = None
            if isinstance(num, int) and isinstance(mname, str):
                luns[num] = mname
        if "luns" in e and isinstance(e.get("luns"), list) and not e["luns"]:
            c.error(f"{key}.luns", "at least one LUN", e["luns"])
        acls = _acls(c, e, key)
        if len(c.problems) > n_before or target is None:
            continue
        out.append(ExportConfig(target, tuple(portals), tuple(sorted(luns.items())),
                                tuple(acls)))
    return out


def _acls(c: _Checker, e: dict[str, Any], key: str) -> list[AclConfig]:
    keys = ("initiator", "chap_user", "chap_password", "mutual_chap_user",
            "mutual_chap_password")
    acls: list[AclConfig] = []
    seen: set[str] = set()
    raw = c.seq(e.get("acls"), f"{key}.acls", "ACLs")
    if "acls" in e and isinstance(e.get("acls"), list) and not raw:
        c.error(f"{key}.acls", "at least one ACL (targetmirror never exports in demo mode)",
                raw)
    for j, item in enumerate(raw):
        ak = f"{key}.acls[{j}]"
        a = c.mapping(item, ak, keys, ("initiator",))
        if a is None:
            continue
        n_before = len(c.problems)
        ini = c.text(a.get("initiator"), f"{ak}.initiator", IQN_EXPECTED,
                     valid_iscsi_name) if "initiator" in a else None
        if ini is not None and ini in seen:
            c.error(f"{ak}.initiator", "an initiator not listed before in this target", ini)
        vals: dict[str, str] = {}
        for k in keys[1:]:
            v = a.get(k, "")
            if not isinstance(v, str):
                c.error(f"{ak}.{k}", "a string", v)
                v = ""
            vals[k] = v
        for k in ("chap_password", "mutual_chap_password"):
            v = vals[k]
            if v and not (CHAP_MIN <= len(v) <= CHAP_MAX and _CHAP_TEXT.match(v)):
                c.error(f"{ak}.{k}", f"{CHAP_MIN}-{CHAP_MAX} printable characters without "
                        f"blanks (got {len(v)} characters; the secret is not shown)",
                        show=False)
        for k in ("chap_user", "mutual_chap_user"):
            v = vals[k]
            if v and not _CHAP_TEXT.match(v):
                c.error(f"{ak}.{k}", "printable characters without blanks", v)
        if bool(vals["chap_user"]) != bool(vals["chap_password"]):
            c.error(ak, "both chap_user and chap_password, or neither", show=False)
        if bool(vals["mutual_chap_user"]) != bool(vals["mutual_chap_password"]):
            c.error(ak, "both mutual_chap_user and mutual_chap_password, or neither",
                    show=False)
        if vals["mutual_chap_user"] and not vals["chap_user"]:
            c.error(ak, "chap_user and chap_password as well (mutual CHAP adds to CHAP)",
                    show=False)
        if vals["chap_password"] and vals["chap_password"] == vals["mutual_chap_password"]:
            c.error(f"{ak}.mutual_chap_password", "a secret different from chap_password "
                    "(RFC 3720 forbids reusing it)", show=False)
        if len(c.problems) > n_before or ini is None:
            continue
        seen.add(ini)
        chap = Chap(vals["chap_user"], vals["chap_password"], vals["mutual_chap_user"],
                    vals["mutual_chap_password"]) if vals["chap_user"] else None
        acls.append(AclConfig(ini, chap))
    if acls and len({a.chap is None for a in acls}) > 1:
        c.error(f"{key}.acls", "CHAP on every ACL of the target or on none (LIO switches "
                "authentication per target portal group)", show=False)
    return acls


__all__ = ["DEFAULTS", "DEFAULT_PATH", "ENV_VAR", "AclConfig", "Chap", "Config",
           "DaemonSettings", "ExportConfig", "GroupConfig", "MirrorConfig", "default_path", "load",
           "loads", "validate"]
