#!/usr/bin/env bash
# libFuzzer runs of the fuzz targets (fuzz/) without cargo-fuzz, on the stable toolchain.
#
#   bash scripts/fuzz-smoke.sh                     every target for 5 s (CI, from .ci/run)
#   PAGEFERRY_FUZZ_SECONDS=60 bash scripts/fuzz-smoke.sh destination
#   PAGEFERRY_FUZZ_RUNS=10000000 bash scripts/fuzz-smoke.sh decode_zstd   (docs/RELIABILITY.md)
#
# Builds the fuzz workspace with plain cargo and the coverage instrumentation cargo-fuzz adds
# for `cargo fuzz build -O -a -s none --codegen-units 16` (no sanitizer: the harness checks
# canary pages itself), then runs each target over its seed corpus in fuzz/corpus for
# PAGEFERRY_FUZZ_SECONDS (default 5), or for PAGEFERRY_FUZZ_RUNS executions. Fails on any
# crash, panic, canary hit, input slower than PAGEFERRY_FUZZ_TIMEOUT (10 s) or process over 2 GiB; the input that
# failed is kept in $PAGEFERRY_FUZZ_ARTIFACTS (default target/fuzz-smoke/). New inputs go to a
# scratch corpus, never into fuzz/corpus.
#
# The stable build and tests do not depend on this: the fuzz workspace is excluded from the main
# one. No -Z flag is used without a sanitizer; RUSTC_BOOTSTRAP=1 is set only because cargo-fuzz
# sets it and some build scripts look at it, so both builds share fuzz/target.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${PAGEFERRY_FUZZ_SECONDS:-5}
runs=${PAGEFERRY_FUZZ_RUNS:-}
# Seconds one input may take (a hang is a failure too); raise it where a watchdog may pause
# the process (this project's helpers' machine SIGSTOPs fuzzers while benchmarks run).
timeout=${PAGEFERRY_FUZZ_TIMEOUT:-10}
triple=$(rustc -vV | sed -n 's/^host: //p')
art=${PAGEFERRY_FUZZ_ARTIFACTS:-$PWD/target/fuzz-smoke}
# The same flags, in the same order, as cargo-fuzz passes.
flags=(
  -Cpasses=sancov-module
  -Cllvm-args=-sanitizer-coverage-level=4
  -Cllvm-args=-sanitizer-coverage-inline-8bit-counters
  -Cllvm-args=-sanitizer-coverage-pc-table
  -Cllvm-args=-sanitizer-coverage-trace-compares
  --cfg fuzzing
  -Cllvm-args=-simplifycfg-branch-fold-threshold=0
  -Cllvm-args=-sanitizer-coverage-stack-depth
  -Cdebug-assertions
  -Ccodegen-units=16
)
start=$(date +%s)
# --target: the flags reach the fuzz targets and their dependencies, not build scripts.
RUSTC_BOOTSTRAP=1 RUSTFLAGS="${flags[*]}" cargo build --release --config 'profile.release.debug="line-tables-only"' \
  --manifest-path fuzz/Cargo.toml --target "$triple" --bins
built=$(date +%s)
target_dir=${CARGO_TARGET_DIR:-fuzz/target}
case $target_dir in /*) ;; *) target_dir=$PWD/$target_dir ;; esac
bin=$target_dir/$triple/release
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
