#!/usr/bin/env bash
# Generate the man pages: the commands' pages from their argparse definitions (argparse-manpage),
# so options and their help are written once, in the code; targetmirror.yaml(5) from the
# loader's key table and the example file (dev/yamlman.py).
# Usage: dev/manpages.sh [OUTDIR]   (default build/man)
# To add a command, add a "name section module description" row below.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${TARGETMIRROR_VENV:-.venv}
OUT=${1:-build/man}
mkdir -p "$OUT"
VERSION=$("$VENV/bin/python" -c 'import targetmirror; print(targetmirror.__version__)')
while read -r name section module description; do
    [ -n "$name" ] || continue
    "$VENV/bin/argparse-manpage" --module "$module" --function build_parser \
        --project-name targetmirror --prog "$name" --version "$VERSION" \
        --description "$description" --manual-title "targetmirror manual" \
        --manual-section "$section" --output "$OUT/$name.$section"
    echo "$OUT/$name.$section"
done <<'ROWS'
targetmirror 1 targetmirror.cli manage split mirrors of LIO/TCMU user:mirror backstores
targetmirrord 8 targetmirror.daemon.main serve user:mirror TCMU devices (the split-mirror daemon)
targetmirror-shell 1 targetmirror.shell.main targetcli-style shell over the targetmirrord control API
ROWS
"$VENV/bin/python" dev/yamlman.py "$OUT/targetmirror.yaml.5"
echo "$OUT/targetmirror.yaml.5"
