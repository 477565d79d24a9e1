"""The import layering of STYLE.md, read from the source with `ast` (no project module is imported):
model library <- LoRA <- shared training parts <- SFT <- GRPO <- command-line apps; data and rewards import no
model code; no cycles; imports at the top of a file (lazy only for the optional extras)."""

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("gemma_jax", "lora", "train", "sft", "grpo", "rewards", "data", "cli")
# package -> the project packages it must not import (run.py is "run")
FORBIDDEN = {
    "gemma_jax": {"lora", "train", "sft", "grpo", "rewards", "data", "cli", "run"},
    "rewards": {"gemma_jax", "lora", "train", "sft", "grpo", "cli", "run"},
    "data": {"gemma_jax", "lora", "train", "sft", "grpo", "cli", "run"},
    "lora": {"train", "sft", "grpo", "cli", "run"},
    "train": {"sft", "grpo", "cli", "run"},
    "sft": {"grpo", "cli", "run"},
    "grpo": {"cli", "run"},
    "cli": {"run"},
}
LAZY_OK = {"matplotlib", "tensorboard"}  # optional extras: imported where used, so they stay optional


def _sources() -> dict:
    """module name ("cli.common", "run") -> path, for every .py of the project packages and run.py."""
    out = {"run": os.path.join(ROOT, "run.py")}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for name in files:
                if name.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, name), ROOT)[: -len(".py")]
                    mod = rel.replace(os.sep, ".")
                    out[mod[: -len(".__init__")] if mod.endswith(".__init__") else mod] = os.path.join(dirpath, name)
    return out


def _imports(mod: str, path: str, modules: set) -> tuple[set, list]:
    """(project modules imported anywhere in the file, [(line, name) of imports below the top level])."""
    tree = ast.parse(open(path).read(), path)
    is_pkg = path.endswith("__init__.py")
    top_level = {id(n) for n in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / try-blocks at module level are still module level
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    edges, nested = set(), []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                parts = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        if id(node) not in top_level and names[0].split(".")[0] not in LAZY_OK:
            nested.append((node.lineno, names[0]))
        for name in names:
            # the longest project module that `name` is or lies in
            while name and name not in modules:
                name = name.rpartition(".")[0]
            # not the module itself, nor its own package (`from gemma_jax import config` inside gemma_jax:
            # the package is imported first anyway, so that is no edge of the graph)
            if name and name != mod and not mod.startswith(name + "."):
                edges.add(name)
    return edges, nested


def _graph():
    sources = _sources()
    graph, nested = {}, {}
    for mod, path in sources.items():
        graph[mod], lazy = _imports(mod, path, set(sources))
        if lazy:
            nested[mod] = lazy
    return graph, nested


def _cycles(graph) -> list:
    """Every strongly connected component with more than one module (Tarjan), as sorted lists."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    graph, _ = _graph()
    # a handful of known edges: guards against a parser that silently finds nothing
    assert "gemma_jax.sharding" in graph["cli.common"] and "lora.io" in graph["cli.common"]
    assert {"cli.sft", "cli.grpo", "cli.eval", "cli.generate", "cli.embedded", "cli.common"} <= graph["run"]
    assert "sft.train" in graph["cli.sft"]
    assert {m.split(".")[0] for m in graph} == {*PACKAGES, "run"}
    assert "gemma_jax" in graph["cli.common"] and "gemma_jax" not in graph["gemma_jax.model"]


def test_no_import_cycles():
    graph, _ = _graph()
    cycles = _cycles(graph)
    edges = [f"{a} -> {b}" for comp in cycles for a in comp for b in sorted(graph[a]) if b in comp]
    assert not cycles, "import cycles among " + "; ".join(", ".join(c) for c in cycles) + ":\n" + "\n".join(edges)


def test_imports_flow_one_way():
    graph, _ = _graph()
    bad = sorted(f"{mod} -> {dep}" for mod, deps in graph.items() for dep in deps
                 if dep.split(".")[0] in FORBIDDEN.get(mod.split(".")[0], ()))
    assert not bad, "imports against the layering (STYLE.md 'Shape of the code'):\n" + "\n".join(bad)


def test_imports_at_the_top():
    _, nested = _graph()
    bad = [f"{mod}:{line} imports {name}" for mod, items in sorted(nested.items()) for line, name in items]
    assert not bad, "imports below the top level (only matplotlib/tensorboard may be lazy):\n" + "\n".join(bad)
