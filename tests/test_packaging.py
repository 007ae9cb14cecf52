"""The Debian package's metadata agrees with the Python package's, and the docs with both."""

from __future__ import annotations

import configparser
import re
from pathlib import Path

import targetmirror

REPO = Path(__file__).resolve().parents[1]

#: PyPI name (setup.cfg install_requires) -> the bookworm package that provides it
DEBIAN_NAME = {"rtslib-fb": "python3-rtslib-fb", "configshell-fb": "python3-configshell-fb",
               "pyyaml": "python3-yaml", "pyroute2": "python3-pyroute2",
               "tqdm": "python3-tqdm", "prometheus-client": "python3-prometheus-client",
               "jeepney": "python3-jeepney"}


def _depends() -> set[str]:
    text = (REPO / "debian" / "control").read_text()
    block = re.search(r"^Depends:(.*?)(?=^\S)", text, re.S | re.M)
    assert block
    return {d.strip().split()[0] for d in block.group(1).replace("\n", " ").split(",")
            if d.strip()}


def test_changelog_version_is_the_package_version() -> None:
    first = (REPO / "debian" / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"targetmirror ({targetmirror.__version__}) "), first


def test_every_python_dependency_is_a_debian_dependency() -> None:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    requires = [r.strip() for r in cfg["options"]["install_requires"].split("\n") if r.strip()]
    assert sorted(requires) == sorted(DEBIAN_NAME)
    assert {DEBIAN_NAME[r] for r in requires} <= _depends()


def test_lab_image_has_every_dependency_of_the_package() -> None:
    """The lab guest has no network: ``dpkg -i`` there works only if the image has them all."""
    from lab.image import PACKAGES

    ours = {d for d in _depends() if not d.startswith("${")}
    assert ours <= set(PACKAGES), ours - set(PACKAGES)


def test_one_metrics_port_everywhere() -> None:
    """README, docs and the example configuration name the same metrics port."""
    ports = {}
    for path in [REPO / "README.md", REPO / "etc" / "targetmirror.yaml",
                 *sorted((REPO / "docs").glob("*.md"))]:
        for m in re.finditer(r"(?:127\.0\.0\.1|\[::1\]|0\.0\.0\.0|localhost)?:(9\d{3})\b",
                             path.read_text()):
            ports.setdefault(m.group(1), set()).add(path.name)
    assert set(ports) == {"9745"}, ports
