#!/usr/bin/env bash
# Validates deploy/ offline, as CI does (no Docker engine, no cluster):
# - every Kustomize overlay renders (`kubectl kustomize`) and its objects
#   pass kubernetes-validate's strict schemas;
# - the compose file parses (docker-compose config);
# - every flag and BREWMESH_* variable the manifests and the compose file
#   give the binary exists: each flag in `brewmesh <role> --help`, each
#   variable in some role's (a shared ConfigMap also reaches roles that
#   ignore some of its keys).
# Installs kubernetes-validate (PyPI) and docker-compose (Debian) if missing.
#
# Usage: scripts/validate-deploy.sh [path to the brewmesh binary]
set -euo pipefail
cd "$(dirname "$0")/.."
brewmesh=${1:-target/debug/brewmesh}
[ -x "$brewmesh" ] || cargo build --locked -q -p brewmesh-cli

command -v kubectl >/dev/null || { echo "kubectl is needed (kubectl kustomize)" >&2; exit 1; }
if ! command -v kubernetes-validate >/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check 'kubernetes-validate==1.37.0'
  PATH="$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"
fi
if ! command -v docker-compose >/dev/null; then
  apt-get update -qq && apt-get install -y -qq docker-compose >/dev/null
fi

out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
for overlay in deploy/k8s/overlays/*/; do
  name=$(basename "$overlay")
  kubectl kustomize "$overlay" > "$out/$name.yaml"
  kubernetes-validate --strict --quiet "$out/$name.yaml"
  echo "k8s overlay $name: $(grep -c '^kind:' "$out/$name.yaml") objects render and validate"
done
docker-compose -f deploy/compose.yaml config > "$out/compose.yaml"
echo "compose file parses"

python3 - "$brewmesh" "$out" <<'PY'
import glob, subprocess, sys, yaml
brewmesh, out = sys.argv[1], sys.argv[2]
ROLES = ("registry", "payment", "barista", "station", "gateway")
helps = {}
def help_of(role):
    if role not in helps:
        helps[role] = subprocess.run([brewmesh, role, "--help"], capture_output=True, text=True, check=True).stdout
    return helps[role]
problems, checked = [], 0
def check(where, args, env):
    global checked
    if not args or args[0] not in ROLES:
        return
    text = help_of(args[0])
    for arg in args[1:]:
        if arg.startswith("--"):
            checked += 1
            if arg.split("=")[0] + " " not in text and arg.split("=")[0] + "\n" not in text:
                problems.append(f"{where}: {args[0]} has no flag {arg}")
    for key in env:
        if key.startswith("BREWMESH_"):
            checked += 1
            known = any(f"[env: {key}=" in help_of(r) or f"[env: {key}]" in help_of(r) for r in ROLES)
            if not known:
                problems.append(f"{where}: no role reads {key}")
for path in glob.glob(f"{out}/*.yaml"):
    docs = list(yaml.safe_load_all(open(path)))
    if path.endswith("compose.yaml"):
        for name, svc in docs[0]["services"].items():
            check(f"compose {name}", svc.get("command"), svc.get("environment", {}))
        continue
    config = {k: v for d in docs if d and d["kind"] == "ConfigMap" and d["metadata"]["name"] == "brewmesh" for k, v in d["data"].items()}
    for d in docs:
        spec = (d or {}).get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []):
            env = {e["name"]: 1 for e in c.get("env", [])}
            if any(r.get("configMapRef", {}).get("name") == "brewmesh" for r in c.get("envFrom", [])):
                env.update(config)
            check(f"{path.split('/')[-1]} {d['kind']}/{d['metadata']['name']}", c.get("args"), env)
if problems:
    sys.exit("\n".join(problems))
print(f"{checked} flags and variables in deploy/ exist in the binary")
PY
