"""Where an installed fastllm keeps its C++ package: the engine's headers, its static libraries
and fastllmConfig.cmake, so a C++ program builds against a pip-installed wheel with

    cmake -S . -B build -Dfastllm_DIR="$(python -m fastllm --cmake-dir)"

A wheel carries them inside the Python package (fastllm/cmake, fastllm/include, fastllm/lib);
a source checkout has none (``cmake --install`` puts them in a prefix of its own instead).
"""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def _folder(name: str, marker: str) -> str:
    path = _PACKAGE / name
    if not (path / marker).exists():
        raise FileNotFoundError(
            f"this fastllm ({_PACKAGE}) carries no C++ package ({path / marker} is missing): "
            "it comes with an installed wheel; from a source checkout, `cmake --install` the "
            "build to a prefix and point CMAKE_PREFIX_PATH at it")
    return str(path)


def cmake_dir() -> str:
    """The folder of fastllmConfig.cmake: the value for ``-Dfastllm_DIR=``."""
    return _folder("cmake", "fastllmConfig.cmake")


def include_dir() -> str:
    """The folder holding ``fastllm/engine.h`` and the other public headers."""
    return _folder("include", "fastllm/engine.h")


def library_dir() -> str:
    """The folder of the static libraries (libfastllm_engine.a, ...)."""
    return _folder("lib", "libfastllm_engine.a")
