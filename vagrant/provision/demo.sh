#!/bin/sh
# The split demo on the target: split the group, back up the split-off copy of `data`, rejoin.
# Environment: TM_BACKUP_DIR [/var/tmp], TM_SOCKET [/run/targetmirror/control.sock],
#   TM_BIN [/usr/local/bin], TM_GROUP [app], TM_BACKUP_OF [data].
# Idempotent: run it again, or after a run that stopped half-way, and it first rejoins what is
# still split, then does the whole demo again (each run keeps its own backup file).
set -eu
: "${TM_BACKUP_DIR:=/var/tmp}"
: "${TM_SOCKET:=/run/targetmirror/control.sock}"
: "${TM_BIN:=/usr/local/bin}"
: "${TM_GROUP:=app}"
: "${TM_BACKUP_OF:=data}"
tm() { "$TM_BIN/targetmirror" "$@"; }
tm status --socket "$TM_SOCKET"
if tm status --socket "$TM_SOCKET" --json | grep -q '"state": "split"'
then
    echo "demo.sh: a previous split is still there: rejoining the group first"
    tm rejoin --socket "$TM_SOCKET" --group "$TM_GROUP"
fi
tm split --socket "$TM_SOCKET" --group "$TM_GROUP"
backup="$TM_BACKUP_DIR/$TM_BACKUP_OF-$(date +%Y%m%d-%H%M%S).img"
tm backup --socket "$TM_SOCKET" "$TM_BACKUP_OF" --to "$backup"
tm rejoin --socket "$TM_SOCKET" --group "$TM_GROUP"
tm status --socket "$TM_SOCKET"
echo "demo.sh: split-off copy of $TM_BACKUP_OF saved as $backup"
