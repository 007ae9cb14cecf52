#!/bin/sh
# Install on a Debian 12 (bookworm) host everything the real-kernel lab needs:
#   - qemu-system-x86 to boot the guest (TCG is enough; KVM is used by nobody),
#   - mmdebstrap + e2fsprogs to build the guest tree and turn it into an ext4 image,
#   - gcc + dpkg-dev + a deb-src entry so `apt-get source tcmu` can fetch tcmu-runner's
#     file_example.c, which we compile into the `file` handler Debian does not ship,
#   - python3-dev (with gcc) to build the express lane, targetmirror's one C extension
#     (optional: without it the daemon serves everything from Python, only slower), and
#     liburing-dev for its batched io_uring submission (optional too: without it the lane
#     makes one pwritev/preadv per leg; the guest image carries liburing2 to load it),
#   - ceph-mon, ceph-osd, ceph-common and librbd's Python binding (python3-rbd, python3-rados)
#     for the RBD leg's tests: they start a disposable one-node cluster on 127.0.0.1.  The
#     binding exists only for Debian's /usr/bin/python3, which is why dev/bootstrap.sh builds
#     .venv from that interpreter with --system-site-packages.
#
# Idempotent: packages already present are not reinstalled, and apt-get update runs only
# when something is missing or the deb-src entry was just added. Run as root.
set -eu

export DEBIAN_FRONTEND=noninteractive

if [ "$(id -u)" -ne 0 ]; then
    echo "install-host-deps.sh: must run as root" >&2
    exit 1
fi

PKGS="qemu-system-x86 mmdebstrap e2fsprogs dpkg-dev gcc libc6-dev python3-dev liburing-dev
      ca-certificates ceph-mon ceph-osd ceph-common python3-rbd python3-rados"
SRC_LIST=/etc/apt/sources.list.d/targetmirror-lab-src.sources
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
need_update=0

# A deb-src entry for bookworm main, unless one is configured already (either format). Its
# URI is the one the host already uses for bookworm binaries: no archive address is written
# into the project.
if ! grep -rqsE '^(deb-src[[:space:]].*bookworm|Types:.*deb-src)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null; then
    uri=$(awk 'BEGIN{RS=""} /Types:[^\n]*deb/ && /Suites:[^\n]*bookworm( |$|\n)/ {
                 for (i = 1; i <= NF; i++) if ($i == "URIs:") { print $(i + 1); exit } }' \
              /etc/apt/sources.list.d/*.sources 2>/dev/null)
    if [ -z "$uri" ]; then
        uri=$(awk '$1 == "deb" && $3 == "bookworm" && $2 !~ /^\[/ { print $2; exit }' \
                  /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null)
    fi
    if [ -z "$uri" ]; then
        echo "install-host-deps.sh: no bookworm entry in the apt sources to derive a deb-src" \
             "entry from" >&2
        exit 1
    fi
    # deb822 with the same Signed-By as Debian's default entry: apt refuses one source
    # with two different Signed-By values.
    printf 'Types: deb-src\nURIs: %s\nSuites: bookworm\nComponents: main\nSigned-By: %s\n' \
        "$uri" "$KEYRING" > "$SRC_LIST"
    need_update=1
fi

missing=""
for p in $PKGS; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
[ -n "$missing" ] && need_update=1

if [ "$need_update" -eq 1 ]; then
    apt-get update -qq
fi
if [ -n "$missing" ]; then
    echo "install-host-deps.sh: installing:$missing"
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# promtool, Prometheus's checker, for tests/etc/test_monitoring.py (the shipped alert rules and
# Grafana dashboard).  Debian ships it only inside the `prometheus` package, whose installation
# would also enable and start a Prometheus server on port 9090 on this machine; so the package
# is downloaded and only its promtool (one program, linked against libc alone) is unpacked into
# the cache.  Without it those tests are skipped, saying so; nothing else needs it.
PROMTOOL_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/targetmirror/promtool
if ! command -v promtool >/dev/null 2>&1 && [ ! -x "$PROMTOOL_DIR/usr/bin/promtool" ]; then
    tmp=$(mktemp -d)
    # apt-get download as root warns that _apt cannot reach the directory: harmless here
    if ! (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); then
        apt-get update -qq
        (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) || true
    fi
    deb=$(ls "$tmp"/prometheus_*.deb 2>/dev/null | head -n 1)
    if [ -n "$deb" ] && mkdir -p "$PROMTOOL_DIR" \
            && dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$PROMTOOL_DIR" ./usr/bin/promtool; then
        echo "install-host-deps.sh: promtool unpacked into $PROMTOOL_DIR/usr/bin"
    else
        echo "install-host-deps.sh: WARNING: could not fetch Debian's prometheus package for" \
             "promtool; the monitoring tests will be skipped" >&2
    fi
    rm -rf "$tmp"
fi
echo "install-host-deps.sh: host ready (qemu-system-x86_64, mmdebstrap, gcc, deb-src, ceph," \
     "promtool)"
