"""Least privilege, checked on the source: no shell anywhere, bandit clean, root-only control.

What runs as root and why is in docs/security.md; these tests keep the rules from eroding.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from targetmirror.daemon.main import Daemon, build_parser

REPO = Path(__file__).resolve().parents[1]
SOURCES = [p for top in ("targetmirror", "lab", "tests", "benchmarks", "dev")
           for p in sorted((REPO / top).rglob("*.py"))]
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("os", "spawnlp"), ("os", "spawnvp"),
               ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        where = f"{path.relative_to(REPO)}:{node.lineno}"
        for kw in node.keywords:
            literal = isinstance(kw.value, ast.Constant)
            # configshell's ConfigNode(shell=...) is its console object, not /bin/sh
            console = not literal and path.parts[-2] == "shell"
            if kw.arg == "shell" and not console and not (literal and kw.value.value is False):
                out.append(f"{where}: shell={ast.unparse(kw.value)}")
        f = node.func
        if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and \
                (f.value.id, f.attr) in SHELL_CALLS:
            out.append(f"{where}: {f.value.id}.{f.attr}")
    return out


def test_sources_are_found() -> None:
    assert len(SOURCES) > 100 and REPO / "targetmirror" / "daemon" / "main.py" in SOURCES


def test_nothing_runs_a_shell() -> None:
    """No call passes a true ``shell`` argument (or a non-literal one), none uses os.system,
    popen and friends: every program is started with an argument list, so no path, name or cfgstring
    can be interpreted by /bin/sh."""
    offences = [o for p in SOURCES for o in _offences(p)]
    assert offences == []


def test_the_scan_would_see_a_shell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    bad = tmp_path / "probe.py"
    # the offending keyword is assembled, so this file itself stays free of the literal
    shell_kw = "shell" + "=True"
    bad.write_text(f"import os, subprocess\nsubprocess.run('ls', {shell_kw})\nos.system('x')\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert len(_offences(bad)) == 2


def test_bandit_is_clean() -> None:
    bandit = shutil.which("bandit", path=str(Path(sys.executable).parent))
    if bandit is None:
        pytest.skip("bandit is not installed (pip install -e '.[test]')")
    proc = subprocess.run([bandit, "-q", "-c", str(REPO / "pyproject.toml"), "-r",
                           str(REPO / "targetmirror"), str(REPO / "lab")],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout


def test_control_socket_is_root_only_unless_more_are_named(tmp_path: Path) -> None:
    assert Daemon(state_dir=str(tmp_path), stuck_after=0).control_uids == (0,)
    args = build_parser().parse_args(["--control-allow-uid", "1000", "--control-allow-uid", "0"])
    d = Daemon(state_dir=str(tmp_path), stuck_after=0,
               control_uids=tuple(args.control_allow_uid))
    assert d.control_uids == (0, 1000)
