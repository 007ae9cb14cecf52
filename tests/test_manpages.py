"""dev/manpages.sh builds the man pages from the argparse definitions (every subcommand and
option is there, and the exit codes) and targetmirror.yaml(5) from the loader's key table."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from targetmirror.cli import build_parser
from targetmirror.daemon.main import build_parser as daemon_parser
from targetmirror.shell.main import build_parser as shell_parser

REPO = Path(__file__).resolve().parents[1]


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {s for a in p._actions for s in a.option_strings
            if s.startswith("--") and s != "--help"}


def test_manpages_generated_from_parsers(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    proc = subprocess.run(["bash", str(REPO / "dev" / "manpages.sh"), str(tmp_path)],
                          capture_output=True, text=True, check=False,
                          env={"PATH": "/usr/bin:/bin", "TARGETMIRROR_VENV": str(venv)})
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "targetmirror.1").read_text()
    roff = page.replace("\\-", "-")
    sub = next(a for a in build_parser()._actions
               if isinstance(a, argparse._SubParsersAction))
    assert len(sub.choices) >= 14
    for name, parser in sub.choices.items():
        assert f"targetmirror {name}" in roff.replace("\\fR \\fI\\,", " ").replace(
            "\\fB", "").replace("\\/\\fR", ""), f"subcommand {name} missing"
        for opt in _options(parser):
            assert opt in roff, f"{name} {opt} missing"
    assert "exit status" in roff and "backup --exec" in roff
    daemon = (tmp_path / "targetmirrord.8").read_text().replace("\\-", "-")
    for opt in _options(daemon_parser()):
        assert opt in daemon
    assert daemon.startswith('.TH TARGETMIRRORD "8"')  # a daemon: section 8
    shell = (tmp_path / "targetmirror-shell.1").read_text().replace("\\-", "-")
    for opt in _options(shell_parser()):
        assert opt in shell
    assert shell.startswith(".TH TARGETMIRROR-SHELL")


def test_config_file_page_has_every_key_and_the_example(tmp_path: Path) -> None:
    from targetmirror.config.loader import DEFAULTS

    out = tmp_path / "targetmirror.yaml.5"
    proc = subprocess.run([sys.executable, str(REPO / "dev" / "yamlman.py"), str(out)],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    assert page.startswith(".TH TARGETMIRROR.YAML 5 ")
    plain = page.replace("\\-", "-").replace("\\e", "\\")
    for key, _default, meaning in DEFAULTS:
        assert f"\\fB{key}\\fR" in plain, f"key {key} missing"
        assert meaning in plain, f"meaning of {key} missing"
    for line in (REPO / "etc" / "targetmirror.yaml").read_text().splitlines():
        assert line in plain, line
    # roff that man renders without a warning (a stray leading '.' or '\' would be one)
    if shutil.which("man"):
        render = subprocess.run(["man", "--warnings", "-l", str(out)], capture_output=True,
                                text=True, check=False, env={"PATH": "/usr/bin:/bin",
                                                             "MANWIDTH": "100"})
        assert render.returncode == 0 and render.stderr == "", render.stderr
        assert "dbgroup" in render.stdout and "mirrors[].image_a" in render.stdout
