#!/usr/bin/env bash
# schemathesis (PyPI, installed here if missing) against a real mesh: every
# check, at least 50 examples per operation, all phases, the gateway's own
# /openapi.json. Fails on any failure, error or warning schemathesis reports.
#
# The mesh is `brewmesh up` on free ports in a scratch directory, mutual
# TLS and tokens on as by default, with the staff's token (`up` writes it)
# as the bearer token, a short stream deadline (so each watch ends by
# itself) and a 20 ms card network instead of the seed's 2 s (the drinks
# still take their seconds, so a fresh order can be cancelled).
# Settings and hooks: scripts/schemathesis/.
#
# Usage: scripts/schemathesis.sh [extra arguments for schemathesis run]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

. scripts/pip-tool.sh
pip_tool schemathesis schemathesis==4.32.5

cargo build --quiet --locked -p brewmesh-cli
scratch=$(mktemp -d)
token="schemathesis-$RANDOM$RANDOM"
BREWMESH_REGISTRY_TOKEN="$token" target/debug/brewmesh up \
  --data-dir "$scratch/data" --ready-file "$scratch/ready.json" \
  --gateway-listen 127.0.0.1:0 --registry-listen 127.0.0.1:0 \
  --payment-listen 127.0.0.1:0 --barista-listen 127.0.0.1:0 \
  --gateway-arg=--stream-timeout=1s --payment-arg=--processing-delay=20ms \
  >"$scratch/up.log" 2>&1 &
up=$!
trap 'kill $up 2>/dev/null; wait $up 2>/dev/null; rm -rf "$scratch"' EXIT
for _ in $(seq 600); do
  [ -s "$scratch/ready.json" ] && break
  kill -0 $up 2>/dev/null || { cat "$scratch/up.log" >&2; echo "brewmesh up exited" >&2; exit 1; }
  sleep 0.1
done
[ -s "$scratch/ready.json" ] || { echo "the mesh was not ready within 60 s" >&2; exit 1; }
addr=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["addr"])' "$scratch/ready.json")
export BREWMESH_GATEWAY_URL="http://$addr"
# The staff's token `up` wrote: every operation is open to it, and
# schemathesis's ignored_auth check calls each one without it as well.
staff=$(cat "$scratch/data/auth/staff.jwt")
export BREWMESH_TOKEN="$staff"

cd "$root/scripts/schemathesis"
status=0
SCHEMATHESIS_HOOKS=hooks PYTHONPATH="$PWD" schemathesis --no-color run \
  "$BREWMESH_GATEWAY_URL/openapi.json" \
  --checks all --max-examples 50 --request-timeout 10 \
  -H "Authorization: Bearer $staff" "$@" | tee "$scratch/report.txt" || status=$?
if [ "$status" -ne 0 ]; then
  echo "schemathesis found failures or errors (exit $status)" >&2
  exit "$status"
fi
if grep -q '^=* WARNINGS =*$' "$scratch/report.txt"; then
  echo "schemathesis warned (see WARNINGS above); a warning fails this check" >&2
  exit 1
fi
echo "schemathesis: no failure, no error, no warning"
