#!/bin/sh
# Provision a targetmirror target: packages, the two commands, a YAML file with two mirrors in a
# consistency group exported to the initiators, the daemon, and `targetmirror apply`.
# Plain POSIX sh: Vagrant runs it on the target VM, the QEMU lab runs it in its guest.
#
# Environment (defaults in brackets):
#   TM_SRC           the targetmirror source tree [/vagrant]
#   TM_PORTAL        IP:PORT the target listens on [0.0.0.0:3260]
#   TM_TARGET_IQN    the target's IQN [iqn.2026-01.org.targetmirror.vagrant:target]
#   TM_INITIATORS    space-separated initiator IQNs allowed in (required)
#   TM_SIZE          size of each mirror [256M]
#   TM_ETC TM_BIN TM_IMAGES TM_STATE_DIR TM_SOCKET   where things go
#                    [/etc/targetmirror /usr/local/bin /var/lib/targetmirror/images
#                     /var/lib/targetmirror /run/targetmirror/control.sock]
#   TM_INSTALL_PACKAGES  1: apt-get the Debian packages that are missing [1]
#   TM_START_DAEMON  1: run targetmirrord under systemd [1]; 0: the caller runs it
#   TM_METRICS_ADDRESS  HOST:PORT of the Prometheus endpoint ["": off]
#
# Order (why): the file is checked offline when the CLI can (`targetmirror validate`), then the
# daemon is started and is serving (Type=notify: `systemctl start` returns after READY=1), and
# only then `apply --dry-run` and `apply`, which need it for consistency groups. Running the
# script again changes nothing that is already so.
set -eu

: "${TM_SRC:=/vagrant}"
: "${TM_PORTAL:=0.0.0.0:3260}"
: "${TM_TARGET_IQN:=iqn.2026-01.org.targetmirror.vagrant:target}"
: "${TM_INITIATORS:?TM_INITIATORS must name the initiator IQNs}"
: "${TM_SIZE:=256M}"
: "${TM_ETC:=/etc/targetmirror}"
: "${TM_BIN:=/usr/local/bin}"
: "${TM_IMAGES:=/var/lib/targetmirror/images}"
: "${TM_STATE_DIR:=/var/lib/targetmirror}"
: "${TM_SOCKET:=/run/targetmirror/control.sock}"
: "${TM_INSTALL_PACKAGES:=1}"
: "${TM_START_DAEMON:=1}"
: "${TM_METRICS_ADDRESS:=}"

say() { echo "target.sh: $*"; }

# -- packages ----------------------------------------------------------------------------------
PACKAGES="python3 python3-rtslib-fb python3-configshell-fb python3-yaml python3-pyroute2
          python3-tqdm python3-prometheus-client python3-jeepney kmod"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
        missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$TM_INSTALL_PACKAGES" = 1 ]; then
        say "installing$missing"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
    else
        echo "target.sh: missing packages:$missing" >&2
        exit 1
    fi
fi

# -- kernel ------------------------------------------------------------------------------------
modprobe -a configfs target_core_mod target_core_user iscsi_target_mod
grep -q " /sys/kernel/config " /proc/mounts || mount -t configfs configfs /sys/kernel/config

# -- the commands: run from the source tree, no build step -------------------------------------
mkdir -p "$TM_BIN"
for cmd in targetmirror:targetmirror.cli targetmirrord:targetmirror.daemon.main; do
    name=${cmd%%:*}
    module=${cmd#*:}
    cat > "$TM_BIN/$name" <<WRAPPER
#!/bin/sh
PYTHONPATH="$TM_SRC\${PYTHONPATH:+:\$PYTHONPATH}" exec python3 -m $module "\$@"
WRAPPER
    chmod 755 "$TM_BIN/$name"
done
say "installed $TM_BIN/targetmirror and $TM_BIN/targetmirrord (source: $TM_SRC)"

# -- the configuration -------------------------------------------------------------------------
mkdir -p "$TM_ETC" "$TM_IMAGES" "$TM_STATE_DIR"
CONFIG="$TM_ETC/targetmirror.yaml"
{
    echo "# written by vagrant/provision/target.sh"
    echo "daemon:"
    echo "  state_dir: $TM_STATE_DIR"
    echo "  control_socket: $TM_SOCKET"
    if [ -n "$TM_METRICS_ADDRESS" ]; then echo "  metrics_address: \"$TM_METRICS_ADDRESS\""; fi
    echo "image_dirs: [$TM_IMAGES]"
    echo "mirrors:"
    for m in data logs; do
        echo "  - name: $m"
        echo "    size: $TM_SIZE"
        echo "    image_a: $TM_IMAGES/$m-a.img"
        echo "    image_b: $TM_IMAGES/$m-b.img"
        echo "    create_images: true"
    done
    echo "groups:"
    echo "  - {name: app, mirrors: [data, logs]}"
    echo "exports:"
    echo "  - target: $TM_TARGET_IQN"
    echo "    portals: [\"$TM_PORTAL\"]"
    echo "    luns: [{lun: 0, mirror: data}, {lun: 1, mirror: logs}]"
    echo "    acls:"
    for i in $TM_INITIATORS; do
        echo "      - initiator: $i"
    done
} > "$CONFIG"
say "wrote $CONFIG"
# Offline check first, where the CLI has one (it needs neither LIO nor the daemon).
if "$TM_BIN/targetmirror" validate --help >/dev/null 2>&1; then
    "$TM_BIN/targetmirror" validate "$CONFIG"
fi

# -- the daemon, then apply ----------------------------------------------------------------------
if [ "$TM_START_DAEMON" = 1 ]; then
    unit=/etc/systemd/system/targetmirrord.service
    sed -e "s|^ExecStart=.*|ExecStart=$TM_BIN/targetmirrord --config $CONFIG|" \
        "$TM_SRC/etc/targetmirrord.service" > "$unit.new"
    if cmp -s "$unit.new" "$unit"; then rm "$unit.new"; else mv "$unit.new" "$unit"; fi
    systemctl daemon-reload
    # Type=notify: this returns once the daemon has sent READY=1 (control socket up).
    systemctl enable --now targetmirrord
    systemctl is-active --quiet targetmirrord || {
        systemctl status --no-pager targetmirrord >&2 || true
        echo "target.sh: targetmirrord is not running" >&2
        exit 1
    }
fi
"$TM_BIN/targetmirror" apply --config "$CONFIG" --dry-run
"$TM_BIN/targetmirror" apply --config "$CONFIG"
"$TM_BIN/targetmirror" list --config "$CONFIG"
