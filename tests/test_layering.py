"""The import layering: arrows only run down, and no package imports itself in a circle.

    trainer -> checkpoints_convert -> moe -> kernels        data and kernels import nothing of ours
    (trainer and checkpoints_convert may use data: its tokenizer, template, loaders)

- The floor, data/errors.py and data/files.py (the error base, safe file writing), may be imported
  by every package and imports nothing else of ours.
- The demo (data/demo/, trainer/demo.py) is imported only by the entry scripts that run it.
- The tools (trainer/tools/) sit beside the trainer: they import nothing of the rest of trainer/.

Every import statement counts, including those inside functions (a lazy import is still an arrow),
except those under ``if __name__ == "__main__":``, which only an entry script runs.
"""
import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("trainer", "checkpoints_convert", "moe", "kernels", "data")
# What each package may import besides itself (and the floor).
ALLOWED = {
    "trainer": {"checkpoints_convert", "moe", "kernels", "data"},
    "checkpoints_convert": {"moe", "kernels", "data"},
    "moe": {"kernels"},
    "kernels": set(),
    "data": set(),
}
FLOOR = {"data.errors", "data.files"}
# Who may import the demo: the demo itself and the entry scripts that run it.
DEMO = ("data.demo", "trainer.demo")
DEMO_USERS = {"trainer.sft", "trainer.dpo", "trainer.tools.evaluate"}


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


def _imports(name: str, path: pathlib.Path, modules: dict) -> set[str]:
    """Our modules that ``name`` imports (a name imported from a package resolves to its submodule
    when there is one, else to the package's __init__)."""
    is_pkg = path.name == "__init__.py"
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    entry = {id(n) for block in tree.body if _is_main_block(block) for n in ast.walk(block)}
    for node in ast.walk(tree):
        if id(node) in entry:
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in modules else mod for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import a.b.c` of a name inside a module: its module
                t = t.rpartition(".")[0]
            if t:
                found.add(t)
    found.discard(name)
    return found


def _is_main_block(node) -> bool:
    """``if __name__ == "__main__":`` at a module's top level."""
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__"
            and any(isinstance(c, ast.Constant) and c.value == "__main__" for c in node.test.comparators))


def _graph():
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _package(module: str) -> str:
    return module.split(".")[0]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
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


def _in(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_packages_import_only_downward():
    bad = sorted(f"{m} imports {t}" for m, targets in _graph().items() for t in targets
                 if _package(t) != _package(m) and _package(t) not in ALLOWED[_package(m)] and t not in FLOOR)
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_the_floor_imports_nothing_above_it():
    graph = _graph()
    assert {m: graph[m] - FLOOR for m in FLOOR if graph[m] - FLOOR} == {}


def test_only_the_entry_scripts_import_the_demo():
    bad = sorted(f"{m} imports {t}" for m, targets in _graph().items() for t in targets
                 if _in(t, DEMO) and not _in(m, DEMO) and m not in DEMO_USERS)
    assert not bad, "the demo reached from the library:\n" + "\n".join(bad)
    graph = _graph()
    assert not any(_in(t, DEMO) for m in ("trainer.loop", "trainer.sources", "checkpoints_convert.dcp_to_hf")
                   for t in graph[m])


def test_the_tools_import_nothing_of_the_trainer():
    bad = sorted(f"{m} imports {t}" for m, targets in _graph().items() if _in(m, ["trainer.tools"])
                 for t in targets if _package(t) == "trainer" and not _in(t, ["trainer.tools"]))
    assert not bad, "\n".join(bad)


def test_no_import_circles_inside_a_package():
    graph = _graph()
    # A package's __init__ re-exporting its modules is not a circle: a module importing a sibling
    # only runs the __init__ first. Edges into an __init__ from its own package's modules are dropped.
    inner = {m: {t for t in ts if _package(t) == _package(m) and t != _package(m)} for m, ts in graph.items()}
    assert _cycles(inner) == []


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # The checker itself: a function-level relative import and a circle are both found.
    modules = {"data": tmp_path / "__init__.py", "data.a": tmp_path / "a.py", "data.b": tmp_path / "b.py",
               "trainer.x": tmp_path / "x.py"}
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text("from data import a\nimport trainer.x\n")
    (tmp_path / "x.py").write_text("import sys\nif __name__ == '__main__':\n    import data.a\n"
                                   "if sys.argv:\n    import data.b\n")
    assert _imports("data.a", modules["data.a"], modules) == {"data.b"}
    assert _imports("data.b", modules["data.b"], modules) == {"data.a", "trainer.x"}
    assert _imports("trainer.x", modules["trainer.x"], modules) == {"data.b"}  # only the __main__ block is skipped
    assert _cycles({"data.a": {"data.b"}, "data.b": {"data.a"}, "data.c": set()}) == [["data.a", "data.b"]]
