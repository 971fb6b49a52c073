"""The package's layers: each module imports mirage modules only from its own layer or those below it, only
at module level (no import inside a function to dodge a cycle), with no cycle anywhere; inference imports no
training code."""
import ast
from pathlib import Path

import mirage

ROOT = Path(mirage.__file__).parent
LAYERS = {"": 0, "illusions": 1, "engine": 2, "backends": 3, "quality": 4, "train": 5, "app": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> int:
    if module == "mirage.__main__":  # `python -m mirage`: the command line's entry point, at the top
        return LAYERS["app"]
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else ""]


def is_module(name: str) -> bool:
    return (ROOT.parent / (name.replace(".", "/") + ".py")).is_file() or (ROOT.parent / name.replace(".", "/")).is_dir()


def absolute(node: ast.ImportFrom, package: str) -> str | None:
    """The module a `from X import ...` names, relative ones (`from . import x`, `from ..io import y`) resolved
    against `package`, the package the importing module is in."""
    if not node.level:
        return node.module
    base = package.split(".")
    if node.level > len(base):
        return None
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path, package: str = "mirage"):
    """(module imported, line, at top level) for every mirage import in the file; `package` is the package the
    file's module is in (to resolve relative imports)."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    for node in ast.walk(tree):
        module = absolute(node, package) if isinstance(node, ast.ImportFrom) else None
        if module is not None and (module == "mirage" or module.startswith("mirage.")):
            names = [f"{module}.{a.name}" for a in node.names]
            found = [n for n in names if is_module(n)] or [module]
        elif isinstance(node, ast.Import):
            found = [a.name for a in node.names if a.name == "mirage" or a.name.startswith("mirage.")]
        else:
            continue
        for name in found:
            yield name, node.lineno, id(node) in top


def graph() -> dict[str, list[tuple[str, int, bool]]]:
    def package(p: Path) -> str:
        name = module_name(p)
        return name if p.name == "__init__.py" else name.rpartition(".")[0]
    return {module_name(p): list(imports(p, package(p))) for p in sorted(ROOT.rglob("*.py"))}


def test_every_mirage_import_is_at_module_level():
    inside = [f"{m}:{line} imports {n}" for m, edges in graph().items() for n, line, top in edges if not top]
    assert not inside, inside


def test_no_module_imports_a_layer_above_its_own():
    upward = [f"{m}:{line} imports {n}" for m, edges in graph().items() for n, line, _ in edges
              if n != "mirage" and layer(n) > layer(m)]
    assert not upward, upward


def test_inference_imports_no_training_code():
    assert all(layer("mirage.train.loop") > layer(m) for m in ("mirage.backends.small", "mirage.quality.metrics"))
    wrong = [f"{m}:{line} imports {n}" for m, edges in graph().items() for n, line, _ in edges
             if n.startswith("mirage.train") and layer(m) < LAYERS["train"]]
    assert not wrong, wrong


def test_the_import_graph_has_no_cycle():
    edges = {m: {n for n, _, _ in e if n != m and n != "mirage"} for m, e in graph().items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in edges.get(m, ()):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*path, m, n]))
            if n not in state:
                visit(n, [*path, m])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [])


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk itself: an engine module importing app is found."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from mirage.app import main\n")
    (found,) = list(imports(bad))
    assert found == ("mirage.app.main", 2, False) and layer(found[0]) > layer("mirage.engine.tasks")


def test_the_check_resolves_relative_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from ..app import main\nfrom . import views\nfrom .. import io\n")
    assert [n for n, _, _ in imports(bad, "mirage.illusions")] == ["mirage.app.main", "mirage.illusions.views",
                                                                   "mirage.io"]
