"""The D-Bus face targetcli uses, on a private dbus-daemon: owning org.kernel.TCMUService1,
registering through a (fake) tcmu-runner's HandlerManager1, and taking the name over when the
runner goes away."""

from __future__ import annotations

import shutil
import subprocess
import threading

import pytest

jeepney = pytest.importorskip("jeepney")
from jeepney import DBusAddress, HeaderFields, MessageType, new_method_call, new_method_return  # noqa: E402
from jeepney.bus_messages import message_bus  # noqa: E402
from jeepney.io.blocking import open_dbus_connection  # noqa: E402

from targetmirror.daemon.dbus_service import (  # noqa: E402
    BUS_NAME,
    HM_IFACE,
    HM_PATH,
    IFACE,
    ROOT_PATH,
    HandlerService,
    check_config,
)

pytestmark = pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="no dbus-daemon")

POLICY = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>session</type>
  <listen>unix:path={path}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow send_destination="*" eavesdrop="true"/>
    <allow eavesdrop="true"/>
    <allow own="*"/>
  </policy>
</busconfig>
"""


@pytest.fixture
def bus(tmp_path):
    sock = tmp_path / "bus.sock"
    conf = tmp_path / "bus.conf"
    conf.write_text(POLICY.format(path=sock))
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork",
                             "--print-address=1"], stdout=subprocess.PIPE, text=True)
    address = proc.stdout.readline().strip()     # printed once it listens
    assert address.startswith("unix:")
    yield address
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def images(tmp_path):
    paths = []
    for leg in ("a", "b"):
        p = tmp_path / f"{leg}.img"
        p.write_bytes(b"\0" * 4096)
        paths.append(str(p))
    return paths


def call(conn, path: str, iface: str, member: str, sig: str | None = None, body=(),
         dest: str = BUS_NAME):
    reply = conn.send_and_get_reply(
        new_method_call(DBusAddress(path, bus_name=dest, interface=iface), member, sig, body),
        timeout=10)
    assert reply.header.message_type == MessageType.method_return, reply.body
    return reply.body


def test_owner_mode_lists_and_checks_like_targetcli(bus, images):
    svc = HandlerService(bus=bus)
    assert svc.start()
    try:
        assert svc.mode == "owner"
        with open_dbus_connection(bus=bus) as c:
            (objs,) = call(c, ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                           "GetManagedObjects")
            assert list(objs) == [f"{ROOT_PATH}/mirror"]
            sig, desc = objs[f"{ROOT_PATH}/mirror"][IFACE]["ConfigDesc"]
            assert sig == "s" and "a=IMAGE_A;b=IMAGE_B" in desc
            path = f"{ROOT_PATH}/mirror"
            a, b = images
            assert call(c, path, IFACE, "CheckConfig", "s", (f"mirror/a={a};b={b}",)) == \
                (True, "ok")
            ok, why = call(c, path, IFACE, "CheckConfig", "s", (f"mirror/a={a};b=/nope.img",))
            assert not ok and "/nope.img" in why
            ok, why = call(c, path, IFACE, "CheckConfig", "s", (f"mirror/a={a};b={a}",))
            assert not ok and why
            ok, why = call(c, path, IFACE, "CheckConfig", "s", ("file/srv/x.img",))
            assert not ok and "not a mirror config" in why
            (props,) = call(c, path, "org.freedesktop.DBus.Properties", "GetAll", "s", (IFACE,))
            assert props["ConfigDesc"] == ("s", desc)
            (xml,) = call(c, "/org/kernel", "org.freedesktop.DBus.Introspectable", "Introspect")
            assert '<node name="TCMUService1"/>' in xml
    finally:
        svc.close()


class FakeRunner:
    """What tcmu-runner does for RegisterHandler: own the service name, answer once the
    handler's name is on the bus, forward CheckConfig to the handler's object."""

    def __init__(self, bus: str) -> None:
        self.conn = open_dbus_connection(bus=bus)
        self.conn.send_and_get_reply(new_method_call(message_bus, "RequestName", "su",
                                                     (BUS_NAME, 4)))
        self.calls: list[tuple[str, str]] = []
        self.forwarded: tuple[bool, str] | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)
        self.thread.start()

    def loop(self) -> None:
        while not self.stop.is_set():
            try:
                msg = self.conn.receive(timeout=0.2)
            except TimeoutError:
                continue
            f = msg.header.fields
            if msg.header.message_type != MessageType.method_call:
                continue
            if f.get(HeaderFields.path) == HM_PATH and f.get(HeaderFields.member) == \
                    "RegisterHandler":
                self.calls.append(tuple(msg.body))
                self.conn.send(new_method_return(msg, "bs", (True, "")))

    def forward_check(self, bus: str, config: str) -> tuple[bool, str]:
        with open_dbus_connection(bus=bus) as c:
            return tuple(call(c, f"{HM_PATH}/mirror", IFACE, "CheckConfig", "s", (config,),
                              dest=f"{HM_IFACE}.mirror"))

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.conn.close()


def test_registers_with_a_running_tcmu_runner_and_takes_over_when_it_stops(bus, images):
    runner = FakeRunner(bus)
    svc = HandlerService(bus=bus)
    try:
        assert svc.start()
        assert svc.registered.wait(10), svc.register_error
        assert svc.mode == "registered"
        assert runner.calls and runner.calls[0][0] == "mirror"
        a, b = images
        assert runner.forward_check(bus, f"mirror/a={a};b={b}") == (True, "ok")
        assert runner.forward_check(bus, "mirror/a=relative;b=x")[0] is False

        runner.close()                               # tcmu-runner stops: its name is released
        assert svc.took_over.wait(10)
        with open_dbus_connection(bus=bus) as c:
            (objs,) = call(c, ROOT_PATH, "org.freedesktop.DBus.ObjectManager",
                           "GetManagedObjects")
        assert list(objs) == [f"{ROOT_PATH}/mirror"]
    finally:
        runner.close() if not runner.stop.is_set() else None
        svc.close()


def test_no_bus_is_not_an_error(tmp_path):
    svc = HandlerService(bus=f"unix:path={tmp_path}/nothing")
    assert svc.start() is False and svc.mode is None


def test_check_config_refuses_other_subtypes_and_bad_strings(images):
    a, b = images
    assert check_config(f"a={a};b={b}") == (True, "ok")
    assert check_config("rbd/pool/img")[0] is False
    assert check_config("mirror/")[0] is False
    assert check_config(f"mirror/a={a},b={b}")[0] is False


def test_bus_going_away_is_logged_not_a_traceback(tmp_path, caplog):
    sock = tmp_path / "bus.sock"
    conf = tmp_path / "bus.conf"
    conf.write_text(POLICY.format(path=sock))
    proc = subprocess.Popen(["dbus-daemon", f"--config-file={conf}", "--nofork",
                             "--print-address=1"], stdout=subprocess.PIPE, text=True)
    address = proc.stdout.readline().strip()
    svc = HandlerService(bus=address)
    try:
        assert svc.start() and svc.mode == "owner"
        proc.terminate()
        proc.wait(10)
        svc._thread.join(10)                          # the loop ends by itself
        assert not svc._thread.is_alive()
        assert "D-Bus connection lost" in caplog.text
    finally:
        svc.close()
