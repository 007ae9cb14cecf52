#!/usr/bin/env bash
# The performance comparison (issue 8), not a test: boots the QEMU lab guest and runs fio over
# iSCSI against targetmirror (user:mirror, two images), tcmu-runner (user:file, one image) and
# the kernel's fileio backstore on the same guest disk, then plots the result on the host.
# Output: lab-out/bench/fio.json and fio.png.  Extra arguments go to benchmarks/lab_fio.py
# (e.g. dev/bench.sh --rounds 3 --seconds 10).  See docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/bootstrap.sh
VENV=${TARGETMIRROR_VENV:-.venv}
"$VENV/bin/python" -c 'import matplotlib' 2>/dev/null \
    || "$VENV/bin/python" -m pip install -q -e '.[test,bench]'
mkdir -p lab-out/bench
"$VENV/bin/python" -m lab run --out lab-out/bench --timeout 1800 \
    --env TARGETMIRROR_IN_GUEST=1 -- python3 benchmarks/lab_fio.py --out /out/fio.json "$@"
"$VENV/bin/python" benchmarks/plot.py lab-out/bench/fio.json
