#!/usr/bin/env bash
# Checks the contracts in proto/ with buf (PyPI `buf-bin`, installed here if
# missing): `buf lint` with the rules buf.yaml names, then `buf breaking`
# against the contracts as they were before this change, then a self-check
# that `buf breaking` does refuse a breaking change (a renumbered field, in a
# scratch copy), so a green run means the comparison really ran.
#
# Compared against, first that exists: $BUF_AGAINST (any buf input, e.g.
# '.git#ref=origin/main,subdir=proto'), the newest tag v*, the parent commit.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/pip-tool.sh
pip_tool buf buf-bin==1.75.0
echo "buf $(buf --version)" >&2

echo "buf lint"
buf lint

against="${BUF_AGAINST:-}"
if [ -z "$against" ]; then
  if tag=$(git describe --tags --abbrev=0 --match 'v*' 2>/dev/null); then
    ref="$tag"
  elif git rev-parse --verify --quiet HEAD^ >/dev/null; then
    ref=$(git rev-parse --short HEAD^)
  else
    echo "no tag v* and no parent commit to compare the contracts with (a shallow clone?); set BUF_AGAINST" >&2
    exit 1
  fi
  against=".git#ref=$ref,subdir=proto"
fi
echo "buf breaking against $against"
buf breaking proto --against "$against"

# The self-check: renumber PlaceOrderRequest.item_id in a scratch copy.
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cp -r proto buf.yaml "$scratch/"
sed -i '0,/^  string item_id = 2;/s//  string item_id = 12;/' "$scratch/proto/brewmesh/barista/v1/barista.proto"
if cmp -s proto/brewmesh/barista/v1/barista.proto "$scratch/proto/brewmesh/barista/v1/barista.proto"; then
  echo "self-check: could not renumber a field in the scratch copy" >&2
  exit 1
fi
if out=$(cd "$scratch" && buf breaking proto --against "$OLDPWD/proto" 2>&1); then
  echo "self-check: buf breaking accepted a renumbered field" >&2
  exit 1
fi
echo "self-check: buf breaking refuses a renumbered field:"
echo "$out" | sed 's/^/  /'
