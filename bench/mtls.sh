#!/usr/bin/env bash
# What mutual TLS between the roles costs, as a ratio to plaintext in one
# run: two meshes side by side, `up` (mTLS, its default) and `up --insecure`,
# each loaded in turn through its gateway with h2load on GET
# /v1/orders/{id} (the gateway → barista GetOrder over one reused
# connection: the handshakes are amortized, as in a running mesh). Rounds
# alternate which mesh goes first; the figures are the medians of the
# per-round ratios of requests/s and of CPU time per request (all of that
# mesh's processes, from /proc/<pid>/stat), mTLS / plaintext.
#
# Usage: bench/mtls.sh     env: ROUNDS (5), REQUESTS (20000), CONNECTIONS (16),
#   SAME=1 runs both meshes plaintext (an A/A check of the setup's noise)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-5}
REQUESTS=${REQUESTS:-20000}
CONNECTIONS=${CONNECTIONS:-16}
command -v h2load >/dev/null || {
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nghttp2-client
}
cargo build --release --locked -p brewmesh-cli
BIN=$ROOT/target/release/brewmesh
OUT=$ROOT/target/bench/mtls-$(date +%Y%m%dT%H%M%S)
mkdir -p "$OUT"
SCRATCH=$(mktemp -d)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -INT "$p" 2>/dev/null; done; wait; rm -rf "$SCRATCH"' EXIT

start() { # name, port base, extra flags → a mesh with its gateway on <base>80
  local name=$1 base=$2; shift 2
  "$BIN" up "$@" --data-dir "$SCRATCH/$name" --registry-listen "127.0.0.1:${base}51" \
    --payment-listen "127.0.0.1:${base}52" --barista-listen "127.0.0.1:${base}53" \
    --gateway-listen "127.0.0.1:${base}80" --ready-file "$SCRATCH/$name.json" \
    --barista-arg=--espresso-time=1ms --barista-arg=--milk-time=1ms \
    --payment-arg=--processing-delay=0s > "$OUT/$name.log" 2>&1 < /dev/null &
  PIDS+=($!)
}
start mtls 184 ${SAME:+--insecure}
start plaintext 185 --insecure
for name in mtls plaintext; do
  for _ in $(seq 300); do [ -s "$SCRATCH/$name.json" ] && break; sleep 0.1; done
  [ -s "$SCRATCH/$name.json" ] || { cat "$OUT/$name.log"; echo "$name did not start" >&2; exit 1; }
done
order() { # gateway port → an order id
  curl -s "127.0.0.1:$1/v1/orders" \
    --json '{"idempotencyKey":"bench-1","itemId":"latte","customerName":"Ada","cardToken":"tok_visa"}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["orderId"])'
}
MTLS_URL="http://127.0.0.1:18480/v1/orders/$(order 18480)"
PLAIN_URL="http://127.0.0.1:18580/v1/orders/$(order 18580)"
ROLES_mtls=$(pgrep -P "${PIDS[0]}" | tr '\n' ' ')
ROLES_plaintext=$(pgrep -P "${PIDS[1]}" | tr '\n' ' ')
cpu() { # pids → CPU ticks (user + system)
  local total=0
  for p in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$total"
}
rate() { # mesh name, url → "requests/s CPU-µs-per-request"
  local roles="ROLES_$1" before after rps
  before=$(cpu ${!roles})
  rps=$(h2load -n "$REQUESTS" -c "$CONNECTIONS" -m 1 "$2" | tee -a "$OUT/h2load.txt" |
    awk '/^finished in/ {gsub(",", "", $4); print $4}')
  after=$(cpu ${!roles})
  echo "$rps $(( (after - before) * 1000000 / $(getconf CLK_TCK) / REQUESTS ))"
}
rate mtls "$MTLS_URL" > /dev/null   # warm-up: connections, caches
rate plaintext "$PLAIN_URL" > /dev/null
: > "$OUT/rounds.txt"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then m=$(rate mtls "$MTLS_URL"); p=$(rate plaintext "$PLAIN_URL")
  else p=$(rate plaintext "$PLAIN_URL"); m=$(rate mtls "$MTLS_URL"); fi
  echo "$round $m $p" | tee -a "$OUT/rounds.txt"
done
python3 - "$OUT/rounds.txt" <<'PY'
import statistics, sys
rows = [[float(x) for x in line.split()] for line in open(sys.argv[1]) if line.strip()]
rates = [m / p for _, m, _, p, _ in rows]
cpus = [mc / pc for _, _, mc, _, pc in rows]
print("\n| round | mTLS req/s | plaintext req/s | ratio | mTLS CPU µs/req | plaintext CPU µs/req | ratio |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for (n, m, mc, p, pc), r, c in zip(rows, rates, cpus):
    print(f"| {n:.0f} | {m:,.0f} | {p:,.0f} | {r:.3f} | {mc:.0f} | {pc:.0f} | {c:.3f} |")
print(f"\nmedian, mTLS / plaintext: requests/s {statistics.median(rates):.3f}, "
      f"CPU per request {statistics.median(cpus):.3f}")
PY
echo "raw output: $OUT"
