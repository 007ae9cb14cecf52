"""The systemd unit as the Debian package installs it: ``systemd-analyze verify`` is clean and
``systemd-analyze security`` rates it 4.0 or better (docs/systemd.md lists what is left).

Both run against a root made of the built .deb (dev/deb.sh; a no-op when the package is up to
date) plus this host's own systemd units, so verify sees the real /usr/bin/targetmirrord, the
real man pages and the units ours is ordered against.  The unit is proven under a real systemd
by the Vagrant VMs; the lab (no systemd) runs its boot sequence by hand (tests/lab/
test_lab_deb.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from targetmirror.daemon.watchdog import Watchdog

REPO = Path(__file__).resolve().parents[1]
UNIT = REPO / "etc" / "targetmirrord.service"
MAX_EXPOSURE = 4.0


def _analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed and could not be (dev/deb.sh installs "
                    "the systemd package; it needs root and apt)")
    return tool


@pytest.fixture(scope="module")
def installed_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A filesystem root with the package unpacked and the host's units beside ours."""
    if os.geteuid() != 0 and shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed and this is not root (dev/deb.sh "
                    "installs it)")
    proc = subprocess.run(["bash", str(REPO / "dev" / "deb.sh")], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _analyze()
    (deb,) = (REPO / "build" / "deb").glob("targetmirror_*.deb")
    root = tmp_path_factory.mktemp("root")
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    units = root / "lib" / "systemd" / "system"
    # (one folder on a merged-/usr host: /lib -> usr/lib)
    for host_units in sorted({p.resolve() for p in (Path("/lib/systemd/system"),
                                                    Path("/usr/lib/systemd/system"))}):
        if host_units.is_dir():
            shutil.copytree(host_units, units, dirs_exist_ok=True, symlinks=True,
                            ignore=lambda d, names: [n for n in names
                                                     if n == "targetmirrord.service"])
    # what the unit runs besides our own commands (coreutils, procps: the .deb depends on
    # procps for /bin/kill), taken from this host
    for tool in _exec_tools():
        if (root / tool.lstrip("/")).exists():
            continue
        assert os.path.exists(tool), f"{tool} missing on this host (dev/deb.sh installs procps)"
        (root / tool.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(tool, root / tool.lstrip("/"))
    assert (units / "targetmirrord.service").read_bytes() == UNIT.read_bytes()
    return root


def test_the_installed_unit_passes_systemd_analyze_verify(installed_root: Path) -> None:
    proc = subprocess.run(
        [_analyze(), "verify", f"--root={installed_root}", "targetmirrord.service"],
        capture_output=True, text=True, check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
             "MANPATH": str(installed_root / "usr" / "share" / "man")})
    # verify exits 0 on unknown keys too, with a warning: any output is a failure
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", \
        proc.stdout + proc.stderr


def test_the_installed_unit_is_hardened(installed_root: Path) -> None:
    proc = subprocess.run(
        [_analyze(), "security", "--offline=yes", f"--root={installed_root}", "--no-pager",
         "targetmirrord.service"], capture_output=True, text=True, check=False)
    m = re.search(r"Overall exposure level for targetmirrord\.service: (\d+\.\d)", proc.stdout)
    assert m, proc.stdout + proc.stderr
    print(proc.stdout)
    assert float(m.group(1)) <= MAX_EXPOSURE, f"exposure {m.group(1)} > {MAX_EXPOSURE}"


def _exec_tools() -> set[str]:
    """The programs of every Exec*= line of the unit (without systemd's prefixes)."""
    return {line.split("=", 1)[1].lstrip("+-@!:").split()[0]
            for line in UNIT.read_text().splitlines() if re.match(r"Exec\w+=", line)}


def _service(key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
            if line.startswith(key + "=")]


def test_watchdog_sec_leaves_room_for_missed_keepalives() -> None:
    """The scanner sends WATCHDOG=1 every min(5 s, WatchdogSec/2); systemd must see several
    healthy passes fail before it kills the daemon, not one slow one."""
    (sec,) = _service("WatchdogSec")
    wd = Watchdog(lambda: [], keepalive=int(sec) / 2)
    assert int(sec) >= 4 * wd.interval, (sec, wd.interval)


def test_the_unit_runs_the_installed_command_after_the_lio_restore() -> None:
    assert _service("ExecStart") == ["/usr/bin/targetmirrord"]
    assert _exec_tools() == {"/usr/bin/targetmirrord", "/bin/kill", "/bin/touch"}
    assert "targetmirrord = targetmirror.daemon.main:main" in (REPO / "setup.cfg").read_text()
    after = " ".join(_service("After")).split()
    assert "rtslib-fb-targetctl.service" in after  # Debian 12's LIO restore
    assert _service("PartOf") == ["rtslib-fb-targetctl.service"]
    assert _service("ExecReload") == ["/bin/kill -HUP $MAINPID"]
    assert _service("UMask") == ["0077"]
