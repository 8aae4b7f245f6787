"""Prints pyproject.toml's build requirements, one a line, for a build without isolation.

CMake and Ninja are added when the machine has none new enough for scikit-build-core's
`cmake.version` (the same rule scikit-build-core applies in an isolated build).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = None


def _load(path: Path) -> dict:
    if tomllib is not None:
        return tomllib.loads(path.read_text())
    try:
        import tomli
    except ModuleNotFoundError:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "tomli"], check=True)
        import tomli
    return tomli.loads(path.read_text())


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def main() -> None:
    project = _load(Path(__file__).resolve().parent.parent / "pyproject.toml")
    requires = list(project["build-system"]["requires"])
    wanted = project["tool"]["scikit-build"]["cmake"]["version"].lstrip(">=")
    cmake = shutil.which("cmake")
    have = None
    if cmake:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True).stdout
        have = _version(out)
    if have is None or have < _version(wanted):
        requires.append(f"cmake>={wanted}")
    if shutil.which("ninja") is None:
        requires.append("ninja")
    print("\n".join(requires))


if __name__ == "__main__":
    main()
