#!/usr/bin/env bash
# Switchover downtime against --downtime-limit, many runs of one dirtying workload
# (docs/BENCHMARKS.md, "auto": downtime). Two processes on loopback, like bench-converge.sh.
#
#   bash scripts/bench-downtime.sh [RUNS] [SIZE] [METHODS]   (defaults: 20, 256M, "auto zstd")
#
# Each run: a fresh copy of a SIZE silesia-like image on /dev/shm; the source runs a
# --dirty-rate 50MB writer over a 32 MiB set during the migration, --max-bandwidth 1gbit,
# --downtime-limit $LIMIT ms (default 300, as QEMU), --max-rounds 30, 2 channels, the digest
# check on (VERIFY=0: --no-verify on both sides).
# The engine's downtime runs from pausing the source to the destination running. With the digest
# check it includes hashing all memory on both sides: the source hashes while its last pages
# travel and its final state waits for the hash (digest_wait_ms), the destination hashes before
# it resumes (verify_ms). The switchover downtime, what --downtime-limit bounds, is the downtime
# less both (the report's switchover_ms; with --no-verify the whole downtime). The table also
# shows the downtime less only the destination's hash (this script's measure before
# switchover_ms existed; a binary without switchover_ms is measured that way) and the whole one.
# Prints one line per run and, per method, the share of runs within the limit, the rounds and the
# total time.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-20}
SIZE=${2:-256M}
METHODS=${3:-auto zstd}
LIMIT=${LIMIT:-300}
B=${PAGEFERRY:-target/release/pageferry}
[ -x "$B" ] || cargo build --release -p pageferry-cli >&2
D=$(mktemp -d /dev/shm/pf-bench-downtime.XXXXXX)
trap 'rm -rf "$D"' EXIT
"$B" image --size "$SIZE" "$D/src0.img" >/dev/null
WORK=(--dirty-rate 50MB --dirty-set 32M --max-bandwidth 1gbit --max-rounds 30 --downtime-limit "$LIMIT" --multifd-channels 2)
NV=()
[ "${VERIFY:-1}" = 0 ] && NV=(--no-verify)

for m in $METHODS; do
    for i in $(seq "$RUNS"); do
        cp "$D/src0.img" "$D/src.img"
        "$B" recv --listen 127.0.0.1:0 --image "$D/dst.img" --json "${NV[@]}" >"$D/recv.out" 2>"$D/recv.err" &
        rpid=$!
        addr=""
        for _ in $(seq 100); do addr=$(head -1 "$D/recv.out" 2>/dev/null | sed -n 's/^listening on //p'); [ -n "$addr" ] && break; sleep 0.05; done
        "$B" send --quiet --json --connect "$addr" --image "$D/src.img" --multifd-compression "$m" "${WORK[@]}" "${NV[@]}" >"$D/send.out" 2>"$D/send.err" || true
        wait $rpid || true
        python3 - "$m" "$i" "$LIMIT" "$D/send.out" "$D/send.err" >>"$D/rows" <<'PY'
import json, sys
m, i, limit, out, err = sys.argv[1], sys.argv[2], float(sys.argv[3]), open(sys.argv[4]).read().strip(), open(sys.argv[5]).read()
if not out:
    print(json.dumps({"method": m, "run": i, "failed": err.strip()[-200:]}))
    sys.exit()
r = json.loads(out)
a = r.get("auto") or {}
print(json.dumps({"method": m, "run": i, "downtime_ms": r["downtime_ms"], "verify_ms": r["verify_ms"],
                  "digest_wait_ms": r.get("digest_wait_ms", 0.0), "less_dest_ms": r["downtime_ms"] - r["verify_ms"],
                  "switchover_ms": r.get("switchover_ms", r["downtime_ms"] - r["verify_ms"]), "expected_ms": r.get("expected_downtime_ms", 0.0),
                  "fixed_ms": r.get("expected_fixed_ms", 0.0),
                  "rounds": r["rounds"], "total_s": r["total_time_s"], "ratio": r.get("ratio"),
                  "auto": ", ".join(f"{s['candidate']} {s['batches']}" for s in a.get("shares", []) if s["batches"])}))
PY
        tail -1 "$D/rows" >&2
    done
done
python3 - "$LIMIT" "$D/rows" <<'PY'
import json, sys, statistics
limit = float(sys.argv[1])
rows = [json.loads(l) for l in open(sys.argv[2])]
print(f"| method | runs | converged | switchover ≤ {limit:.0f} ms | less dest. digest ≤ {limit:.0f} ms | whole downtime ≤ {limit:.0f} ms | switchover ms median (max) | expected ms median (fixed) | digests ms median (source wait + dest.) | rounds median (max) | total s median |")
print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for m in dict.fromkeys(r["method"] for r in rows):
    rs = [r for r in rows if r["method"] == m]
    ok = [r for r in rs if "failed" not in r]
    n = len(rs)
    share = lambda key: (lambda k: f"{k}/{n} ({100*k/n:.0f}%)")(sum(1 for r in ok if r[key] <= limit))
    med = lambda v: statistics.median(v) if v else float("nan")
    sw = [r["switchover_ms"] for r in ok]
    print(f"| {m} | {n} | {len(ok)} | {share('switchover_ms')} | {share('less_dest_ms')} | {share('downtime_ms')} | "
          f"{med(sw):.1f} ({max(sw) if sw else float('nan'):.1f}) | {med([r['expected_ms'] for r in ok]):.1f} ({med([r['fixed_ms'] for r in ok]):.1f}) | "
          f"{med([r['digest_wait_ms'] + r['verify_ms'] for r in ok]):.1f} ({med([r['digest_wait_ms'] for r in ok]):.1f} + {med([r['verify_ms'] for r in ok]):.1f}) | "
          f"{med([r['rounds'] for r in ok]):.0f} ({max([r['rounds'] for r in ok], default=0)}) | {med([r['total_s'] for r in ok]):.2f} |")
PY
