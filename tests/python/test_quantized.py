"""GGUF-quantized linear layers: the quant_linear kernel against x @ dequantize(W).T, scalar
against AVX2, and the quantized default model against its dequantized (fp32) twin."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastllm import _C, LLM, SamplingParams, ops
from fastllm.config import EngineArgs, ModelConfig
from fastllm.loader import dequantize, load_config, resolve_model
from fastllm.models import cpu_model, fidelity
from fastllm.models.cpu_model import CpuModel
from fastllm.models.native_cpu import (
    F32,
    LM_HEAD_REFINE,
    LM_HEAD_REFINE_Q7,
    Q7_0X8,
    Q8_0X8,
    convert_rows,
    lm_head_refine_count,
    prepare_cpu_linear,
    q7_output_enabled,
)
from fastllm.models.quant_linear import QuantEmbedding, QuantLinear
from fastllm.tokenizer import load_tokenizer

CUDA = torch.cuda.is_available() and _C.ops.built_with_cuda()
TYPES_32 = ["Q8_0", "Q4_0", "Q4_1"]
TYPES_256 = ["Q4_K", "Q6_K"]


def _half_bytes(rng: np.random.Generator, shape, low: float, high: float) -> np.ndarray:
    return rng.uniform(low, high, size=shape).astype(np.float16).view(np.uint8).reshape(
        *shape[:-1], shape[-1] * 2)


def random_blocks(rng: np.random.Generator, quant_type: str, n: int, k: int) -> np.ndarray:
    """uint8 [n, bytes_per_row]: valid blocks with random scales and quants."""
    values, _ = ops.quant_block_info(ops.GGML_QUANT_TYPES[quant_type])
    nb = k // values

    def u8(count):
        return rng.integers(0, 256, size=(n, nb, count), dtype=np.uint8)

    if quant_type == "Q8_0":
        q = rng.integers(-127, 128, size=(n, nb, 32), dtype=np.int8).view(np.uint8)
        parts = [_half_bytes(rng, (n, nb, 1), 1e-3, 2e-2), q]
    elif quant_type == "Q4_0":
        parts = [_half_bytes(rng, (n, nb, 1), 1e-3, 2e-2), u8(16)]
    elif quant_type == "Q4_1":
        parts = [_half_bytes(rng, (n, nb, 1), 1e-3, 2e-2),
                 _half_bytes(rng, (n, nb, 1), -0.1, 0.0), u8(16)]
    elif quant_type == "Q4_K":
        parts = [_half_bytes(rng, (n, nb, 1), 1e-4, 1e-3),
                 _half_bytes(rng, (n, nb, 1), 1e-4, 1e-3), u8(12), u8(128)]
    else:  # Q6_K
        parts = [u8(128), u8(64), u8(16), _half_bytes(rng, (n, nb, 1), 1e-4, 1e-3)]
    return np.ascontiguousarray(np.concatenate(parts, axis=2).reshape(n, -1))


def dequantized(raw: np.ndarray, quant_type: str, n: int, k: int) -> torch.Tensor:
    return torch.from_numpy(dequantize(raw.reshape(-1), quant_type, n * k).reshape(n, k))


def fake_quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x rounded through the kernel's int8 activation blocks (32 values, scale max|x| / 127)."""
    blocks = x.reshape(x.shape[0], -1, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127.0
    inv = torch.where(d != 0, 1.0 / d, torch.zeros_like(d))
    return (torch.round(blocks * inv) * d).reshape(x.shape)


SHAPES = [(1, 37, 64), (3, 129, 96), (7, 64, 576), (33, 45, 256), (5, 300, 1536)]


@pytest.mark.parametrize("quant_type", TYPES_32 + TYPES_256)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_quant_linear_matches_dequantized_reference(quant_type, m, n, k):
    values, _ = ops.quant_block_info(ops.GGML_QUANT_TYPES[quant_type])
    if k % values:
        k = values * max(1, k // values)
    rng = np.random.default_rng(m * 1000 + n + k)
    raw = random_blocks(rng, quant_type, n, k)
    w = dequantized(raw, quant_type, n, k)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    y = ops.quant_linear(x, torch.from_numpy(raw), ops.GGML_QUANT_TYPES[quant_type], n)
    assert y.shape == (m, n) and y.dtype == torch.float32
    exact = x.double() @ w.double().T
    scale = exact.abs().max().item()
    if quant_type in TYPES_32:
        # int8 activations: exact against the reference fed the same rounded activations, and
        # within the activation rounding (~0.5/127 relative per value) of the float product.
        same_input = fake_quantize_rows(x).double() @ w.double().T
        torch.testing.assert_close(y.double(), same_input, atol=2e-5 * scale, rtol=1e-4)
        rel = (y.double() - exact).norm() / exact.norm()
        assert rel < 0.01, rel
    else:
        torch.testing.assert_close(y.double(), exact, atol=2e-5 * scale, rtol=1e-4)


@pytest.mark.parametrize("quant_type", TYPES_32 + TYPES_256)
def test_scalar_and_simd_paths_agree(quant_type):
    m, n, k = 9, 71, 512
    rng = np.random.default_rng(7)
    raw = torch.from_numpy(random_blocks(rng, quant_type, n, k))
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    type_id = ops.GGML_QUANT_TYPES[quant_type]
    simd = ops.quant_linear_into(torch.empty(m, n), x, raw, type_id, allow_simd=True)
    scalar = ops.quant_linear_into(torch.empty(m, n), x, raw, type_id, allow_simd=False)
    scale = scalar.abs().max().item()
    torch.testing.assert_close(simd, scalar, atol=1e-5 * scale, rtol=1e-5)


@pytest.mark.parametrize("cap", ["avx2", "avx_vnni"])
def test_simd_variants_agree(tmp_path, cap):
    """The narrower SIMD kernels (picked in a fresh process with FASTLLM_CPU_ISA, as the
    path is chosen once) give the same results as this process's path, on every tile height."""
    k = 288  # 9 blocks: an odd count exercises the AVX-512 kernel's block-pair tail
    rng = np.random.default_rng(13)
    x = rng.standard_normal((11, k)).astype(np.float32)
    # The row-major types, and the CPU layouts (weights stored ready; type ids in the file name).
    weights = {str(ops.GGML_QUANT_TYPES[t]): random_blocks(rng, t, 53, k) for t in TYPES_32}
    weights["1003"] = _repacked(random_blocks(rng, "Q4_1", 56, k), "Q4_1", k)[0]
    weights["1008"] = _q7(random_blocks(rng, "Q8_0", 56, k), k)
    outputs = {}
    for type_id, raw in weights.items():
        np.save(tmp_path / f"{type_id}_w.npy", raw)
        outputs[type_id] = [ops.quant_linear(torch.from_numpy(x[:m]), torch.from_numpy(raw),
                                             int(type_id), raw.shape[0]) for m in range(1, 12)]
    np.save(tmp_path / "x.npy", x)
    script = (
        "import sys, numpy as np, torch\n"
        "from fastllm import _C, ops\n"
        "d = sys.argv[1]; x = torch.from_numpy(np.load(d + '/x.npy'))\n"
        "print(_C.ops.quant_gemm_cpu_isa())\n"
        f"for t in {sorted(weights)}:\n"
        "    w = torch.from_numpy(np.load(d + f'/{t}_w.npy'))\n"
        "    for m in range(1, 12):\n"
        "        y = ops.quant_linear(x[:m], w, int(t), w.shape[0])\n"
        "        np.save(d + f'/{t}_{m}_y.npy', y.numpy())\n"
    )
    env = dict(os.environ, FASTLLM_CPU_ISA=cap)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    assert proc.stdout.split()[-1] in (cap, "avx2", "scalar")
    for quant_type, ours in outputs.items():
        for m, y in enumerate(ours, start=1):
            theirs = torch.from_numpy(np.load(tmp_path / f"{quant_type}_{m}_y.npy"))
            torch.testing.assert_close(y, theirs, atol=1e-5 * y.abs().max().item(), rtol=1e-5)


def test_quant_gemm_reports_its_path():
    assert _C.ops.quant_gemm_cpu_isa() in ("avx512_vnni", "avx_vnni", "avx2", "scalar")
    assert ops.quant_block_info(ops.GGML_QUANT_TYPES["Q4_1"]) == (32, 20)
    assert ops.quant_block_info(ops.GGML_QUANT_TYPES["Q6_K"]) == (256, 210)


def test_quant_linear_bias_and_strided_rows():
    rng = np.random.default_rng(3)
    n, k = 50, 128
    raw = torch.from_numpy(random_blocks(rng, "Q4_1", n, k))
    w = dequantized(raw.numpy(), "Q4_1", n, k)
    wide = torch.from_numpy(rng.standard_normal((6, k + 32)).astype(np.float32))
    x = wide[:, :k]  # rows k + 32 apart
    bias = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    y = ops.quant_linear(x, raw, ops.GGML_QUANT_TYPES["Q4_1"], n, bias)
    ref = fake_quantize_rows(x.contiguous()) @ w.T + bias
    torch.testing.assert_close(y, ref, atol=1e-4, rtol=1e-4)


def test_quant_linear_rejects_bad_shapes():
    raw = torch.zeros(4, 20, dtype=torch.uint8)
    with pytest.raises(ValueError):
        ops.quant_linear(torch.zeros(2, 48), raw, ops.GGML_QUANT_TYPES["Q4_1"], 4)  # k % 32
    with pytest.raises(ValueError):
        ops.quant_linear(torch.zeros(2, 64), raw, ops.GGML_QUANT_TYPES["Q4_1"], 4)  # bytes
    with pytest.raises(ValueError):
        ops.quant_linear(torch.zeros(2, 32), raw, 99, 4)  # unknown type


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
@pytest.mark.parametrize("quant_type", TYPES_32 + TYPES_256)
def test_quant_linear_cuda_matches_reference(quant_type):
    m, n, k = 3, 67, 512
    rng = np.random.default_rng(11)
    raw = random_blocks(rng, quant_type, n, k)
    w = dequantized(raw, quant_type, n, k)
    x = torch.from_numpy(rng.standard_normal((m, k)).astype(np.float32))
    y = ops.quant_linear(x.cuda(), torch.from_numpy(raw).cuda(), ops.GGML_QUANT_TYPES[quant_type],
                         n)
    exact = x @ w.T
    torch.testing.assert_close(y.cpu(), exact, atol=1e-4 * exact.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("quant_type", TYPES_32)
def test_quant_embedding_equals_dequantized_rows(quant_type):
    rng = np.random.default_rng(5)
    vocab, dim = 40, 96
    raw = random_blocks(rng, quant_type, vocab, dim)
    emb = QuantEmbedding(vocab, dim, quant_type)
    emb.qweight.copy_(torch.from_numpy(raw))
    ids = torch.tensor([[3, 0, 39], [7, 7, 1]])
    assert torch.equal(emb(ids), dequantized(raw, quant_type, vocab, dim)[ids])


# ---- the 8-row interleaved CPU layouts (Q4_0x8 / Q4_1x8) ------------------------------------------

REPACKABLE = ["Q4_0", "Q4_1"]


def _repacked(raw: np.ndarray, quant_type: str, k: int) -> tuple[np.ndarray, int]:
    packed = raw.copy()
    type_id = _C.ops.quant_repack(packed, ops.GGML_QUANT_TYPES[quant_type], k)
    return packed, type_id


def _gemm(x: np.ndarray, raw: np.ndarray, type_id: int, n: int, simd: bool = True) -> np.ndarray:
    y = np.empty((x.shape[0], n), dtype=np.float32)
    _C.ops.quant_gemm(y, x, raw, type_id, None, simd, 0)
    return y


@pytest.mark.parametrize("quant_type", REPACKABLE)
@pytest.mark.parametrize("m,n,k", [(1, 8, 32), (3, 136, 96), (9, 64, 576), (33, 48, 256)])
def test_repacked_layout_matches_dequantized_reference(quant_type, m, n, k):
    rng = np.random.default_rng(m * 1000 + n)
    raw = random_blocks(rng, quant_type, n, k)
    packed, type_id = _repacked(raw, quant_type, k)
    assert type_id == 1000 + ops.GGML_QUANT_TYPES[quant_type]
    assert not np.array_equal(packed, raw)  # the bytes moved
    x = rng.standard_normal((m, k)).astype(np.float32)
    exact = fake_quantize_rows(torch.from_numpy(x)).double() @ dequantized(raw, quant_type, n,
                                                                             k).double().T
    scale = exact.abs().max().item()
    for simd in (True, False):
        y = torch.from_numpy(_gemm(x, packed, type_id, n, simd))
        torch.testing.assert_close(y.double(), exact, atol=2e-5 * scale, rtol=1e-4)
    # The scalar kernel reads the repacked blocks back: bit-identical to the row-major layout.
    assert np.array_equal(_gemm(x, packed, type_id, n, False),
                          _gemm(x, raw, ops.GGML_QUANT_TYPES[quant_type], n, False))


@pytest.mark.parametrize("quant_type", REPACKABLE + ["Q8_0"])
def test_cpu_gemm_is_batch_invariant(quant_type):
    """A row's outputs are the same bits whichever batch (1..13 rows, any position) it is in:
    repacked 4-bit weights, and Q8_0 (the output projection's usual type) as stored."""
    n, k = 72, 384
    rng = np.random.default_rng(17)
    packed, type_id = _repacked(random_blocks(rng, quant_type, n, k), quant_type, k)
    x = rng.standard_normal((13, k)).astype(np.float32)
    alone = np.stack([_gemm(x[i:i + 1], packed, type_id, n)[0] for i in range(13)])
    for m in range(2, 14):
        assert np.array_equal(_gemm(x[:m], packed, type_id, n), alone[:m]), m
    assert np.array_equal(_gemm(x[5:12], packed, type_id, n), alone[5:12])


def test_repack_leaves_other_types_and_shapes():
    rng = np.random.default_rng(19)
    for quant_type, n in (("Q8_0", 16), ("Q4_1", 12)):  # no x8 layout / rows not a multiple of 8
        raw = random_blocks(rng, quant_type, n, 64)
        packed, type_id = _repacked(raw, quant_type, 64)
        assert type_id == ops.GGML_QUANT_TYPES[quant_type] and np.array_equal(packed, raw)
    packed, type_id = _repacked(random_blocks(rng, "Q4_0", 16, 64), "Q4_0", 64)
    again = packed.copy()
    assert _C.ops.quant_repack(again, type_id, 64) == type_id and np.array_equal(again, packed)
    with pytest.raises(ValueError):
        _C.ops.quant_repack(packed, ops.GGML_QUANT_TYPES["Q4_0"], 96)  # rows hold 64 values
    with pytest.raises(ValueError, match="multiple of 8"):
        _gemm(np.zeros((1, 64), np.float32), packed[:12].copy(), type_id, 12)


@pytest.mark.parametrize("quant_type", REPACKABLE)
def test_quant_linear_and_embedding_read_repacked_rows(quant_type):
    rng = np.random.default_rng(23)
    vocab, dim = 48, 96
    raw = random_blocks(rng, quant_type, vocab, dim)
    lin = QuantLinear(dim, vocab, quant_type)
    lin.qweight.copy_(torch.from_numpy(raw))
    emb = QuantEmbedding(vocab, dim, quant_type)
    emb.qweight = lin.qweight  # a tied table, as the loader shares it
    x = torch.from_numpy(rng.standard_normal((5, dim)).astype(np.float32))
    before = lin(x)
    lin.repack_for_cpu()
    emb.type_id = lin.type_id
    assert lin.type_id == 1000 + ops.GGML_QUANT_TYPES[quant_type]
    torch.testing.assert_close(lin(x), before, atol=1e-5 * before.abs().max().item(), rtol=1e-5)
    ids = torch.tensor([[3, 0, 47], [8, 9, 1]])
    assert torch.equal(emb(ids), dequantized(raw, quant_type, vocab, dim)[ids])


# ---- Q8_0x8 / Q7_0x8: output projections ---------------------------------------------------------


def _q7(raw: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((raw.shape[0], k // 32 * 38), dtype=np.uint8)
    _C.ops.quant_pack_q7_0x8(out, raw, k)
    return out


def _q8x8(raw: np.ndarray, k: int) -> np.ndarray:
    out = np.empty((raw.shape[0], k // 32 * 38), dtype=np.uint8)
    _C.ops.quant_pack_q8_0x8(out, raw, k)
    return out


@pytest.mark.parametrize("m,n,k", [(1, 8, 32), (3, 136, 96), (9, 64, 576), (33, 48, 256)])
def test_q8_0x8_layout_matches_its_reference(m, n, k):
    """Q8_0x8 keeps the Q8_0 values (and every path reads them so): the GEMM equals a float64
    product of the dequantized rows with the int8-rounded activations, SIMD and scalar, and the
    row-major Q8_0 GEMM bit for bit; the embedding lookup reads the table's values."""
    rng = np.random.default_rng(m * 1000 + n + 11)
    raw = random_blocks(rng, "Q8_0", n, k)
    raw.reshape(n, k // 32, 34)[1, 0, 2:] = np.uint8(0x80)  # -128, which no kernel may saturate
    packed = _q8x8(raw, k)
    w = dequantized(raw, "Q8_0", n, k).double().numpy()
    x = rng.standard_normal((m, k)).astype(np.float32)
    exact = fake_quantize_rows(torch.from_numpy(x)).double().numpy() @ w.T
    scale = np.abs(exact).max()
    for simd in (True, False):
        y = _gemm(x, packed, Q8_0X8, n, simd)
        np.testing.assert_allclose(y, exact, atol=2e-5 * scale, rtol=1e-4)
        assert np.array_equal(y, _gemm(x, raw, ops.GGML_QUANT_TYPES["Q8_0"], n, simd))
    emb = np.empty((3, k), np.float32)
    _C.ops.embed_quant_rows(emb, packed, Q8_0X8, np.array([0, n - 1, 5], np.int32))
    np.testing.assert_array_equal(emb, w[[0, n - 1, 5]].astype(np.float32))
    rows = np.empty((n, k), np.float32)
    _C.ops.quant_dequantize_rows(rows, packed, Q8_0X8)
    np.testing.assert_array_equal(rows, w.astype(np.float32))


def test_q8_0x8_gemm_is_batch_invariant():
    n, k = 72, 384
    rng = np.random.default_rng(30)
    packed = _q8x8(random_blocks(rng, "Q8_0", n, k), k)
    x = rng.standard_normal((13, k)).astype(np.float32)
    alone = np.stack([_gemm(x[i:i + 1], packed, Q8_0X8, n)[0] for i in range(13)])
    for m in range(2, 14):
        assert np.array_equal(_gemm(x[:m], packed, Q8_0X8, n), alone[:m]), m
    with pytest.raises(ValueError, match="multiple of 8"):
        _q8x8(random_blocks(rng, "Q8_0", 12, 64), 64)


@pytest.mark.parametrize("quant_type", TYPES_32)
def test_dequantize_rows_reads_every_cpu_layout(quant_type):
    """quant_dequantize_rows (the float twin's weights, the refinement's rows) gives the GGUF
    loader's values from a row-major or repacked weight."""
    n, k = 16, 96
    rng = np.random.default_rng(47)
    raw = random_blocks(rng, quant_type, n, k)
    expected = dequantized(raw, quant_type, n, k).numpy()
    type_id = ops.GGML_QUANT_TYPES[quant_type]
    layouts = [(raw, type_id)]
    if quant_type == "Q8_0":
        layouts.append((_q8x8(raw, k), Q8_0X8))
    else:
        layouts.append(_repacked(raw, quant_type, k))
    for weight, layout in layouts:
        rows = np.empty((n, k), np.float32)
        _C.ops.quant_dequantize_rows(rows, weight, layout)
        np.testing.assert_array_equal(rows, expected)


def test_f32_rows_run_float_dot_products():
    """Type 0 (F32): float32 rows as uint8 views, no activation rounding (the fidelity ablation
    switches linears to it)."""
    n, k = 24, 160
    rng = np.random.default_rng(53)
    w = rng.standard_normal((n, k)).astype(np.float32)
    x = rng.standard_normal((5, k)).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    assert ops.quant_block_info(F32) == (1, 4)
    for simd in (True, False):
        y = np.empty((5, n), np.float32)
        _C.ops.quant_gemm(y, x, w.view(np.uint8), F32, bias, simd, 0)
        np.testing.assert_allclose(y, x.astype(np.float64) @ w.T + bias, rtol=1e-5, atol=1e-4)


def _refine(logits, x, weight, type_id, count, bias=None):
    out = logits.copy()
    _C.ops.refine_top_logits(out, x, weight, type_id, bias, count)
    return out


@pytest.mark.parametrize("quant_type", ["Q8_0", "Q8_0x8", "Q4_1x8"])
def test_refine_top_logits_recomputes_the_leading_entries(quant_type):
    """The `count` largest logits within 16 of each row's maximum become float64 dot products
    with the dequantized rows (+ bias); every other entry keeps the GEMM's value."""
    n, k, count = 64, 128, 5
    rng = np.random.default_rng(59)
    base = "Q4_1" if quant_type == "Q4_1x8" else "Q8_0"
    raw = random_blocks(rng, base, n, k)
    w = dequantized(raw, base, n, k).double().numpy()
    if quant_type == "Q8_0":
        weight, type_id = raw, ops.GGML_QUANT_TYPES["Q8_0"]
    elif quant_type == "Q8_0x8":
        weight, type_id = _q8x8(raw, k), Q8_0X8
    else:
        weight, type_id = _repacked(raw, base, k)
    x = (0.05 * rng.standard_normal((9, k))).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    y = np.empty((9, n), np.float32)
    _C.ops.quant_gemm(y, x, weight, type_id, bias, True, 0)
    y[0, 7] = y[0].max() + 1.0  # one clear winner
    y[1, :] = y[1].min()  # all tied: the lowest indices win
    y[2, 3] = y[2].max() + 20.0  # the rest fall outside the margin: only index 3 is recomputed
    got = _refine(y, x, weight, type_id, count, bias)
    exact = x.astype(np.float64) @ w.T + bias
    for r in range(9):
        ranked = sorted(range(n), key=lambda j: (-y[r, j], j))
        chosen = [j for j in ranked[:count] if y[r, j] >= y[r].max() - 16]
        assert (r != 2) or chosen == [3]
        if r == 1:
            assert chosen == list(range(count))
        np.testing.assert_allclose(got[r, chosen], exact[r, chosen], rtol=1e-6, atol=1e-6)
        rest = np.setdiff1d(np.arange(n), chosen)
        assert np.array_equal(got[r, rest], y[r, rest])
    # Rows are refined alone, and count 0, F32 and K-quant weights leave logits as they are.
    assert np.array_equal(_refine(y[4:5], x[4:5], weight, type_id, count, bias), got[4:5])
    assert np.array_equal(_refine(y, x, weight, type_id, 0, bias), y)
    floats = w.astype(np.float32)
    assert np.array_equal(_refine(y, x, floats.view(np.uint8), F32, count, bias), y)


def _q7_reference(raw: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(scales [n, blocks], values [n, blocks, 32]) of the 7-bit requantization, in numpy."""
    blocks = raw.reshape(n, k // 32, 34)
    d8 = blocks[..., :2].copy().view(np.float16).astype(np.float32)[..., 0]
    q8 = blocks[..., 2:].view(np.int8).astype(np.float32)
    amax = np.abs(q8).max(axis=-1)
    d7 = np.where(amax <= 63, d8, (d8 * amax / np.float32(63)).astype(np.float16)).astype(
        np.float32)
    q7 = np.where((amax <= 63)[..., None], q8,
                  np.clip(np.rint(q8 * d8[..., None] * (np.float32(1) / d7[..., None])), -63, 63))
    return d7, q7


def fake_quantize_rows_7bit(x: np.ndarray) -> np.ndarray:
    blocks = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(63)
    inv = np.where(d != 0, np.float32(1) / np.where(d != 0, d, 1), 0).astype(np.float32)
    return (np.rint(blocks * inv) * d).reshape(x.shape)


@pytest.mark.parametrize("m,n,k", [(1, 8, 32), (3, 136, 96), (9, 64, 576), (33, 48, 256)])
def test_q7_output_layout_matches_its_reference(m, n, k):
    """Q7_0x8 = Q8_0 rows requantized to |q| <= 63 (blocks that fit keep their bytes), against
    7-bit activations: exact against a numpy reference of both roundings, SIMD and scalar; within
    ~2 % of the float product on random (worst-case: every block spans +-127) weights."""
    rng = np.random.default_rng(m * 1000 + n + 5)
    raw = random_blocks(rng, "Q8_0", n, k)
    small = raw.reshape(n, k // 32, 34)
    small[0, :, 2:] = (small[0, :, 2:].view(np.int8) // 3).view(np.uint8)  # fits in 7 bits
    packed = _q7(raw, k)
    d7, q7 = _q7_reference(raw, n, k)
    assert np.array_equal(q7[0], small[0, :, 2:].view(np.int8))  # kept as they were
    w7 = (q7 * d7[..., None]).reshape(n, k).astype(np.float64)
    x = rng.standard_normal((m, k)).astype(np.float32)
    exact = fake_quantize_rows_7bit(x).astype(np.float64) @ w7.T
    scale = np.abs(exact).max()
    for simd in (True, False):
        y = _gemm(x, packed, Q7_0X8, n, simd)
        np.testing.assert_allclose(y, exact, atol=2e-5 * scale, rtol=1e-4)
    full = x.astype(np.float64) @ dequantized(raw, "Q8_0", n, k).double().numpy().T
    assert np.linalg.norm(y - full) / np.linalg.norm(full) < 0.02
    # The kernels read the rows back as Q8_0 blocks (the embedding lookup does).
    emb = np.empty((3, k), np.float32)
    _C.ops.embed_quant_rows(emb, packed, Q7_0X8, np.array([0, n - 1, 5], np.int32))
    np.testing.assert_array_equal(emb, w7[[0, n - 1, 5]].astype(np.float32))


def test_q7_output_gemm_is_batch_invariant_and_rejects_bad_shapes():
    n, k = 72, 384
    rng = np.random.default_rng(29)
    packed = _q7(random_blocks(rng, "Q8_0", n, k), k)
    x = rng.standard_normal((13, k)).astype(np.float32)
    alone = np.stack([_gemm(x[i:i + 1], packed, Q7_0X8, n)[0] for i in range(13)])
    for m in range(2, 14):
        assert np.array_equal(_gemm(x[:m], packed, Q7_0X8, n), alone[:m]), m
    with pytest.raises(ValueError, match="multiple of 8"):
        _q7(random_blocks(rng, "Q8_0", 12, 64), 64)
    with pytest.raises(ValueError, match="Q8_0 rows"):
        _q7(random_blocks(rng, "Q4_0", 16, 64), 64)


def test_q7_packing_of_degenerate_blocks():
    """A block with a zero scale but large quants packs as zeros; a NaN scale gives zero values
    too (no undefined float-to-int conversions), and the rest of the row is unaffected."""
    rng = np.random.default_rng(37)
    raw = random_blocks(rng, "Q8_0", 8, 64)
    blocks = raw.reshape(8, 2, 34)
    blocks[0, 0, :2] = np.frombuffer(np.float16(0).tobytes(), np.uint8)
    blocks[0, 0, 2:] = 100
    blocks[1, 0, :2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
    blocks[1, 0, 2] = 120
    emb = np.empty((2, 64), np.float32)
    _C.ops.embed_quant_rows(emb, _q7(raw, 64), Q7_0X8, np.array([0, 1], np.int32))
    assert np.all(emb[0, :32] == 0) and np.all(np.isfinite(emb[0, 32:]))
    w1 = dequantized(raw, "Q8_0", 8, 64).numpy()[1, 32:]
    np.testing.assert_allclose(emb[1, 32:], w1, atol=np.abs(w1).max() / 63)


@pytest.mark.parametrize("q7", ["0", "1"])
def test_prepare_cpu_linear_gives_output_projections_their_layout(monkeypatch, q7):
    """Q8_0 output projections become Q8_0x8, or Q7_0x8 under FASTLLM_CPU_Q7_LM_HEAD=1; other
    linears keep their rows."""
    monkeypatch.setenv("FASTLLM_CPU_Q7_LM_HEAD", q7)
    layout, pack = (Q7_0X8, _q7) if q7 == "1" else (Q8_0X8, _q8x8)
    rng = np.random.default_rng(31)
    raw = random_blocks(rng, "Q8_0", 16, 64)
    weight, type_id = prepare_cpu_linear(raw, ops.GGML_QUANT_TYPES["Q8_0"], output=True)
    assert type_id == layout and np.array_equal(weight, pack(raw, 64))
    same, type_id = prepare_cpu_linear(raw, ops.GGML_QUANT_TYPES["Q8_0"])  # not an output
    assert same is raw and type_id == ops.GGML_QUANT_TYPES["Q8_0"]
    lin = QuantLinear(64, 16, "Q8_0")
    lin.qweight.copy_(torch.from_numpy(raw))
    x = torch.from_numpy(rng.standard_normal((4, 64)).astype(np.float32))
    lin.repack_for_cpu(output=True)
    assert lin.type_id == layout and lin.qweight.shape == (16, 2 * 38)
    torch.testing.assert_close(lin(x), torch.from_numpy(_gemm(x.numpy(), weight, layout, 16)))


def default_head_layout() -> int:
    """The output projection layout FASTLLM_CPU_Q7_LM_HEAD=auto picks: 7-bit where the GEMM runs
    without VNNI."""
    return Q7_0X8 if _C.ops.quant_gemm_cpu_isa() == "avx2" else Q8_0X8


def test_output_projection_switches(monkeypatch):
    """The 7-bit layout: auto (the default) only without VNNI; the refinement: 32 logits per row
    behind the 8-bit layout, 128 behind the 7-bit one, or the env's count. Bad values refused."""
    assert q7_output_enabled() == (default_head_layout() == Q7_0X8)
    assert lm_head_refine_count(Q8_0X8) == LM_HEAD_REFINE == 32
    assert lm_head_refine_count(Q7_0X8) == LM_HEAD_REFINE_Q7 == 128
    monkeypatch.setenv("FASTLLM_CPU_Q7_LM_HEAD", "yes")
    with pytest.raises(ValueError, match="FASTLLM_CPU_Q7_LM_HEAD"):
        q7_output_enabled()
    monkeypatch.setenv("FASTLLM_CPU_LM_HEAD_REFINE", "-1")
    with pytest.raises(ValueError, match="FASTLLM_CPU_LM_HEAD_REFINE"):
        lm_head_refine_count(Q8_0X8)
    monkeypatch.setenv("FASTLLM_CPU_LM_HEAD_REFINE", "8")
    assert lm_head_refine_count(Q8_0X8) == lm_head_refine_count(Q7_0X8) == 8


# ---- K-quants onto the integer kernels ----------------------------------------------------------


@pytest.mark.parametrize("n,k", [(8, 256), (24, 512)])
def test_q4_k_rows_convert_to_q4_1(n, k):
    """Each 32-value Q4_K sub-block is a Q4_1 block: the same values up to the fp16 rounding of
    its scale and min (relative 2^-11)."""
    rng = np.random.default_rng(n + k)
    raw = random_blocks(rng, "Q4_K", n, k)
    q4_1 = convert_rows(raw, ops.GGML_QUANT_TYPES["Q4_K"], ops.GGML_QUANT_TYPES["Q4_1"])
    assert q4_1.shape == (n, k // 32 * 20)
    ref = dequantized(raw, "Q4_K", n, k).numpy()
    got = dequantized(q4_1, "Q4_1", n, k).numpy()
    bound = 2.0 ** -10 * (np.abs(ref).reshape(n, -1, 32).max(-1, keepdims=True) + 1e-6)
    assert np.all(np.abs(got - ref).reshape(n, -1, 32) <= bound)


@pytest.mark.parametrize("quant_type", TYPES_32 + TYPES_256)
def test_rows_convert_to_q8_0(quant_type):
    """Any GGUF type to Q8_0: within half a step (max|w| / 254) of each 32-value block."""
    n, k = 16, 512
    rng = np.random.default_rng(41)
    raw = random_blocks(rng, quant_type, n, k)
    q8 = convert_rows(raw, ops.GGML_QUANT_TYPES[quant_type], ops.GGML_QUANT_TYPES["Q8_0"])
    ref = dequantized(raw, quant_type, n, k).numpy().reshape(n, -1, 32)
    got = dequantized(q8, "Q8_0", n, k).numpy().reshape(n, -1, 32)
    step = np.abs(ref).max(-1, keepdims=True) / 127
    assert np.all(np.abs(got - ref) <= 0.5 * step * 1.002 + 1e-7)
    with pytest.raises(ValueError, match="Q4_1"):
        convert_rows(raw, ops.GGML_QUANT_TYPES[quant_type], 2)  # Q4_0 is no target


def test_prepare_cpu_linear_moves_kquants_to_integer_kernels(monkeypatch):
    n, k = 16, 512
    rng = np.random.default_rng(43)
    x = rng.standard_normal((5, k)).astype(np.float32)
    for quant_type, expected in (("Q4_K", 1003), ("Q6_K", ops.GGML_QUANT_TYPES["Q8_0"])):
        raw = random_blocks(rng, quant_type, n, k)
        weight, type_id = prepare_cpu_linear(raw.copy(), ops.GGML_QUANT_TYPES[quant_type])
        assert type_id == expected
        exact = x.astype(np.float64) @ dequantized(raw, quant_type, n, k).double().numpy().T
        y = _gemm(x, weight, type_id, n)
        assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 0.01
    _, head_type = prepare_cpu_linear(raw.copy(), ops.GGML_QUANT_TYPES["Q6_K"], output=True)
    assert head_type == default_head_layout()
    monkeypatch.setenv("FASTLLM_CPU_CONVERT_KQUANTS", "0")
    weight, type_id = prepare_cpu_linear(raw, ops.GGML_QUANT_TYPES["Q6_K"])
    assert weight is raw and type_id == ops.GGML_QUANT_TYPES["Q6_K"]


def test_fused_parts_of_different_types_stack_as_q8_0():
    """A Q4_K_M file's fused Q/K/V: Q4_K queries and keys, Q6_K values, stacked as Q8_0."""
    k = 256
    rng = np.random.default_rng(47)

    class Part:
        def __init__(self, quant_type, rows):
            self.ggml_type, self.gguf_name = quant_type, quant_type
            self.data = random_blocks(rng, quant_type, rows, k)

    class NoFile:
        def release_pages(self, name=None):
            pass

    parts = [Part("Q4_K", 16), Part("Q4_K", 8), Part("Q6_K", 8)]
    weight, type_id, bias = cpu_model._stack(parts, None, NoFile())
    assert type_id == ops.GGML_QUANT_TYPES["Q8_0"] and bias is None
    ref = np.concatenate([dequantized(p.data, p.ggml_type, p.data.shape[0], k).numpy()
                          for p in parts])
    x = rng.standard_normal((3, k)).astype(np.float32)
    exact = x.astype(np.float64) @ ref.T.astype(np.float64)
    y = _gemm(x, weight, type_id, 32)
    assert np.linalg.norm(y - exact) / np.linalg.norm(exact) < 0.01


def test_torch_loader_stacks_parts_of_different_types_as_q8_0():
    """The torch model's loader does as the torch-free one: a fused linear whose parts differ in
    type becomes one Q8_0 QuantLinear (repacked for the CPU GEMM, same products)."""
    from torch import nn

    from fastllm.models import quant_loader

    k = 256
    rng = np.random.default_rng(53)

    class Part:
        def __init__(self, name, quant_type, rows):
            self.name = self.gguf_name = name
            self.ggml_type = quant_type
            self.data = random_blocks(rng, quant_type, rows, k)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self._stacked = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1),
                             "v_proj": ("qkv_proj", 2)}
            self.attn = nn.Module()
            self.attn.qkv_proj = nn.Linear(k, 32, bias=False)

    model = Model()
    parts = [Part("attn.q_proj.weight", "Q4_K", 16), Part("attn.k_proj.weight", "Q4_K", 8),
             Part("attn.v_proj.weight", "Q6_K", 8)]
    count, consumed = quant_loader._quantize_linears(
        model, {p.name: p for p in parts}, torch.device("cpu"), lambda name=None: None)
    assert count == 1 and consumed == {p.name for p in parts}
    lin = model.attn.qkv_proj
    assert isinstance(lin, QuantLinear) and lin.quant_type == "Q8_0"
    ref = np.concatenate([dequantized(p.data, p.ggml_type, p.data.shape[0], k).numpy()
                          for p in parts])
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
    exact = x.double() @ torch.from_numpy(ref).double().T
    assert ((lin(x).double() - exact).norm() / exact.norm()).item() < 0.01


# ---- the default model: quantized against dequantized ---------------------------------------------

TEXT = (
    "The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
    "experimented with two-wheeled machines that riders pushed along with their feet. These "
    "early designs, sometimes called hobby horses, were heavy and uncomfortable, yet they showed "
    "that a person could balance on two wheels in a line. Decades later, mechanics attached "
    "pedals and cranks to the front wheel, and the velocipede became popular in Paris and "
    "London. Because the pedals turned the wheel directly, makers enlarged the front wheel to "
    "go faster, which led to the tall high-wheeler with its tiny rear wheel. Riding one was "
    "dangerous: a sudden stop could throw the rider over the handlebars. The safety bicycle of "
    "the 1880s solved this problem with two wheels of equal size and a chain that drove the "
    "rear wheel. Pneumatic tires, invented soon after, made the ride smoother, and the bicycle "
    "quickly became a practical means of transport for millions of people. Cycling changed "
    "daily life in many ways. Workers could live farther from factories, women gained a new "
    "freedom of movement, and road improvements that later helped cars were first demanded by "
    "cyclists. Today engineers continue to refine frames, gears and brakes, while cities build "
    "protected lanes to make cycling safer. The basic shape of the safety bicycle, however, has "
    "remained almost unchanged for more than a century, a sign of how well its designers solved "
    "the problem of personal transport."
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Write a haiku about the sea.",
    "Q: What is 12 times 7?\nA:",
]


@pytest.fixture(scope="module")
def llm_pair():
    quant = LLM(max_model_len=512, quantized_weights="auto")
    fp32 = LLM(max_model_len=512, quantized_weights="dequantize")
    return quant, fp32


def _perplexity(llm: LLM, ids: list[int]) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    lps = [d[t].logprob for t, d in zip(ids[1:], out.prompt_logprobs[1:])]
    return math.exp(-sum(lps) / len(lps))


def test_default_model_keeps_gguf_quantization(llm_pair):
    """The default LLM() runs the torch-free executor: Q4_1 layers in their repacked layout, the
    tied Q8_0 table as Q8_0x8 for both the output projection and the embedding (without VNNI: a
    7-bit copy for the output projection, the table for the embedding and the refinement), and
    the output projection's leading logits refined."""
    model = llm_pair[0].llm_engine.core.model
    assert isinstance(model, CpuModel)
    assert len(model.layers) == model.config.num_hidden_layers
    q4_1x8 = 1000 + ops.GGML_QUANT_TYPES["Q4_1"]
    for layer in model.layers:
        assert {lin[1] for lin in (layer.qkv, layer.o_proj, layer.gate_up, layer.down)} == {q4_1x8}
    head, head_type = model.lm_head
    assert head_type == default_head_layout()
    assert head.shape == (model.config.vocab_size, 576 // 32 * 38)
    if head_type == Q8_0X8:
        assert model.embed_table is head and model.embed_type == Q8_0X8
        assert model.lm_head_refine == LM_HEAD_REFINE and model.refine_rows is None
    else:
        assert model.embed_type == ops.GGML_QUANT_TYPES["Q8_0"]
        assert model.lm_head_refine == LM_HEAD_REFINE_Q7
        assert model.refine_rows[0] is model.embed_table


def test_torch_model_keeps_gguf_quantization(monkeypatch):
    monkeypatch.setenv("FASTLLM_TORCH_FREE", "0")
    model = LLM(max_model_len=128).llm_engine.core.model
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    # qkv, o, gate_up, down per layer + the tied output projection
    assert len(layers) == 4 * model.config.num_hidden_layers + 1
    assert {m.quant_type for m in layers} == {"Q4_1", "Q8_0"}
    layout = default_head_layout()
    assert {m.type_id for m in layers} == {1000 + ops.GGML_QUANT_TYPES["Q4_1"], layout}
    head = model.quant_lm_head
    embed = model.model.embed_tokens
    assert isinstance(embed, QuantEmbedding) and head.type_id == layout
    if layout == Q8_0X8:
        assert head.refine_top == LM_HEAD_REFINE and head.refine_rows is None
        assert embed.type_id == Q8_0X8 and embed.qweight is head.qweight
    else:
        assert head.refine_top == LM_HEAD_REFINE_Q7
        assert embed.type_id == ops.GGML_QUANT_TYPES["Q8_0"]
        assert head.refine_rows[0] is embed.qweight


@pytest.mark.parametrize("q7", ["0", "1"])
def test_output_projection_layout_and_refinement_are_switches(monkeypatch, q7):
    """FASTLLM_CPU_Q7_LM_HEAD=0: one Q8_0x8 table for the output projection and the embedding;
    =1: a 7-bit copy for the output projection, the Q8_0 table for the embedding.
    FASTLLM_CPU_LM_HEAD_REFINE sets the refined logits per row."""
    monkeypatch.setenv("FASTLLM_CPU_Q7_LM_HEAD", q7)
    monkeypatch.setenv("FASTLLM_CPU_LM_HEAD_REFINE", "0")
    model = LLM(max_model_len=128).llm_engine.core.model
    assert model.lm_head[1] == (Q7_0X8 if q7 == "1" else Q8_0X8) and model.lm_head_refine == 0
    if q7 == "1":
        assert model.embed_type == ops.GGML_QUANT_TYPES["Q8_0"]
        assert model.embed_table.shape == (model.config.vocab_size, 576 // 32 * 34)
    else:
        assert model.embed_table is model.lm_head[0] and model.embed_type == Q8_0X8


def test_greedy_output_does_not_depend_on_batch_or_prefix_cache(llm_pair):
    """Batch-invariant CPU kernels: a greedy request gives the same tokens and logprobs alone,
    again with its prompt from the prefix cache, and inside a batch of other prompts."""
    llm = llm_pair[0]
    sp = SamplingParams(temperature=0, max_tokens=24, logprobs=2)
    prompt = "Here is a list of the planets of the solar system, in order:"
    first = llm.generate([prompt], sp, use_tqdm=False)[0]
    cached = llm.generate([prompt], sp, use_tqdm=False)[0]
    batched = llm.generate(PROMPTS + [prompt] + PROMPTS[::-1], sp, use_tqdm=False)[len(PROMPTS)]
    assert cached.num_cached_tokens > 0
    for other in (cached, batched):
        assert other.outputs[0].token_ids == first.outputs[0].token_ids
        assert other.outputs[0].cumulative_logprob == first.outputs[0].cumulative_logprob


def test_perplexity_within_one_percent_of_fp32(llm_pair):
    quant, fp32 = llm_pair
    ids = quant.get_tokenizer().encode(TEXT, add_special_tokens=False)
    assert len(ids) >= 250
    ppl_quant, ppl_fp32 = _perplexity(quant, ids), _perplexity(fp32, ids)
    print(f"perplexity: quantized {ppl_quant:.4f}, fp32 {ppl_fp32:.4f}")
    assert abs(ppl_quant / ppl_fp32 - 1.0) < 0.01, (ppl_quant, ppl_fp32)


def model_tokenizer():
    return load_tokenizer(resolve_model(None))


def _load_default_cpu_model():
    args = EngineArgs()
    source = resolve_model(None)
    config = ModelConfig.from_dict(load_config(source), args)
    return cpu_model.load_cpu_model(config, source, "float32", "float16")


def test_default_paths_are_closer_to_fp32_than_the_former_one(monkeypatch):
    """On TEXT, KL(float twin || quantized) per token (the twin: the same weights through float
    dot products and a float32 KV cache). Measured: the default with VNNI (Q8_0x8 output
    projection, 32 logits per row refined) 0.0023 mean and 95.1 % top-1 agreement; the default
    without VNNI (7-bit output projection, 128 logits refined from the Q8_0 table) 0.0026 and
    95.1 %; the former default (7-bit, no refinement) 0.0061 and 94.4 %. Layers in F32 leave only
    the fp16 KV cache and the refinement's tail: 0.00013."""
    ids = np.array(model_tokenizer().encode(TEXT, add_special_tokens=False), np.int32)
    models = {}
    for name, q7, refine in (("8-bit", "0", None), ("7-bit", "1", None), ("former", "1", "0")):
        monkeypatch.setenv("FASTLLM_CPU_Q7_LM_HEAD", q7)
        if refine is not None:
            monkeypatch.setenv("FASTLLM_CPU_LM_HEAD_REFINE", refine)
        models[name] = _load_default_cpu_model()
    assert models["7-bit"].refine_rows is not None  # the refinement reads the Q8_0 table
    reference = fidelity.sequence_logits(fidelity.float_linears(models["8-bit"], lm_head=True),
                                         ids, "float32")
    models["float layers"] = fidelity.float_linears(models["8-bit"])
    measured = {}
    for name, m in models.items():
        logits = fidelity.sequence_logits(m, ids)
        kl = fidelity.kl_divergence(reference, logits)
        measured[name] = (float(kl.mean()), float(np.mean(reference.argmax(-1) ==
                                                           logits.argmax(-1))))
    print(measured)
    former_kl, former_top1 = measured["former"]
    for name in ("8-bit", "7-bit"):
        kl, top1 = measured[name]
        assert kl < 0.003 and former_kl > 2 * kl and top1 >= former_top1, (name, measured)
    assert measured["float layers"][0] < 3e-4


def test_greedy_text_close_to_fp32(llm_pair):
    """Greedy continuations start the same; int8 activations may flip a near-tie later on."""
    quant, fp32 = llm_pair
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in quant.generate(PROMPTS, params, use_tqdm=False)]
    theirs = [o.outputs[0].token_ids for o in fp32.generate(PROMPTS, params, use_tqdm=False)]
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), len(x))
              for x, y in zip(ours, theirs)]
    assert min(prefix) >= 4, prefix
    assert sum(prefix) >= 8 * len(PROMPTS), prefix
