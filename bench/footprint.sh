#!/usr/bin/env bash
# Memory and start-up of each brewmesh process: time from exec to its
# "serving" line (health SERVING, listener bound) — fresh data directory,
# migrations included — and RSS idle and under load.
#
# Usage: bench/footprint.sh     env: STARTS (5), LOAD_SECONDS (20), CONCURRENCY (64)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STARTS=${STARTS:-5}
LOAD_SECONDS=${LOAD_SECONDS:-20}
CONCURRENCY=${CONCURRENCY:-64}
cargo build --release --locked -p brewmesh-cli
BIN=$ROOT/target/release/brewmesh
OUT=$ROOT/target/bench/footprint-$(date +%Y%m%dT%H%M%S)
mkdir -p "$OUT"
export BREWMESH_REGISTRY_TOKEN=footprint

# Start-up: each role alone, STARTS times; median of exec → "serving".
start_ms() { # role args...
  local data; data=$(mktemp -d)
  local t0 t1
  t0=$(date +%s%N)
  coproc ROLE { exec "$BIN" --log-format json "$@" --listen 127.0.0.1:0 2>&1; }
  while IFS= read -r line <&"${ROLE[0]}"; do
    case "$line" in *'"message":"serving"'*) break ;; esac
  done
  t1=$(date +%s%N)
  kill "$ROLE_PID" 2>/dev/null || true; wait "$ROLE_PID" 2>/dev/null || true
  rm -rf "$data"
  echo $(( (t1 - t0) / 1000 ))
}
echo "| role | start → SERVING, median of $STARTS (ms) |"
echo "|---|---:|"
for role in registry payment barista gateway; do
  samples=()
  for _ in $(seq "$STARTS"); do
    data=$(mktemp -d)
    case $role in
      payment|barista) us=$(start_ms "$role" --data-dir "$data") ;;
      gateway) us=$(start_ms gateway --backend "brewmesh.barista.v1.Barista=127.0.0.1:1") ;;
      *) us=$(start_ms "$role") ;;
    esac
    rm -rf "$data"
    samples+=("$us")
  done
  median=$(printf '%s\n' "${samples[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '| %s | %.1f |\n' "$role" "$(echo "$median / 1000" | bc -l)"
done | tee "$OUT/startup.md"

# RSS: the mesh from `brewmesh up`, idle, then under LOAD_SECONDS of load.
DATA=$(mktemp -d)
"$BIN" up --insecure --no-auth --data-dir "$DATA" --registry-listen 127.0.0.1:18151 --payment-listen 127.0.0.1:18152 \
  --barista-listen 127.0.0.1:18153 --gateway-listen 127.0.0.1:18180 \
  --barista-arg=--espresso-time=50ms --barista-arg=--milk-time=50ms \
  --barista-arg=--espresso-machines=64 --barista-arg=--steam-wands=64 --barista-arg=--queue-depth=1024 \
  --payment-arg=--processing-delay=10ms > "$OUT/up.log" 2>&1 < /dev/null &
UP=$!
for _ in $(seq 300); do (exec 3<>/dev/tcp/127.0.0.1/18180) 2>/dev/null && break; sleep 0.1; done
sleep 2
rss_of() { awk '/VmRSS/{print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }
declare -A PID IDLE PEAK
for p in $(pgrep -P "$UP"); do
  role=$(tr '\0' ' ' < "/proc/$p/cmdline" | awk '{for (i=1;i<=NF;i++) if ($i ~ /^(registry|payment|barista|gateway)$/) {print $i; exit}}')
  PID[$role]=$p; IDLE[$role]=$(rss_of "$p"); PEAK[$role]=${IDLE[$role]}
done
"$BIN" load --gateway http://127.0.0.1:18180 --duration "${LOAD_SECONDS}s" --concurrency "$CONCURRENCY" \
  --no-progress > "$OUT/load.txt" &
LOAD=$!
while kill -0 "$LOAD" 2>/dev/null; do
  for role in "${!PID[@]}"; do
    r=$(rss_of "${PID[$role]}"); [ "${r:-0}" -gt "${PEAK[$role]}" ] && PEAK[$role]=$r
  done
  sleep 0.2
done
kill -INT "$UP"; wait "$UP" || true
rm -rf "$DATA"
cat "$OUT/load.txt"
{
  echo "| process | RSS idle (MiB) | RSS peak under load (MiB) |"
  echo "|---|---:|---:|"
  for role in registry payment barista gateway; do
    printf '| %s | %.1f | %.1f |\n' "$role" "$(echo "${IDLE[$role]} / 1024" | bc -l)" "$(echo "${PEAK[$role]} / 1024" | bc -l)"
  done
} | tee "$OUT/rss.md"
echo "raw output: $OUT"
