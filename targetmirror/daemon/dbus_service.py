"""Make ``user:mirror`` visible to targetcli over D-Bus (optional; ``targetmirrord --no-dbus``).

targetcli lists ``user:<subtype>`` backstore types by asking the system bus name
``org.kernel.TCMUService1`` for its managed objects (``GetManagedObjects`` on
``/org/kernel/TCMUService1``): one object per handler, ``/org/kernel/TCMUService1/<subtype>``,
with interface ``org.kernel.TCMUService1`` (property ``ConfigDesc``, method
``CheckConfig(s) -> (b, s)``, which ``create`` calls with ``<subtype>/<cfgstring>`` before it
makes the backstore).  Two cases:

* **No tcmu-runner**: we own ``org.kernel.TCMUService1`` and serve that object tree ourselves.
* **tcmu-runner owns the name**: we must not take it.  We own
  ``org.kernel.TCMUService1.HandlerManager1.mirror``, export
  ``/org/kernel/TCMUService1/HandlerManager1/mirror`` (interface ``org.kernel.TCMUService1``) and
  call tcmu-runner's ``HandlerManager1.RegisterHandler("mirror", ConfigDesc)``; the runner then
  lists ``user:mirror`` and forwards CheckConfig to us.  It does not serve our devices -- we
  still do that ourselves, as always.

If the owner of ``org.kernel.TCMUService1`` goes away (tcmu-runner stopped) we take the name over,
so targetcli keeps listing us.  All of it runs on one thread with jeepney (pure Python, Debian's
python3-jeepney), a blocking connection and our own dispatch: no GLib main loop in the daemon.
Without a system bus (containers, the lab before dbus-daemon starts) the daemon logs one line and
runs without it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from targetmirror.config.cfgstring import (
    SUBTYPE,
    MirrorSpec,
    SnapshotSpec,
    check_images,
    parse_any,
)
from targetmirror.errors import TargetMirrorError

log = logging.getLogger("targetmirror.dbus")

BUS_NAME = "org.kernel.TCMUService1"
ROOT_PATH = "/org/kernel/TCMUService1"
IFACE = "org.kernel.TCMUService1"
HM_PATH = ROOT_PATH + "/HandlerManager1"
HM_IFACE = "org.kernel.TCMUService1.HandlerManager1"
OBJECT_MANAGER = "org.freedesktop.DBus.ObjectManager"
PROPERTIES = "org.freedesktop.DBus.Properties"
INTROSPECTABLE = "org.freedesktop.DBus.Introspectable"
PEER = "org.freedesktop.DBus.Peer"

CONFIG_DESC = (
    "a=IMAGE_A;b=IMAGE_B[;direct=1] -- two image files or block devices of at least the LUN "
    "size (absolute paths, ';'-separated; A is the copy a split freezes, B the live leg). "
    "Also snapshot=IMAGE: read-only export of a split mirror's A. Add "
    "control=nl_reply_supported=-1 while tcmu-runner runs, and hw_max_sectors=2048 for 1 MiB "
    "commands. Served by targetmirrord.")

_REQUEST_NAME_PRIMARY = 1
_DO_NOT_QUEUE = 4


def check_config(config: str,
                 guard: Callable[[MirrorSpec | SnapshotSpec], None] | None = None
                 ) -> tuple[bool, str]:
    """CheckConfig: ``mirror/<cfgstring>`` (or a bare cfgstring) -> (valid, reason).

    ``guard`` is the serving daemon's own check (image confinement, one image per mirror), so
    that targetcli refuses a backstore the daemon would refuse to serve.
    """
    head, sep, rest = config.partition("/")
    cfg = config
    if sep and "=" not in head:  # a subtype prefix (paths inside the cfgstring follow a '=')
        if head != SUBTYPE:
            return False, f"not a {SUBTYPE} config: {config!r}"
        cfg = rest
    try:
        spec = parse_any(cfg)
        if isinstance(spec, MirrorSpec):
            check_images(spec, None)
        if guard is not None and isinstance(spec, MirrorSpec | SnapshotSpec):
            guard(spec)
    except TargetMirrorError as exc:
        return False, str(exc)
    return True, "ok"


def _introspection(path: str, children: list[str]) -> str:
    ifaces = ""
    if path.endswith("/" + SUBTYPE):
        ifaces += (f'<interface name="{IFACE}"><method name="CheckConfig">'
                   '<arg type="s" name="configstr" direction="in"/>'
                   '<arg type="b" name="is_valid" direction="out"/>'
                   '<arg type="s" name="message" direction="out"/></method>'
                   '<property type="s" name="ConfigDesc" access="read"/></interface>'
                   f'<interface name="{PROPERTIES}"><method name="Get">'
                   '<arg type="s" direction="in"/><arg type="s" direction="in"/>'
                   '<arg type="v" direction="out"/></method><method name="GetAll">'
                   '<arg type="s" direction="in"/><arg type="a{sv}" direction="out"/>'
                   '</method></interface>')
    if path == ROOT_PATH:
        ifaces += (f'<interface name="{OBJECT_MANAGER}"><method name="GetManagedObjects">'
                   '<arg type="a{oa{sa{sv}}}" direction="out"/></method></interface>')
    nodes = "".join(f'<node name="{c}"/>' for c in children)
    return (f'<node><interface name="{INTROSPECTABLE}"><method name="Introspect">'
            f'<arg type="s" direction="out"/></method></interface>{ifaces}{nodes}</node>')


class HandlerService:
    """The D-Bus face of the ``mirror`` handler, on its own thread."""

    def __init__(self, *, bus: str = "SYSTEM", subtype: str = SUBTYPE,
                 config_desc: str = CONFIG_DESC,
                 check: Callable[[str], tuple[bool, str]] = check_config) -> None:
        self.bus = bus
        self.subtype = subtype
        self.config_desc = config_desc
        self.check = check
        self.mode: str | None = None
        """"owner" (we own org.kernel.TCMUService1), "registered" (through tcmu-runner's
        HandlerManager1), or None (not on the bus)."""
        self.registered = threading.Event()
        self.took_over = threading.Event()
        """Set when we took the service name over from a tcmu-runner that went away."""
        self.register_error: str | None = None
        self._conn: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pending: dict[int, str] = {}

    @property
    def handler_path(self) -> str:
        base = ROOT_PATH if self.mode == "owner" else HM_PATH
        return f"{base}/{self.subtype}"

    # -- start / stop ----------------------------------------------------------------------
    def start(self) -> bool:
        """Connect and take our place on the bus; False (logged) when there is no bus."""
        try:
            from jeepney.io.blocking import open_dbus_connection
        except ImportError:
            log.warning("python3-jeepney is not installed: targetcli will not list user:%s",
                        self.subtype)
            return False
        try:
            self._conn = open_dbus_connection(bus=self.bus)
        except (OSError, KeyError, ValueError) as exc:
            log.info("no D-Bus %s bus (%s): targetcli will not list user:%s", self.bus.lower(),
                     exc, self.subtype)
            return False
        self._watch_owner()
        self._take_place()
        self._thread = threading.Thread(target=self._loop, name="dbus", daemon=True)
        self._thread.start()
        return True

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # -- bus calls (before the loop runs, or from it) ----------------------------------------
    def _bus_call(self, method: str, signature: str, *args: Any) -> Any:
        from jeepney import new_method_call
        from jeepney.bus_messages import message_bus

        reply = self._conn.send_and_get_reply(
            new_method_call(message_bus, method, signature, args), timeout=10)
        return reply.body

    def _watch_owner(self) -> None:
        rule = (f"type='signal',sender='org.freedesktop.DBus',interface='org.freedesktop.DBus',"
                f"member='NameOwnerChanged',arg0='{BUS_NAME}'")
        self._bus_call("AddMatch", "s", rule)

    def _take_place(self) -> None:
        """Own the service name if nobody does; otherwise register with its owner."""
        (has_owner,) = self._bus_call("NameHasOwner", "s", BUS_NAME)
        if not has_owner:
            (res,) = self._bus_call("RequestName", "su", BUS_NAME, _DO_NOT_QUEUE)
            if res == _REQUEST_NAME_PRIMARY:
                self.mode = "owner"
                self.registered.set()
                log.info("D-Bus: serving %s; targetcli lists user:%s", BUS_NAME, self.subtype)
                return
        self._register_with_runner()

    def _register_with_runner(self) -> None:
        from jeepney import DBusAddress, new_method_call

        name = f"{HM_IFACE}.{self.subtype}"
        (res,) = self._bus_call("RequestName", "su", name, _DO_NOT_QUEUE)
        if res != _REQUEST_NAME_PRIMARY and res != 4:  # 4: we own it already
            self.register_error = f"could not own {name} (RequestName answered {res})"
            log.warning("D-Bus: %s; targetcli will not list user:%s", self.register_error,
                        self.subtype)
            return
        self.mode = "registered"
        msg = new_method_call(DBusAddress(HM_PATH, bus_name=BUS_NAME, interface=HM_IFACE),
                              "RegisterHandler", "ss", (self.subtype, self.config_desc))
        serial = next(self._conn.outgoing_serial)
        self._pending[serial] = "RegisterHandler"
        # the reply is taken by the loop: the runner may call us (CheckConfig, GetAll) before
        # it answers, and a blocking wait here would not serve those calls
        self._conn.send(msg, serial=serial)

    # -- the loop --------------------------------------------------------------------------------
    def _loop(self) -> None:
        from jeepney import MessageType

        while not self._stop.is_set():
            try:
                msg = self._conn.receive(timeout=0.5)
            except TimeoutError:
                continue
            except Exception as exc:  # EOFError when the bus goes away, OSError, parse errors
                if not self._stop.is_set():
                    log.warning("D-Bus connection lost (%s: %s); targetcli will not list "
                                "user:%s until targetmirrord restarts", type(exc).__name__,
                                exc, self.subtype)
                return
            try:
                if msg.header.message_type == MessageType.method_call:
                    self._on_call(msg)
                elif msg.header.message_type in (MessageType.method_return,
                                                 MessageType.error):
                    self._on_reply(msg)
                elif msg.header.message_type == MessageType.signal:
                    self._on_signal(msg)
            except Exception:
                log.exception("D-Bus: handling a message failed")

    def _on_reply(self, msg: Any) -> None:
        from jeepney import HeaderFields, MessageType

        what = self._pending.pop(msg.header.fields.get(HeaderFields.reply_serial, -1), None)
        if what != "RegisterHandler":
            return
        if msg.header.message_type == MessageType.error:
            self.register_error = f"{msg.header.fields.get(HeaderFields.error_name)}: {msg.body}"
        elif not msg.body[0]:
            self.register_error = str(msg.body[1])
        if self.register_error:
            log.warning("D-Bus: tcmu-runner refused RegisterHandler(%s): %s", self.subtype,
                        self.register_error)
            return
        self.registered.set()
        log.info("D-Bus: registered user:%s with tcmu-runner's HandlerManager1", self.subtype)

    def _on_signal(self, msg: Any) -> None:
        from jeepney import HeaderFields

        if msg.header.fields.get(HeaderFields.member) != "NameOwnerChanged":
            return
        name, _old, new = msg.body
        if name == BUS_NAME and not new and self.mode != "owner":
            # tcmu-runner went away: its list no longer has us.  Take the name over; our
            # HandlerManager1 name stays ours and harmless.
            log.info("D-Bus: %s was released; taking it over", BUS_NAME)
            self.registered.clear()
            self.mode = None
            self._own_later()

    def _own_later(self) -> None:
        from jeepney import new_method_call
        from jeepney.bus_messages import message_bus

        serial = next(self._conn.outgoing_serial)
        self._pending[serial] = "RequestName"
        self._conn.send(new_method_call(message_bus, "RequestName", "su",
                                        (BUS_NAME, _DO_NOT_QUEUE)), serial=serial)
        self.mode = "owner"
        self.registered.set()
        self.took_over.set()

    def _on_call(self, msg: Any) -> None:
        from jeepney import HeaderFields, new_error, new_method_return

        f = msg.header.fields
        path, iface, member = (f.get(HeaderFields.path), f.get(HeaderFields.interface),
                               f.get(HeaderFields.member))
        handler = self.handler_path
        reply = None
        if member == "Introspect" and iface in (INTROSPECTABLE, None):
            reply = new_method_return(msg, "s", (_introspection(path, self._children(path)),))
        elif member == "Ping" and iface in (PEER, None):
            reply = new_method_return(msg)
        elif (path == ROOT_PATH and self.mode == "owner" and member == "GetManagedObjects"
              and iface in (OBJECT_MANAGER, None)):
            objs = {handler: {IFACE: {"ConfigDesc": ("s", self.config_desc)}}}
            reply = new_method_return(msg, "a{oa{sa{sv}}}", (objs,))
        elif path == handler and member == "CheckConfig" and iface in (IFACE, None):
            ok, why = self.check(str(msg.body[0]))
            log.info("D-Bus: CheckConfig(%r) -> %s, %s", msg.body[0], ok, why)
            reply = new_method_return(msg, "bs", (ok, why))
        elif path == handler and iface == PROPERTIES and member in ("Get", "GetAll"):
            props = {"ConfigDesc": ("s", self.config_desc)} if msg.body[0] == IFACE else {}
            if member == "GetAll":
                reply = new_method_return(msg, "a{sv}", (props,))
            elif msg.body[1] in props:
                reply = new_method_return(msg, "v", (props[msg.body[1]],))
        if reply is None:
            reply = new_error(msg, "org.freedesktop.DBus.Error.UnknownMethod", "s",
                              (f"no method {iface}.{member} on {path}",))
        self._conn.send(reply)

    def _children(self, path: str) -> list[str]:
        """Child node names for Introspect along the path to our handler object."""
        target = self.handler_path.strip("/").split("/")
        here = [p for p in path.strip("/").split("/") if p]
        if target[: len(here)] == here and len(here) < len(target):
            return [target[len(here)]]
        return []
