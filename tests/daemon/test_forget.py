"""The daemon's ``forget`` op: the saved state of a mirror whose backstore is gone (used by
``targetmirror selftest`` to leave nothing behind)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from targetmirror.daemon.main import Daemon
from targetmirror.errors import ConfigError, MirrorError
from targetmirror.mirror.state import StateStore
from tests.daemon.splitrig import make_device


def test_forget_removes_only_an_unserved_mirrors_state(tmp_path: Path) -> None:
    state = tmp_path / "state"
    store = StateStore(str(state / "mirrors"))
    dev = make_device(str(tmp_path), "m0", 64, workers=1, store=store)
    d = Daemon(state_dir=str(state), control_socket=None)
    d.devices[dev.served.info.name] = dev.served
    files = sorted(p.name for p in (state / "mirrors").iterdir())
    assert files == ["m0.bitmap", "m0.json"]
    with pytest.raises(MirrorError, match="is served; delete its backstore first"):
        d.ops.forget("m0")
    assert sorted(p.name for p in (state / "mirrors").iterdir()) == files
    d.detach(dev.served.info.name)          # the backstore was deleted
    dev.producer.close()
    os.close(dev.uio.efd)
    res = d.ops.forget("m0")
    assert res["forgotten"] == "m0" and len(res["removed"]) == 2
    assert list((state / "mirrors").iterdir()) == []
    assert d.ops.forget("m0")["removed"] == []       # nothing left: still fine
    with pytest.raises(ConfigError, match="mirror name"):
        d.ops.forget("../groups")
