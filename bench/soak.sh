#!/usr/bin/env bash
# The soak: the whole mesh under REST load at 70% of its measured capacity
# for a long while (30 minutes by default), a fault every few minutes, and
# each minute the mesh's RSS, open file descriptors, database size (SQLite
# and its WAL) and the p99 of the customers served. At the end `brewmesh
# audit` and the load's errors. Not in CI: it takes half an hour.
#
# The mesh: `brewmesh up` (release, SQLite) with 2 payments and 2 baristas,
# 20 ms steps, wide stations, on ports of its own. Capacity: 30 s of a
# closed loop (64 customers at a time) through the gateway. Faults, in
# turn: barista-1 SIGKILL (up restarts it), payment-2 SIGSTOP 5 s, half of
# payment-1's Authorize calls UNAVAILABLE for 60 s (/admin/faults), barista-2
# SIGTERM (restarted).
#
# Usage: bench/soak.sh              env: SOAK (30m), FAULT_EVERY (180 s)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SOAK=${SOAK:-30m}
FAULT_EVERY=${FAULT_EVERY:-180}
cargo build --release --locked -p brewmesh-cli
BIN=$ROOT/target/release/brewmesh
OUT=$ROOT/target/bench/soak-$(date +%Y%m%dT%H%M%S)
DATA=$(mktemp -d)
mkdir -p "$OUT"
export BREWMESH_REGISTRY_TOKEN=soak-$$-$RANDOM
GW=http://127.0.0.1:18180

"$BIN" up --insecure --no-auth --data-dir "$DATA" --ready-file "$DATA/up.json" \
  --registry-listen 127.0.0.1:18151 --payment-listen 127.0.0.1:18152 \
  --barista-listen 127.0.0.1:18153 --gateway-listen 127.0.0.1:18180 \
  --payment-replicas 2 --barista-replicas 2 \
  --payment-arg=--processing-delay=20ms \
  --barista-arg=--espresso-time=20ms --barista-arg=--milk-time=20ms \
  --barista-arg=--espresso-machines=256 --barista-arg=--steam-wands=256 \
  --barista-arg=--queue-depth=4096 --barista-arg=--order-lease=2s \
  > "$OUT/up.log" 2>&1 < /dev/null &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 600); do [ -s "$DATA/up.json" ] && break; sleep 0.1; done
addr() { python3 -c "import json,sys; print(json.load(open('$DATA/up.json'))['instances']['$1'])"; }
pid() { python3 -c "import json; print(json.load(open('$DATA/ready/$1.json'))['pid'])"; }

echo "capacity: 30 s closed loop, 64 at a time"
"$BIN" load --gateway "$GW" --concurrency 64 --duration 30s --no-progress \
  --json "$OUT/capacity.json" > "$OUT/capacity.txt"
CAP=$(python3 -c "import json; print(json.load(open('$OUT/capacity.json'))['served_per_second'])")
RATE=$(python3 -c "print(round($CAP * 0.7, 1))")
echo "capacity $CAP served/s; soaking at $RATE/s for $SOAK"

"$BIN" load --gateway "$GW" --rate "$RATE" --duration "$SOAK" --timeout 120s \
  --declined-every 20 --no-progress --json "$OUT/soak.json" > "$OUT/soak.txt" &
LOAD=$!

sample() { # minute
  local rss=0 fds=0
  for p in $UP $(pgrep -P "$UP" | tr '\n' ' '); do
    rss=$((rss + $(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)))
    fds=$((fds + $(ls "/proc/$p/fd" 2>/dev/null | wc -l)))
  done
  local db; db=$(du -ck "$DATA"/*/*.db* 2>/dev/null | tail -1 | cut -f1)
  echo "$1 $((rss / 1024)) $fds $((db / 1024))" >> "$OUT/samples.txt"
}

fault() { # n
  case $(( $1 % 4 )) in
    0) echo "fault: barista-1 SIGKILL"; kill -9 "$(pid barista-1)" ;;
    1) echo "fault: payment-2 SIGSTOP 5 s"; p=$(pid payment-2); kill -STOP "$p"; sleep 5; kill -CONT "$p" ;;
    2) echo "fault: payment-1 Authorize 50% UNAVAILABLE for 60 s"
       url="http://$(addr payment-1)/admin/faults"
       curl -s -X PUT -H "Authorization: Bearer $BREWMESH_REGISTRY_TOKEN" "$url" \
         -d '["brewmesh.payment.v1.Payments/Authorize=abort:UNAVAILABLE@50%"]' > /dev/null
       ( sleep 60; curl -s -X DELETE -H "Authorization: Bearer $BREWMESH_REGISTRY_TOKEN" "$url" > /dev/null ) & ;;
    3) echo "fault: barista-2 SIGTERM"; kill -TERM "$(pid barista-2)" ;;
  esac
}

start=$(date +%s); minute=0; faults=0
: > "$OUT/samples.txt"
while kill -0 "$LOAD" 2>/dev/null; do
  sleep 5
  elapsed=$(( $(date +%s) - start ))
  if [ $(( elapsed / 60 )) -gt "$minute" ]; then minute=$(( elapsed / 60 )); sample "$minute"; fi
  if [ $(( elapsed / FAULT_EVERY )) -gt "$faults" ]; then fault "$faults" | tee -a "$OUT/faults.txt"; faults=$((faults + 1)); fi
done
wait "$LOAD" || true
sleep 5
"$BIN" audit --barista "$(addr barista-1)" --payment "$(addr payment-1)" --grace 30s \
  --json "$OUT/audit.json" > "$OUT/audit.txt" || true

python3 - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
soak = json.load(open(f"{out}/soak.json"))
audit = json.load(open(f"{out}/audit.json"))
rows = [line.split() for line in open(f"{out}/samples.txt")]
p99 = {}
for s in soak["timeline"]:
    m = s["second"] // 60 + 1
    p99[m] = max(p99.get(m, 0), s["p99_ms"])
print("| minute | RSS MiB | open fds | SQLite + WAL MiB | worst per-second p99 ms |")
print("|---:|---:|---:|---:|---:|")
for m, rss, fds, db in rows:
    print(f"| {m} | {rss} | {fds} | {db} | {p99.get(int(m), 0):.0f} |")
by_minute = {int(m): int(rss) for m, rss, _, _ in rows}
if 5 in by_minute and by_minute:
    last = by_minute[max(by_minute)]
    print(f"RSS growth after minute 5: {100 * (last - by_minute[5]) / by_minute[5]:+.1f}%")
print(f"customers {soak['customers']}, served {soak['served']}, failed {soak['failed']} {soak['failed_by_reason']}, "
      f"errors {soak['errors']} {soak['errors_by_code']}, p99 {soak['latency_ms']['p99']:.0f} ms")
print(f"audit: {len(audit['findings'])} finding(s) over {audit['orders']} orders and {audit['payments']} payments")
EOF
echo "raw output: $OUT"
