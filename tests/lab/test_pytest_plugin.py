"""The host side of the lab plugin, run in a throw-away pytest session (pytester).

CI once went red on the ordering alone: a host-only test in tests/lab (the conformance parser's)
set up the package, the lab items were replayed without pytest's teardown, and the first host
test after them errored with "previous item was not torn down properly".
"""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

CONFTEST = """
import sys
sys.path.insert(0, {root!r})
from lab import pytest_plugin

def pytest_addoption(parser):
    pytest_plugin.addoption(parser)

def pytest_configure(config):
    config.addinivalue_line("markers", "lab: runs in the guest")
    pytest_plugin.configure(config)
"""

PKG_CONFTEST = """
import pytest

@pytest.fixture(scope="package")
def pkg_resource(request):
    yield "up"
    request.config.stash_order.append("pkg-a torn down")
"""


@pytest.fixture
def project(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    from lab import REPO_ROOT, vm

    # No emulator: the plugin skips the lab items (outside CI) through the same protocol hook.
    monkeypatch.setattr(vm, "qemu_available", lambda: False)
    monkeypatch.delenv("CI", raising=False)
    pytester.makeconftest(CONFTEST.format(root=str(REPO_ROOT)))
    pytester.mkpydir("pkg_a")
    pytester.path.joinpath("pkg_a", "conftest.py").write_text(PKG_CONFTEST)
    pytester.path.joinpath("pkg_a", "test_host.py").write_text(
        "def test_host_in_lab_package(pkg_resource):\n    assert pkg_resource == 'up'\n")
    pytester.path.joinpath("pkg_a", "test_lab_x.py").write_text(
        "import pytest\n\n@pytest.mark.lab\ndef test_in_guest():\n    raise AssertionError\n")
    pytester.mkpydir("pkg_b")
    pytester.path.joinpath("pkg_b", "test_after.py").write_text(
        "def test_host_after_the_lab_items(request):\n"
        "    assert request.config.stash_order == ['pkg-a torn down']\n")
    return pytester


def test_host_tests_after_lab_items_find_a_clean_setup_stack(project: pytest.Pytester) -> None:
    class Order:
        def pytest_configure(self, config: pytest.Config) -> None:
            config.stash_order = []  # type: ignore[attr-defined]

    result = project.runpytest_inprocess("-p", "no:cacheprovider", plugins=[Order()])
    result.assert_outcomes(passed=2, skipped=1, errors=0)
    result.stdout.no_fnmatch_line("*not torn down properly*")
    result.stdout.fnmatch_lines(["*real-kernel lab unavailable*"])
