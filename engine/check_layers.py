#!/usr/bin/env python3
"""Checks that engine modules import only from their own layer or below.

A module's layer comes from LAYERS (by path under engine/src); every
`crate::<module>` path in its code (comments excluded) must name a module
of a layer no higher than its own."""
import pathlib, re, sys
LAYERS = [
    ('primitives', ['codec', 'window', 'sketch', 'hash', 'risk', 'facts', 'validate', 'policy']),
    ('reason', ['reason', 'identity', 'routes']),
    ('records', ['record', 'profile', 'account', 'endpoint', 'object_route', 'session', 'wire']),
    ('state', ['state', 'known_accounts']),
    ('detectors', ['detectors', 'rules', 'verdict', 'login_risk']),
    ('config', ['config']),
    ('services', ['callout', 'exemptions']),
    ('engine', ['engine', 'lib', 'stats']),
]
rank = {m: i for i, (_, ms) in enumerate(LAYERS) for m in ms}
root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else 'engine/src')
bad = 0
for f in sorted(root.rglob('*.rs')):
    mod = f.relative_to(root).parts[0].removesuffix('.rs')
    me = rank[mod]
    code = '\n'.join(l.split('//')[0] for l in f.read_text().split('\n'))
    for used in sorted(set(re.findall(r'crate::(\w+)', code))):
        if used not in rank:
            continue
        if rank[used] > me:
            bad += 1
            print(f'UP  {f.relative_to(root)} ({LAYERS[me][0]}) -> crate::{used} ({LAYERS[rank[used]][0]})')
# No cycles between files either (same layer included): crate::a::b names
# the file a/b.rs when it exists, else a.rs (or a/mod.rs).
def target(path):
    parts = path.split('::')
    for n in range(len(parts), 0, -1):
        for cand in (root.joinpath(*parts[:n]).with_suffix('.rs'), root.joinpath(*parts[:n], 'mod.rs')):
            if cand.exists():
                return cand
    return None
graph = {}
for f in sorted(root.rglob('*.rs')):
    code = '\n'.join(l.split('//')[0] for l in f.read_text().split('\n'))
    code = code.split('#[cfg(test)]')[0]
    deps = set()
    for p in re.findall(r'crate::((?:\w+::)*\w+)', code):
        t = target(p)
        if t and t != f and not (f.name == 'mod.rs' and t.parent == f.parent) and not (t.name == 'mod.rs' and f.parent == t.parent):
            deps.add(t)
    graph[f] = deps
cycles = set()
def walk(node, stack, seen):
    for d in graph.get(node, ()):
        if d in stack:
            cyc = stack[stack.index(d):]
            cycles.add(' -> '.join(str(c.relative_to(root)) for c in cyc + [d]))
        elif d not in seen:
            seen.add(d)
            walk(d, stack + [d], seen)
for f in graph:
    walk(f, [f], {f})
for c in sorted(cycles):
    bad += 1
    print('CYCLE', c)
print(f'{len(cycles)} file cycle(s)')
print(' -> '.join(f"{n} [{', '.join(ms)}]" for n, ms in LAYERS))
print(f'{bad} upward import(s)')
sys.exit(1 if bad else 0)
