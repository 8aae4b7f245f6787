#!/usr/bin/env bash
# Compile every CUDA source of the kernels library with hipcc for an AMD target, as a portability
# check (objects are discarded). Needs hipcc: apt-get install -y hipcc libamdhip64-dev.
# Usage: scripts/hip_compile_check.sh [offload-arch, default gfx90a]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
arch="${1:-gfx90a}"
if ! command -v hipcc >/dev/null 2>&1; then
  echo "hipcc not found: apt-get install -y hipcc libamdhip64-dev" >&2
  exit 2
fi
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
status=0
start=$(date +%s)
for source in "$root"/cpp/kernels/src/cuda/*.cu; do
  name="$(basename "$source" .cu)"
  t0=$(date +%s)
  # Without HIP_PLATFORM=amd, hipcc sees nvcc on PATH and targets NVIDIA instead.
  if HIP_PLATFORM=amd hipcc -x hip --offload-arch="$arch" -std=c++17 -O2 \
      -I"$root/cpp/kernels/include" -DFASTLLM_WITH_CUDA=1 -c "$source" -o "$out/$name.o"; then
    echo "ok     $name.cu ($(( $(date +%s) - t0 )) s)"
  else
    echo "FAILED $name.cu"
    status=1
  fi
done
echo "hip compile check: $([ $status -eq 0 ] && echo passed || echo FAILED) in $(( $(date +%s) - start )) s"
exit $status
