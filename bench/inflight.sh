#!/usr/bin/env bash
# Memory per order in flight, by role: what `--max-orders auto` sizes its
# bound from. `brewmesh up` (SQLite, one replica each, stations 65,535
# wide, steps of an hour, no bound) is given N latte orders at once over
# gRPC in batches of BATCH (`brewmesh load --until accepted`); once the
# orders are all accepted and authorized — every saga waiting at its
# stations — each process's RSS is read (VmRSS, and its peak VmHWM). A
# fresh mesh for each N; the growth over the idle mesh, divided by N, is
# the cost of one order in flight.
#
# Usage: bench/inflight.sh     env: STEPS ("10000 20000 40000"), BATCH (1000)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STEPS=${STEPS:-10000 20000 40000}
BATCH=${BATCH:-1000}
cargo build --release --locked -p brewmesh-cli
BIN=$ROOT/target/release/brewmesh
OUT=$ROOT/target/bench/inflight-$(date +%Y%m%dT%H%M%S)
mkdir -p "$OUT"
UP=""
cleanup() { [ -n "$UP" ] && { kill -INT "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; }; UP=""; }
trap cleanup EXIT

kib() { # pid field → KiB
  awk -v f="$2:" '$1 == f {print $2}' "/proc/$1/status"
}

echo "| orders in flight | role | RSS idle (MiB) | RSS (MiB) | peak (MiB) | per order (KiB) |" | tee "$OUT/inflight.md"
echo "|---:|---|---:|---:|---:|---:|" | tee -a "$OUT/inflight.md"
for n in $STEPS; do
  data=$(mktemp -d)
  "$BIN" up --insecure --no-auth --data-dir "$data" --ready-file "$data/ready.json" \
    --registry-listen 127.0.0.1:18651 --payment-listen 127.0.0.1:18652 \
    --barista-listen 127.0.0.1:18653 --gateway-listen 127.0.0.1:18680 \
    --barista-arg=--espresso-machines=65535 --barista-arg=--steam-wands=65535 \
    --barista-arg=--queue-depth=65535 --barista-arg=--order-lease=600s \
    --barista-arg=--espresso-time=3600s --barista-arg=--milk-time=3600s \
    --barista-arg=--max-orders=none --payment-arg=--processing-delay=0s \
    > "$OUT/up-$n.log" 2>&1 < /dev/null &
  UP=$!
  for _ in $(seq 300); do [ -s "$data/ready.json" ] && break; sleep 0.1; done
  sleep 2
  declare -A pids=() idle=()
  for f in "$data"/ready/*.json; do
    label=$(basename "$f" .json)
    case $label in registry*) continue ;; esac
    pids[$label]=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f")
    idle[$label]=$(kib "${pids[$label]}" VmRSS)
  done
  "$BIN" load --grpc 127.0.0.1:18653 --customers "$n" --concurrency "$n" --batch "$BATCH" \
    --mix latte --until accepted --timeout 600s --no-progress > "$OUT/load-$n.txt" 2>&1
  grep -E 'customers|error' "$OUT/load-$n.txt" | sed 's/^/  /' >&2
  # Every saga authorizes at once and then waits at its stations.
  sleep 10
  for label in $(printf '%s\n' "${!pids[@]}" | sort); do
    pid=${pids[$label]}
    rss=$(kib "$pid" VmRSS); hwm=$(kib "$pid" VmHWM)
    printf '| %d | %s | %.1f | %.1f | %.1f | %.1f |\n' "$n" "$label" \
      "$(echo "${idle[$label]} / 1024" | bc -l)" "$(echo "$rss / 1024" | bc -l)" \
      "$(echo "$hwm / 1024" | bc -l)" "$(echo "($rss - ${idle[$label]}) / $n" | bc -l)" | tee -a "$OUT/inflight.md"
  done
  unset pids idle
  cleanup
  rm -rf "$data"
done
echo "raw output: $OUT"
