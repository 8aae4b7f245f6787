"""The import structure of python/fastllm: no import cycles between modules, and the folders import
each other only downwards (DESIGN.md, "Layers and the one direction of dependency").

Read from the source with ast, not by importing: every ``import`` / ``from ... import`` of a fastllm
module counts, at module level or inside a function, except under ``if TYPE_CHECKING:``. A lazy import
inside a function still ties the two modules together, so it cannot be the way to break a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "python" / "fastllm"

# Folder (a subpackage, or a top-level module by its name; "fastllm" is the package's __init__)
# -> the folders it may import. Read top down: entrypoints -> engine -> distributed ->
# (worker, guided, tokenizer) -> models -> loader; ops is the torch kernel layer under models, kernels (the one
# caller of _C.ops, torch-free) under ops; config, sampling_params and outputs are shared data
# types; version is the package version, cpp_package the installed C++ package's paths (read by
# `python -m fastllm`), torch_extra the one place torch is imported from; _C is the extension.
ALLOWED: dict[str, set[str]] = {
    "fastllm": {"entrypoints", "engine", "config", "sampling_params", "outputs", "cpp_package",
                "version", "lora", "_C"},
    "__main__": {"cpp_package", "version"},
    "entrypoints": {"engine", "guided", "tokenizer", "config", "sampling_params", "outputs",
                    "lora", "torch_extra", "version", "distributed", "_C"},
    "engine": {"worker", "guided", "tokenizer", "models", "loader", "config", "sampling_params",
               "outputs", "lora", "torch_extra", "distributed", "_C"},
    # The model on several workers: their processes and the executor over them.
    "distributed": {"worker", "models", "loader", "config", "torch_extra", "_C"},
    "worker": {"models", "ops", "config", "lora", "torch_extra", "_C"},
    # LoRA adapters: reading them (loader, config), the torch executor's slots (ops).
    "lora": {"loader", "ops", "config", "torch_extra"},
    "guided": {"torch_extra", "_C"},
    "tokenizer": {"loader"},
    "models": {"loader", "ops", "kernels", "config", "torch_extra", "_C"},
    "loader": {"torch_extra"},
    "ops": {"kernels", "torch_extra"},
    "kernels": {"_C"},
    "config": {"torch_extra", "_C"},
    "sampling_params": {"guided", "_C"},
    "outputs": set(),
    "cpp_package": set(),
    "torch_extra": set(),
    "version": set(),
    "_C": set(),
}

# Imports against the direction, each with its reason.
EXCEPTIONS: set[tuple[str, str]] = {
    # The model registry is one table (models/registry.py, data only, importing nothing from
    # fastllm); its GGUF layouts and config-key aliases are what the loader applies.
    ("fastllm.loader.config", "fastllm.models.registry"),
    ("fastllm.loader.gguf_mapping", "fastllm.models.registry"),
}


def _modules() -> dict[str, Path]:
    """Dotted name -> file of every module in the package, and the compiled extension."""
    modules = {"fastllm._C": PACKAGE}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (never executed)."""
    skipped = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The fastllm modules ``name`` imports: ``from pkg import x`` is module ``pkg.x`` when that is a
    module, else ``pkg``; ``import a.b.c`` is the longest of its prefixes that is a module."""

    def known(dotted: str) -> str:
        while dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted

    tree = ast.parse(path.read_text(), str(path))
    skipped = _type_checking_only(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(known(a.name) for a in node.names if a.name.split(".")[0] == "fastllm")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            if base.split(".")[0] != "fastllm":
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in modules else known(base))
    found.discard(name)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: (set() if name == "fastllm._C" else _imports(name, path, modules))
            for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a path whose last node is its first, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _folder(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_graph_sees_the_imports_it_must():
    graph = _graph()
    # Module level, a function-level one (adapter.py reads gguf_mapping in a function) and the
    # extension.
    assert "fastllm.kernels" in graph["fastllm.ops"]
    assert "fastllm.loader.gguf_mapping" in graph["fastllm.lora.adapter"]
    assert "fastllm._C" in graph["fastllm.kernels"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_registry_imports_nothing_from_fastllm():
    # What lets the loader read the registry without a cycle (EXCEPTIONS).
    assert _graph()["fastllm.models.registry"] == set()


def test_no_module_import_cycles():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_folders_import_only_downwards():
    assert set(ALLOWED) == {_folder(m) for m in _graph()}, "a folder is missing from ALLOWED"
    wrong = sorted(f"{m} imports {dep}" for m, deps in _graph().items() for dep in deps
                   if _folder(dep) != _folder(m) and _folder(dep) not in ALLOWED[_folder(m)]
                   and (m, dep) not in EXCEPTIONS)
    assert not wrong, "imports against the layer direction:\n" + "\n".join(wrong)
    folder_graph = {f: {d for d in deps if d != f} for f, deps in ALLOWED.items()}
    assert _find_cycle(folder_graph) is None, "ALLOWED itself has a cycle"


def test_only_kernels_calls_the_native_ops():
    """One Python route per kernel: fastllm.kernels is the only module that reaches ``_C.ops``
    (config.py asks ``_C.ops.built_with_cuda()``, a build query, not a kernel)."""
    callers = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                     if "_C.ops" in p.read_text().replace("``_C.ops", ""))
    assert callers == ["config.py", "kernels.py"], callers
