"""Write the targetmirror.yaml(5) man page from the code's own key table and example file.

Every key, its default and its meaning come from ``targetmirror.config.loader.DEFAULTS`` (the
same rows docs/operations.md's reference table is checked against), and the EXAMPLE section is
etc/targetmirror.yaml verbatim, so the page cannot drift from what the loader accepts.

Usage: python3 dev/yamlman.py OUTFILE   (dev/manpages.sh calls it)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from targetmirror import __version__  # noqa: E402
from targetmirror.config.loader import DEFAULT_PATH, DEFAULTS, ENV_VAR  # noqa: E402

EXAMPLE = REPO / "etc" / "targetmirror.yaml"


def esc(text: str) -> str:
    """Text safe inside a roff paragraph: backslashes, hyphens, and a leading dot or quote."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    if text.startswith((".", "'")):
        text = "\\&" + text
    return text


def show_default(value: Any) -> str:
    if value is None:
        return "required"
    if isinstance(value, bool):
        return "default: " + str(value).lower()
    if isinstance(value, list):
        return "default: " + json.dumps(value)
    return 'default: ""' if value == "" else f"default: {value}"


def render() -> str:
    out = [
        f'.TH TARGETMIRROR.YAML 5 "" "targetmirror {__version__}" "targetmirror manual"',
        ".SH NAME",
        "targetmirror.yaml \\- targetmirror configuration: mirrored LUNs, consistency groups "
        "and their iSCSI exports",
        ".SH SYNOPSIS",
        esc(DEFAULT_PATH),
        ".SH DESCRIPTION",
        esc("One YAML file describes every mirrored LUN of the host (a user:mirror backstore "
            "with images A and B), which mirrors split together, and how they are exported "
            "over iSCSI. targetmirror apply makes LIO match it; targetmirrord applies it when "
            "it starts (after the saved LIO configuration is restored at boot) and again on "
            "systemctl reload."),
        ".PP",
        esc("The file is read with a safe YAML loader and checked completely before anything "
            "changes: every problem is reported at once as FILE: key.path: expected ..., got "
            "... and nothing is touched. targetmirror apply --dry-run --config FILE shows "
            "what would change without changing it."),
        ".PP",
        esc("Sizes are bytes or binary units (512M, 10G, 64K). Image paths are resolved "
            "(symlinks and ..) and must land inside one of image_dirs. Target and initiator "
            "names are iSCSI names (iqn., eui., naa.) in lower case. apply never removes or "
            "changes what it did not create, and never deletes an image."),
        ".SH KEYS",
        esc("[] marks the items of a list; a key without a default is required."),
    ]
    for key, default, meaning in DEFAULTS:
        out += [".TP", f"\\fB{esc(key)}\\fR ({esc(show_default(default))})", esc(meaning)]
    out += [".SH EXAMPLE", ".nf"]
    for line in EXAMPLE.read_text().splitlines():
        out.append(esc(line) if line else "")
    out += [".fi",
            ".SH ENVIRONMENT",
            ".TP", f"\\fB{esc(ENV_VAR)}\\fR",
            esc("the file to use instead of the default path (--config overrides it)."),
            ".SH FILES",
            ".TP", esc(DEFAULT_PATH), esc("the configuration."),
            ".TP", esc("/usr/share/doc/targetmirror/examples/targetmirror.yaml"),
            esc("the commented example above."),
            ".TP", esc("/var/lib/targetmirror/apply-manifest.json"),
            esc("what apply created (it removes only those)."),
            ".SH SEE ALSO",
            "\\fBtargetmirror\\fR(1), \\fBtargetmirrord\\fR(8), \\fBtargetmirror\\-shell\\fR(1), "
            "\\fBtargetcli\\fR(8); "
            + esc("/usr/share/doc/targetmirror/operations.md")]
    return "\n".join(out) + "\n"


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: dev/yamlman.py OUTFILE", file=sys.stderr)
        return 2
    Path(sys.argv[1]).write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main())
