#!/bin/sh
# Provision an initiator: open-iscsi, its name, discovery and login to the target, and the
# login made automatic (open-iscsi logs in again at every boot).
# Plain POSIX sh (Vagrant initiator VMs; the QEMU lab guest logs in to itself with it).
#
# Environment: TM_PORTAL (IP:PORT of the target, required), TM_TARGET_IQN (required),
#   TM_INITIATOR_NAME (set /etc/iscsi/initiatorname.iscsi to it; unset: keep the current one),
#   TM_INSTALL_PACKAGES [1], TM_WAIT_TARGET [1800]: seconds to wait for the target to serve.
#
# Vagrant starts and provisions the VMs in parallel, so the target may still be booting or
# provisioning when this runs: discovery and login are retried until TM_WAIT_TARGET runs out
# (the target's portal appears only when its `apply` has run; its ACL for us right after).
# Running the script again changes nothing when the session is already there.
set -eu
: "${TM_PORTAL:?TM_PORTAL must be IP:PORT of the target}"
: "${TM_TARGET_IQN:?TM_TARGET_IQN must name the target}"
: "${TM_INSTALL_PACKAGES:=1}"
: "${TM_WAIT_TARGET:=1800}"

say() { echo "initiator.sh: $*"; }

if ! command -v iscsiadm >/dev/null; then
    if [ "$TM_INSTALL_PACKAGES" != 1 ]; then
        echo "initiator.sh: open-iscsi is not installed" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends open-iscsi
fi
name_changed=0
if [ -n "${TM_INITIATOR_NAME:-}" ] &&
        ! grep -qx "InitiatorName=$TM_INITIATOR_NAME" /etc/iscsi/initiatorname.iscsi 2>/dev/null
then
    echo "InitiatorName=$TM_INITIATOR_NAME" > /etc/iscsi/initiatorname.iscsi
    name_changed=1
fi
modprobe -a iscsi_tcp sd_mod
if [ -d /run/systemd/system ]; then
    if [ "$name_changed" = 1 ]; then systemctl restart iscsid; else systemctl start iscsid; fi
elif ! [ -e /run/iscsid.pid ] || ! kill -0 "$(cat /run/iscsid.pid)" 2>/dev/null; then
    mkdir -p /run/lock/iscsi
    iscsid
fi

logged_in() {
    iscsiadm -m session 2>/dev/null | grep -q " $TM_PORTAL,[0-9]* $TM_TARGET_IQN\( \|$\)"
}

if logged_in; then
    say "already logged in to $TM_TARGET_IQN at $TM_PORTAL"
else
    start=$(date +%s)
    tries=0
    until iscsiadm -m discovery -t sendtargets -p "$TM_PORTAL" 2>/dev/null |
            grep -q " $TM_TARGET_IQN\$" &&
          iscsiadm -m node -T "$TM_TARGET_IQN" -p "$TM_PORTAL" --login >/dev/null 2>&1
    do
        tries=$((tries + 1))
        if [ $(($(date +%s) - start)) -ge "$TM_WAIT_TARGET" ]; then
            echo "initiator.sh: $TM_TARGET_IQN at $TM_PORTAL did not let us in within" \
                 "${TM_WAIT_TARGET}s ($tries tries); last attempt:" >&2
            iscsiadm -m discovery -t sendtargets -p "$TM_PORTAL" >&2 || true
            iscsiadm -m node -T "$TM_TARGET_IQN" -p "$TM_PORTAL" --login >&2 || true
            exit 1
        fi
        [ "$tries" = 1 ] && say "waiting for $TM_TARGET_IQN at $TM_PORTAL (up to ${TM_WAIT_TARGET}s)"
        sleep 5
    done
    say "logged in to $TM_TARGET_IQN at $TM_PORTAL after $(($(date +%s) - start))s ($tries retries)"
fi
# Log in again at every boot (open-iscsi.service logs in the nodes marked automatic).
iscsiadm -m node -T "$TM_TARGET_IQN" -p "$TM_PORTAL" --op update -n node.startup -v automatic
