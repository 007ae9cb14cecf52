"""``targetmirrord --config``: apply the YAML file at start, before serving.

The daemon restores the file with the same code as ``targetmirror apply`` (the plan in
:mod:`targetmirror.config.plan`), with the daemon's own group registry instead of the control
API (the socket is not up yet).  Creating ``user:mirror`` backstores before serving is safe:
they carry ``nl_reply_supported=-1``, so the kernel does not wait for us, and the first rescan
serves them.

A file that is invalid or cannot be applied is logged as an error and the daemon goes on
serving the devices that exist: a restart under I/O (systemd ``Restart=``) must never leave
working LUNs unserved because of a typo made since.  The admin sees the error in the journal
and from ``targetmirror apply``, which reports the same problems.
"""

from __future__ import annotations

import dataclasses
import logging
import os

from targetmirror.config import loader
from targetmirror.config.apply import GroupSeam, apply
from targetmirror.config.loader import Config
from targetmirror.errors import TargetMirrorError

log = logging.getLogger("targetmirror.daemon")


def load(path: str | None) -> tuple[Config | None, str | None]:
    """The file to restore (``--config``, ``$TARGETMIRROR_CONFIG``, or the default path when
    it exists) and a problem to log, if any."""
    path = path or os.environ.get(loader.ENV_VAR)
    if path is None:
        if not os.path.exists(loader.DEFAULT_PATH):
            return None, None
        path = loader.DEFAULT_PATH
    try:
        return loader.load(path), None
    except TargetMirrorError as exc:
        return None, f"configuration not applied, serving what exists: {exc}"


def apply_at_start(config: Config, groups: GroupSeam, state_dir: str | None) -> bool:
    """Apply ``config`` through rtslib; False (and an error logged) if it could not be."""
    from targetmirror.lio.live import RtslibLio

    if state_dir:  # --state-dir overrides the file: the manifest lives with the state
        config = dataclasses.replace(
            config, daemon=dataclasses.replace(config.daemon, state_dir=state_dir))
    try:
        apply(config, RtslibLio(), groups, out=log.info)
    except TargetMirrorError as exc:
        log.error("configuration %s not applied, serving what exists: %s", config.path, exc)
        return False
    return True
