"""The project's modules import each other without a cycle, and none takes a private name from another.

Read from the source with `ast`, nothing is imported. Every import statement counts, at module level and inside
functions: an import deferred into a function still needs the other module whole when it runs. Importing `a.b.c`
depends on the module `a.b.c` and on the packages `a.b` and `a` that the importer is not itself inside (those are
already being initialised while it runs). `import qwenjax`, or `from qwenjax import name` where `name` is not a
submodule, depends on the package `qwenjax` itself: its `__init__` must have finished, so no module that
`qwenjax/__init__.py` reaches may do that. A package's `__init__` importing its own submodules is the normal
direction.
"""

import ast
import collections
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("qwenjax", "pallas_kernels")


@dataclass(frozen=True)
class Module:
    name: str          # "qwenjax.ops.kernels"; a package is named by its __init__.py: "qwenjax.ops"
    path: Path
    is_package: bool

    @property
    def package(self) -> str:
        """The package its relative imports start from."""
        return self.name if self.is_package else self.name.rpartition(".")[0]

    def inside(self, package: str) -> bool:
        return (self.name + ".").startswith(package + ".")

    def where(self, node: ast.stmt) -> str:
        return f"{self.path.relative_to(ROOT).as_posix()}:{node.lineno}"


def _modules() -> dict[str, Module]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            modules[name] = Module(name, path, is_package)
    return modules


def _source(module: Module, node: ast.ImportFrom) -> str:
    """The module `from X import ...` reads from, a relative X resolved."""
    if not node.level:
        return node.module
    base = module.package.split(".")
    return ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))


def _scan(module: Module, modules: dict[str, Module]) -> tuple[dict[str, str], list[str]]:
    """({project module `module` depends on: where the first import saying so is}, its imports of another
    module's private names)."""
    depends, private_imports = {}, []

    def depend(target: str, where: str) -> None:
        parts = target.split(".")
        for package in (".".join(parts[:i]) for i in range(1, len(parts))):
            if package in modules and not module.inside(package):
                depends.setdefault(package, where)
        if target in modules and target != module.name:
            depends.setdefault(target, where)

    for node in ast.walk(ast.parse(module.path.read_text(), str(module.path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                depend(alias.name, module.where(node))
        elif isinstance(node, ast.ImportFrom):
            source = _source(module, node)
            for alias in node.names:
                if f"{source}.{alias.name}" in modules:  # a submodule, private (`_compat`) or not
                    depend(f"{source}.{alias.name}", module.where(node))
                    continue
                depend(source, module.where(node))
                is_private = alias.name.startswith("_") and not alias.name.endswith("__")
                if is_private and source in modules and source != module.name:
                    private_imports.append(f"{module.where(node)}: from {source} import {alias.name}")
    return depends, private_imports


def _graph() -> tuple[dict[str, dict[str, str]], list[str]]:
    """({module: {module it depends on: where}}, every import of another module's private name)."""
    modules = _modules()
    graph, private_imports = {}, []
    for name, module in modules.items():
        graph[name], private = _scan(module, modules)
        private_imports += private
    return graph, private_imports


def _reachable(graph: dict[str, dict[str, str]], start: str) -> set[str]:
    """The modules `start` depends on, directly or not (itself only through a cycle)."""
    seen, todo = set(), list(graph[start])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph[node]
    return seen


def _cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """For each group of modules that depend on each other, a shortest cycle through its first one."""
    reach = {node: _reachable(graph, node) for node in graph}
    groups = {frozenset(other for other in reach[node] if node in reach[other])
              for node in graph if node in reach[node]}  # each module on a cycle, with those it cycles through
    cycles = []
    for group in sorted(groups, key=min):
        start = min(group)
        previous, frontier = {}, collections.deque([start])
        while frontier:  # breadth first, inside the group, until an edge leads back to start
            node = frontier.popleft()
            if start in graph[node]:
                path = [node]
                while path[-1] != start:
                    path.append(previous[path[-1]])
                cycles.append(path[::-1] + [start])
                break
            for nxt in graph[node]:
                if nxt in group and nxt not in previous and nxt != start:
                    previous[nxt] = node
                    frontier.append(nxt)
    return cycles


def test_no_import_cycle():
    graph, _ = _graph()
    assert graph["qwenjax.cli"] and graph["qwenjax"], "no imports found: the scan is broken"
    cycles = _cycles(graph)
    shown = [cycle[0] + "".join(f" -> {b} ({graph[a][b]})" for a, b in zip(cycle, cycle[1:])) for cycle in cycles]
    assert not cycles, f"{len(cycles)} import cycle(s), each edge with the import that makes it:\n" + "\n".join(shown)


def test_no_module_imports_another_modules_private_name():
    _, private_imports = _graph()
    assert not private_imports, ("private names imported from another module (make them public, or keep them "
                                 "where they are used):\n" + "\n".join(private_imports))


def _environment_writes(path: Path) -> list[str]:
    """`os.environ[...] = / del`, `os.environ.update/setdefault/pop/clear`, `os.putenv/unsetenv` in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = None
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
            target = next((t for t in targets if isinstance(t, ast.Subscript) and ast.unparse(t.value).endswith(
                "environ")), None)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = ast.unparse(node.func)
            if (name.endswith(("environ.update", "environ.setdefault", "environ.pop", "environ.clear",
                               "environ.popitem")) or name in ("os.putenv", "os.unsetenv")):
                target = node
        if target is not None:
            found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno}: {ast.unparse(node).splitlines()[0]}")
    return found


def test_nothing_in_the_library_writes_the_environment():
    """Settings are passed explicitly (a model's `Kernels`); the environment is only read, once, as a fallback."""
    writes = [w for package in PACKAGES for path in sorted((ROOT / package).rglob("*.py"))
              for w in _environment_writes(path)]
    assert not writes, "the library writes the process environment:\n" + "\n".join(writes)
    assert _environment_writes(ROOT / "tests" / "conftest.py"), "the scan finds nothing: it is broken"


def test_tests_choose_kernels_through_the_setting():
    """Only the tests of the environment-variable fallback itself set a kernel's variable."""
    fallback_tests = {"test_model_object.py", "test_cpu_matvec.py"}
    names = ("QWENJAX_GATED_DELTA_RULE", "QWENJAX_GROUPED_MATMUL", "QWENJAX_EXPERT_PARALLEL", "QWENJAX_CPU_MATVEC")
    offenders = [f"{path.name}: {line.strip()}" for path in sorted((ROOT / "tests").glob("*.py"))
                 if path.name not in fallback_tests and path.name != "test_imports.py"
                 for line in path.read_text().splitlines() if "setenv" in line and any(n in line for n in names)]
    assert not offenders, "tests that choose a kernel through the environment:\n" + "\n".join(offenders)
