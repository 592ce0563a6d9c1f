#!/usr/bin/env python3
"""Lists the `crate::<module>` edges between the top-level modules of src/ and fails when they
form a cycle. Test code is left out: everything from a `#[cfg(test)]` line to the end of its file
(test modules sit at the end of a file), and files named tests.rs; so are comments (a doc link
names a module without importing it).

    scripts/check-module-cycles.py            check src/
    scripts/check-module-cycles.py --edges    also print every edge
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")
EDGE = re.compile(r"\bcrate::([a-z_][a-z0-9_]*)")


def top_level(rel):
    first = rel.split(os.sep)[0]
    return first[:-3] if first.endswith(".rs") else first


def edges():
    out = {}
    for dirpath, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".rs") or name == "tests.rs":
                continue
            path = os.path.join(dirpath, name)
            module = top_level(os.path.relpath(path, ROOT))
            if module in ("main", "lib"):
                continue
            with open(path, encoding="utf-8") as f:
                text = f.read()
            text = text.split("#[cfg(test)]", 1)[0]
            text = "\n".join(l for l in text.splitlines() if not l.lstrip().startswith("//"))
            for m in EDGE.finditer(text):
                if m.group(1) != module:
                    out.setdefault(module, set()).add(m.group(1))
    return out


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def main():
    graph = edges()
    if "--edges" in sys.argv[1:]:
        for module in sorted(graph):
            print(f"{module} -> {' '.join(sorted(graph[module]))}")
    found = cycles(graph)
    for comp in found:
        print(f"check-module-cycles: import cycle between {', '.join(comp)}", file=sys.stderr)
    if found:
        print("check-module-cycles: run with --edges to see every edge", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
