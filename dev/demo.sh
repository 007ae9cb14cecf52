#!/usr/bin/env bash
# The demo, end to end: install what is needed, build (once) and boot the QEMU lab guest with
# Debian's real kernel, and run lab/demo.py inside it (create a mirrored LUN over iSCSI, ext4 on
# it, split under load, export the split copy read-only, fsck it, compare the images).
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/bootstrap.sh
VENV=${TARGETMIRROR_VENV:-.venv}
exec "$VENV/bin/python" -m lab run --console --timeout 1200 --env TARGETMIRROR_IN_GUEST=1 \
    -- python3 lab/demo.py
