#!/usr/bin/env bash
# Scale-out with brewing as the bottleneck: throughput with 1, 2 and 4
# barista replicas, as a fraction of 1×, 2× and 4× the one-replica figure.
#
# Each barista has 2 espresso machines pulling a shot in 250 ms (8 drinks a
# second at most) and a queue of 8; payment answers at once. Espressos only,
# through the gateway (P2C over the replicas the registry reports); closed
# loop with 10 customers per replica, so the offered load grows with the
# replicas. Rounds alternate 1, 2, 4 replicas ROUNDS times; medians.
#
# Usage: bench/scale.sh     env: ROUNDS (2), SECONDS_PER_RUN (20),
#   COMPARE=/path/to/another/brewmesh: each round runs that binary too
#   (labelled "compared"), for a before/after in one run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-2}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}
cargo build --release --locked -p brewmesh-cli
BINS=("this=$ROOT/target/release/brewmesh")
[ -n "${COMPARE:-}" ] && BINS+=("compared=$COMPARE")
OUT=$ROOT/target/bench/scale-$(date +%Y%m%dT%H%M%S)
mkdir -p "$OUT"

run() { # replicas round label binary
  local r=$1 data; data=$(mktemp -d)
  local BIN=$4 tag="$3-$1-$2"
  "$BIN" up --insecure --no-auth --data-dir "$data" --registry-listen 127.0.0.1:18251 --payment-listen 127.0.0.1:18252 \
    --barista-listen 127.0.0.1:18253 --gateway-listen 127.0.0.1:18280 --barista-replicas "$r" \
    --barista-arg=--espresso-time=250ms --barista-arg=--espresso-machines=2 \
    --barista-arg=--queue-depth=8 --payment-arg=--processing-delay=0s \
    > "$OUT/up-$tag.log" 2>&1 < /dev/null &
  local up=$!
  for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/18280) 2>/dev/null && break; sleep 0.1; done
  # Every replica registered and resolved by the gateway before measuring.
  sleep 3
  "$BIN" load --gateway http://127.0.0.1:18280 --mix espresso --concurrency $((10 * r)) \
    --duration 3s --no-progress > /dev/null
  "$BIN" load --gateway http://127.0.0.1:18280 --mix espresso --concurrency $((10 * r)) \
    --duration "${SECONDS_PER_RUN}s" --no-progress --json "$OUT/load-$tag.json" > "$OUT/load-$tag.txt"
  kill -INT "$up"; wait "$up" || true
  rm -rf "$data"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{sys.argv[3]} {sys.argv[2]} {r['served_per_second']:.2f} {r['errors']} {r['latency_ms']['p99']:.1f}\")" \
    "$OUT/load-$tag.json" "$r" "$3" | tee -a "$OUT/rounds.txt"
}

: > "$OUT/rounds.txt"
for round in $(seq "$ROUNDS"); do
  for r in 1 2 4; do
    for bin in "${BINS[@]}"; do run "$r" "$round" "${bin%%=*}" "${bin#*=}"; done
  done
done
python3 - "$OUT/rounds.txt" <<'PY'
import statistics, sys
by_label = {}
for line in open(sys.argv[1]):
    label, r, rate, errors, p99 = line.split()
    by_label.setdefault(label, {}).setdefault(int(r), []).append((float(rate), int(errors), float(p99)))
for label, rows in by_label.items():
    one = statistics.median(x[0] for x in rows[1])
    print(f"\n{label}:\n")
    print("| barista replicas | served/s (median) | ideal (n × one) | fraction of ideal | p99 ms | refused (full shop, all rounds) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in sorted(rows):
        rate = statistics.median(x[0] for x in rows[r])
        print(f"| {r} | {rate:.1f} | {r * one:.1f} | {rate / (r * one):.2f} | {statistics.median(x[2] for x in rows[r]):.0f} | {sum(x[1] for x in rows[r])} |")
PY
echo "raw output: $OUT"
