"""issue 16's bad inputs, each through the real ``targetmirror`` entry point: one line on stderr
(``targetmirror: CODE: why``), exit 1, nothing changed (neither LIO nor a file), no traceback
unless ``--debug``.

LIO is the in-memory fake of ``tests/cli/fakertslib.py`` (the host has no LIO); the same
commands run against the real kernel in ``tests/lab/test_lab_operator.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from targetmirror import cli
from targetmirror.lio.rts import FIX
from tests.cli import fakertslib
from tests.cli.fakertslib import Lio

IQN = "iqn.2026-01.org.example:db"
HOST = "iqn.2026-01.org.example:host1"
NETADDR = ("IP:PORT with a numeric IP and a port 1-65535 (e.g. 192.0.2.10:3260 or "
           "[2001:db8::1]:3260)")


@pytest.fixture
def lio(monkeypatch: pytest.MonkeyPatch) -> Lio:
    return fakertslib.install(monkeypatch)


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def create(tmp: Path, *extra: str) -> list[str]:
    return ["create", "db", "--size", "1M", "--image-a", str(tmp / "a.img"),
            "--image-b", str(tmp / "b.img"), "--create-images", *extra]


def _absent(kind: str) -> Callable[[Lio], None]:
    def setup(lio: Lio) -> None:
        lio.absent = kind
    return setup


def _acl_target(lio: Lio) -> None:
    """An existing target whose TPG 1 has an ACL (someone's real export)."""
    so = fakertslib.StorageObject("other", 1 << 20, "mirror/a=/x;b=/y")
    target = fakertslib.Target(fakertslib.FabricModule("iscsi"), IQN)
    tpg = fakertslib.TPG(target, 1)
    lun = fakertslib.LUN(tpg, 0, so)
    fakertslib.MappedLUN(fakertslib.NodeACL(tpg, HOST), 0, lun)


def _demo_target(lio: Lio) -> None:
    target = fakertslib.Target(fakertslib.FabricModule("iscsi"), IQN)
    fakertslib.TPG(target, 1).set_attribute("generate_node_acls", "1")


def _taken_name(lio: Lio) -> None:
    fakertslib.StorageObject("db", 1 << 20, "mirror/a=/x;b=/y")


def _fail(what: str) -> Callable[[Lio], None]:
    def setup(lio: Lio) -> None:
        lio.fail_on.add(what)
    return setup


NOT_AVAILABLE = f"targetmirror: lio: {FIX} (No such file or directory: /proc/modules)"
NO_CONFIGFS = f"targetmirror: lio: {FIX} (Cannot mount configfs)"

#: (case, LIO set-up, argv (tmp -> list), the exact line on stderr)
CASES: list[tuple[str, Callable[[Lio], None] | None, Callable[[Path], list[str]], str]] = [
    ("list, LIO absent", _absent("proc-modules"), lambda t: ["list"], NOT_AVAILABLE),
    ("list, configfs not mountable", _absent("configfs"), lambda t: ["list"], NO_CONFIGFS),
    ("create, LIO absent", _absent("proc-modules"),
     lambda t: create(t, "--iqn", IQN, "--initiator", HOST), NOT_AVAILABLE),
    ("delete, LIO absent", _absent("configfs"), lambda t: ["delete", "db"], NO_CONFIGFS),
    ("create, bad name", None,
     lambda t: ["create", "bad name!", "--size", "1M", "--image-a", str(t / "a.img"),
                "--image-b", str(t / "b.img"), "--create-images"],
     "targetmirror: config: name 'bad name!': expected a name of letters, digits, '_', '.', "
     "'-' (1-64 characters, starting with a letter or digit)"),
    ("create, portal without port", None,
     lambda t: create(t, "--iqn", IQN, "--initiator", HOST, "--portal", "10.0.0.1"),
     f"targetmirror: config: --portal 10.0.0.1: expected {NETADDR}"),
    ("create, no --initiator (no silent demo mode)", None, lambda t: create(t, "--iqn", IQN),
     f"targetmirror: config: --iqn {IQN}: expected --initiator IQN (repeatable: who may log "
     "in) or --demo-mode (any initiator may write; lab only)"),
    ("create, bad IQN", None,
     lambda t: create(t, "--iqn", "iqn.2026-01.org.Example_x", "--initiator", HOST),
     "targetmirror: config: --iqn iqn.2026-01.org.Example_x: expected an iSCSI name: "
     "iqn.YYYY-MM.reversed.domain[:suffix] in lower case (no '_' or blanks), eui.<16 hex> or "
     "naa.<16 or 32 hex>"),
    ("create, LUN out of range", None,
     lambda t: create(t, "--iqn", IQN, "--initiator", HOST, "--lun", "256"),
     "targetmirror: config: --lun 256: expected a LUN number 0-255"),
    ("create, size not in sectors", None,
     lambda t: ["create", "db", "--size", "1000", "--image-a", str(t / "a.img"),
                "--image-b", str(t / "b.img"), "--create-images"],
     "targetmirror: config: --size 1000: expected a positive size, a multiple of 512"),
    ("create, missing image", None,
     lambda t: ["create", "db", "--size", "1M", "--image-a", str(t / "a.img"),
                "--image-b", str(t / "b.img")],
     "targetmirror: config: 2 problems with the arguments:"),
    ("create, --demo-mode on a TPG with ACLs", _acl_target,
     lambda t: create(t, "--iqn", IQN, "--demo-mode", "--lun", "1"),
     f"targetmirror: config: target {IQN} TPG 1 has ACLs ({HOST}); --demo-mode would let any "
     "initiator write its LUNs: give --initiator instead"),
    ("create, ACLs on a TPG in demo mode", _demo_target,
     lambda t: create(t, "--iqn", IQN, "--initiator", HOST),
     f"targetmirror: config: target {IQN} TPG 1 is in demo mode; adding ACLs would lock out "
     "the initiators using it: export under another IQN, or add --demo-mode"),
    ("create, LUN taken", _acl_target, lambda t: create(t, "--iqn", IQN, "--initiator", HOST),
     f"targetmirror: config: target {IQN} TPG 1 has a LUN 0 already; choose another --lun "
     "(used: 0)"),
    ("create, name taken", _taken_name, lambda t: create(t),
     "targetmirror: lio: a user:mirror backstore named 'db' exists already; choose another "
     "name or delete it first (targetmirror delete)"),
    ("create --create-images, export fails later", _fail("LUN"),
     lambda t: create(t, "--iqn", IQN, "--initiator", HOST),
     f"targetmirror: lio: exporting db as {IQN} LUN 0 failed: injected failure of LUN"),
    ("create --create-images, backstore fails", _fail("UserBackedStorageObject"),
     lambda t: create(t),
     "targetmirror: lio: creating user:mirror backstore 'db' failed: injected failure of "
     "UserBackedStorageObject"),
    ("create --initial-sync, daemon unreachable", None,
     lambda t: create(t, "--initial-sync", "--socket", str(t / "nope.sock")),
     "targetmirror: device: cannot reach targetmirrord at {tmp}/nope.sock: No such file "
     "or directory (is it running? 'systemctl status targetmirrord')"),
    ("status, daemon unreachable", None,
     lambda t: ["status", "--socket", str(t / "nope.sock")],
     "targetmirror: device: cannot reach targetmirrord at {tmp}/nope.sock: No such file or "
     "directory (is it running? 'systemctl status targetmirrord')"),
    ("export-snapshot, no --initiator", None,
     lambda t: ["export-snapshot", "db", "--iqn", IQN, "--socket", str(t / "nope.sock")],
     f"targetmirror: config: --iqn {IQN}: expected --initiator IQN (repeatable: who may log "
     "in) or --demo-mode (any initiator may write; lab only)"),
    ("delete --iqn of a target that is not there", _taken_name,
     lambda t: ["delete", "db", "--iqn", IQN],
     f"targetmirror: lio: no iSCSI target {IQN} (nothing was deleted)"),
    ("create-volume2, bad name and portal", None,
     lambda t: ["create-volume2", "v 2", "--of", "db", "--iqn", IQN, "--initiator", HOST,
                "--portal", "[::1]"],
     "targetmirror: config: 2 problems with the arguments:"),
]


@pytest.mark.parametrize("case, setup, argv, line", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_1_and_changes_nothing(
        case: str, setup: Callable[[Lio], None] | None, argv: Callable[[Path], list[str]],
        line: str, lio: Lio, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if setup is not None:
        setup(lio)
    absent, lio.absent = lio.absent, None
    before = lio.snapshot()
    lio.absent = absent
    files_before = files(tmp_path)
    rc, out, err = run(capsys, *argv(tmp_path))
    assert rc == 1, (out, err)
    lines = err.splitlines()
    assert lines[0] == line.format(tmp=tmp_path), err
    assert "Traceback" not in err and out == ""
    if not line.endswith("problems with the arguments:"):
        assert len(lines) == 1, err
    lio.absent = None
    assert lio.snapshot() == before, "LIO changed"
    assert files(tmp_path) == files_before, "a file was made or left behind"


def test_several_argument_problems_one_line_each(tmp_path: Path, lio: Lio,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    rc, _out, err = run(capsys, "create", "bad name!", "--size", "1000", "--image-a",
                        str(tmp_path / "a.img"), "--image-b", str(tmp_path / "a.img"),
                        "--iqn", IQN, "--portal", "10.0.0.1", "--lun", "-1")
    assert rc == 1
    assert err.splitlines() == [
        "targetmirror: config: 7 problems with the arguments:",
        "  name 'bad name!': expected a name of letters, digits, '_', '.', '-' (1-64 "
        "characters, starting with a letter or digit)",
        "  --size 1000: expected a positive size, a multiple of 512",
        f"  --image-b {tmp_path}/a.img: expected an image other than --image-a",
        f"  --image-a {tmp_path}/a.img: expected an existing image file or block device (or "
        "--create-images)",
        f"  --portal 10.0.0.1: expected {NETADDR}",
        "  --lun -1: expected a LUN number 0-255",
        f"  --iqn {IQN}: expected --initiator IQN (repeatable: who may log in) or --demo-mode "
        "(any initiator may write; lab only)",
    ], err


def test_a_good_create_makes_everything_and_delete_removes_it(
        tmp_path: Path, lio: Lio, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run(capsys, *create(tmp_path, "--iqn", IQN, "--initiator", HOST,
                                       "--portal", "192.0.2.10:3260"))
    assert rc == 0, err
    assert out.startswith("created user:mirror db (1048576 bytes)")
    assert [so.name for so in lio.storage_objects] == ["db"]
    tpg = lio.targets[0].tpgs[0]
    assert tpg.attrs["generate_node_acls"] == "0" and tpg.enable
    assert [(p.ip_address, p.port) for p in tpg.network_portals] == [("192.0.2.10", 3260)]
    assert [a.node_wwn for a in tpg.node_acls] == [HOST]
    assert os.path.getsize(tmp_path / "a.img") == 1 << 20
    # --demo-mode is there when asked for by name, on a new target
    rc, _, err = run(capsys, "create", "lab", "--size", "1M", "--image-a",
                     str(tmp_path / "c.img"), "--image-b", str(tmp_path / "d.img"),
                     "--create-images", "--iqn", "iqn.2026-01.org.example:lab", "--demo-mode")
    assert rc == 0, err
    assert lio.targets[1].tpgs[0].attrs["generate_node_acls"] == "1"
    rc, out, err = run(capsys, "delete", "db", "--iqn", IQN)
    assert rc == 0, err
    assert [so.name for so in lio.storage_objects] == ["lab"]
    assert [t.wwn for t in lio.targets] == ["iqn.2026-01.org.example:lab"]
    assert (tmp_path / "a.img").exists(), "delete never removes images"


def test_an_existing_image_is_kept_when_a_create_fails(
        tmp_path: Path, lio: Lio, capsys: pytest.CaptureFixture[str]) -> None:
    """Only the images this create made are removed again; one that was there stays."""
    (tmp_path / "a.img").write_bytes(b"\x01" * (1 << 20))
    lio.fail_on.add("UserBackedStorageObject")
    rc, _, err = run(capsys, *create(tmp_path))
    assert rc == 1 and "injected failure" in err
    assert files(tmp_path) == ["a.img"]
    assert (tmp_path / "a.img").read_bytes() == b"\x01" * (1 << 20)


def test_a_bug_is_one_line_and_debug_shows_the_traceback(
        tmp_path: Path, lio: Lio, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*a: Any, **k: Any) -> Any:
        return {}["images"]

    monkeypatch.setattr(cli.ui_lio, "check_images_args", broken)
    rc, _, err = run(capsys, *create(tmp_path))
    assert rc == 1
    assert err == ("targetmirror: internal: KeyError: 'images' (a bug: run again with --debug "
                   "for the traceback and report it)\n")
    rc, _, err = run(capsys, "--debug", *create(tmp_path))
    assert rc == 1 and err.startswith("Traceback (most recent call last):")
    assert err.splitlines()[-1].startswith("targetmirror: internal: KeyError")


def test_interrupted_is_one_line_and_130(tmp_path: Path, lio: Lio,
                                         capsys: pytest.CaptureFixture[str],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupt(*a: Any, **k: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli.ui_lio, "_create_image", interrupt)
    rc, _, err = run(capsys, *create(tmp_path))
    assert rc == 130 and err == "targetmirror: interrupted: interrupted\n"
    assert files(tmp_path) == [] and lio.storage_objects == []


def test_apply_dry_run_without_lio_is_one_line(tmp_path: Path, lio: Lio,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """issue 16: ``apply --dry-run`` (and list, create, delete) printed a 40-line traceback
    on a host where LIO is not loaded."""
    from tests.config.test_loader import good, write

    doc = good(tmp_path)
    doc["groups"] = []
    path = write(tmp_path, doc)
    lio.absent = "proc-modules"
    before = files(tmp_path)
    rc, out, err = run(capsys, "apply", "--config", str(path), "--dry-run")
    assert rc == 1 and out == ""
    assert err == NOT_AVAILABLE + "\n"
    assert files(tmp_path) == before
