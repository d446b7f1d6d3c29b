#!/usr/bin/env bash
# Pre-copy vs auto-converge vs postcopy on one workload that dirties memory 4x faster than the
# link moves it (docs/BENCHMARKS.md, "Finishing every migration"). Two processes on loopback.
#
#   bash scripts/bench-converge.sh [RUNS] [SIZE]      (defaults: 3 runs, 256M)
#
# Workload: a --dirty-rate 400MB writer over a 32 MiB set of a SIZE silesia-like image on
# /dev/shm, --max-bandwidth 100MB, --downtime-limit 100 (1000 for the second row),
# --max-rounds 20, method none, no in-band digest (postcopy cannot have one),
# 2 channels. Prints one markdown row per run.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
SIZE=${2:-256M}
B=target/release/pageferry
[ -x "$B" ] || cargo build --release -p pageferry-cli >&2
D=$(mktemp -d /dev/shm/pf-bench-converge.XXXXXX)
trap 'rm -rf "$D"' EXIT
"$B" image --size "$SIZE" "$D/src0.img" >/dev/null
WORK=(--dirty-rate 400MB --dirty-set 32M --max-bandwidth 100MB --max-rounds 20)

run() { # name, recv flags..., --, send flags...
    local name=$1; shift
    local rflags=() sflags=()
    while [ "$1" != "--" ]; do rflags+=("$1"); shift; done; shift
    sflags=("$@")
    cp "$D/src0.img" "$D/src.img"
    "$B" recv --listen 127.0.0.1:0 --image "$D/dst.img" --json "${rflags[@]}" >"$D/recv.out" 2>"$D/recv.err" &
    local rpid=$!
    local addr=""
    for _ in $(seq 100); do addr=$(head -1 "$D/recv.out" 2>/dev/null | sed -n 's/^listening on //p'); [ -n "$addr" ] && break; sleep 0.05; done
    "$B" send --quiet --json --connect "$addr" --image "$D/src.img" "${WORK[@]}" "${sflags[@]}" >"$D/send.out" 2>"$D/send.err" || true
    wait $rpid || true
    python3 - "$name" "$D/send.out" "$D/send.err" <<'EOF'
import json, sys, re
name, out, err = sys.argv[1], open(sys.argv[2]).read().strip(), open(sys.argv[3]).read()
if not out:
    m = re.search(r"after (\d+) rounds and ([\d.]+) s", err)
    print(f"| {name} | did not converge ({m.group(1)} rounds, {m.group(2)} s) | – | – | – | – | – | – |" if m else f"| {name} | failed: {err.strip()[-120:]} |")
    sys.exit()
r = json.loads(out)
pc = r.get("postcopy") or {}
thr = r.get("throttle_pct_per_round") or []
lat = f"{pc['fault_latency_p50_us']:.0f} / {pc['fault_latency_p99_us']:.0f} / {pc['fault_latency_max_us']:.0f}" if pc.get("faults") else "–"
print(f"| {name} | {r['total_time_s']:.2f} s | {r['downtime_ms']:.1f} ms | {r['rounds']} | {max(thr) if thr else 0}% | "
      f"{r['postcopy_ms']:.0f} ms | {r['postcopy_pages_requested']} / {r['postcopy_pages_pushed']} | {lat} |" if r.get("postcopy_reason") else
      f"| {name} | {r['total_time_s']:.2f} s | {r['downtime_ms']:.1f} ms | {r['rounds']} | {max(thr) if thr else 0}% | – | – | – |")
EOF
}

echo "| mechanism | total time | downtime | rounds | max throttle | postcopy duration | pages requested / pushed | fault latency p50 / p99 / max (µs) |"
echo "|---|---|---|---|---|---|---|---|"
for i in $(seq "$RUNS"); do
    run "pre-copy" --no-verify -- --no-verify --downtime-limit 100
    run "pre-copy, --downtime-limit 1000" --no-verify -- --no-verify --downtime-limit 1000
    run "auto-converge" --no-verify -- --no-verify --downtime-limit 100 --auto-converge
    run "postcopy" --no-verify --resume-writer -- --no-verify --downtime-limit 100 --postcopy
done
