"""The project's modules import each other without a cycle.

The graph is read from the source with ``ast``: an edge A -> B for every
``import`` in A that names project module B, and every
``importlib.import_module("B")`` with a literal name, at module level or
inside a function (a lazy import still ties the two modules together), and
every submodule of a package's ``lazy_exports(__name__, TABLE)`` (PEP 562
names imported on first use), but not under ``if TYPE_CHECKING:``. ``from P import name`` is an edge to the module
``P.name`` when that is a module, else to ``P``. A package's own ``__init__``
is the node ``P``; importing ``P.m`` is an edge to ``P.m`` only (Python also
runs ``P/__init__``, but that edge is the package's layout, not a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("autodiffusion_rt", "export", "kernels", "search")


def module_names(root: Path = ROOT) -> dict[str, Path]:
    """{dotted module name: file} for every .py file of the project's packages."""
    out = {}
    for pkg in PACKAGES:
        for f in sorted((root / pkg).rglob("*.py")):
            parts = list(f.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = f
    return out


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _is_import_module(node: ast.AST) -> bool:
    """``importlib.import_module("literal")`` or ``import_module("literal")``."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
        return False
    f = node.func
    return (isinstance(f, ast.Attribute) and f.attr == "import_module") or (isinstance(f, ast.Name) and f.id == "import_module")


def _is_lazy_exports(node: ast.AST) -> bool:
    """``lazy_exports(__name__, TABLE)``: autodiffusion_rt.utils' PEP 562 table of name -> submodule."""
    return isinstance(node, ast.Call) and getattr(node.func, "id", None) == "lazy_exports" and len(node.args) == 2


def _lazy_submodules(call: ast.Call, tree: ast.Module) -> list[str]:
    """The relative submodules (".build") a lazy_exports table names: a dict literal, or a module-level name bound
    to one."""
    table = call.args[1]
    if isinstance(table, ast.Name):
        table = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                     and any(getattr(t, "id", None) == table.id for t in n.targets))
    return [v.value for v in table.values]


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node and literal import_module call, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)) or _is_import_module(node) or _is_lazy_exports(node):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        for node in _imports(tree):
            if _is_lazy_exports(node):
                targets = [package + sub for sub in _lazy_submodules(node, tree)]
            elif isinstance(node, ast.Call):
                targets = [node.args[0].value]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - (node.level - 1)]
                    prefix = ".".join(base + ([node.module] if node.module else []))
                else:
                    prefix = node.module or ""
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in modules else prefix for a in node.names]
            for target in targets:
                while target and target not in modules:  # `import a.b.c` of a non-module attribute path
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules (first == last), or None."""
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        color[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if color.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in color:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        color[node] = 2
        return None

    for node in sorted(graph):
        if node not in color:
            found = visit(node)
            if found:
                return found
    return None


def test_the_graph_sees_the_known_edges():
    """The reader finds edges of every kind it claims to read (else an empty graph would pass)."""
    graph = import_graph(module_names())
    assert "autodiffusion_rt.diffusion" in graph["autodiffusion_rt.sampling"]  # from .diffusion import name: the package
    assert "autodiffusion_rt.runtime.manifest" in graph["autodiffusion_rt.runtime.runtime"]  # from .manifest import name
    assert "autodiffusion_rt.serve.schemas" in graph["autodiffusion_rt.serve"]  # from .schemas import name
    assert "autodiffusion_rt.metrics.imagesets" in graph["autodiffusion_rt.metrics"]  # a lazy_exports table
    assert "autodiffusion_rt.sampling" in graph["autodiffusion_rt"]  # a lazy_exports dict literal
    assert "autodiffusion_rt.runtime.manifest" in graph["export.build"]  # absolute from-import of a module
    assert "kernels" in graph["autodiffusion_rt.utils"]  # importlib.import_module("kernels") in a function
    assert "kernels.triton_kernels" in graph["kernels"]  # a function-level from-import


def test_no_import_cycles():
    cycle = find_cycle(import_graph(module_names()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_cycle_is_found(tmp_path):
    """What would catch a broken checker: a two-module cycle, one side a lazy import, must be reported."""
    pkg = tmp_path / "autodiffusion_rt"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import f\n")
    (pkg / "b.py").write_text("def f():\n    from autodiffusion_rt import a\n")
    for other in PACKAGES[1:]:
        (tmp_path / other).mkdir()
    cycle = find_cycle(import_graph(module_names(tmp_path)))
    assert cycle is not None and set(cycle) == {"autodiffusion_rt.a", "autodiffusion_rt.b"}


@pytest.mark.parametrize("package", PACKAGES)
def test_every_package_is_read(package):
    assert any(m == package or m.startswith(package + ".") for m in module_names())


def test_the_core_imports_no_tool_package():
    """``autodiffusion_rt`` never imports ``export`` or ``search``, and reaches ``kernels`` only through
    ``utils.kernel_hook`` (ARCHITECTURE.md, "Rules that keep it this way": dependencies point one way)."""
    graph = import_graph(module_names())
    crossing = sorted((a, b) for a, targets in graph.items() for b in targets
                      if a.split(".")[0] == "autodiffusion_rt" and b.split(".")[0] in ("export", "search", "kernels"))
    assert crossing == [("autodiffusion_rt.utils", "kernels")]
