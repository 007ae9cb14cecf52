"""``targetmirrord --config``: read the YAML file, apply it at start and on SIGHUP.

The daemon never exits because of its configuration file (issue 16): whatever is wrong with it
is logged, one line per problem, and the daemon serves what it can.

* **At start** the file is checked (:func:`targetmirror.config.loader.check`).  A valid file is
  applied with the same code as ``targetmirror apply`` (the plan in
  :mod:`targetmirror.config.plan`), with the daemon's own group registry instead of the control
  API (the socket is not up yet).  A file with problems is applied only in part: what the valid
  entries need that does not exist yet is created (backstores, their images, new targets and
  groups); nothing is removed or changed, because the file cannot be trusted to say what should
  go.  Each mirror whose entry is invalid is *refused*: a backstore of that name is served NOT
  READY with reason ``config`` (the initiator sees why its LUN is not usable; the admin sees it
  in ``targetmirror status``) rather than served from a guess.
* **On SIGHUP** (``systemctl reload targetmirrord``) the file is read and checked again; a valid
  file is applied in full and every refusal lifted, a file with problems is logged and the
  running configuration kept as it is.

Creating ``user:mirror`` backstores before or while serving is safe: they carry
``nl_reply_supported=-1``, so the kernel does not wait for us, and the next rescan serves them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from targetmirror.config import loader
from targetmirror.config.apply import GroupSeam, apply
from targetmirror.config.loader import Checked, Config
from targetmirror.errors import ConfigFileError, TargetMirrorError

log = logging.getLogger("targetmirror.daemon")


@dataclass
class Loaded:
    """One reading of the configuration file."""

    path: str
    checked: Checked | None
    """None when the file could not be read or is not YAML (``problems`` says why)."""
    problems: tuple[str, ...] = ()
    wall: float = field(default_factory=time.time)

    @property
    def config(self) -> Config | None:
        return self.checked.config if self.checked is not None else None

    @property
    def ok(self) -> bool:
        return self.checked is not None and not self.problems

    @property
    def refused(self) -> dict[str, str]:
        """Backstore name -> why the file refuses it (its entry's problems, in one line)."""
        if self.checked is None:
            return {}
        return {name: "; ".join(p.split(": ", 1)[-1] for p in problems)
                for name, problems in self.checked.refused.items()}

    def status(self) -> dict[str, Any]:
        """What ``targetmirror status`` shows about the file."""
        return {"path": self.path, "read_wall": self.wall, "valid": self.ok,
                "problems": list(self.problems), "refused": sorted(self.refused)}


def config_path(arg: str | None) -> str | None:
    """``--config``, ``$TARGETMIRROR_CONFIG``, or the default path when it exists."""
    path = arg or os.environ.get(loader.ENV_VAR)
    if path is None and os.path.exists(loader.DEFAULT_PATH):
        path = loader.DEFAULT_PATH
    return path


def read(path: str) -> Loaded:
    """Read and check the file; never raises (a problem is in the result)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as exc:
        return Loaded(path, None, (f"{path}: cannot read the configuration file: "
                                   f"{exc.strerror or exc}",))
    except UnicodeDecodeError as exc:
        return Loaded(path, None, (f"{path}: expected UTF-8 text: {exc}",))
    try:
        checked = loader.check(loader.parse_yaml(text, path), path)
    except ConfigFileError as exc:
        return Loaded(path, None, tuple(exc.problems))
    return Loaded(path, checked, checked.problems)


def log_problems(loaded: Loaded, what: str) -> None:
    """Every problem on its own line, then what the daemon does about them."""
    for p in loaded.problems:
        log.error("%s", p)
    if loaded.problems:
        refused = sorted(loaded.refused)
        log.error("configuration %s has %d problem(s): %s%s", loaded.path,
                  len(loaded.problems), what,
                  f"; refusing {', '.join(refused)} (served NOT READY, reason config)"
                  if refused else "")


def apply_config(config: Config, groups: GroupSeam, state_dir: str | None, *,
                 only_new: bool = False) -> bool:
    """Apply ``config`` through rtslib; False (and an error logged) if it could not be.
    ``only_new``: create what is missing, change and remove nothing (a partial file)."""
    from targetmirror.lio.live import RtslibLio

    if state_dir:  # --state-dir overrides the file: the manifest lives with the state
        config = dataclasses.replace(
            config, daemon=dataclasses.replace(config.daemon, state_dir=state_dir))
    try:
        apply(config, RtslibLio(), groups, out=log.info, only_new=only_new)
    except TargetMirrorError as exc:
        log.error("configuration %s not applied, serving what exists: %s", config.path, exc)
        return False
    return True


def apply_at_start(config: Config, groups: GroupSeam, state_dir: str | None) -> bool:
    """Apply a valid ``config`` in full (kept for callers of the earlier name)."""
    return apply_config(config, groups, state_dir)
