#!/usr/bin/env bash
# Make this machine ready to build, test and demo targetmirror (Debian 12 / Ubuntu, as root):
# system packages for the QEMU lab (lab/install-host-deps.sh), then a virtual environment in
# .venv with the project and its test tools.  Idempotent: a second run installs nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "dev/bootstrap.sh: run as root (apt-get and the lab need it)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive

if ! /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends python3 python3-venv python3-pip >/dev/null
fi
sh lab/install-host-deps.sh

# The venv is made from Debian's own interpreter with --system-site-packages: librbd's Python
# binding (python3-rbd, python3-rados; the RBD leg) exists only for /usr/bin/python3, not on
# PyPI.  A venv made earlier from another interpreter is rebuilt once.
SYSPY=/usr/bin/python3
VENV=${TARGETMIRROR_VENV:-.venv}
if [ -x "$VENV/bin/python" ] && ! "$VENV/bin/python" -c 'import rbd, rados' 2>/dev/null \
        && "$SYSPY" -c 'import rbd, rados' 2>/dev/null; then
    echo "dev/bootstrap.sh: $VENV cannot import rbd; rebuilding it from $SYSPY"
    rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
    "$SYSPY" -m venv --system-site-packages "$VENV"
fi
# setup.py and the C source are in the stamp: the express lane is built in place by the
# editable install, and a stale build must not be what the lab guest loads.
stamp="$VENV/.installed-$(cat setup.cfg pyproject.toml setup.py targetmirror/express/_lane.c \
    | sha256sum | cut -c1-16)"
if [ ! -e "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test]'
    touch "$stamp"
fi
echo "dev/bootstrap.sh: ready ($VENV)"
