#!/bin/sh
# Install on a Debian 12 (bookworm) host what the Vagrant lab needs beside the QEMU lab's
# packages (lab/install-host-deps.sh): Vagrant with its libvirt provider, libvirt's daemon and
# QEMU driver (started by hand by lab/vagrant/host.py: the host may have no systemd), dnsmasq
# and iptables/ebtables for libvirt's networks, rsync and ssh for Vagrant's synced folder.
# Idempotent: nothing is installed when everything is there. Run as root (~70 s the first time).
set -eu
export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "lab/vagrant/install-host-deps.sh: must run as root" >&2
    exit 1
fi
PKGS="vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
      qemu-system-x86 qemu-utils dnsmasq-base openssh-client rsync iptables ebtables fdisk
      mmdebstrap e2fsprogs"
missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
if [ -n "$missing" ]; then
    echo "lab/vagrant/install-host-deps.sh: installing:$missing"
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
echo "lab/vagrant/install-host-deps.sh: host ready (vagrant, vagrant-libvirt, libvirtd)"
