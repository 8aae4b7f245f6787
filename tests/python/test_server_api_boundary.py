"""The server talks to one object: every module of the server (python/fastllm/entrypoints)
reaches the engine through AsyncLLM's public API and the public parameter / result types, never
through the engine's internals (the native engine, the executor, the output processor, the
guided-decoding manager). Checked on the source (ast), so a violation fails without a model."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ENTRYPOINTS = Path(__file__).resolve().parents[2] / "python" / "fastllm" / "entrypoints"

# The offline API (LLM) is the front end of LLMEngine by design, not part of the server.
OFFLINE = {"llm.py"}

FORBIDDEN_MODULES = (
    "fastllm._C",
    "fastllm.engine.llm_engine",
    "fastllm.engine.output_processor",
    "fastllm.engine.request_state",
    "fastllm.worker",
    "fastllm.models",
    "fastllm.guided.manager",
    "fastllm.guided.registry",
    "fastllm.guided.backends",
    "fastllm.guided.hook",
)


def _server_modules() -> list[Path]:
    return sorted(p for p in ENTRYPOINTS.rglob("*.py")
                  if p.relative_to(ENTRYPOINTS).as_posix() not in OFFLINE)


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN_MODULES)


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, module) for every import, the names of `from x import y` included as x.y (so
    `from fastllm import _C` counts as fastllm._C)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def _internal_reaches(tree: ast.AST) -> list[tuple[int, str]]:
    """Attribute chains `<x>.core.<y>` and `<x>.engine.engine`: a front end's engine core and
    the raw native engine."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        if isinstance(node.value, ast.Attribute) and node.value.attr == "core":
            found.append((node.lineno, f".core.{node.attr}"))
        if node.attr == "engine" and (
                isinstance(node.value, ast.Attribute) and node.value.attr == "engine"
                or isinstance(node.value, ast.Name) and node.value.id == "engine"):
            found.append((node.lineno, ".engine.engine"))
    return found


def test_the_server_modules_are_found():
    names = {p.name for p in _server_modules()}
    assert {"api_server.py", "serving_base.py", "serving_chat.py", "serving_completion.py",
            "serving_models.py", "errors.py"} <= names
    assert "llm.py" not in names


@pytest.mark.parametrize("path", _server_modules(),
                         ids=lambda p: p.relative_to(ENTRYPOINTS).as_posix())
def test_server_module_uses_only_the_public_engine_api(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [f"line {line}: imports {module}" for line, module in _imported_modules(tree)
           if _is_forbidden(module)]
    bad += [f"line {line}: reaches into {what}" for line, what in _internal_reaches(tree)]
    assert not bad, f"{path.name}: " + "; ".join(bad)


def test_the_checks_catch_what_they_forbid():
    """The checkers themselves: each forbidden form is reported, the allowed ones are not."""
    source = (
        "from fastllm import _C\n"
        "import fastllm.worker.cpu_runner\n"
        "from fastllm.guided.manager import GuidedDecodingManager\n"
        "from fastllm.engine.async_llm import AsyncLLM\n"
        "from fastllm.guided.params import GuidedDecodingParams\n"
        "x = engine.core.model_config\n"
        "y = engine.engine.stats()\n"
        "w = self.engine.engine\n"
        "z = engine.stats()\n"
    )
    tree = ast.parse(source)
    forbidden = sorted({m for _, m in _imported_modules(tree) if _is_forbidden(m)})
    assert forbidden == ["fastllm._C", "fastllm.guided.manager",
                         "fastllm.guided.manager.GuidedDecodingManager",
                         "fastllm.worker.cpu_runner"]
    assert sorted(what for _, what in _internal_reaches(tree)) == [
        ".core.model_config", ".engine.engine", ".engine.engine"]
