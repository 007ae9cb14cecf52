#!/usr/bin/env bash
# Build the Debian package from this tree (debhelper + dh-python's pybuild, as rtslib-fb and
# targetcli-fb are packaged): build/deb/targetmirror_<version>_<arch>.deb.
#
# Installs its build dependencies itself (apt-get; root), writes the man pages with the project's
# venv (dev/manpages.sh), and builds from a clean copy of the tree's files (tracked and untracked,
# not ignored) in build/deb/src, so nothing is written next to the checkout. A build whose source
# files have not changed since the last one is not repeated. Prints where the .deb is.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "dev/deb.sh: run as root (apt-get installs the build dependencies)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# build dependencies (debian/control); for tests/test_systemd_unit.py also systemd
# (systemd-analyze) and procps (/bin/kill, which the unit's ExecReload runs)
NEEDS="debhelper dh-python python3-all-dev python3-setuptools dpkg-dev systemd procps"
missing=""
for p in $NEEDS; do
    dpkg-query -W -f='${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed \
        || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "dev/deb.sh: installing$missing"
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

VENV=${TARGETMIRROR_VENV:-.venv}
[ -x "$VENV/bin/argparse-manpage" ] || bash dev/bootstrap.sh

OUT=build/deb
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
    list_files() { git ls-files -z --cached --others --exclude-standard | \
        while IFS= read -r -d '' f; do [ -f "$f" ] && printf '%s\0' "$f"; done; }
else
    list_files() { find . -path ./.git -prune -o -path ./.venv -prune -o -path ./build -prune \
        -o -path ./lab-out -prune -o -type f -printf '%P\0'; }
fi
hash=$(list_files | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
VERSION=$(dpkg-parsechangelog -S Version)
ARCH=$(dpkg-architecture -qDEB_HOST_ARCH)
DEB="$OUT/targetmirror_${VERSION}_${ARCH}.deb"
mkdir -p "$OUT"
if [ -e "$DEB" ] && [ "$(cat "$OUT/source-hash" 2>/dev/null)" = "$hash" ]; then
    echo "dev/deb.sh: $DEB is up to date"
    exit 0
fi

start=$(date +%s)
# Built in a folder of its own and renamed into place at the end: a .deb in build/deb is always
# a complete one (a lab run may be reading it while a new one builds).
WORK="$OUT/work.$$"
rm -rf "$WORK"
trap 'rm -rf "$WORK"' EXIT
SRC="$WORK/targetmirror-$VERSION"
mkdir -p "$SRC"
list_files | tar --null -T - -cf - | tar -xf - -C "$SRC"
bash dev/manpages.sh "$SRC/manpages" >/dev/null
(cd "$SRC" && dpkg-buildpackage -b -us -uc) > "$OUT/build.log" 2>&1 || {
    tail -40 "$OUT/build.log" >&2
    echo "dev/deb.sh: dpkg-buildpackage failed; full log: $OUT/build.log" >&2
    exit 1
}
NEW="$WORK/targetmirror_${VERSION}_${ARCH}.deb"

# What an installation needs must be in it (a missing file fails the build, not a later boot).
contents=$(dpkg-deb -c "$NEW")
for path in ./usr/bin/targetmirror ./usr/bin/targetmirrord ./usr/bin/targetmirror-shell \
        ./lib/systemd/system/targetmirrord.service \
        ./usr/share/dbus-1/system.d/targetmirror.conf \
        ./usr/share/man/man1/targetmirror.1.gz ./usr/share/man/man1/targetmirror-shell.1.gz \
        ./usr/share/man/man8/targetmirrord.8.gz ./usr/share/man/man5/targetmirror.yaml.5.gz \
        ./usr/share/doc/targetmirror/examples/targetmirror.yaml \
        ./usr/share/doc/targetmirror/systemd.md ./usr/share/doc/targetmirror/copyright \
        ./usr/lib/python3/dist-packages/targetmirror/daemon/main.py; do
    grep -q " $path\$" <<<"$contents" || { echo "dev/deb.sh: the package lacks $path" >&2; exit 1; }
done
grep -Eq ' \./usr/lib/python3/dist-packages/targetmirror/express/_lane\.cpython-[^ ]+\.so$' \
    <<<"$contents" || { echo "dev/deb.sh: the package lacks the express lane" >&2; exit 1; }
for old in "$OUT"/targetmirror_*.deb; do
    [ "$old" = "$DEB" ] || rm -f "$old"
done
mv -f "$NEW" "$DEB"
echo "$hash" > "$OUT/source-hash"
echo "dev/deb.sh: built $DEB in $(( $(date +%s) - start )) s"
