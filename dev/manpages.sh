#!/usr/bin/env bash
# Generate the man pages from the argparse definitions (argparse-manpage), so options and their
# help are written once, in the code.  Usage: dev/manpages.sh [OUTDIR]   (default build/man)
# To add a command, add a "name module description" row below.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TARGETMIRROR_VENV:-.venv}
OUT=${1:-build/man}
mkdir -p "$OUT"
VERSION=$("$VENV/bin/python" -c 'import targetmirror; print(targetmirror.__version__)')
while read -r name module description; do
    [ -n "$name" ] || continue
    "$VENV/bin/argparse-manpage" --module "$module" --function build_parser \
        --project-name targetmirror --prog "$name" --version "$VERSION" \
        --description "$description" --manual-title "targetmirror manual" \
        --output "$OUT/$name.1"
    echo "$OUT/$name.1"
done <<'ROWS'
targetmirror targetmirror.cli manage split mirrors of LIO/TCMU user:mirror backstores
targetmirrord targetmirror.daemon.main serve user:mirror TCMU devices (the split-mirror daemon)
targetmirror-shell targetmirror.shell.main targetcli-style shell over the targetmirrord control API
ROWS
