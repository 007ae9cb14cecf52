#!/usr/bin/env bash
# The whole test suite: lint, types, the Debian package build, unit tests on the host, and the
# lab tests, which boot the QEMU guest once and run inside it against the real kernel (LIO,
# TCMU, open-iscsi).
# Extra arguments go to pytest (e.g. dev/test.sh -k ring).
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/bootstrap.sh
VENV=${TARGETMIRROR_VENV:-.venv}
"$VENV/bin/ruff" check targetmirror tests lab dev
# security lint; the skip list and its reasons are in pyproject.toml [tool.bandit]
"$VENV/bin/bandit" -q -c pyproject.toml -r targetmirror lab
"$VENV/bin/mypy" targetmirror/tcmu targetmirror/scsi targetmirror/store targetmirror/mirror \
    targetmirror/config targetmirror/daemon targetmirror/lio targetmirror/shell \
    targetmirror/express targetmirror/cli targetmirror/client.py targetmirror/rbdbackup.py \
    targetmirror/selftest.py targetmirror/protocol.py
# the Debian package, before pytest: tests/lab/test_lab_deb.py installs it in the guest and
# tests/test_systemd_unit.py checks the unit it installs (~15 s; a no-op when up to date)
bash dev/deb.sh
exec "$VENV/bin/python" -m pytest -v -rA "$@"
