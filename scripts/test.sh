#!/usr/bin/env bash
# The project's test command (README): installs what the tests need, then runs every test of
# the workspace with ISA-L enabled.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup-deps.sh
cargo test --workspace --release --features pageferry/isal "$@"
