#!/usr/bin/env bash
# The seed talk's demo, brewmesh's way: serve N customers with 2-second
# steps (payment 2 s, espresso 2 s, milk 2 s) through the whole mesh, and
# report the time and the peak memory of all brewmesh processes together.
#
# The mesh is `brewmesh up` (release build, SQLite, one replica each) with
# stations wide enough for every customer at once, as the seed's goroutines
# are; `brewmesh load` drives it straight over gRPC (HTTP/2, one connection)
# or, with VIA=gateway, through the gateway. Customers are served when their
# drink is READY: authorize and brew side by side (2 s); the capture settles
# after READY, off the customer's time.
#
# Each N runs twice: customers one by one (PlaceOrder, WatchOrder each), and
# in groups of BATCH (one BatchPlaceOrders and one WatchOrders per group,
# as the seed's /serve-customer/N serves N in one request).
#
# Usage: bench/seed.sh [N ...]          (default: 30000)
#   env: CONCURRENCY (default: N, all customers at once), VIA (grpc|gateway),
#        BATCH (1000), SHAPES (the batch sizes to run, default "1 $BATCH")
# The seed's own figures: ../shared/peers/build.sh seed N (GWPEER_DIR=…).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VIA=${VIA:-grpc}
[ $# -eq 0 ] && set -- 30000
BATCH=${BATCH:-1000}
SHAPES=${SHAPES:-1 $BATCH}
cargo build --release --locked -p brewmesh-cli
BIN=$ROOT/target/release/brewmesh
OUT=$ROOT/target/bench/seed-$(date +%Y%m%dT%H%M%S)
mkdir -p "$OUT"

for N in "$@"; do
for B in $SHAPES; do
  C=${CONCURRENCY:-$N}
  TAG=$N-batch$B
  DATA=$(mktemp -d)
  # Ports of their own, so a mesh already running on the defaults is left alone.
  "$BIN" up --insecure --no-auth --data-dir "$DATA" --ready-file "$DATA/ready.json" \
    --registry-listen 127.0.0.1:18051 --payment-listen 127.0.0.1:18052 \
    --barista-listen 127.0.0.1:18053 --gateway-listen 127.0.0.1:18080 \
    --barista-arg=--espresso-machines=65535 --barista-arg=--steam-wands=65535 \
    --barista-arg=--queue-depth=65535 --barista-arg=--order-lease=60s \
    --gateway-arg=--timeout=600s \
    > "$OUT/up-$TAG.log" 2>&1 < /dev/null &
  UP=$!
  for _ in $(seq 300); do
    [ -s "$DATA/ready.json" ] && break
    sleep 0.1
  done

  # Peak RSS of `up` and every role, summed, sampled every 200 ms.
  ( peak=0
    while kill -0 "$UP" 2>/dev/null; do
      pids="$UP $(pgrep -P "$UP" | tr '\n' ' ')"
      total=0
      for p in $pids; do
        rss=$(awk '/VmRSS/{print $2}' "/proc/$p/status" 2>/dev/null || echo 0)
        total=$((total + ${rss:-0}))
      done
      [ "$total" -gt "$peak" ] && peak=$total && echo "$peak" > "$OUT/peak-$TAG.kb"
      sleep 0.2
    done ) &
  WATCH=$!

  if [ "$VIA" = gateway ]; then
    target=(--gateway http://127.0.0.1:18080)
  else
    target=(--grpc 127.0.0.1:18053)
  fi
  /usr/bin/time -v -o "$OUT/load-$TAG.time" "$BIN" load "${target[@]}" \
    --customers "$N" --concurrency "$C" --batch "$B" --mix latte --timeout 3600s --no-progress \
    --json "$OUT/load-$TAG.json" --chart "$OUT/load-$TAG.svg" | tee "$OUT/load-$TAG.txt"

  kill -INT "$UP"; wait "$UP" || true
  kill "$WATCH" 2>/dev/null || true; wait "$WATCH" 2>/dev/null || true
  rm -rf "$DATA"
  echo "---- N=$N via $VIA, concurrency $C, batches of $B"
  echo "peak RSS of the mesh (up + registry + payment + barista + gateway): $(( $(cat "$OUT/peak-$TAG.kb") / 1024 )) MiB"
  grep -E 'Maximum resident' "$OUT/load-$TAG.time" | sed 's/^\s*/load generator: /'
done
done
echo "raw output: $OUT"
