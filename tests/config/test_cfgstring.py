"""cfgstring: parse, canonical form, and refusals with a reason."""

from __future__ import annotations

import pytest

from targetmirror.config.cfgstring import MirrorSpec, check_images, parse
from targetmirror.errors import ConfigError


def test_parse_and_roundtrip():
    spec = parse("a=/srv/a.img;b=/srv/b.img")
    assert spec == MirrorSpec("/srv/a.img", "/srv/b.img", False)
    assert parse(spec.to_cfgstring()) == spec
    assert parse("mirror/a=/x/a;b=/x/b;direct=1").direct is True
    region = parse("a=/x/a;b=/x/b;region=131072")
    assert region.region_size == 131072 and parse(region.to_cfgstring()) == region
    assert parse("a=/x/a;b=/x/b").region_size is None


@pytest.mark.parametrize("text, reason", [
    ("a=/x/a,b=/x/b", "comma"),
    ("a=/x/a;b=/x:b", "colon"),
    ("a=/x/a", "lacks key 'b'"),
    ("b=/x/b", "lacks key 'a'"),
    ("a=x/a;b=/x/b", "absolute path"),
    ("a=/x/../a;b=/x/b", "normalised"),
    ("a=/x//a;b=/x/b", "normalised"),
    ("a=/x/a;b=/x/a", "same image"),
    ("a=/x/a;b=/x/b;c=1", "unknown"),
    ("a=/x/a;a=/x/c;b=/x/b", "twice"),
    ("a=/x/a;b=/x/b;direct=yes", "expected 0 or 1"),
    ("a=/x/a;bogus;b=/x/b", "key=value"),
    ("a=/x/a;b=/x/b;region=3000", "power of two"),
    ("a=/x/a;b=/x/b;region=2048", "power of two"),
    ("a=/x/a;b=/x/b;region=-4096", "power of two"),
    ("a=/" + "x" * 300 + ";b=/x/b", "255"),
])
def test_bad_cfgstrings(text, reason):
    with pytest.raises(ConfigError, match=reason):
        parse(text)


def test_check_images(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(bytes(4096))
    b.write_bytes(bytes(2048))
    spec = MirrorSpec(str(a), str(b))
    check_images(spec, 2048)
    with pytest.raises(ConfigError, match=r"image b .* needs 4096"):
        check_images(spec, 4096)
    with pytest.raises(ConfigError, match="No such file"):
        check_images(MirrorSpec(str(a), str(tmp_path / "c")))
    (tmp_path / "link").symlink_to(a)
    with pytest.raises(ConfigError, match="same file"):
        check_images(MirrorSpec(str(a), str(tmp_path / "link")))


def test_snapshot_cfgstring():
    from targetmirror.config.cfgstring import SnapshotSpec, parse_any

    spec = parse_any("mirror/snapshot=/srv/db-a.img")
    assert spec == SnapshotSpec("/srv/db-a.img")
    assert parse_any(spec.to_cfgstring()) == spec
    assert isinstance(parse_any("a=/x/a;b=/x/b"), MirrorSpec)
    for bad, reason in (("snapshot=rel/a", "absolute"), ("snapshot=/x/a;b=/y", "only"),
                        ("snapshot=/x/../a", "normalised")):
        with pytest.raises(ConfigError, match=reason):
            parse_any(bad)


def test_volume2_cfgstring_round_trips_and_is_strict() -> None:
    from targetmirror.config.cfgstring import VolumeSpec, parse_any

    spec = parse_any("mirror/mirror=db;volume=2")
    assert spec == VolumeSpec("db", 2)
    assert parse_any(spec.to_cfgstring()) == spec
    assert parse_any("volume=2;mirror=db.1") == VolumeSpec("db.1", 2)
    for bad, why in (("mirror=db", "lacks key 'volume'"), ("volume=2", "lacks key 'mirror'"),
                     ("mirror=db;volume=1", "expected 2"), ("mirror=db;volume=3", "expected 2"),
                     ("mirror=db;volume=2;a=/x", "not allowed"),
                     ("mirror=../db;volume=2", "not a mirror name"),
                     ("mirror=db;mirror=e;volume=2", "given twice"),
                     ("mirror=db;volume=2,x", "a comma")):
        with pytest.raises(ConfigError, match=why):
            parse_any(bad)


# -- RBD legs ----------------------------------------------------------------------------------

def test_rbd_legs_round_trip() -> None:
    from targetmirror.config.cfgstring import parse_any
    from targetmirror.store.rbd import CephAccess

    text = ("a=rbd/p1/ns/img-a;b=rbd/p2/img-b;a_conf=/etc/ceph/one.conf;a_id=tm;"
            "b_conf=/etc/ceph/two.conf;b_keyring=/etc/ceph/two.keyring;b_timeout=30")
    spec = parse(text)
    assert spec.image_a == "rbd/p1/ns/img-a" and spec.image_b == "rbd/p2/img-b"
    assert spec.access("a") == CephAccess("/etc/ceph/one.conf", "tm", "", 10)
    assert spec.access("b") == CephAccess("/etc/ceph/two.conf", "admin",
                                          "/etc/ceph/two.keyring", 30)
    assert spec.to_cfgstring() == text and parse(spec.to_cfgstring()) == spec
    snap = parse_any("snapshot=rbd/p1/img-a@tm-1;conf=/etc/ceph/one.conf")
    assert snap.to_cfgstring() == "snapshot=rbd/p1/img-a@tm-1;conf=/etc/ceph/one.conf"


@pytest.mark.parametrize(("text", "why"), [
    ("a=rbd/p;b=/x", "expected rbd/POOL/IMAGE"),
    ("a=rbd/p/a/b/c;b=/x", "expected rbd/POOL/IMAGE"),
    ("a=rbd/p/im g;b=/x", "not a valid pool"),
    ("a=rbd/p/i@s;b=/x", "cannot be a snapshot"),
    ("a=/x;b=/y;a_id=tm", "only for an RBD leg"),
    ("a=rbd/p/i;b=/y;a_timeout=0", "1-300"),
    ("a=rbd/p/i;b=/y;a_conf=etc/ceph.conf", "absolute path"),
    ("a=rbd/p/i;b=/y;a_id=bad/name", "cephx client name"),
    ("a=rbd/p/i;b=rbd/p/i", "same image"),
    ("snapshot=rbd/p/i", "needs rbd/POOL/IMAGE@SNAP"),
    ("snapshot=rbd/p/i@s;region=4096", "unknown here"),
])
def test_bad_rbd_cfgstring(text: str, why: str) -> None:
    from targetmirror.config.cfgstring import parse_any

    with pytest.raises(ConfigError, match=why):
        parse_any(text)
