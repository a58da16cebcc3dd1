#!/usr/bin/env bash
# Scale-out as the seed talk ends it: every replica a pod, in a cgroup of
# its own with a pod's CPU quota and memory limit, so that adding a replica
# adds capacity the way adding a pod does on a cluster.
#
# Two scenarios, each with 1, 2 and 4 replicas of the role that runs out:
#   barista:  payment ×2, espresso ×2, milk ×2 (wide, quick stations: 64
#             machines, 1 ms parts); baristas 1 → 2 → 4, 32 customers
#             per barista. The barista's CPU is what runs out.
#   espresso: payment ×2, milk ×2 (wide, quick), baristas ×4; espresso
#             stations 1 → 2 → 4, each 2 machines pulling in 100 ms (20
#             parts a second), 8 customers per replica. The espresso
#             machines are what runs out.
# Every registry, payment, barista and station process gets QUOTA of a core
# (cpu.cfs_quota_us) and MEMORY bytes (memory.limit_in_bytes); the gateway
# and the load generator are not capped (they are the cluster's ingress and
# its customers). The CPU time of each role per order (from /proc) names
# the bottleneck: the role near QUOTA × replicas is it.
#
# STORE=postgres runs the replicas on one PostgreSQL (scripts/postgres.sh
# starts a throwaway one), STORE=sqlite on the shared SQLite files.
#
# Usage: bench/split.sh     env: STORE (postgres), SCENARIOS ("barista espresso"),
#   QUOTA (0.1: a 2-core machine runs 4 capped baristas and the rest), MEMORY (256M),
#   SECONDS_PER_RUN (20), ROUNDS (1), STEPS (the replica counts, "1 2 4")
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STORE=${STORE:-postgres}
if [ "$STORE" = postgres ] && [ -z "${BREWMESH_TEST_POSTGRES_URL:-}" ]; then
  exec bash scripts/postgres.sh "$0" "$@"
fi
SCENARIOS=${SCENARIOS:-barista espresso}
QUOTA=${QUOTA:-0.1}
MEMORY=${MEMORY:-256M}
SECONDS_PER_RUN=${SECONDS_PER_RUN:-20}
ROUNDS=${ROUNDS:-1}
STEPS=${STEPS:-1 2 4}
cargo build --release --locked -p brewmesh-cli
BIN=$ROOT/target/release/brewmesh
OUT=$ROOT/target/bench/split-$STORE-$(date +%Y%m%dT%H%M%S)
mkdir -p "$OUT"
CPU_CG=/sys/fs/cgroup/cpu/brewmesh-split
MEM_CG=/sys/fs/cgroup/memory/brewmesh-split
TICK=$(getconf CLK_TCK)

UP=""
cleanup_cgroups() {
  if [ -n "$UP" ]; then kill -INT "$UP" 2>/dev/null || true; wait "$UP" 2>/dev/null || true; fi
  for g in "$CPU_CG" "$MEM_CG"; do
    [ -d "$g" ] || continue
    for d in "$g"/*/; do [ -d "$d" ] && rmdir "$d" 2>/dev/null || true; done
    rmdir "$g" 2>/dev/null || true
  done
}
trap cleanup_cgroups EXIT

pod() { # label pid: a cgroup of its own with the pod's limits
  local cpu=$CPU_CG/$1 mem=$MEM_CG/$1
  mkdir -p "$cpu" "$mem"
  echo 100000 > "$cpu/cpu.cfs_period_us"
  echo "$QUOTA * 100000 / 1" | bc > "$cpu/cpu.cfs_quota_us"
  echo "$MEMORY" > "$mem/memory.limit_in_bytes"
  echo "$2" > "$cpu/cgroup.procs"
  echo "$2" > "$mem/cgroup.procs"
}

database() { # name → a flag for it, on PostgreSQL (a fresh database each run)
  [ "$STORE" = postgres ] || return 0
  psql -q "$BREWMESH_TEST_POSTGRES_URL/postgres" -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1" >/dev/null
  echo "--database-url=$BREWMESH_TEST_POSTGRES_URL/$1"
}

run() { # scenario replicas round
  local scenario=$1 n=$2 tag="$1-$2-$3" data; data=$(mktemp -d)
  local baristas=2 espressos=2 concurrency
  local wide=(--machines=64 --queue-depth=4096 --brew-time=1ms) espresso=()
  case $scenario in
    barista) baristas=$n; espresso=("${wide[@]}"); concurrency=$((32 * n)) ;;
    espresso) espressos=$n; baristas=4; espresso=(--machines=2 --queue-depth=64 --brew-time=100ms); concurrency=$((8 * n)) ;;
  esac
  local flags=()
  for f in "${wide[@]}"; do flags+=("--milk-arg=$f"); done
  for f in "${espresso[@]}"; do flags+=("--espresso-arg=$f"); done
  local payment_db barista_db
  payment_db=$(database payment_split)
  barista_db=$(database barista_split)
  "$BIN" up --insecure --no-auth --data-dir "$data" \
    --registry-listen 127.0.0.1:18451 --payment-listen 127.0.0.1:18452 \
    --barista-listen 127.0.0.1:18453 --gateway-listen 127.0.0.1:18480 \
    --payment-replicas 2 --barista-replicas "$baristas" \
    --espresso-replicas "$espressos" --milk-replicas 2 "${flags[@]}" \
    --barista-arg=--queue-depth=4096 --barista-arg=--order-lease=30s \
    --payment-arg=--processing-delay=0s ${payment_db:+--payment-arg=$payment_db} ${barista_db:+--barista-arg=$barista_db} \
    > "$OUT/up-$tag.log" 2>&1 < /dev/null &
  local up=$!
  UP=$up
  for _ in $(seq 600); do (exec 3<>/dev/tcp/127.0.0.1/18480) 2>/dev/null && break; sleep 0.1; done
  sleep 3
  declare -A pids=()
  for f in "$data"/ready/*.json; do
    local label; label=$(basename "$f" .json)
    pids[$label]=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["pid"])' "$f")
    if [ "$label" != gateway ]; then pod "$label" "${pids[$label]}"; fi
  done
  "$BIN" load --gateway http://127.0.0.1:18480 --mix espresso --concurrency "$concurrency" \
    --duration 3s --no-progress > /dev/null
  local before=() after=()
  cpu_of_role() { # role prefix → CPU ticks of its processes
    local total=0
    for label in "${!pids[@]}"; do
      case $label in "$1"*) total=$((total + $(awk '{print $14 + $15}' "/proc/${pids[$label]}/stat"))) ;; esac
    done
    echo "$total"
  }
  local roles=(registry payment barista espresso milk gateway)
  for r in "${roles[@]}"; do before+=("$(cpu_of_role "$r")"); done
  "$BIN" load --gateway http://127.0.0.1:18480 --mix espresso --concurrency "$concurrency" \
    --duration "${SECONDS_PER_RUN}s" --no-progress --json "$OUT/load-$tag.json" > "$OUT/load-$tag.txt"
  for r in "${roles[@]}"; do after+=("$(cpu_of_role "$r")"); done
  local served
  served=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["served"])' "$OUT/load-$tag.json")
  local cpu=""
  for i in "${!roles[@]}"; do
    cpu+=" ${roles[$i]}=$(echo "(${after[$i]} - ${before[$i]}) / $TICK" | bc -l)"
  done
  kill -INT "$up"; wait "$up" || true
  rm -rf "$data"
  python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(f\"{sys.argv[2]} {sys.argv[3]} {r['served_per_second']:.2f} {r['errors']} {r['latency_ms']['p99']:.1f} {sys.argv[4]}{sys.argv[5]}\")" \
    "$OUT/load-$tag.json" "$scenario" "$n" "$served" "$cpu" | tee -a "$OUT/rounds.txt"
}

: > "$OUT/rounds.txt"
for round in $(seq "$ROUNDS"); do
  for scenario in $SCENARIOS; do
    for n in $STEPS; do run "$scenario" "$n" "$round"; done
  done
done
python3 - "$OUT/rounds.txt" "$QUOTA" "$SECONDS_PER_RUN" "$STORE" "$MEMORY" <<'PY'
import statistics, sys
path, quota, seconds, store, memory = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4], sys.argv[5]
rows = {}
for line in open(path):
    scenario, n, rate, errors, p99, served, *cpu = line.split()
    cpu = {k: float(v) for k, v in (c.split("=") for c in cpu)}
    rows.setdefault(scenario, {}).setdefault(int(n), []).append((float(rate), int(errors), float(p99), int(served), cpu))
print(f"\n{store}, every replica but the gateway capped at {quota} core and {memory}:")
for scenario, by_n in rows.items():
    base = min(by_n)
    one = statistics.median(r[0] for r in by_n[base]) / base
    print(f"\n{scenario} replicas scaled:\n")
    print("| replicas | orders/s | n × one | fraction | p99 ms | errors | CPU ms per order: registry / payment / barista / espresso / milk / gateway | busiest role's share of its CPU quota | espresso machines busy |")
    print("|---:|---:|---:|---:|---:|---:|---|---|---:|")
    for n in sorted(by_n):
        rs = by_n[n]
        rate = statistics.median(r[0] for r in rs)
        served = sum(r[3] for r in rs)
        cpu = {k: sum(r[4][k] for r in rs) for k in rs[0][4]}
        per = " / ".join(f"{1000 * cpu[k] / max(served, 1):.2f}" for k in ["registry", "payment", "barista", "espresso", "milk", "gateway"])
        counts = {"barista": n if scenario == "barista" else 4, "payment": 2, "espresso": n if scenario == "espresso" else 2, "milk": 2}
        share = {k: cpu[k] / (quota * counts[k] * seconds * len(rs)) for k in counts}
        busiest = max(share, key=share.get)
        # Each espresso takes one part on one machine; an espresso replica
        # has 2 machines of 100 ms in that scenario.
        machines = f"{rate * 0.1 / (2 * n):.2f}" if scenario == "espresso" else "—"
        print(f"| {n} | {rate:.1f} | {n * one:.1f} | {rate / (n * one):.2f} | {statistics.median(r[2] for r in rs):.0f} | {sum(r[1] for r in rs)} | {per} | {busiest} {share[busiest]:.2f} | {machines} |")
PY
echo "raw output: $OUT"
