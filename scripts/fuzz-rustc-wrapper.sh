#!/bin/sh
# RUSTC_WRAPPER for scripts/fuzz-smoke.sh: adds libFuzzer's coverage instrumentation (the flags
# cargo-fuzz passes for -O -a -s none) to this project's crates only — the library under test
# and the fuzz targets — and compiles everything else (dependencies, build scripts) exactly as
# the main build does, so the fuzz build reuses the dependencies the test suite already built.
rustc=$1
shift
case " $* " in
  *" --crate-name build_script_"*) ;;
  *" --crate-name pageferry "* | *" --crate-name pageferry_fuzz "* | *" fuzz_targets/"*)
    exec "$rustc" "$@" -Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
      -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing \
      -Cllvm-args=-simplifycfg-branch-fold-threshold=0 -Cllvm-args=-sanitizer-coverage-stack-depth \
      -Cdebug-assertions ;;
esac
exec "$rustc" "$@"
