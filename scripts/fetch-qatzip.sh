#!/usr/bin/env bash
# Unpack Debian trixie's QATzip 1.3.1 run-time libraries and header into a private prefix,
# without installing anything: the qatzip method's `qat` provider and its tests load the library
# from there (PAGEFERRY_QATZIP_LIB=PREFIX/usr/lib/x86_64-linux-gnu/libqatzip.so.3).
#
# Usage: scripts/fetch-qatzip.sh [PREFIX]     (default: .qatzip at the repository root)
#        DEBIAN_MIRROR=URL overrides the archive (default http://deb.debian.org/debian).
#
# The packages are fetched with `apt-get download` under a throw-away apt state whose only
# source is trixie main, then unpacked with `dpkg-deb -x`. Never `apt-get install` them on a
# bookworm host: that would drag in trixie's libc. Run-time needs of the unpacked libraries
# (liblz4-1, libnuma1, zlib1g, libssl3) come from the host.
# Idempotent: does nothing when the prefix already holds the library and the header.
# Exit status: 0 done (or nothing to do), 2 not a Debian-like host, 3 archive unreachable or
# download failed, 4 unexpected package contents.
set -euo pipefail

mirror="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${1:-$root/.qatzip}"
mkdir -p "$prefix"
prefix="$(cd "$prefix" && pwd)"

arch="$(dpkg --print-architecture 2>/dev/null || echo amd64)"
case "$arch" in
    amd64) multiarch=x86_64-linux-gnu ;;
    arm64) multiarch=aarch64-linux-gnu ;;
    *) multiarch="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo "$arch-linux-gnu")" ;;
esac
libdir="$prefix/usr/lib/$multiarch"
packages=(libqatzip3 libqat4 libusdm0 libqatzip-dev)

if [[ -e "$libdir/libqatzip.so.3" && -e "$libdir/libqat.so.4" && -e "$libdir/libusdm.so.0" && -e "$prefix/usr/include/qatzip.h" ]]; then
    echo "fetch-qatzip: already unpacked in $prefix (nothing to do)"
    exit 0
fi

for tool in apt-get dpkg-deb; do
    command -v "$tool" >/dev/null || { echo "fetch-qatzip: '$tool' not found (needs a Debian-based host)" >&2; exit 2; }
done
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
[[ -r "$keyring" ]] || { echo "fetch-qatzip: $keyring missing (install debian-archive-keyring)" >&2; exit 2; }

work="$(mktemp -d "${TMPDIR:-/tmp}/fetch-qatzip.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/state/lists/partial" "$work/cache/archives/partial" "$work/parts" "$work/prefs" "$work/debs"
: > "$work/status"
cat > "$work/sources.list" <<SRC
deb [arch=$arch signed-by=$keyring] $mirror trixie main
SRC
apt_opts=(
    -o "Dir::State=$work/state"
    -o "Dir::State::status=$work/status"
    -o "Dir::Cache=$work/cache"
    -o "Dir::Etc::SourceList=$work/sources.list"
    -o "Dir::Etc::SourceParts=$work/parts"
    -o "Dir::Etc::Preferences=$work/prefs/none"
    -o "Dir::Etc::PreferencesParts=$work/prefs"
    -o "APT::Architecture=$arch"
    -o "APT::Sandbox::User=root"
    -o "Acquire::Languages=none"
    -q
)

echo "fetch-qatzip: reading the trixie main package index (private apt state in $work)"
if ! apt-get "${apt_opts[@]}" update >"$work/update.log" 2>&1 || grep -qE '^(W|E): (Failed to fetch|Some index files failed)' "$work/update.log"; then
    cat "$work/update.log" >&2
    echo "fetch-qatzip: cannot reach the Debian archive ($mirror, trixie main); QATzip not fetched" >&2
    exit 3
fi

echo "fetch-qatzip: downloading ${packages[*]}"
if ! (cd "$work/debs" && apt-get "${apt_opts[@]}" download "${packages[@]}") >"$work/download.log" 2>&1; then
    cat "$work/download.log" >&2
    echo "fetch-qatzip: download of ${packages[*]} failed" >&2
    exit 3
fi

for deb in "$work"/debs/*.deb; do
    echo "fetch-qatzip: unpacking $(basename "$deb")"
    dpkg-deb -x "$deb" "$prefix"
done

for f in "$libdir/libqatzip.so.3" "$libdir/libqat.so.4" "$libdir/libusdm.so.0" "$prefix/usr/include/qatzip.h"; do
    [[ -e "$f" ]] || { echo "fetch-qatzip: expected $f after unpacking, not found" >&2; exit 4; }
done
echo "fetch-qatzip: QATzip unpacked in $prefix"
echo "fetch-qatzip: use PAGEFERRY_QATZIP_LIB=$libdir/libqatzip.so.3 (or --qatzip-lib)"
