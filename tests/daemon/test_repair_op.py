"""The daemon's ``repair`` control op and the CLI's ``repair`` arguments."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from targetmirror.cli import build_parser
from targetmirror.daemon.main import Daemon
from targetmirror.errors import MirrorError
from targetmirror.mirror.mirror import Mirror
from targetmirror.mirror.state import StateStore
from targetmirror.store.faulty import Fault, FaultPlan, FaultyImage

SIZE = 64 * 4096


def test_repair_op_brings_a_failed_leg_back(tmp_path):
    paths = [str(tmp_path / n) for n in ("a.img", "b.img")]
    for p in paths:
        with open(p, "wb") as f:
            f.truncate(SIZE)
    d = Daemon(state_dir=str(tmp_path / "state"))
    plan = FaultPlan()
    m = Mirror("m", FaultyImage(paths[0], plan), FaultyImage(paths[1]), size=SIZE,
               store=StateStore(str(tmp_path / "state" / "mirrors")), region_size=4096,
               wi_interval=None, leg_timeout=None, wi_extent=4096)
    d.devices["uio0"] = SimpleNamespace(info=SimpleNamespace(dev_name="m"), mirror=m,
                                        reason=None)  # type: ignore[assignment]
    try:
        with pytest.raises(MirrorError, match="no failed leg"):
            d.ops.repair("m")
        with pytest.raises(MirrorError, match="absolute"):
            d.ops.repair("m", replace="rel.img")
        plan.add(Fault("write", "eio"))
        m.write(8192, [memoryview(b"r" * 512)], False)
        assert m.health == "degraded"
        out = d.ops.repair("m", wait=True, timeout=20)["repair"]
        assert out["state"] == "mirrored" and out["health"] == "ok"
        assert out["last_repair"]["bytes_copied"] == 4096
        with open(paths[0], "rb") as fa, open(paths[1], "rb") as fb:
            assert fa.read() == fb.read()
    finally:
        m.close()


def test_cli_repair_arguments():
    args = build_parser().parse_args(["repair", "db", "--replace", "/srv/new.img",
                                      "--rate", "50", "--leg", "a"])
    assert (args.name, args.replace, args.rate, args.leg) == ("db", "/srv/new.img", 50.0, "a")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["repair", "db", "--leg", "c"])
