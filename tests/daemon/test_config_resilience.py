"""issue 16: targetmirrord never exits because of its configuration file.

A file with one bad mirror and one good one: the good one serves I/O on both legs, the bad one
is answered NOT READY (04/03) with reason ``config``, and ``status`` says why; a reload with a
file that is still broken keeps the running configuration; a reload with the corrected file
lifts the refusal and the mirror serves.  The real ``serve`` runs; only the kernel's side
(UIO, configfs) and LIO (the apply seam) are the in-process doubles of
tests/daemon/test_bad_input.py and tests/config/fakelio.py.  The lab proves the same on the
real kernel (tests/lab/test_lab_operator.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from targetmirror.config.plan import BackstoreState
from targetmirror.daemon import main as daemon_main
from targetmirror.daemon import restore
from targetmirror.lio import live
from targetmirror.scsi.sense import parse_fixed_sense
from tests.config.fakelio import FakeLio
from tests.daemon.test_bad_input import MiB, Rig, rig  # noqa: F401 - the fixture

BS = 512


def doc(r: Rig, *, typo: bool) -> dict[str, Any]:
    i = r.images
    m2: dict[str, Any] = {"name": "m2", "image_a": f"{i}/m2-a.img", "image_b": f"{i}/m2-b.img"}
    m2["sise" if typo else "size"] = "1M"
    return {"daemon": {"state_dir": str(r.state)}, "image_dirs": [str(i)],
            "mirrors": [{"name": "m1", "size": "1M", "image_a": f"{i}/m1-a.img",
                         "image_b": f"{i}/m1-b.img"}, m2]}


def test_a_bad_mirror_is_refused_the_good_one_serves_and_a_reload_fixes_it(
        rig: Rig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        caplog: pytest.LogCaptureFixture) -> None:
    i = rig.images
    # LIO has both backstores already (restored at boot, or made by an earlier apply)
    cfg = {n: f"a={i}/{n}-a.img;b={i}/{n}-b.img" for n in ("m1", "m2")}
    for n, c in cfg.items():
        rig.add(n, c)
    fake = FakeLio()
    fake.state.backstores = {n: BackstoreState(MiB, c, f"serial-{n}") for n, c in cfg.items()}
    monkeypatch.setattr(live, "RtslibLio", lambda: fake)
    path = tmp_path / "targetmirror.yaml"
    path.write_text(yaml.safe_dump(doc(rig, typo=True)))
    d = rig.daemon
    d.config_path = str(path)

    d.start_with(restore.read(str(path)))
    d.rescan()
    assert fake.calls == [], "nothing to create: both backstores exist; nothing removed"
    assert rig.write10("m1", 0)[0] == 0  # the good one serves, both legs
    assert (i / "m1-a.img").read_bytes()[:BS] == (i / "m1-b.img").read_bytes()[:BS] \
        == b"\xa5" * BS
    st = rig.status("m2")
    assert st["state"] == "not-ready" and st["reason_code"] == "config", st
    assert "mirrors[1].sise: expected no such key (did you mean size?" in st["reason"]
    status, sense = rig.write10("m2", 0)
    info = parse_fixed_sense(sense)
    assert status == 0x02 and (info.key, info.asc, info.ascq) == (0x2, 0x04, 0x03)
    assert (i / "m2-b.img").read_bytes() == b"\x5a" * MiB, "the refused mirror's image changed"
    config = d.ops.status()["config"]
    assert config["path"] == str(path) and config["valid"] is False
    assert config["refused"] == ["m2"] and len(config["problems"]) == 1

    # a reload with a file that is still broken keeps everything as it runs
    broken = doc(rig, typo=True)
    broken["mirrors"][0]["region_size"] = 3000
    path.write_text(yaml.safe_dump(broken))
    assert d.reload() is False
    assert rig.status("m2")["reason_code"] == "config" and rig.write10("m1", 1)[0] == 0
    assert d.ops.status()["config"]["last_reload"]["result"] == \
        "kept the running configuration"
    assert "mirrors[0].region_size: expected a power of two" in caplog.text

    # the corrected file: applied, the refusal lifted, m2 serves
    path.write_text(yaml.safe_dump(doc(rig, typo=False)))
    d.request_reload()
    assert d._reload.is_set()
    assert d.reload() is True
    st = rig.status("m2")
    assert st["state"] == "mirrored", st
    assert rig.write10("m2", 2)[0] == 0
    assert (i / "m2-a.img").read_bytes()[2 * BS:3 * BS] == b"\xa5" * BS
    assert d.ops.status()["config"] == {
        "path": str(path), "read_wall": d.loaded.wall if d.loaded else None, "valid": True,
        "problems": [], "refused": [],
        "last_reload": {"wall": d.loaded.wall if d.loaded else None, "result": "applied",
                        "problems": []}}


@pytest.mark.parametrize("text", ["mirrors: [\n", "mirrors:\n  - name: m1\n    sise: 1M\n",
                                  "a: &a [1, *a]\n"])
def test_targetmirrord_starts_whatever_the_file_says(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
        text: str) -> None:
    """main() logs the problems and serves; it never returns 1 because of the file."""
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    started: list[Any] = []

    def run(self: Any) -> int:
        started.append(self)
        return 0

    monkeypatch.setattr(daemon_main.Daemon, "run", run)
    monkeypatch.setattr(daemon_main.logs, "setup", lambda level: None)
    monkeypatch.setattr(live, "RtslibLio", FakeLio)  # the host has no LIO
    assert daemon_main.main(["--config", str(path), "--state-dir", str(tmp_path / "state"),
                             "--control-socket", str(tmp_path / "c.sock"), "--no-dbus",
                             "--image-dir", str(tmp_path)]) == 0
    assert len(started) == 1 and started[0].config_path == str(path)
    assert f"{path}: " in caplog.text and "serving its valid part" in caplog.text
