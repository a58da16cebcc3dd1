#!/usr/bin/env bash
# What security costs, as a ratio to a mesh without it in one run: two
# meshes side by side, each loaded in turn through its gateway with h2load
# on GET /v1/orders/{id} (the gateway → barista GetOrder over one reused
# connection: the handshakes are amortized, as in a running mesh). MODE
# says what the secured mesh has that the plain one (`up --insecure
# --no-auth`) has not:
#   mtls  mutual TLS between the roles (`up --no-auth`);
#   jwt   the gateway checking each request's bearer JWT (`up --insecure`,
#         h2load sending the customer's token `up` wrote);
#   both  `up` as it runs by default, mTLS and tokens.
# Rounds alternate which mesh goes first; the figures are the medians of the
# per-round ratios of requests/s and of CPU time per request (all of that
# mesh's processes, from /proc/<pid>/stat), secured / plain.
#
# Usage: bench/mtls.sh     env: MODE (mtls), ROUNDS (5), REQUESTS (20000),
#   CONNECTIONS (16), SAME=1 runs both meshes plain (an A/A check of the
#   setup's noise)
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
MODE=${MODE:-mtls}
case "$MODE" in
  mtls) SECURED=(--no-auth) ;;
  jwt) SECURED=(--insecure) ;;
  both) SECURED=() ;;
  *) echo "MODE is mtls, jwt or both" >&2; exit 2 ;;
esac
PLAIN=(--insecure --no-auth)
[ -n "${SAME:-}" ] && SECURED=("${PLAIN[@]}")
OUT=$ROOT/target/bench/$MODE-$(date +%Y%m%dT%H%M%S)
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
start secured 184 "${SECURED[@]}"
start plain 185 "${PLAIN[@]}"
for name in secured plain; do
  for _ in $(seq 300); do [ -s "$SCRATCH/$name.json" ] && break; sleep 0.1; done
  [ -s "$SCRATCH/$name.json" ] || { cat "$OUT/$name.log"; echo "$name did not start" >&2; exit 1; }
done
# The customer's token where `up` wrote one (a mesh with --no-auth has none).
bearer() { # mesh name → its Authorization header, or a harmless one
  local file="$SCRATCH/$1/auth/customer.jwt"
  if [ -s "$file" ]; then echo "authorization: Bearer $(cat "$file")"; else echo "x-no-token: 1"; fi
}
HEADER_secured=$(bearer secured)
HEADER_plain=$(bearer plain)
order() { # mesh name, gateway port → an order id
  local header="HEADER_$1"
  curl -s "127.0.0.1:$2/v1/orders" -H "${!header}" \
    --json '{"idempotencyKey":"bench-1","itemId":"latte","customerName":"Ada","cardToken":"tok_visa"}' |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["orderId"])'
}
URL_secured="http://127.0.0.1:18480/v1/orders/$(order secured 18480)"
URL_plain="http://127.0.0.1:18580/v1/orders/$(order plain 18580)"
ROLES_secured=$(pgrep -P "${PIDS[0]}" | tr '\n' ' ')
ROLES_plain=$(pgrep -P "${PIDS[1]}" | tr '\n' ' ')
cpu() { # pids → CPU ticks (user + system)
  local total=0
  for p in "$@"; do total=$((total + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
  echo "$total"
}
rate() { # mesh name → "requests/s CPU-µs-per-request"
  local roles="ROLES_$1" url="URL_$1" header="HEADER_$1" before after rps
  before=$(cpu ${!roles})
  rps=$(h2load -n "$REQUESTS" -c "$CONNECTIONS" -m 1 -H "${!header}" "${!url}" | tee -a "$OUT/h2load.txt" |
    awk '/^finished in/ {gsub(",", "", $4); print $4}')
  after=$(cpu ${!roles})
  echo "$rps $(( (after - before) * 1000000 / $(getconf CLK_TCK) / REQUESTS ))"
}
rate secured > /dev/null   # warm-up: connections, caches
rate plain > /dev/null
: > "$OUT/rounds.txt"
for round in $(seq "$ROUNDS"); do
  if [ $((round % 2)) -eq 1 ]; then m=$(rate secured); p=$(rate plain)
  else p=$(rate plain); m=$(rate secured); fi
  echo "$round $m $p" | tee -a "$OUT/rounds.txt"
done
python3 - "$OUT/rounds.txt" "$MODE" <<'PY'
import statistics, sys
rows = [[float(x) for x in line.split()] for line in open(sys.argv[1]) if line.strip()]
rates = [m / p for _, m, _, p, _ in rows]
cpus = [mc / pc for _, _, mc, _, pc in rows]
mode = sys.argv[2]
print(f"\n| round | {mode} req/s | plain req/s | ratio | {mode} CPU µs/req | plain CPU µs/req | ratio |")
print("|---:|---:|---:|---:|---:|---:|---:|")
for (n, m, mc, p, pc), r, c in zip(rows, rates, cpus):
    print(f"| {n:.0f} | {m:,.0f} | {p:,.0f} | {r:.3f} | {mc:.0f} | {pc:.0f} | {c:.3f} |")
print(f"\nmedian, {mode} / plain: requests/s {statistics.median(rates):.3f}, "
      f"CPU per request {statistics.median(cpus):.3f}")
PY
echo "raw output: $OUT"
