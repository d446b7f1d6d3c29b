#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then runs every test of
# the workspace with ISA-L built from source (the `isal` feature), and the library's codec tests
# once more as a default build (ISA-L from the system, which setup-deps.sh installs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-deps.sh
cargo test --workspace --release --features pageferry/isal "$@"
cargo test --release -p pageferry --lib codec::
