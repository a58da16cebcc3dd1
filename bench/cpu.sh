#!/usr/bin/env bash
# CPU time per order through the whole mesh (gateway → barista → payment,
# saga and all, until the drink is ready) against CPU time per direct unary
# gRPC call (GetMenu straight to the barista), measured in the same run from
# the processes' own counters (/proc/<pid>/stat utime + stime).
#
# Beside them, the same orders in groups of BATCH (one BatchPlaceOrders and
# one WatchOrders per group, `load --batch`).
#
# Usage: bench/cpu.sh     env: ORDERS (3000), CALLS (30000), BATCH (100; 1
#        skips the batched run), BIN (a brewmesh binary to measure instead
#        of building this checkout's)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ORDERS=${ORDERS:-3000}
CALLS=${CALLS:-30000}
BATCH=${BATCH:-100}
command -v h2load >/dev/null || {
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nghttp2-client
}
if [ -z "${BIN:-}" ]; then
  cargo build --release --locked -p brewmesh-cli
  BIN=$ROOT/target/release/brewmesh
fi
OUT=$ROOT/target/bench/cpu-$(date +%Y%m%dT%H%M%S)
mkdir -p "$OUT"
DATA=$(mktemp -d)
"$BIN" up --insecure --no-auth --data-dir "$DATA" --registry-listen 127.0.0.1:18351 --payment-listen 127.0.0.1:18352 \
  --barista-listen 127.0.0.1:18353 --gateway-listen 127.0.0.1:18380 \
  --barista-arg=--espresso-time=1ms --barista-arg=--milk-time=1ms \
  --barista-arg=--espresso-machines=64 --barista-arg=--steam-wands=64 --barista-arg=--queue-depth=4096 \
  --payment-arg=--processing-delay=0s > "$OUT/up.log" 2>&1 < /dev/null &
UP=$!
trap 'kill -INT $UP 2>/dev/null; wait $UP 2>/dev/null; rm -rf "$DATA"' EXIT
for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/18380) 2>/dev/null && break; sleep 0.1; done
sleep 2
TICK=$(getconf CLK_TCK)
cpu() { # pids → CPU seconds (user + system)
  local total=0
  for p in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$total"
}
ROLES=$(pgrep -P "$UP" | tr '\n' ' ')
BARISTA=""
for p in $ROLES; do
  if tr '\0' ' ' < "/proc/$p/cmdline" | grep -q ' barista '; then BARISTA=$p; fi
done

# Warm-up, then the orders.
"$BIN" load --gateway http://127.0.0.1:18380 --customers 300 --concurrency 32 --no-progress > /dev/null
before=$(cpu $ROLES)
"$BIN" load --gateway http://127.0.0.1:18380 --customers "$ORDERS" --concurrency 32 --no-progress | tee "$OUT/orders.txt"
sleep 1   # the last sagas' captures
after=$(cpu $ROLES)
per_order=$(echo "($after - $before) / $TICK / $ORDERS * 1000" | bc -l)

if [ "$BATCH" -gt 1 ]; then
  before=$(cpu $ROLES)
  "$BIN" load --gateway http://127.0.0.1:18380 --customers "$ORDERS" --concurrency $((BATCH * 4)) \
    --batch "$BATCH" --no-progress | tee "$OUT/batched.txt"
  sleep 1
  after=$(cpu $ROLES)
  per_batched=$(echo "($after - $before) / $TICK / $ORDERS * 1000" | bc -l)
fi

# GetMenu, straight to the barista: an empty request in one gRPC frame.
printf '\x00\x00\x00\x00\x00' > "$OUT/empty.bin"
h2load -n 2000 -c 16 -m 1 -d "$OUT/empty.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
  http://127.0.0.1:18353/brewmesh.barista.v1.Barista/GetMenu > /dev/null
before=$(cpu $BARISTA)
h2load -n "$CALLS" -c 16 -m 1 -d "$OUT/empty.bin" -H 'content-type: application/grpc' -H 'te: trailers' \
  http://127.0.0.1:18353/brewmesh.barista.v1.Barista/GetMenu | tee "$OUT/unary.txt" | grep -E 'requests:|finished in'
after=$(cpu $BARISTA)
per_call=$(echo "($after - $before) / $TICK / $CALLS * 1000" | bc -l)

printf '\n| path | CPU per request (ms, all mesh processes) |\n|---|---:|\n'
printf '| one order through the mesh (REST, to READY) | %.3f |\n' "$per_order"
[ "$BATCH" -gt 1 ] && printf '| one order in batches of %d (REST, to READY) | %.3f |\n' "$BATCH" "$per_batched"
printf '| one direct unary call (GetMenu, barista) | %.4f |\n' "$per_call"
printf '\nratio: %.0f×\n' "$(echo "$per_order / $per_call" | bc -l)"
[ "$BATCH" -gt 1 ] && printf 'batched ratio: %.0f×\n' "$(echo "$per_batched / $per_call" | bc -l)"
echo "raw output: $OUT"
