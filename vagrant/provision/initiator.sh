#!/bin/sh
# Provision an initiator: open-iscsi, its name, discovery and login to the target.
# Plain POSIX sh (Vagrant initiator VMs; the QEMU lab guest logs in to itself with it).
#
# Environment: TM_PORTAL (IP:PORT of the target, required), TM_TARGET_IQN (required),
#   TM_INITIATOR_NAME (set /etc/iscsi/initiatorname.iscsi to it; unset: keep the current one),
#   TM_INSTALL_PACKAGES [1].
set -eu
: "${TM_PORTAL:?TM_PORTAL must be IP:PORT of the target}"
: "${TM_TARGET_IQN:?TM_TARGET_IQN must name the target}"
: "${TM_INSTALL_PACKAGES:=1}"

if ! command -v iscsiadm >/dev/null; then
    if [ "$TM_INSTALL_PACKAGES" != 1 ]; then
        echo "initiator.sh: open-iscsi is not installed" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends open-iscsi
fi
if [ -n "${TM_INITIATOR_NAME:-}" ]; then
    echo "InitiatorName=$TM_INITIATOR_NAME" > /etc/iscsi/initiatorname.iscsi
    if [ -d /run/systemd/system ]; then systemctl restart iscsid; fi
fi
modprobe -a iscsi_tcp sd_mod
if [ -d /run/systemd/system ]; then
    systemctl start iscsid
elif ! [ -e /run/iscsid.pid ] || ! kill -0 "$(cat /run/iscsid.pid)" 2>/dev/null; then
    mkdir -p /run/lock/iscsi
    iscsid
fi
iscsiadm -m discovery -t sendtargets -p "$TM_PORTAL"
iscsiadm -m node -T "$TM_TARGET_IQN" -p "$TM_PORTAL" --login
echo "initiator.sh: logged in to $TM_TARGET_IQN at $TM_PORTAL"
