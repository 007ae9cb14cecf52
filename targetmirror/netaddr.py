"""``IP:PORT`` as every listener of targetmirror takes it: iSCSI portals (the YAML file,
``create --portal``) and the Prometheus endpoint (``--metrics-address``, the file's
``daemon.metrics_address``).

One rule everywhere: a numeric IP (IPv4, or IPv6 in brackets: ``[2001:db8::1]:3260``), a colon
and a port from 1 to 65535.  No host names (an address is bound, not looked up) and no
``:PORT`` shorthand (write ``0.0.0.0:PORT`` or ``[::]:PORT``: which family is then plain).
Port 0 (any free port) is for tests, which pass ``(host, 0)`` to the listener directly.
"""

from __future__ import annotations

import ipaddress

EXPECTED = ("IP:PORT with a numeric IP and a port 1-65535 (e.g. 192.0.2.10:3260 or "
            "[2001:db8::1]:3260)")


def parse_hostport(text: str) -> tuple[str, int] | None:
    """``192.0.2.10:3260`` / ``[2001:db8::1]:3260`` -> (IP without brackets, port); None if
    ``text`` does not follow the rule."""
    if not isinstance(text, str):
        return None
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        return host, int(port)
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return None
    return host, int(port)


def format_hostport(host: str, port: int) -> str:
    """The inverse of :func:`parse_hostport` (brackets around an IPv6 address)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
