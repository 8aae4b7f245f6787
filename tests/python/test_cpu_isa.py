"""FASTLLM_CPU_ISA caps every CPU dispatcher: each level this machine has, picked in a fresh
process (the choice is made once per process), reports itself and gives the same quantized GEMM
results as the others; an unknown value is a clear error."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from fastllm import _C, ops
from test_quantized import _repacked, random_blocks

LEVELS = ["scalar", "avx2", "avx_vnni", "avx512"]
QUANT_NAMES = {"scalar": "scalar", "avx2": "avx2", "avx_vnni": "avx_vnni", "avx512": "avx512_vnni"}

# Prints the float and quantized paths, then saves y for every weight and 1..11 rows of x (every
# tile height, and a second tile).
SCRIPT = """
import sys, numpy as np
from fastllm import _C
print(_C.ops.cpu_isa(), _C.ops.quant_gemm_cpu_isa())
d = sys.argv[1]
x = np.load(d + "/x.npy")
data = np.load(d + "/weights.npz")
out = {}
for name in data.files:
    type_id, n = (int(v) for v in name.split("_"))
    for m in range(1, x.shape[0] + 1):
        y = np.empty((m, n), np.float32)
        _C.ops.quant_gemm(y, x[:m], data[name], type_id, None, True, 0)
        out[f"{name}_{m}"] = y
np.savez(d + "/" + sys.argv[2] + ".npz", **out)
"""


def _run(cap: str | None, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTLLM_CPU_ISA"}
    if cap is not None:
        env["FASTLLM_CPU_ISA"] = cap
    return subprocess.run([sys.executable, "-c", *args], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_each_isa_cap_reports_itself_and_agrees(tmp_path):
    k = 288  # 9 blocks: an odd count exercises the AVX-512 kernel's block pairs
    rng = np.random.default_rng(41)
    np.save(tmp_path / "x.npy", rng.standard_normal((11, k)).astype(np.float32))
    weights = {}
    for quant_type in ("Q8_0", "Q4_0", "Q4_1"):
        raw = random_blocks(rng, quant_type, 53, k)  # odd rows: the kernels' row-pair tails
        weights[f"{ops.GGML_QUANT_TYPES[quant_type]}_53"] = raw
    for quant_type in ("Q4_0", "Q4_1"):  # the layouts Q4_0 / Q4_1 weights are repacked to
        packed, type_id = _repacked(random_blocks(rng, quant_type, 56, k), quant_type, k)
        weights[f"{type_id}_56"] = packed
    q8_rows = random_blocks(rng, "Q8_0", 56, k)  # the output projection's 8-bit layouts
    for type_id, pack in ((2008, _C.ops.quant_pack_q8_0x8), (1008, _C.ops.quant_pack_q7_0x8)):
        packed = np.empty((56, k // 32 * 38), np.uint8)
        pack(packed, q8_rows, k)
        weights[f"{type_id}_56"] = packed
    np.savez(tmp_path / "weights.npz", **weights)

    results, reported = {}, {}
    for cap in [None, *LEVELS]:
        name = cap or "best"
        proc = _run(cap, SCRIPT, str(tmp_path), name)
        assert proc.returncode == 0, proc.stderr
        reported[name] = proc.stdout.split()
        results[name] = dict(np.load(tmp_path / f"{name}.npz"))
    best = next(level for level in LEVELS if QUANT_NAMES[level] == reported["best"][1])
    for level in LEVELS:
        # A cap above what the CPU has gives the CPU's best.
        effective = LEVELS[min(LEVELS.index(level), LEVELS.index(best))]
        float_path = "scalar" if effective == "scalar" else reported["best"][0]
        assert reported[level] == [float_path, QUANT_NAMES[effective]], level
    assert reported[best] == reported["best"]

    simd = [level for level in LEVELS[1:] if LEVELS.index(level) <= LEVELS.index(best)]
    q8_0 = f"{ops.GGML_QUANT_TYPES['Q8_0']}_53_"
    for key, want in results["scalar"].items():
        scale = np.abs(want).max()
        for level in simd:
            got = results[level][key]
            # The SIMD kernels take the same exact integer dot products; the float sums differ
            # from the scalar loop's order (and FMA) in the last bits only.
            np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-5, err_msg=key)
            # AVX-VNNI is AVX2's code with vpdpbusd; the AVX-512 kernels of the x8 layouts take
            # those kernels' per-lane steps two groups at a time, and Q8_0 takes the same float
            # steps on all three.
            x8 = key.split("_")[0] in ("1002", "1003", "1008", "2008")
            if level == "avx_vnni" or key.startswith(q8_0) or x8:
                assert np.array_equal(got, results["avx2"][key]), (level, key)
    assert results["best"].keys() == results["scalar"].keys()
    for key, got in results["best"].items():
        assert np.array_equal(got, results[best][key]), key


@pytest.mark.parametrize("value", ["avx1024", "AVX2", "native"])
def test_unknown_cpu_isa_is_a_clear_error(value):
    script = (
        "import numpy as np\n"
        "from fastllm import _C\n"
        "for query in (_C.ops.cpu_isa, _C.ops.quant_gemm_cpu_isa):\n"
        "    try:\n"
        "        query()\n"
        "    except ValueError as e:\n"
        "        print(e)\n"
        "y = np.empty((1, 8), np.float32)\n"
        "_C.ops.quant_gemm(y, np.ones((1, 32), np.float32), np.zeros((8, 34), np.uint8), 8, None,"
        " True, 0)\n"
    )
    proc = _run(value, script)
    message = f"FASTLLM_CPU_ISA='{value}' is not one of scalar, avx2, avx_vnni, avx512"
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith(message) for line in lines), proc.stdout
    # The GEMM itself raises too (a ValueError from Python, not a crash).
    assert proc.returncode == 1 and "ValueError: " + message in proc.stderr, proc.stderr
