#!/usr/bin/env bash
# Installs what the full test suite needs beyond Rust and gcc, on a fresh Debian machine:
#  - libisal-dev: the system's ISA-L, which a default build compresses deflate with (build.rs
#    finds it; without it a default build falls back to libdeflate);
#  - nasm + autotools, to build ISA-L from source (the `isal` feature);
#  - iproute2 (ip, tc) for the bench's kernel-shaped links;
#  - QATzip 1.3.1 unpacked into .qatzip/ (never installed system-wide), for the real-library tests.
# Idempotent; needs root for apt-get (skipped with a message otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
for tool in nasm:nasm autoreconf:autoconf automake:automake libtoolize:libtool ip:iproute2 tc:iproute2; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need+=("${tool##*:}")
done
[ -f /usr/include/isa-l/igzip_lib.h ] || need+=(libisal-dev)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup-deps: installing ${need[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "setup-deps: not root; cannot install ${need[*]} (ISA-L, the isal feature and tc links need them)" >&2
  fi
fi

if [ -x scripts/fetch-qatzip.sh ] || [ -f scripts/fetch-qatzip.sh ]; then
  bash scripts/fetch-qatzip.sh || echo "setup-deps: QATzip could not be fetched; its tests will say why they skip" >&2
fi
