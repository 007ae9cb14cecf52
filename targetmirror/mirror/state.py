"""Durable per-mirror state: one small JSON document per mirror, replaced atomically.

Each save writes a temporary file in the same directory, fsyncs it, renames it over the old one
and fsyncs the directory, so a crash at any point leaves either the old or the new state on disk,
never a mix.  The documents are tiny and change only at state transitions (split, rejoin, leg
failure), so a database would buy nothing here; the write-intent and change bitmaps, which
change on the I/O path, live in their own files.
"""

from __future__ import annotations

import copy
import json
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from targetmirror.errors import ConfigError, MirrorError
from targetmirror.mirror.bitmap import Bitmap

if TYPE_CHECKING:
    from targetmirror.mirror.policy import Event

SCHEMA = 1
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class State(StrEnum):
    """Where a mirror is in its cycle."""

    MIRRORED = "mirrored"
    """Every write goes to A and B; both hold the same data."""
    SPLITTING = "splitting"
    """The split instant has passed; pre-split writes still draining to A."""
    SPLIT = "split"
    """A is a frozen point-in-time copy; writes go to B only (their regions are marked)."""
    REJOINING = "rejoining"
    """Marked regions are being copied B -> A; every write goes to both legs."""
    ONE_WAY = "one-way"
    """One-way cut-over (claim 4): after the split instant, writes through volume 1 still go
    to A and B, writes through volume 2 go to B only (their regions are marked); A is not
    frozen.  Ended by a rejoin."""
    SYNCING = "syncing"
    """Initial sync (claim 2): A holds the data, B is being filled from it below a persisted
    cursor; reads come from A, writes go to both legs."""


@dataclass
class SplitRecord:
    """What is known about the latest split."""

    epoch: int
    requested_wall: float
    """When the split was asked for (seconds since the epoch)."""
    instant_wall: float | None = None
    """When the ring positions were read: the split instant.  None: not recorded (crash)."""
    completed_wall: float | None = None
    drain_seconds: float | None = None
    pre_split_drained: int | None = None
    """Pre-split writes still in flight when the ring thread passed the split position (it
    counts from there, so writes that finished between the instant and that moment are not
    included); each completed before the split was declared complete."""
    a_status: str = "draining"
    """"consistent" (drained and fsynced), "crash-consistent" (drain interrupted by a daemon
    stop; A holds every write acknowledged before the instant and a subset of those in flight),
    or "draining"."""
    group: list[str] = field(default_factory=list)
    one_way: bool = False
    """A one-way split: volume 1 keeps writing both legs, A is not frozen (State.ONE_WAY)."""


@dataclass
class MirrorState:
    """The persistent state of one mirror."""

    name: str
    state: State = State.MIRRORED
    epoch: int = 0
    image_a: str = ""
    image_b: str = ""
    split: SplitRecord | None = None
    region_size: int = 64 * 1024
    last_rejoin: dict[str, Any] | None = None
    sync_cursor: int = 0
    last_sync: dict[str, Any] | None = None
    clean: bool = True
    """False from the moment a daemon opens the mirror until it closes it cleanly (legs
    fdatasync'ed, write-intent bits cleared).  Found False at open: the last stop was unclean,
    so mirrored writes may be torn between the legs; the marked regions are resynced."""
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Failed legs ("a", "b") with reason, errno and time.  A failed leg gets no I/O; every
    write from then on marks its regions, so ``repair`` copies only those."""
    resync_from: str = "b"
    """While rejoining: the leg the copier reads (the complete one).  "b" for a rejoin, a
    repair of A, or crash recovery; "a" for a repair of B."""
    resync_kind: str = "rejoin"
    """While rejoining: "rejoin", "repair" or "recovery" (after an unclean stop)."""
    last_repair: dict[str, Any] | None = None
    last_recovery: dict[str, Any] | None = None
    replaced: dict[str, str] = field(default_factory=dict)
    """Configured image path -> the image ``repair --replace`` put in its place (the
    cfgstring still names the old one until the backstore is recreated)."""
    last_split: SplitRecord | None = None
    """The split record of the previous cycle, moved here by the transition that ended it
    (``split`` belongs to the split states only; see ``mirror/policy.py``)."""
    schema: int = SCHEMA

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], origin: str) -> MirrorState:
        try:
            if data.get("schema") != SCHEMA:
                raise MirrorError(f"{origin}: unsupported state schema {data.get('schema')!r}")
            split = data.get("split")
            last_split = data.get("last_split")
            return cls(
                name=str(data["name"]),
                state=State(data["state"]),
                epoch=int(data["epoch"]),
                image_a=str(data.get("image_a", "")),
                image_b=str(data.get("image_b", "")),
                split=SplitRecord(**split) if split else None,
                region_size=int(data.get("region_size", 64 * 1024)),
                last_rejoin=data.get("last_rejoin"),
                sync_cursor=int(data.get("sync_cursor", 0)),
                last_sync=data.get("last_sync"),
                clean=bool(data.get("clean", True)),
                failed={str(k): dict(v) for k, v in (data.get("failed") or {}).items()},
                resync_from=str(data.get("resync_from", "b")),
                resync_kind=str(data.get("resync_kind", "rejoin")),
                last_repair=data.get("last_repair"),
                last_recovery=data.get("last_recovery"),
                replaced={str(k): str(v) for k, v in (data.get("replaced") or {}).items()},
                last_split=SplitRecord(**last_split) if last_split else None,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise MirrorError(f"{origin}: malformed mirror state: {exc}") from exc


class StateStore:
    """The directory holding every mirror's state document."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        os.makedirs(directory, mode=0o700, exist_ok=True)

    def _path(self, name: str) -> str:
        if not _NAME.match(name):
            raise ConfigError(f"mirror name {name!r}: expected letters, digits, '_', '.', '-'")
        return os.path.join(self.directory, f"{name}.json")

    def load(self, name: str) -> MirrorState | None:
        """The saved state of ``name``, or None if it has none."""
        path = self._path(name)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            return None
        except (OSError, json.JSONDecodeError) as exc:
            raise MirrorError(f"{path}: cannot read mirror state: {exc}") from exc
        return MirrorState.from_json(data, path)

    def bitmap_path(self, name: str) -> str:
        """Where the region bitmap of ``name`` lives (beside its state)."""
        return self._path(name)[: -len(".json")] + ".bitmap"

    def open_bitmap(self, name: str, size: int, region_size: int) -> Bitmap:
        """The region bitmap of ``name`` (a seam: the crash-point test gives its own store a
        bitmap whose writes go through a simulated page cache)."""
        return Bitmap(self.bitmap_path(name), size, region_size)

    def all(self) -> list[MirrorState]:
        """Every saved mirror state (unreadable ones are skipped: they are reported on load)."""
        out = []
        for entry in sorted(os.listdir(self.directory)):
            if entry.endswith(".json"):
                try:
                    st = self.load(entry[: -len(".json")])
                except (MirrorError, ConfigError):
                    continue
                if st is not None:
                    out.append(st)
        return out

    def save(self, st: MirrorState) -> None:
        """Replace the state of ``st.name`` atomically and durably."""
        path = self._path(st.name)
        tmp = f"{path}.tmp.{os.getpid()}.{time.monotonic_ns()}"
        data = json.dumps(st.to_json(), indent=1, sort_keys=True).encode()
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


_DEFAULTS = MirrorState("")


class Records:
    """One mirror's state document in memory and on disk, and the one way to change it.

    The discipline (issue 15): a change is built on a *copy* of the current document, saved
    durably, and only then made the current one -- so a failed save changes nothing, in memory
    or on disk, and a reader never sees a state that a crash could take back.  Changes are
    serialised (a second one starts from the first one's result, never from a stale copy), and
    the swap happens under the mirror's admission lock, so admission sees either the old or
    the new document whole.  No lock admission needs is held across the save.
    """

    def __init__(self, store: StateStore | None, st: MirrorState,
                 mu: threading.Lock) -> None:
        self.store = store
        self._st = st
        self._mu = mu
        self._save = threading.Lock()

    @property
    def current(self) -> MirrorState:
        """The current document (treat it as read-only: change it through :meth:`commit`)."""
        return self._st

    def commit(self, change: Callable[[MirrorState], None],
               apply: Callable[[MirrorState], None] | None = None) -> MirrorState:
        """Save ``change`` applied to a copy, then make the copy current and call ``apply``
        with it (under the admission lock: keep it to memory updates).  ``change`` may raise
        to refuse; nothing is changed then."""
        with self._save:
            new = copy.deepcopy(self._st)
            change(new)
            if self.store is not None:
                self.store.save(new)
            with self._mu:
                self._st = new
                if apply is not None:
                    apply(new)
            return new

    def transition(self, event: Event, change: Callable[[MirrorState], None] | None = None,
                   apply: Callable[[MirrorState], None] | None = None) -> MirrorState:
        """:meth:`commit` of the table's transition for ``event`` (raises
        ``IllegalTransition`` when the current state has none), resetting the records that
        belong to the state left (``policy.OWNED``) before ``change`` runs."""
        from targetmirror.mirror.policy import leaving, next_state

        def run(new: MirrorState) -> None:
            old = new.state
            new.state = next_state(old, event)
            for rec in leaving(old, new.state):
                if rec == "split":
                    new.last_split = new.split
                setattr(new, rec, copy.deepcopy(getattr(_DEFAULTS, rec)))
            if change is not None:
                change(new)
        return self.commit(run, apply)

    def replace(self, st: MirrorState) -> None:
        """Make ``st`` current without saving (opening a mirror: nothing runs yet)."""
        with self._mu:
            self._st = st
