"""The mixture-of-experts kernels (fastllm._C.ops.moe_route / moe_experts) against torch
references: routing as HF transformers computes it, the experts grouped by expert equal to a loop
over tokens (float rows), to per-expert quant_gemm calls (quantized rows, bit for bit), in any
batch; bad arguments raise ValueError."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from fastllm import kernels

# INTER = 288: with several tokens per expert the x8 path splits the gate and up rows into slices
# of 128 (two and a remainder); a lone token's slices are larger (two of 144).
HIDDEN, INTER, EXPERTS, TOP_K = 64, 288, 6, 2
Q4_0, Q8_0, F32 = 2, 8, 0


def _route_reference(logits: torch.Tensor, top_k: int, renormalize: bool):
    probs = torch.softmax(logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def _route(logits: np.ndarray, top_k: int, renormalize: bool):
    ids = np.empty((logits.shape[0], top_k), np.int32)
    weights = np.empty((logits.shape[0], top_k), np.float32)
    kernels.moe_route(logits, top_k, renormalize, ids, weights)
    return weights, ids


@pytest.mark.parametrize("renormalize", [True, False])
def test_route_matches_torch(renormalize):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((37, 8)).astype(np.float32) * 3
    weights, ids = _route(logits, 3, renormalize)
    ref_w, ref_ids = _route_reference(torch.from_numpy(logits), 3, renormalize)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(weights, ref_w.numpy(), rtol=1e-6, atol=1e-7)
    if renormalize:
        np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-6)
    # Mixtral's formulation (softmax over the top-k logits) gives the same weights.
    top = np.take_along_axis(logits, ids.astype(np.int64), axis=1)
    mixtral = np.exp(top - top.max(axis=1, keepdims=True))
    mixtral /= mixtral.sum(axis=1, keepdims=True)
    if renormalize:
        np.testing.assert_allclose(weights, mixtral, rtol=1e-5)


def _experts_reference(x, ids, weights, gate_up, down):
    """HF's loop: per expert, its tokens through silu(gate) * up and down, weighted, summed."""
    x, gate_up, down = (torch.from_numpy(np.asarray(a, np.float32)) for a in (x, gate_up, down))
    out = torch.zeros_like(x)
    ids_t, w_t = torch.from_numpy(ids.astype(np.int64)), torch.from_numpy(weights)
    for e in range(gate_up.shape[0]):
        tok, slot = torch.where(ids_t == e)
        if len(tok) == 0:
            continue
        gate, up = (x[tok] @ gate_up[e].T).chunk(2, dim=-1)
        y = (torch.nn.functional.silu(gate) * up) @ down[e].T
        out.index_add_(0, tok, y * w_t[tok, slot, None])
    return out.numpy()


def _problem(tokens: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, HIDDEN)).astype(np.float32)
    gate_up = (rng.standard_normal((EXPERTS, 2 * INTER, HIDDEN)) * 0.2).astype(np.float32)
    down = (rng.standard_normal((EXPERTS, HIDDEN, INTER)) * 0.2).astype(np.float32)
    logits = rng.standard_normal((tokens, EXPERTS)).astype(np.float32)
    weights, ids = _route(logits, TOP_K, True)
    return x, ids, weights, gate_up, down


def _experts(x, ids, weights, gate_up, gate_up_type, down, down_type, allow_simd=True):
    out = np.full_like(x, np.nan)
    kernels.moe_experts(out, x, ids, weights, gate_up, gate_up_type, down, down_type, INTER,
                        allow_simd)
    return out


def test_float_experts_match_the_token_loop():
    x, ids, weights, gate_up, down = _problem(19)
    out = _experts(x, ids, weights, gate_up.reshape(-1, HIDDEN).view(np.uint8), F32,
                   down.reshape(-1, INTER).view(np.uint8), F32)
    np.testing.assert_allclose(out, _experts_reference(x, ids, weights, gate_up, down),
                               rtol=1e-5, atol=1e-5)


def _quantize(w: np.ndarray, name: str) -> np.ndarray:
    rows = w.reshape(-1, w.shape[-1])
    return gguf.quants.quantize(rows, getattr(gguf.GGMLQuantizationType, name))


def _dequantize(rows: np.ndarray, type_id: int, k: int) -> np.ndarray:
    out = np.empty((rows.shape[0], k), np.float32)
    kernels.quant_dequantize_rows(out, rows, type_id)
    return out


@pytest.mark.parametrize("name,repack", [("Q8_0", False), ("Q4_0", False), ("Q4_0", True)])
@pytest.mark.parametrize("allow_simd", [True, False])
def test_quantized_experts_equal_per_expert_gemms(name, repack, allow_simd):
    x, ids, weights, gate_up_f, down_f = _problem(23)
    gate_up, down = _quantize(gate_up_f, name), _quantize(down_f, name)
    type_id = kernels.GGML_QUANT_TYPES[name]
    gate_up_type = down_type = type_id
    if repack:
        gate_up_type = kernels.quant_repack(gate_up, type_id, HIDDEN)
        down_type = kernels.quant_repack(down, type_id, INTER)
        assert gate_up_type == down_type == 1000 + type_id
    out = _experts(x, ids, weights, gate_up, gate_up_type, down, down_type, allow_simd)
    # The same GEMMs called one expert at a time over its tokens, then silu-and-mul and the
    # weighted sum in slot order: the grouped kernel must give these bits.
    expected = np.zeros_like(x)
    gu_rows, d_rows = gate_up.reshape(EXPERTS, 2 * INTER, -1), down.reshape(EXPERTS, HIDDEN, -1)
    per_slot = np.zeros((x.shape[0], TOP_K, HIDDEN), np.float32)
    for e in range(EXPERTS):
        tok, slot = np.nonzero(ids == e)
        if len(tok) == 0:
            continue
        h = np.empty((len(tok), 2 * INTER), np.float32)
        kernels.quant_gemm(h, np.ascontiguousarray(x[tok]), gu_rows[e], gate_up_type, None,
                           allow_simd, 0)
        act = np.empty((len(tok), INTER), np.float32)
        kernels.act_and_mul(act, h, 0, 0)
        y = np.empty((len(tok), HIDDEN), np.float32)
        kernels.quant_gemm(y, act, d_rows[e], down_type, None, allow_simd, 0)
        per_slot[tok, slot] = y
    for j in range(TOP_K):
        expected += weights[:, j, None] * per_slot[:, j]
    np.testing.assert_array_equal(out, expected)
    # And close to the float computation over the dequantized weights.
    ref = _experts_reference(x, ids, weights,
                             _dequantize(gate_up, gate_up_type, HIDDEN).reshape(gate_up_f.shape),
                             _dequantize(down, down_type, INTER).reshape(down_f.shape))
    assert np.abs(out - ref).max() < 0.05 * np.abs(ref).max()


def test_a_token_gives_the_same_output_in_any_batch():
    x, ids, weights, gate_up_f, down_f = _problem(17, seed=5)
    gate_up, down = _quantize(gate_up_f, "Q4_0"), _quantize(down_f, "Q4_0")
    gt = kernels.quant_repack(gate_up, Q4_0, HIDDEN)
    dt = kernels.quant_repack(down, Q4_0, INTER)
    batch = _experts(x, ids, weights, gate_up, gt, down, dt)
    for t in (0, 7, 16):
        alone = _experts(x[t:t + 1].copy(), ids[t:t + 1].copy(), weights[t:t + 1].copy(),
                         gate_up, gt, down, dt)
        np.testing.assert_array_equal(alone[0], batch[t])


def test_bad_arguments_raise_value_error():
    x, ids, weights, gate_up, down = _problem(4)
    gu = gate_up.reshape(-1, HIDDEN).view(np.uint8)
    dn = down.reshape(-1, INTER).view(np.uint8)
    bad_ids = ids.copy()
    bad_ids[2, 1] = EXPERTS
    with pytest.raises(ValueError, match="out of range"):
        _experts(x, bad_ids, weights, gu, F32, dn, F32)
    with pytest.raises(ValueError, match="whole experts"):
        _experts(x, ids, weights, gu[:-1], F32, dn, F32)
    with pytest.raises(ValueError, match="top_k"):
        _route(np.zeros((2, 4), np.float32), 5, True)
    with pytest.raises(ValueError, match="unknown quantization type"):
        _experts(x, ids, weights, gu, 77, dn, F32)
    with pytest.raises(ValueError, match="CUDA"):
        kernels.moe_experts_float(x, x, ids, weights, gate_up, down, x)
