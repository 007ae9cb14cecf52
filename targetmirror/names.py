"""Names an admin gives: backstores, mirrors, groups, clusters (one rule) and iSCSI names (RFC
3720/3721: iqn., eui., naa.), checked the same way by the YAML file, the CLI and the daemon."""

from __future__ import annotations

import re

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
NAME_EXPECTED = ("a name of letters, digits, '_', '.', '-' (1-64 characters, starting with a "
                 "letter or digit)")
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_IQN = re.compile(rf"^iqn\.\d{{4}}-(?:0[1-9]|1[0-2])\.{_LABEL}(?:\.{_LABEL})*"
                  r"(?::[a-z0-9.:-]+)?$")
_EUI = re.compile(r"^eui\.[0-9a-f]{16}$")
_NAA = re.compile(r"^naa\.[0-9a-f]{16}(?:[0-9a-f]{16})?$")
IQN_EXPECTED = ("an iSCSI name: iqn.YYYY-MM.reversed.domain[:suffix] in lower case "
                "(no '_' or blanks), eui.<16 hex> or naa.<16 or 32 hex>")


def valid_name(name: object) -> bool:
    return isinstance(name, str) and bool(_NAME.match(name))


def valid_iscsi_name(name: object) -> bool:
    return isinstance(name, str) and len(name.encode()) <= 223 and bool(
        _IQN.match(name) or _EUI.match(name) or _NAA.match(name))
