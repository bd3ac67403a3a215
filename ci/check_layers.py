#!/usr/bin/env python3
"""Fails when the `use crate::` imports among src/ modules form a cycle, or
when a module imports from a higher layer than its own (issue 11).

Each file under src/ is a module (`src/a/b.rs` -> `a::b`, `src/a/mod.rs` ->
`a`); an import `use crate::x::y::Z` (also inside `{...}` groups, and
`crate::x::y` paths in code) names the longest module prefix that exists.
Re-exports from lib.rs (`crate::ServiceHost`, ...) resolve to the module that
defines the item. Prints the module graph (which file imports which) with
`--graph`.
"""
import os
import re
import sys

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")

# Layers, lowest first; every import must point to the same or a lower layer
# (same layer: only if no cycle).
LAYERS = [
    ("seam", ["sync", "loom_waker"]),
    ("values", ["value", "value::error", "value::panic", "value::stats"]),
    ("state word", ["state"]),
    ("slot", ["slot"]),
    ("store", ["store", "store::slab", "store::table", "store::host_core",
               "store::overflow", "store::timer", "store::segment", "store::host_store"]),
    ("engine", ["engine", "engine::channel", "engine::host", "engine::deadline"]),
    ("async", ["wait", "wait::cancel", "wait::idle", "wait::close"]),
    ("face", ["call", "channel", "host"]),
    ("root", ["lib"]),
]


def modules():
    mods = {}
    for root, _, files in os.walk(SRC):
        for f in files:
            if not f.endswith(".rs"):
                continue
            path = os.path.join(root, f)
            rel = os.path.relpath(path, SRC)[:-3].replace(os.sep, "::")
            if rel.endswith("::mod"):
                rel = rel[: -len("::mod")]
            mods[rel] = path
    return mods


def reexports(mods):
    """Item name -> defining module, from lib.rs `pub use`."""
    out = {}
    text = open(mods["lib"]).read()
    for m in re.finditer(r"pub use ([\w:]+)::\{([^}]*)\};|pub use ([\w:]+)::(\w+);", text):
        if m.group(1):
            for item in m.group(2).split(","):
                item = item.strip()
                if item:
                    out[item] = m.group(1)
        else:
            out[m.group(4)] = m.group(3)
    return out


def strip_comments(text):
    # unit-test modules are not part of the layering (they may use the face)
    m = re.search(r"#\[cfg\((?:all\()?test[^\n]*\n\s*mod tests", text)
    if m:
        text = text[: m.start()]
    text = re.sub(r"//[^\n]*", "", text)
    return re.sub(r"/\*.*?\*/", "", text, flags=re.S)


def imports(text, mods, items):
    found = set()
    text = strip_comments(text)
    # expand `use crate::{a::X, b::{Y, Z}}` groups crudely: every path that
    # starts after `crate::` up to a non-path character
    for m in re.finditer(r"crate::((?:\w+::)*\w+|\{)", text):
        start = m.end(0) - len(m.group(1))
        if m.group(1) == "{":
            # take the brace group and split into paths
            depth, i = 0, start
            while i < len(text):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        break
                i += 1
            group = text[start + 1 : i]
            paths = flatten("", group)
        else:
            paths = [m.group(1)]
        for p in paths:
            target = resolve(p, mods, items)
            if target:
                found.add(target)
    return found


def flatten(prefix, group):
    """`a::{B, c::D}` -> [a::B, a::c::D] (one level of nesting is enough)."""
    out, depth, cur = [], 0, ""
    for ch in group + ",":
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            cur = cur.strip()
            if cur:
                if "{" in cur:
                    head, rest = cur.split("{", 1)
                    out += flatten(prefix + head, rest.rsplit("}", 1)[0])
                else:
                    out.append(prefix + cur)
            cur = ""
        else:
            cur += ch
    return out


def resolve(path, mods, items):
    parts = [p for p in re.split(r"::", path.replace(" ", "")) if p and p != "self"]
    for n in range(len(parts), 0, -1):
        cand = "::".join(parts[:n])
        if cand in mods and cand != "lib":
            return cand
    if parts and parts[0] in items:
        return items[parts[0]]
    return None


def layer_of(mod):
    for i, (_, names) in enumerate(LAYERS):
        if mod in names:
            return i
    return None


def main():
    mods = modules()
    items = reexports(mods)
    graph = {}
    for mod, path in sorted(mods.items()):
        deps = imports(open(path).read(), mods, items)
        deps.discard(mod)
        # a parent module's `mod child;` is not an import; children may use
        # their parent's siblings freely within the layer check below
        graph[mod] = sorted(d for d in deps if not d.startswith(mod + "::"))
    errors = []
    for mod, deps in graph.items():
        lm = layer_of(mod)
        if lm is None:
            errors.append(f"{mod}: not assigned to a layer in ci/check_layers.py")
            continue
        for d in deps:
            ld = layer_of(d)
            if ld is not None and ld > lm:
                errors.append(
                    f"{mod} ({LAYERS[lm][0]}) imports {d} ({LAYERS[ld][0]}): points up"
                )
    # cycles (Tarjan)
    index, low, stack, on, sccs, counter = {}, {}, [], set(), [], [0]

    def strong(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, []):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            strong(v)
    for comp in sccs:
        errors.append("import cycle: " + " <-> ".join(comp))
    if "--graph" in sys.argv:
        for mod, deps in graph.items():
            print(f"{mod:18} -> {', '.join(deps) if deps else '-'}")
    if errors:
        for e in errors:
            print("check_layers:", e, file=sys.stderr)
        sys.exit(1)
    print(f"check_layers: {len(graph)} modules, no cycle, every import points down")


if __name__ == "__main__":
    main()
