"""`python -m fastllm`: where the installed C++ package is, and the version.

    cmake -S . -B build -Dfastllm_DIR="$(python -m fastllm --cmake-dir)"
"""

from __future__ import annotations

import argparse
import sys

from fastllm import cpp_package
from fastllm.version import __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fastllm",
        description="Paths of the C++ package an installed fastllm wheel carries (headers, "
                    "static libraries, CMake config). The server is `fastllm-serve`.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--cmake-dir", action="store_true",
                      help="the folder of fastllmConfig.cmake, for -Dfastllm_DIR=")
    what.add_argument("--include-dir", action="store_true", help="the public headers' root")
    what.add_argument("--library-dir", action="store_true", help="the static libraries' folder")
    what.add_argument("--version", action="store_true", help="fastllm's version")
    ns = parser.parse_args(argv)
    if ns.version:
        print(__version__)
        return 0
    find = (cpp_package.cmake_dir if ns.cmake_dir else
            cpp_package.include_dir if ns.include_dir else cpp_package.library_dir)
    try:
        print(find())
    except FileNotFoundError as exc:
        print(f"python -m fastllm: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
