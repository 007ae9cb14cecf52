"""The YAML loader: defaults, the example file, and a table of bad files.

Every bad file must give a message naming the file, the key path and what was expected -- and
``targetmirror apply`` on it must not touch LIO (the recording seam sees no call, not even a
read) nor the daemon's groups.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from targetmirror import cli
from targetmirror.config import loader
from targetmirror.errors import ConfigError, ConfigFileError
from tests.config.fakelio import FakeGroups, FakeLio

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20


def good(tmp: Path) -> dict[str, Any]:
    """A valid document: two mirrors, a group, one export (images exist, 1 MiB each)."""
    images = tmp / "images"
    images.mkdir(exist_ok=True)
    for n in ("m1-a", "m1-b", "m2-a", "m2-b"):
        with open(images / f"{n}.img", "wb") as f:
            f.truncate(MiB)
    return {
        "daemon": {"state_dir": str(tmp / "state"), "control_socket": str(tmp / "ctl.sock")},
        "image_dirs": [str(images)],
        "mirrors": [
            {"name": "m1", "size": "1M", "image_a": f"{images}/m1-a.img",
             "image_b": f"{images}/m1-b.img"},
            {"name": "m2", "size": MiB, "image_a": f"{images}/m2-a.img",
             "image_b": f"{images}/m2-b.img", "region_size": "128K"},
        ],
        "groups": [{"name": "g", "mirrors": ["m1", "m2"]}],
        "exports": [{
            "target": "iqn.2026-01.org.example:t1",
            "portals": ["127.0.0.1:3260"],
            "luns": [{"lun": 0, "mirror": "m1"}, {"lun": 1, "mirror": "m2"}],
            "acls": [{"initiator": "iqn.2026-01.org.example:host1"}],
        }],
    }


def write(tmp: Path, doc: Any, name: str = "tm.yaml") -> Path:
    path = tmp / name
    path.write_text(doc if isinstance(doc, str) else yaml.safe_dump(doc, sort_keys=False))
    return path


def test_good_file_loads(tmp_path: Path) -> None:
    cfg = loader.load(str(write(tmp_path, good(tmp_path))))
    assert [m.name for m in cfg.mirrors] == ["m1", "m2"]
    assert cfg.mirrors[0].size == MiB and cfg.mirrors[0].region_size == 64 * 1024
    # the default region size stays out of the cfgstring (same string as `targetmirror create`)
    assert cfg.mirrors[0].cfgstring() == \
        f"a={tmp_path}/images/m1-a.img;b={tmp_path}/images/m1-b.img"
    assert cfg.mirrors[1].cfgstring().endswith(";region=131072")
    assert cfg.groups[0].mirrors == ("m1", "m2")
    e = cfg.exports[0]
    assert e.portals == (("127.0.0.1", 3260),) and e.luns == ((0, "m1"), (1, "m2"))
    assert cfg.daemon.log_level == "info" and cfg.daemon.metrics_address == ""


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    cfg = loader.loads("daemon: {log_level: debug}\nimage_dirs: []\n", "x.yaml")
    assert cfg.mirrors == () and cfg.exports == () and cfg.daemon.log_level == "debug"
    assert cfg.daemon.write_intent_extent == 4 << 20
    cfg = loader.loads("daemon: {write_intent_extent: 64K}\nimage_dirs: []\n", "x.yaml")
    assert cfg.daemon.write_intent_extent == 64 << 10
    assert cfg.daemon.state_dir == loader.default("daemon.state_dir")


def test_example_file_is_valid(tmp_path: Path) -> None:
    """etc/targetmirror.yaml, with its image directory pointed at a scratch one."""
    text = (REPO / "etc" / "targetmirror.yaml").read_text()
    assert "/var/lib/targetmirror/images" in text
    images = tmp_path / "images"
    images.mkdir()
    cfg = loader.loads(text.replace("/var/lib/targetmirror/images", str(images)), "example")
    assert {m.name for m in cfg.mirrors} == {"db", "logs"}
    assert cfg.exports[0].acls[0].chap is not None
    assert cfg.exports[0].acls[0].chap.mutual_user == "target1"
    assert "change-me" not in repr(cfg), "CHAP secrets must not appear in reprs (logs)"


def test_path_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, good(tmp_path))
    monkeypatch.setenv(loader.ENV_VAR, str(path))
    assert loader.load().path == str(path)
    monkeypatch.delenv(loader.ENV_VAR)
    assert loader.default_path() == "/etc/targetmirror/targetmirror.yaml"


def _set(path: str, value: Any) -> Any:
    """A mutation setting ``a.b[1].c`` to ``value`` (``DELETE`` removes the key)."""
    def mutate(doc: dict[str, Any], tmp: Path) -> None:
        obj: Any = doc
        parts = path.replace("]", "").replace("[", ".").split(".")
        for p in parts[:-1]:
            obj = obj[int(p)] if p.isdigit() else obj[p]
        v = value(tmp) if callable(value) else value
        if v is DELETE:
            del obj[parts[-1]]
        else:
            obj[int(parts[-1]) if parts[-1].isdigit() else parts[-1]] = v
    return mutate


DELETE = object()


def _rename(path: str, old: str, new: str) -> Any:
    """A mutation renaming key ``old`` of the mapping at ``path`` (a typo)."""
    def mutate(doc: dict[str, Any], tmp: Path) -> None:
        obj: Any = doc
        for p in path.split("."):
            obj = obj[int(p)] if p.isdigit() else obj[p]
        obj[new] = obj.pop(old)
    return mutate


def _symlink_out(tmp: Path) -> str:
    outside = tmp / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "evil.img").write_bytes(bytes(MiB))
    link = tmp / "images" / "link.img"
    link.symlink_to(outside / "evil.img")
    return str(link)


def _add_mirror(doc: dict[str, Any], tmp: Path, name: str, images: str = "m3") -> None:
    for leg in ("a", "b"):
        with open(tmp / "images" / f"{images}-{leg}.img", "wb") as f:
            f.truncate(MiB)
    doc["mirrors"].append({"name": name, "size": "1M",
                           "image_a": f"{tmp}/images/{images}-a.img",
                           "image_b": f"{tmp}/images/{images}-b.img"})


def _group2(doc: dict[str, Any], tmp: Path) -> None:
    _add_mirror(doc, tmp, "m3")
    doc["groups"].append({"name": "g2", "mirrors": ["m3", "m1"]})


def _dup_name(doc: dict[str, Any], tmp: Path) -> None:
    _add_mirror(doc, tmp, "m1")


def _dup_lun(doc: dict[str, Any], tmp: Path) -> None:
    doc["exports"][0]["luns"][1]["lun"] = 0


BAD: list[tuple[str, Any, str, str]] = [
    # (case, mutation, key path, expectation fragment)
    ("wrong type", _set("mirrors.0.size", [1]), "mirrors[0].size", "expected a positive size"),
    ("unknown key", _set("mirrors.0.colour", "red"), "mirrors[0].colour", "no such key"),
    ("unknown top key", _set("mirror", []), "mirror:", "no such key"),
    ("missing key", _set("mirrors.1.image_b", DELETE), "mirrors[1].image_b",
     "it is required"),
    ("missing image", _set("mirrors.1.image_b", lambda t: f"{t}/images/nope.img"),
     "mirrors[1].image_b", "expected an existing image"),
    ("duplicate image", _set("mirrors.1.image_a", lambda t: f"{t}/images/m1-b.img"),
     "mirrors[1].image_a", "no other leg uses (mirrors[0].image_b"),
    ("symlink escape", _set("mirrors.0.image_a", _symlink_out), "mirrors[0].image_a",
     "expected a path inside image_dirs"),
    ("dotdot escape", _set("mirrors.0.image_b", lambda t: f"{t}/images/../m1-b.img"),
     "mirrors[0].image_b", "expected a path inside image_dirs"),
    ("bad IQN", _set("exports.0.target", "iqn.2026-13.org.example:t1"), "exports[0].target",
     "expected an iSCSI name"),
    ("bad initiator", _set("exports.0.acls.0.initiator", "iqn.2026-01.org.Example_x"),
     "exports[0].acls[0].initiator", "expected an iSCSI name"),
    ("duplicate LUN", _dup_lun, "exports[0].luns[1].lun", "not used before"),
    ("group names unknown mirror", _set("groups.0.mirrors.1", "m9"), "groups[0].mirrors[1]",
     "the name of a mirror under mirrors"),
    ("mirror in two groups", _group2, "groups[1].mirrors[1]", "in no other group"),
    ("bad region size", _set("mirrors.0.region_size", 3000), "mirrors[0].region_size",
     "power of two of at least 4096"),
    ("size not sectors", _set("mirrors.0.size", 1000), "mirrors[0].size", "multiple of 512"),
    ("bad portal", _set("exports.0.portals.0", "127.0.0.1"), "exports[0].portals[0]",
     "expected IP:PORT"),
    ("bad portal port", _set("exports.0.portals.0", "10.0.0.1:70000"), "exports[0].portals[0]",
     "port 1-65535"),
    ("half CHAP", _set("exports.0.acls.0.chap_user", "u"), "exports[0].acls[0]",
     "both chap_user and chap_password"),
    ("short CHAP secret", lambda d, t: d["exports"][0]["acls"][0].update(
        chap_user="u", chap_password="short"), "exports[0].acls[0].chap_password",
     "12-255 printable"),
    ("bad log level", _set("daemon.log_level", "loud"), "daemon.log_level", "one of debug"),
    ("write-intent extent not a power of two", _set("daemon.write_intent_extent", "3M"),
     "daemon.write_intent_extent", "a power of two from 4K to 1G"),
    ("write-intent extent too small", _set("daemon.write_intent_extent", "512"),
     "daemon.write_intent_extent", "a power of two from 4K to 1G"),
    ("relative state dir", _set("daemon.state_dir", "var/lib"), "daemon.state_dir",
     "an absolute path"),
    ("duplicate mirror name", _dup_name, "mirrors[2].name",
     "a name not used before"),
    ("LUN of unknown mirror", _set("exports.0.luns.0.mirror", "zz"),
     "exports[0].luns[0].mirror", "a mirror under mirrors"),
    ("no ACL", _set("exports.0.acls", []), "exports[0].acls", "at least one ACL"),
    ("bool as direct", _set("mirrors.0.direct", "yes"), "mirrors[0].direct", "true or false"),
    # issue 16: these crashed the checker with AssertionError
    ("missing size", _set("mirrors.0.size", DELETE), "mirrors[0].size", "it is required"),
    ("size typo", _rename("mirrors.0", "size", "sise"), "mirrors[0].sise",
     "no such key (did you mean size? It is required; known keys here: name, size,"),
    ("image typo", _rename("mirrors.1", "image_b", "imageb"), "mirrors[1].imageb",
     "did you mean image_b? It is required"),
    ("optional key typo", _set("mirrors.0.regionsize", "64K"), "mirrors[0].regionsize",
     "did you mean region_size? known keys"),
    ("daemon key typo", _set("daemon.log_levl", "info"), "daemon.log_levl",
     "did you mean log_level?"),
    ("bad name", lambda d, t: _add_mirror(d, t, "bad name!"), "mirrors[2].name",
     "expected a name of letters, digits"),
    ("portal without port", _set("exports.0.portals.0", "10.0.0.1"), "exports[0].portals[0]",
     "expected IP:PORT with a numeric IP"),
    ("portal host name", _set("exports.0.portals.0", "target.example:3260"),
     "exports[0].portals[0]", "numeric IP"),
    ("metrics address without host", _set("daemon.metrics_address", ":9745"),
     "daemon.metrics_address", "expected IP:PORT"),
]


@pytest.mark.parametrize("case, mutate, key, expected", BAD, ids=[b[0] for b in BAD])
def test_bad_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                  capsys: pytest.CaptureFixture[str], case: str, mutate: Any, key: str,
                  expected: str) -> None:
    doc = good(tmp_path)
    mutate(doc, tmp_path)
    path = write(tmp_path, doc)
    with pytest.raises(ConfigFileError) as info:
        loader.load(str(path))
    msg = str(info.value)
    assert str(path) in msg and key in msg and expected in msg, msg
    assert all(p.startswith(f"{path}: ") for p in info.value.problems)
    assert len(info.value.problems) == 1, f"one mistake, one message: {info.value.problems}"
    _assert_apply_changes_nothing(tmp_path, path, monkeypatch, capsys, key)


def _assert_apply_changes_nothing(tmp: Path, path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str], key: str) -> None:
    fake = FakeLio()
    groups = FakeGroups()
    monkeypatch.setattr(cli.common, "lio_seam", lambda: fake)
    monkeypatch.setattr(cli.ui_config, "DaemonGroups", lambda socket: groups)
    before = sorted(p.name for p in (tmp / "images").iterdir())
    rc = cli.main(["apply", "--config", str(path)])
    err = capsys.readouterr().err
    assert rc == 1 and "targetmirror: config: " in err and key in err, err
    assert fake.calls == [] and fake.reads == 0, "a bad file must not touch LIO"
    assert groups.calls == []
    assert sorted(p.name for p in (tmp / "images").iterdir()) == before
    assert not (tmp / "state").exists(), "no manifest may be written"


def test_yaml_syntax_error_names_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    good(tmp_path)
    path = write(tmp_path, "mirrors:\n  - name: m1\n    size: [1M\n    image_a: /x\n")
    with pytest.raises(ConfigFileError) as info:
        loader.load(str(path))
    msg = str(info.value)
    assert str(path) in msg and "line 4" in msg and "expected valid YAML" in msg, msg
    _assert_apply_changes_nothing(tmp_path, path, monkeypatch, capsys, "line 4")


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    with pytest.raises(ConfigFileError, match=r"\(top level\): expected a mapping"):
        loader.loads("- 1\n- 2\n", "list.yaml")


def test_every_problem_is_reported(tmp_path: Path) -> None:
    """Several mistakes: all of them in one error, each with its own key path."""
    doc = good(tmp_path)
    doc["mirrors"][0]["size"] = "lots"
    doc["exports"][0]["target"] = "IQN.bad"
    doc["daemon"]["log_level"] = 3
    doc["groups"][0]["mirrors"] = ["m1"]
    with pytest.raises(ConfigFileError) as info:
        loader.load(str(write(tmp_path, doc)))
    keys = ["mirrors[0].size", "exports[0].target", "daemon.log_level", "groups[0].mirrors"]
    assert len(info.value.problems) == len(keys), info.value.problems
    for k, p in zip(keys, sorted(info.value.problems, key=lambda p: [
            k in p for k in keys].index(True)), strict=True):
        assert k in p
    assert str(info.value).startswith(f"4 problems in {tmp_path}/tm.yaml:")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        loader.load(str(tmp_path / "nope.yaml"))


def test_create_images_allows_missing(tmp_path: Path) -> None:
    doc = good(tmp_path)
    doc["mirrors"][1]["image_b"] = f"{tmp_path}/images/new-b.img"
    doc["mirrors"][1]["create_images"] = True
    cfg = loader.load(str(write(tmp_path, doc)))
    assert cfg.mirrors[1].image_b == f"{tmp_path}/images/new-b.img"
    assert not (tmp_path / "images" / "new-b.img").exists(), "loading never writes"


def test_symlink_inside_resolves(tmp_path: Path) -> None:
    """A link that stays inside the allowed directory is fine; the cfgstring names the target."""
    doc = good(tmp_path)
    (tmp_path / "images" / "alias.img").symlink_to(tmp_path / "images" / "m1-a.img")
    doc["mirrors"][0]["image_a"] = f"{tmp_path}/images/alias.img"
    cfg = loader.load(str(write(tmp_path, doc)))
    assert cfg.mirrors[0].image_a == f"{tmp_path}/images/m1-a.img"


# -- RBD legs ----------------------------------------------------------------------------------

def _rbd_doc(tmp: Path) -> dict[str, Any]:
    doc = good(tmp)
    conf = tmp / "ceph.conf"
    conf.write_text("[global]\n")
    # (no keyring here: three pytest tmp paths would not fit the kernel's 255-byte dev_config)
    doc["ceph"] = [{"name": "main", "conf": str(conf), "client": "targetmirror",
                    "timeout": 7}]
    doc["mirrors"][0]["image_a"] = "rbd/tm/ns1/m1-a"
    doc["mirrors"][0]["rbd_snapshots_keep"] = 3
    return doc


def test_rbd_leg_loads_and_reaches_the_cfgstring(tmp_path: Path) -> None:
    cfg = loader.load(str(write(tmp_path, _rbd_doc(tmp_path))))
    m1 = cfg.mirrors[0]
    assert m1.image_a == "rbd/tm/ns1/m1-a" and m1.ceph_b is None
    assert m1.ceph_a is not None and m1.ceph_a.client == "targetmirror"
    assert m1.rbd_snapshots_keep == 3
    assert m1.cfgstring() == (f"a=rbd/tm/ns1/m1-a;b={tmp_path}/images/m1-b.img;"
                              f"a_conf={tmp_path}/ceph.conf;a_id=targetmirror;a_timeout=7")


@pytest.mark.parametrize(("change", "key", "expected"), [
    (lambda d: d["mirrors"][0].update(image_a="rbd/tm"), "mirrors[0].image_a",
     "rbd/POOL/IMAGE"),
    (lambda d: d["mirrors"][0].update(image_a="rbd/tm/x@snap"), "mirrors[0].image_a",
     "not a snapshot"),
    (lambda d: d["mirrors"][0].update(cluster_a="other"), "mirrors[0].cluster_a",
     "an entry under ceph (main)"),
    (lambda d: d["mirrors"][1].update(cluster_b="main"), "mirrors[1].cluster_b",
     "no cluster_b"),
    (lambda d: d["ceph"][0].update(timeout=0), "ceph[0].timeout", "1 to 300"),
    (lambda d: d["ceph"][0].update(conf="/nonexistent/ceph.conf"), "ceph[0].conf",
     "existing ceph.conf"),
    (lambda d: d["ceph"][0].update(client="client.tm"), "ceph[0].client", "without 'client.'"),
    (lambda d: d["ceph"][0].update(keyring="/nonexistent.keyring"), "ceph[0].keyring",
     "existing keyring"),
    (lambda d: d["ceph"].append(dict(d["ceph"][0], name="second")), "mirrors[0].cluster_a",
     "there are several"),
    (lambda d: d["mirrors"][1].update(image_a="rbd/tm/ns1/m1-a"), "mirrors[1].image_a",
     "no other leg uses"),
    (lambda d: d["mirrors"][0].update(rbd_snapshots_keep=-1), "mirrors[0].rbd_snapshots_keep",
     "0 or more"),
])
def test_bad_rbd_leg_names_file_key_and_expectation(tmp_path: Path, change, key: str,
                                                    expected: str) -> None:
    doc = _rbd_doc(tmp_path)
    change(doc)
    path = write(tmp_path, doc)
    with pytest.raises(ConfigFileError) as exc:
        loader.load(str(path))
    text = str(exc.value)
    assert f"{path}: {key}: expected" in text and expected in text, text


def test_rbd_leg_without_ceph_entries_uses_the_defaults(tmp_path: Path) -> None:
    doc = good(tmp_path)
    doc["mirrors"][0]["image_b"] = "rbd/pool/m1-b"
    m1 = loader.load(str(write(tmp_path, doc))).mirrors[0]
    assert m1.cfgstring() == f"a={tmp_path}/images/m1-a.img;b=rbd/pool/m1-b"
    assert m1.spec().access("b") is not None and m1.spec().access("b").conf == \
        "/etc/ceph/ceph.conf"


def test_missing_name_is_reported_not_a_crash(tmp_path: Path) -> None:
    """issue 16: a mirror without ``name`` crashed the checker with AssertionError."""
    doc = good(tmp_path)
    del doc["mirrors"][0]["name"]
    checked = loader.check(doc, "f.yaml")
    assert "f.yaml: mirrors[0].name: expected this key (it is required)" in checked.problems
    # the other mirror is still valid; the group and the export that name m1 (now a name no
    # entry has) are problems of their own and left out, not guessed at
    assert [m.name for m in checked.config.mirrors] == ["m2"]
    assert checked.config.groups == () and checked.config.exports == ()
    assert "f.yaml: groups[0].mirrors[0]: expected the name of a mirror under mirrors, got " \
        "'m1'" in checked.problems


def test_check_keeps_the_valid_part_and_names_the_refused_mirrors(tmp_path: Path) -> None:
    """What the daemon serves from a file with one bad mirror: the good one, and the bad one's
    name with its problems (it is answered NOT READY, reason config)."""
    doc = good(tmp_path)
    doc["mirrors"][1]["sise"] = doc["mirrors"][1].pop("size")
    checked = loader.check(doc, "f.yaml")
    assert not checked.ok
    assert [m.name for m in checked.config.mirrors] == ["m1"]
    assert checked.config.groups == ()                      # g needs m2
    assert checked.config.exports[0].luns == ((0, "m1"),)   # the export keeps m1's LUN
    assert list(checked.refused) == ["m2"]
    assert checked.refused["m2"] == (
        "f.yaml: mirrors[1].sise: expected no such key (did you mean size? It is required; "
        "known keys here: name, size, image_a, image_b, region_size, direct, create_images, "
        "cluster_a, cluster_b, rbd_snapshots_keep)",)
    # a bad daemon setting falls back to its default in the valid part
    doc["daemon"]["log_level"] = "loud"
    assert loader.check(doc, "f.yaml").config.daemon.log_level == "info"


def test_yaml_aliases_cannot_blow_up_memory(tmp_path: Path) -> None:
    """The billion laughs: nine levels of nine aliases is 9**9 values once followed; the
    document is refused from its composed node graph, before anything is built."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, 10):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    text = "\n".join(lines) + "\n"
    with pytest.raises(ConfigFileError, match=r"expected at most 100000 values with YAML "
                       r"aliases expanded"):
        loader.loads(text, "laughs.yaml")
    # a few aliases are fine (they are YAML): the same ACL list for two targets, say
    ok = loader.parse_yaml("x: &acl [{initiator: iqn.2026-01.org.example:h}]\ny: *acl\n")
    assert ok == {"x": [{"initiator": "iqn.2026-01.org.example:h"}],
                  "y": [{"initiator": "iqn.2026-01.org.example:h"}]}


def test_recursive_alias_duplicate_key_and_size_limits() -> None:
    with pytest.raises(ConfigFileError, match="line 1: expected no recursive YAML alias"):
        loader.parse_yaml("a: &a [1, *a]\n", "rec.yaml")
    with pytest.raises(ConfigFileError) as info:
        loader.parse_yaml("mirrors:\n  - name: m1\n    size: 1G\n    size: 2G\n", "dup.yaml")
    assert info.value.problems == ["dup.yaml: line 4: expected each key once in a mapping, got "
                                   "'size' again (first at line 3)"]
    with pytest.raises(ConfigFileError, match="at most 1048576 bytes"):
        loader.parse_yaml("#" * (2 << 20), "big.yaml")
