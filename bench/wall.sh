#!/usr/bin/env bash
# The seed talk's memory wall, side by side: its Go coffee shop and the
# brewmesh mesh, each as one pod — a memory cgroup (cgroups v1
# memory.limit_in_bytes, swap included) — under the talk's limits with the
# talk's customer counts: a 10 MiB pod with 3,000 customers, then a 3 GiB
# pod with 3,000,000. 2-second steps, every customer at once, as the talk
# serves them; brewmesh in batches of BATCH (the seed's /serve-customer/N
# is one request for N customers), patient: a customer the barista sends
# away as full (its --max-orders, sized from the pod's memory) comes back
# when it says. The customers (curl, `brewmesh load`) are outside the pod. Printed per run: what happened (served, failed, OOM
# kills, restarts), the time, and the pod's peak memory.
#
# Usage: bench/wall.sh     env: RUNS ("10M:3000 3G:3000000"; LIMIT:N pairs;
#   brewmesh needs about 50 s per 30,000 customers here, so 3,000,000 takes
#   over an hour; a customer waits up to two hours), WHO ("seed brewmesh"), BATCH (1000),
#   GWPEER_DIR (where ../shared/peers/build.sh builds the seed; default
#   target/gwpeer)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
RUNS=${RUNS:-10M:3000 3G:3000000}
WHO=${WHO:-seed brewmesh}
BATCH=${BATCH:-1000}
export GWPEER_DIR=${GWPEER_DIR:-$ROOT/target/gwpeer}
mkdir -p "$GWPEER_DIR"
[ -x "$GWPEER_DIR/bin/coffee-seed" ] || bash ../shared/peers/build.sh build
cargo build --release --locked -p brewmesh-cli
BIN=$ROOT/target/release/brewmesh
OUT=$ROOT/target/bench/wall-$(date +%Y%m%dT%H%M%S)
mkdir -p "$OUT"
CG=/sys/fs/cgroup/memory/brewmesh-wall
UP=""
cleanup() {
  [ -n "$UP" ] && { kill -INT "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; }
  pkill -f "$GWPEER_DIR/bin/coffee-seed" 2>/dev/null || true
  sleep 1
  [ -d "$CG" ] && rmdir "$CG" 2>/dev/null || true
}
trap cleanup EXIT

pod() { # limit: a fresh memory cgroup with it, swap included
  cleanup
  mkdir -p "$CG"
  echo "$1" > "$CG/memory.limit_in_bytes"
  [ -e "$CG/memory.memsw.limit_in_bytes" ] && echo "$1" > "$CG/memory.memsw.limit_in_bytes" || true
  echo 0 > "$CG/memory.max_usage_in_bytes"
}

report() { # who limit n outcome seconds
  local kills peak
  kills=$(awk '/oom_kill /{print $2}' "$CG/memory.oom_control" 2>/dev/null || echo 0)
  peak=$(( $(cat "$CG/memory.max_usage_in_bytes") / 1048576 ))
  printf '%-9s %5s pod, %9s customers: %s in %ss; OOM kills %s, peak %s MiB\n' \
    "$1" "$2" "$3" "$4" "$5" "${kills:-0}" "$peak" | tee -a "$OUT/wall.txt"
}

seed() { # limit n
  pod "$1"
  local log=$OUT/seed-$1-$2.log start end
  ( echo "$BASHPID" > "$CG/cgroup.procs"
    COFFEE_DELAY=2s COFFEE_ADDR=127.0.0.1:8082 COFFEE_EXIT_AFTER=1 exec "$GWPEER_DIR/bin/coffee-seed" ) > "$log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/8082) 2>/dev/null && break; sleep 0.1; done
  start=$(date +%s.%N)
  local code
  code=$(curl -s -m 7200 -o /dev/null -w '%{http_code}' "127.0.0.1:8082/serve-customer/$2" || true)
  end=$(date +%s.%N)
  wait "$pid" 2>/dev/null && status=0 || status=$?
  local outcome="HTTP $code, exit $status"
  [ "$status" = 137 ] && outcome="killed (SIGKILL) mid-run, HTTP $code"
  grep -q Took "$log" && outcome="$outcome, $(grep -m1 Took "$log")"
  report seed "$1" "$2" "$outcome" "$(printf '%.1f' "$(echo "$end - $start" | bc -l)")"
}

brewmesh() { # limit n
  pod "$1"
  local data; data=$(mktemp -d)
  local tag=$1-$2 start end
  ( echo "$BASHPID" > "$CG/cgroup.procs"
    exec "$BIN" up --insecure --no-auth --data-dir "$data" --ready-file "$data/ready.json" \
      --registry-listen 127.0.0.1:18551 --payment-listen 127.0.0.1:18552 \
      --barista-listen 127.0.0.1:18553 --gateway-listen 127.0.0.1:18580 \
      --barista-arg=--espresso-machines=65535 --barista-arg=--steam-wands=65535 \
      --barista-arg=--queue-depth=65535 --barista-arg=--order-lease=60s ) \
    > "$OUT/up-$tag.log" 2>&1 < /dev/null &
  UP=$!
  for _ in $(seq 300); do
    [ -s "$data/ready.json" ] && break
    kill -0 "$UP" 2>/dev/null || break
    sleep 0.1
  done
  start=$(date +%s.%N)
  local outcome
  if [ -s "$data/ready.json" ]; then
    timeout 9000 "$BIN" load --grpc 127.0.0.1:18553 --customers "$2" --concurrency "$2" --batch "$BATCH" \
      --mix latte --patient --timeout 7200s --no-progress --json "$OUT/load-$tag.json" > "$OUT/load-$tag.txt" 2>&1 || true
    if [ -s "$OUT/load-$tag.json" ]; then
      outcome=$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print("served %d, failed %d, errors %d" % (r["served"], r["failed"], r["errors"]))' "$OUT/load-$tag.json")
      outcome="$outcome ($(grep -m1 -E '^ +error ' "$OUT/load-$tag.txt" | sed 's/^ *//' || true))"
    else
      outcome="no report: $(tail -1 "$OUT/load-$tag.txt")"
    fi
  else
    outcome="never served: the mesh did not start in the pod"
  fi
  end=$(date +%s.%N)
  local restarts; restarts=$(grep -c 'exited unexpectedly' "$OUT/up-$tag.log" || true)
  outcome="$outcome, child restarts $restarts"
  report brewmesh "$1" "$2" "$outcome" "$(printf '%.1f' "$(echo "$end - $start" | bc -l)")"
  kill -INT "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; UP=""
  rm -rf "$data"
}

: > "$OUT/wall.txt"
for run in $RUNS; do
  for who in $WHO; do "$who" "${run%%:*}" "${run#*:}"; done
done
echo "raw output: $OUT"
