#!/usr/bin/env bash
# The layout's rules that the compiler does not check (ARCHITECTURE.md):
#  1. no module imports one that imports it back, in any crate — a child
#     naming its parent's items counts, as `super::` or `crate::` does;
#  2. the release binary does not link the test-support crate.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "-- no module imports one that imports it back"
python3 - <<'EOF'
import os, re, sys

def sources():
    """Each crate's source directory and its root files (lib.rs, main.rs)."""
    for root, dirs, files in os.walk('.'):
        dirs[:] = [d for d in dirs if d not in ('target', '.git', 'node_modules')]
        src = os.path.join(root, 'src')
        if 'Cargo.toml' in files and os.path.isdir(src):
            for top in ('lib.rs', 'main.rs'):
                if os.path.exists(os.path.join(src, top)):
                    yield src, top

def modules_of(src, top):
    """Module path → file, for the tree under `top`."""
    found = {(): os.path.join(src, top)}
    def walk(module, path, directory):
        text = open(path, encoding='utf-8').read()
        for name in re.findall(r'^\s*(?:pub(?:\([\w:]+\))?\s+)?mod\s+(\w+)\s*;', text, re.M):
            for candidate in (os.path.join(directory, name + '.rs'),
                              os.path.join(directory, name, 'mod.rs')):
                if os.path.exists(candidate):
                    child = module + (name,)
                    found[child] = candidate
                    walk(child, candidate, os.path.join(directory, name))
                    break
    walk((), found[()], src)
    return found

def code(path):
    text = open(path, encoding='utf-8').read()
    # Unit tests may reach anywhere: `#[cfg(test)] mod tests` is cut off.
    text = re.split(r'#\[cfg\(test\)\]\s*mod\s+tests', text)[0]
    # Comments (and intra-doc links) are not imports.
    return '\n'.join(l for l in text.splitlines() if not l.lstrip().startswith('//'))

failed = False
for src, top in sources():
    modules = modules_of(src, top)
    def resolve(path):
        for k in range(len(path), -1, -1):
            if path[:k] in modules:
                return path[:k]
    edges = {m: set() for m in modules}
    for m, path in modules.items():
        text = code(path)
        refs = [tuple(x.split('::')) for x in re.findall(r'\bcrate::((?:\w+::)*\w+)', text)]
        refs += [m[:-1] + tuple(x.split('::')) for x in re.findall(r'\bsuper::((?:\w+::)*\w+)', text)]
        children = {c[-1] for c in modules if len(c) == len(m) + 1 and c[:len(m)] == m}
        for name in children:
            if re.search(r'(?<![\w:])' + name + r'::', text):
                refs.append(m + (name,))
        for ref in refs:
            target = resolve(ref)
            if target is not None and target != m:
                edges[m].add(target)
    seen, stack, on = set(), [], set()
    def visit(n):
        global failed
        seen.add(n); stack.append(n); on.add(n)
        for t in sorted(edges[n]):
            if t in on:
                failed = True
                cycle = stack[stack.index(t):] + [t]
                print(f"{src}/{top}: " + ' -> '.join('::'.join(c) or 'crate' for c in cycle))
            elif t not in seen:
                visit(t)
        stack.pop(); on.discard(n)
    for n in sorted(edges):
        if n not in seen:
            visit(n)
sys.exit(1 if failed else 0)
EOF

echo "-- the brewmesh binary does not link brewmesh-testing"
if cargo tree --locked -e normal -p brewmesh-cli --prefix none | grep -q '^brewmesh-testing '; then
  echo "brewmesh-cli links brewmesh-testing outside its dev-dependencies" >&2
  exit 1
fi
echo ok
