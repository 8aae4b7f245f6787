"""FASTLLM_CPU_ISA caps every CPU dispatcher: each level this machine has, picked in a fresh
process (the choice is made once per process), reports itself and gives the same quantized GEMM
results as the others (the same refined logits bit for bit), and the paged attention of each path matches a float64 reference; an
unknown value is a clear error."""

from __future__ import annotations

import os
import pickle
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
    # Every entry of every row recomputed as a float dot product (refine_top_logits).
    refined = np.zeros((x.shape[0], n), np.float32)
    _C.ops.refine_top_logits(refined, x, data[name], type_id, None, n)
    out[f"refine_{name}"] = refined
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
        if key.startswith("refine_"):
            # The refinement's dot products take the same steps on every path: the same bits.
            assert np.count_nonzero(want) == want.size, key
            for level in simd:
                assert np.array_equal(results[level][key], want), (level, key)
            continue
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


# Runs every paged attention call of a pickled list and pickles the outputs, after printing the
# attention kernels' code path.
ATTENTION_SCRIPT = """
import pickle, sys, numpy as np
from fastllm import _C
print(_C.ops.attention_cpu_isa())
with open(sys.argv[1], "rb") as f:
    calls = pickle.load(f)
outs = []
for c in calls:
    out = np.empty(c["query"].shape, np.float32)
    _C.ops.paged_attention(out, c["query"], c["key_cache"], c["value_cache"], c["query_start_loc"],
                           c["context_lens"], c["block_tables"], c["scale"], c["window"])
    outs.append(out)
with open(sys.argv[2], "wb") as f:
    pickle.dump(outs, f)
"""


def _e4m3_value(code: np.ndarray) -> np.ndarray:
    """float8 e4m3fn codes (no NaN among them) as float64."""
    sign = np.where(code & 0x80, -1.0, 1.0)
    exponent, mantissa = (code >> 3) & 0xF, (code & 7).astype(np.float64)
    magnitude = np.where(exponent == 0, mantissa / 8 * 2.0**-6,
                         (1 + mantissa / 8) * 2.0 ** (exponent.astype(np.float64) - 7))
    return sign * magnitude


def _paged_cache(rng, contexts, kv_heads, d, cache_dtype, block_size=16):
    """K/V of sequences with the given context lengths in a paged cache with scattered blocks
    (unused slots NaN, so a stray read shows), its block table, and the float64 K/V per
    sequence. cache_dtype np.uint8: float8 e4m3 codes of magnitudes 1/8 to 7.5 (unused slots 0x7F,
    NaN)."""
    counts = [-(-c // block_size) for c in contexts]
    ids = rng.permutation(np.arange(1, sum(counts) + 2))
    shape = (sum(counts) + 2, block_size, kv_heads, d)
    fp8 = cache_dtype == np.uint8
    caches = [np.full(shape, 0x7F if fp8 else np.nan, cache_dtype) for _ in range(2)]
    table = np.zeros((len(contexts), max(counts)), np.int32)
    kv = []
    cursor = 0
    for s, (ctx, count) in enumerate(zip(contexts, counts)):
        table[s, :count] = ids[cursor:cursor + count]
        cursor += count
        pair = []
        for cache in caches:
            if fp8:
                size = (ctx, kv_heads, d)
                sign, exponent = rng.integers(0, 2, size), rng.integers(4, 10, size)
                x = (sign << 7 | exponent << 3 | rng.integers(0, 8, size)).astype(np.uint8)
            else:
                x = rng.standard_normal((ctx, kv_heads, d)).astype(cache_dtype)
            for j in range(ctx):
                cache[table[s, j // block_size], j % block_size] = x[j]
            pair.append(_e4m3_value(x) if fp8 else x.astype(np.float64))
        kv.append(pair)
    return caches[0], caches[1], table, kv


def _attention_reference(query, kv, query_lens, contexts, group, scale, window):
    """float64 causal attention; query [tokens, heads, d], kv[s] = (K, V) [context, kv_heads, d]."""
    out = np.empty(query.shape, np.float64)
    start = 0
    for (k, v), qlen, ctx in zip(kv, query_lens, contexts):
        q = query[start:start + qlen].astype(np.float64)
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("thd,khd->htk", q, k) * scale
        pos = np.arange(ctx - qlen, ctx)[:, None]
        key = np.arange(ctx)[None, :]
        mask = (key <= pos) & ((key > pos - window) if window > 0 else True)
        scores = np.where(mask[None], scores, -np.inf)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        out[start:start + qlen] = np.einsum("htk,khd->thd", weights, v)
        start += qlen
    return out


def _expected_attention_paths() -> dict[str, str]:
    """The attention path each cap should give on this CPU (from /proc/cpuinfo's flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next((line.split() for line in f if line.startswith("flags")), []))
    except OSError:
        flags = set()
    avx2 = "avx2" if {"avx2", "fma", "f16c"} <= flags else "scalar"
    avx512 = "avx512" if avx2 == "avx2" and {"avx512f", "avx512bw", "avx512vl"} <= flags else avx2
    return {"avx2": avx2, "avx512": avx512}


def test_attention_isa_paths_match_float64_and_are_tile_invariant(tmp_path):
    """Decode (one token per sequence, odd context lengths) and a multi-token query, over
    float32, float16 and float8 caches, run with the attention kernels of FASTLLM_CPU_ISA=avx2
    and avx512: both match a float64 reference, and on each a token decoded alone gives the same
    bits as inside the multi-token query (speculative decoding's verification must reproduce
    one-token decode), with and without a sliding window."""
    rng = np.random.default_rng(7)
    decode_contexts = [1, 5, 37, 67, 130]
    multi_len, multi_context = 7, 45
    calls, checks = [], []  # checks: (config, kind, call index, reference or None)
    for d in (64, 128):
        for cache_dtype in (np.float32, np.float16, np.uint8):  # uint8: float8 e4m3
            for heads, kv_heads in ((4, 4), (8, 4), (8, 2)):
                cache_name = "e4m3" if cache_dtype == np.uint8 else np.dtype(cache_dtype).name
                config = f"d{d}/{cache_name}/gqa{heads // kv_heads}"
                group, scale = heads // kv_heads, d**-0.5
                kc, vc, table, kv = _paged_cache(rng, decode_contexts, kv_heads, d, cache_dtype)
                query = rng.standard_normal((len(decode_contexts), heads, d)).astype(np.float32)
                n = len(decode_contexts)
                calls.append({"query": query, "key_cache": kc, "value_cache": vc,
                              "query_start_loc": np.arange(n + 1, dtype=np.int32),
                              "context_lens": np.array(decode_contexts, np.int32),
                              "block_tables": table, "scale": scale, "window": -1})
                ref = _attention_reference(query, kv, [1] * n, decode_contexts, group, scale, -1)
                checks.append((config, "decode", len(calls) - 1, ref))

                kc, vc, table, kv = _paged_cache(rng, [multi_context], kv_heads, d, cache_dtype)
                query = rng.standard_normal((multi_len, heads, d)).astype(np.float32)
                for window in (-1, 20):
                    base = {"key_cache": kc, "value_cache": vc, "block_tables": table,
                            "scale": scale, "window": window}
                    calls.append({**base, "query": query,
                                  "query_start_loc": np.array([0, multi_len], np.int32),
                                  "context_lens": np.array([multi_context], np.int32)})
                    ref = _attention_reference(query, kv, [multi_len], [multi_context], group,
                                               scale, window)
                    checks.append((config, f"multi/window{window}", len(calls) - 1, ref))
                    for t in range(multi_len):
                        calls.append({**base, "query": query[t:t + 1].copy(),
                                      "query_start_loc": np.array([0, 1], np.int32),
                                      "context_lens": np.array(
                                          [multi_context - multi_len + t + 1], np.int32)})
                        checks.append((config, f"alone{t}/window{window}", len(calls) - 1, None))
    with open(tmp_path / "calls.pkl", "wb") as f:
        pickle.dump(calls, f)

    for cap, path in _expected_attention_paths().items():
        result = tmp_path / f"{cap}.pkl"
        proc = _run(cap, ATTENTION_SCRIPT, str(tmp_path / "calls.pkl"), str(result))
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == [path], cap
        with open(result, "rb") as f:
            outs = pickle.load(f)
        multi = None
        for config, kind, index, ref in checks:
            got = outs[index]
            where = f"{cap} {config} {kind}"
            if ref is not None:
                np.testing.assert_allclose(got, ref, atol=2e-5, rtol=2e-5, err_msg=where)
                if kind.startswith("multi"):
                    multi = got
            else:  # alone{t}: the multi-token query's token t, bit for bit
                t = int(kind[len("alone"):kind.index("/")])
                assert np.array_equal(got[0], multi[t]), where


SILU_SCRIPT = """
import sys, numpy as np
from fastllm import kernels
h = np.load(sys.argv[1])
act = np.empty((h.shape[0], h.shape[1] // 2), np.float32)
kernels.act_and_mul(act, h, 0, 0)
np.save(sys.argv[2], act)
"""


def test_silu_and_mul_gives_the_same_bits_on_avx2_and_avx512(tmp_path):
    """The AVX-512 SiLU-and-mul takes the AVX2 one's steps 16 lanes at a time (and leaves it the
    tail): every element, wherever it falls in its row, gets the same bits on either path, and
    matches float64 (the MoE experts' rows are sliced differently for one token than for a
    batch, so a lane's result must not depend on the path)."""
    paths = _expected_attention_paths()
    if paths["avx512"] != "avx512":
        pytest.skip("no AVX-512 on this CPU")
    rng = np.random.default_rng(11)
    h = (rng.standard_normal((5, 2 * 203)) * 20).astype(np.float32)  # 203: 16s, an 8, a tail
    h[0, :9] = [-100.0, -89.0, -88.5, -87.5, 0.0, -0.0, 88.0, 89.0, 100.0]
    np.save(tmp_path / "h.npy", h)
    got = {}
    for cap in ("avx2", "avx512"):
        proc = _run(cap, SILU_SCRIPT, str(tmp_path / "h.npy"), str(tmp_path / f"{cap}.npy"))
        assert proc.returncode == 0, proc.stderr
        got[cap] = np.load(tmp_path / f"{cap}.npy")
    assert np.array_equal(got["avx2"], got["avx512"])
    gate, up = h[:, :203].astype(np.float64), h[:, 203:].astype(np.float64)
    want = gate / (1.0 + np.exp(-gate)) * up
    np.testing.assert_allclose(got["avx512"], want, rtol=2e-6, atol=1e-30)
