"""What the packaging promises, checked without building a wheel (scripts/wheel_check.sh installs
the real one): torch is optional and reached only through fastllm.torch_extra, whose error names
the `torch` extra; the base install's path (a GGUF model on the CPU) runs with torch unimportable;
`python -m fastllm --cmake-dir` finds the C++ package a wheel carries."""

from __future__ import annotations

import ast
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import fastllm
from fastllm import _C, config, cpp_package
from fastllm import __main__ as fastllm_main
from fastllm.config import EngineArgs
from fastllm.torch_extra import INSTALL_HINT, TorchMissingError, require_torch

PACKAGE = Path(fastllm.__file__).resolve().parent
# Run first in a child process: `import torch` then fails as it does where torch is not installed.
NO_TORCH = "import sys; sys.modules['torch'] = None\n"


def _torch_imports(path: Path) -> list[int]:
    """Lines of ``import torch`` / ``from torch ...`` outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(n) for node in ast.walk(tree)
               if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for stmt in node.body for n in ast.walk(stmt)}
    lines = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            modules = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            modules = [node.module or ""]
        else:
            continue
        if any(m.split(".")[0] == "torch" for m in modules):
            lines.append(node.lineno)
    return lines


def test_only_torch_extra_imports_torch(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"
                      "import torch.nn\ndef f():\n    from torch import nn\n"
                      "from fastllm.torch_extra import torch\n")
    assert _torch_imports(sample) == [4, 6]
    found = {str(p.relative_to(PACKAGE)): lines for p in sorted(PACKAGE.rglob("*.py"))
             if (lines := _torch_imports(p))}
    assert list(found) == ["torch_extra.py"] and len(found["torch_extra.py"]) == 1, found


def _run_without_torch(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", NO_TORCH + code, *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_without_torch_the_gguf_path_runs_and_the_torch_path_names_the_extra(tiny_llama_dir):
    code = """
import json
import fastllm
from fastllm.torch_extra import TorchMissingError
found = {}
try:
    import fastllm.ops
except TorchMissingError as exc:
    found["import"] = str(exc)
try:
    fastllm.LLM(model=sys.argv[1], max_model_len=128)
except TorchMissingError as exc:
    found["hf_model"] = str(exc)
llm = fastllm.LLM(max_model_len=256)  # the default GGUF: the C++ CPU executor
out = llm.generate(["The capital of France is"],
                   fastllm.SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
found["gguf_text"] = out[0].outputs[0].text
found["torch_loaded"] = any(m == "torch" or m.startswith("torch.") for m in sys.modules
                            if sys.modules[m] is not None)
print(json.dumps(found))
"""
    proc = _run_without_torch(code, tiny_llama_dir)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "Paris" in found["gguf_text"]
    assert found["torch_loaded"] is False
    assert found["import"].startswith("fastllm's torch path (HF-format models")
    assert found["import"].endswith(INSTALL_HINT)
    assert found["hf_model"] == (
        f"model {tiny_llama_dir!r} (safetensors weights, not GGUF) needs PyTorch, which the base "
        f"install of fastllm leaves out (it serves GGUF models on the CPU without it): "
        f"{INSTALL_HINT}")
    assert INSTALL_HINT == 'pip install "fastllm[torch]"'


def test_server_without_torch_exits_with_the_hint(tiny_llama_dir):
    code = ("from fastllm.entrypoints.cli import main\n"
            "sys.exit(main(['--host', '127.0.0.1', '--port', '0', '--model', sys.argv[1]]))")
    proc = _run_without_torch(code, tiny_llama_dir)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"fastllm-serve: model {tiny_llama_dir!r} (safetensors weights")
    assert last.endswith(INSTALL_HINT)


def test_require_torch(monkeypatch, caplog):
    import torch

    assert require_torch("anything") is torch
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(TorchMissingError, match=r"^the GPU needs PyTorch") as info:
        require_torch("the GPU")
    assert isinstance(info.value, ImportError) and info.value.name == "torch"
    # device "cuda" asks for torch; "auto" on a CUDA build with a GPU but no torch runs on the CPU
    with pytest.raises(TorchMissingError, match=r"^device 'cuda' needs PyTorch"):
        EngineArgs(device="cuda").resolve_device()
    monkeypatch.setattr(_C.ops, "built_with_cuda", lambda: True)
    monkeypatch.setattr(config, "_gpu_device_nodes_present", lambda: True)
    with caplog.at_level(logging.WARNING, logger="fastllm.config"):
        assert EngineArgs(device="auto").resolve_device() == "cpu"
    expected = ("a GPU is present but PyTorch is not installed: running on the CPU "
                f"({INSTALL_HINT} for the GPU)")
    assert caplog.messages == [expected]


def test_cmake_dir_finds_the_cpp_package_a_wheel_carries(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cpp_package, "_PACKAGE", tmp_path)
    with pytest.raises(FileNotFoundError, match="carries no C\\+\\+ package"):
        fastllm.cmake_dir()
    assert fastllm_main.main(["--cmake-dir"]) == 1
    assert "cmake --install" in capsys.readouterr().err

    (tmp_path / "cmake").mkdir()
    (tmp_path / "cmake" / "fastllmConfig.cmake").write_text("")
    (tmp_path / "include" / "fastllm").mkdir(parents=True)
    (tmp_path / "include" / "fastllm" / "engine.h").write_text("")
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libfastllm_engine.a").write_text("")
    assert fastllm.cmake_dir() == str(tmp_path / "cmake")
    for flag, folder in (("--cmake-dir", "cmake"), ("--include-dir", "include"),
                         ("--library-dir", "lib")):
        assert fastllm_main.main([flag]) == 0
        assert capsys.readouterr().out == f"{tmp_path / folder}\n"
    assert fastllm_main.main(["--version"]) == 0
    assert capsys.readouterr().out == f"{fastllm.__version__}\n"
