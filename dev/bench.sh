#!/usr/bin/env bash
# The performance comparison (issue 8), not a test: boots the QEMU lab guest and runs fio over
# iSCSI against targetmirror (user:mirror, two images), tcmu-runner (user:file, one image), the
# kernel's fileio backstore and the plain handler (benchmarks/plain_handler.py, two images) on
# the same guest disk, with syscalls and CPU per I/O and a py-spy profile of targetmirrord, then
# plots the result on the host.  Output: lab-out/bench/fio.json, fio.png, pyspy-*.txt and the
# host's uptime before and after.  Extra arguments go to benchmarks/lab_fio.py
# (e.g. dev/bench.sh --rounds 3 --seconds 10).  See docs/performance.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash dev/bootstrap.sh
VENV=${TARGETMIRROR_VENV:-.venv}
{ "$VENV/bin/python" -c 'import matplotlib' 2>/dev/null && [ -x "$VENV/bin/py-spy" ]; } \
    || "$VENV/bin/python" -m pip install -q -e '.[test,bench]'
# py-spy is a static binary: the guest runs it from the repository mount when the venv is in it
SPY=()
case "$VENV" in
    /*) ;;
    *) [ -x "$VENV/bin/py-spy" ] && SPY=(--py-spy "/src/$VENV/bin/py-spy") ;;
esac
mkdir -p lab-out/bench
uptime | tee lab-out/bench/uptime-before.txt
"$VENV/bin/python" -m lab run --out lab-out/bench --timeout 2400 --memory 4G \
    --env TARGETMIRROR_IN_GUEST=1 -- python3 benchmarks/lab_fio.py --out /out/fio.json \
    "${SPY[@]}" "$@"
uptime | tee lab-out/bench/uptime-after.txt
"$VENV/bin/python" benchmarks/plot.py lab-out/bench/fio.json
