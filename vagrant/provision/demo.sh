#!/bin/sh
# The split demo on the target: split the group, back up the split-off copy of `data`, rejoin.
# Environment: TM_BACKUP_DIR [/var/tmp], TM_CONFIG [/etc/targetmirror/targetmirror.yaml],
#   TM_SOCKET [/run/targetmirror/control.sock], TM_BIN [/usr/local/bin].
set -eu
: "${TM_BACKUP_DIR:=/var/tmp}"
: "${TM_SOCKET:=/run/targetmirror/control.sock}"
: "${TM_BIN:=/usr/local/bin}"
tm() { "$TM_BIN/targetmirror" "$@"; }
tm status --socket "$TM_SOCKET"
tm split --socket "$TM_SOCKET" --group app
backup="$TM_BACKUP_DIR/data-$(date +%Y%m%d-%H%M%S).img"
tm backup --socket "$TM_SOCKET" data --to "$backup"
tm rejoin --socket "$TM_SOCKET" --group app
tm status --socket "$TM_SOCKET"
echo "demo.sh: split-off copy of data saved as $backup"
