#!/usr/bin/env bash
# libFuzzer runs of the fuzz targets (fuzz/) without cargo-fuzz, on the stable toolchain.
#
#   bash scripts/fuzz-smoke.sh                     every target for 5 s (CI, from .ci/run)
#   PAGEFERRY_FUZZ_SECONDS=60 bash scripts/fuzz-smoke.sh destination
#   PAGEFERRY_FUZZ_RUNS=10000000 bash scripts/fuzz-smoke.sh decode_zstd   (docs/RELIABILITY.md)
#
# Builds the fuzz workspace with plain cargo on the stable toolchain, in the main target
# directory: scripts/fuzz-rustc-wrapper.sh adds the coverage instrumentation cargo-fuzz adds
# for `-O -a -s none` (no sanitizer: the harness checks canary pages itself) to this project's
# crates only, so every dependency the test suite already built is reused (only the library,
# the harness and libFuzzer itself are compiled). It then runs each target over its seed
# corpus in fuzz/corpus for PAGEFERRY_FUZZ_SECONDS (default 5), or for PAGEFERRY_FUZZ_RUNS
# executions. Fails on any crash, panic, canary hit, input slower than PAGEFERRY_FUZZ_TIMEOUT
# (10 s) or process over 2 GiB; the input that failed is kept in $PAGEFERRY_FUZZ_ARTIFACTS
# (default target/fuzz-smoke/). New inputs go to a scratch corpus, never into fuzz/corpus.
# (The long runs in docs/RELIABILITY.md use cargo-fuzz, which instruments the dependencies too.)
#
# The stable build and tests do not depend on this: the fuzz workspace is excluded from the
# main one, and nothing here needs nightly, cargo-fuzz or RUSTC_BOOTSTRAP.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${PAGEFERRY_FUZZ_SECONDS:-5}
runs=${PAGEFERRY_FUZZ_RUNS:-}
# Seconds one input may take (a hang is a failure too); raise it where a watchdog may pause
# the process (this project's helpers' machine SIGSTOPs fuzzers while benchmarks run).
timeout=${PAGEFERRY_FUZZ_TIMEOUT:-10}
art=${PAGEFERRY_FUZZ_ARTIFACTS:-$PWD/target/fuzz-smoke}
start=$(date +%s)
target_dir=${CARGO_TARGET_DIR:-target}
case $target_dir in /*) ;; *) target_dir=$PWD/$target_dir ;; esac
# The main build's features and profile (its codegen units), so the dependencies' artifacts are
# the same ones; debug assertions and overflow checks for the crates under test (as
# `cargo fuzz build -a`), which also keeps their artifacts apart from the main build's.
cfg=(--config profile.release.codegen-units=4)
for p in pageferry pageferry-fuzz; do
  cfg+=(--config "profile.release.package.$p.debug-assertions=true" --config "profile.release.package.$p.overflow-checks=true")
done
RUSTC_WRAPPER=$PWD/scripts/fuzz-rustc-wrapper.sh cargo build --release --features pageferry/isal "${cfg[@]}" \
  --manifest-path fuzz/Cargo.toml --target-dir "$target_dir" --bins
built=$(date +%s)
bin=$target_dir/release
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^pageferry-fuzz$')
fi
if [ -n "$runs" ]; then limit=(-runs="$runs"); else limit=(-max_total_time="$secs"); fi
failed=()
for t in "${targets[@]}"; do
  scratch=$(mktemp -d)
  mkdir -p "$art/$t"
  echo "fuzz-smoke: $t ${limit[*]}"
  t0=$(date +%s)
  if ! "$bin/$t" "${limit[@]}" -timeout="$timeout" -rss_limit_mb=2048 -print_final_stats=1 \
      -artifact_prefix="$art/$t/" "$scratch" "fuzz/corpus/$t" > "$art/$t.log" 2>&1; then
    failed+=("$t")
    tail -40 "$art/$t.log"
  fi
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$art/$t.log")
  corpus_files=$(( $(find "$scratch" "fuzz/corpus/$t" -type f | wc -l) ))
  corpus_bytes=$(cat "$scratch"/* "fuzz/corpus/$t"/* 2>/dev/null | wc -c)
  echo "fuzz-smoke: $t: ${execs:-?} executions in $(( $(date +%s) - t0 )) s; corpus $corpus_files files, $corpus_bytes bytes; artifacts: $(ls "$art/$t" | wc -l)"
  rm -rf "$scratch"
done
echo "fuzz-smoke: build $((built - start)) s, runs $(( $(date +%s) - built )) s"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz-smoke: FAILED: ${failed[*]} (inputs in $art/)" >&2
  exit 1
fi
