"""Vectorised numpy dequantizers for the ggml block formats fastllm reads.

Every function takes the raw bytes of a whole tensor (a 1-D uint8 array, possibly a read-only
view into a memory map) and returns a new, writable 1-D float32 array of `n_elements` values.
The arithmetic follows ggml's reference (and `gguf.quants`) step for step in float32, so the
results are bit-identical to it; no function loops over blocks in Python.

Block layouts (bytes, little-endian; "d" etc. are float16)::

    Q8_0  32 values  | d | qs int8[32]                       y = q * d
    Q4_0  32 values  | d | qs u8[16]                         y = (nibble - 8) * d
    Q4_1  32 values  | d | m | qs u8[16]                     y = nibble * d + m
          (low nibbles are values 0..15 of the block, high nibbles values 16..31)
    Q4_K  256 values | d | dmin | scales u8[12] | qs u8[128]
          8 sub-blocks of 32 with 6-bit scale/min pairs; y = (d*sc) * q - (dmin*mn)
    Q6_K  256 values | ql u8[128] | qh u8[64] | scales int8[16] | d
          16 sub-blocks of 16; q = (4 low bits | 2 high bits << 4) - 32; y = (d*sc) * q
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .gguf_file import GGML_BLOCK_SIZES

_F16 = np.dtype("<f2")


def _blocks(raw: np.ndarray, type_name: str, n_elements: int) -> np.ndarray:
    block, block_bytes = GGML_BLOCK_SIZES[type_name]
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    n_blocks = n_elements // block
    if n_elements % block or raw.size != n_blocks * block_bytes:
        raise ValueError(
            f"{type_name}: {raw.size} bytes do not hold {n_elements} values "
            f"({block_bytes} bytes per {block})"
        )
    return raw.reshape(n_blocks, block_bytes)


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """Column of float16 at byte `start` of each block, as float32 of shape (n_blocks, 1)."""
    return blocks[:, start : start + 2].copy().view(_F16).astype(np.float32)


def _split_nibbles(qs: np.ndarray, out: np.ndarray) -> None:
    """Low nibbles of `qs` (..., k) into out[..., 0, :], high nibbles into out[..., 1, :]."""
    np.bitwise_and(qs, 0x0F, out=out[..., 0, :])
    np.right_shift(qs, 4, out=out[..., 1, :])


def dequantize_f32(raw: np.ndarray, n_elements: int) -> np.ndarray:
    return _blocks(raw, "F32", n_elements).view("<f4").reshape(-1).copy()


def dequantize_f16(raw: np.ndarray, n_elements: int) -> np.ndarray:
    return _blocks(raw, "F16", n_elements).view(_F16).reshape(-1).astype(np.float32)


def dequantize_bf16(raw: np.ndarray, n_elements: int) -> np.ndarray:
    halves = _blocks(raw, "BF16", n_elements).view("<u2").reshape(-1)
    out = np.left_shift(halves, 16, dtype=np.uint32)
    return out.view(np.float32)


def dequantize_q8_0(raw: np.ndarray, n_elements: int) -> np.ndarray:
    blocks = _blocks(raw, "Q8_0", n_elements)
    d = _half(blocks, 0)
    qs = blocks[:, 2:].view(np.int8)
    return np.multiply(qs, d, dtype=np.float32).reshape(-1)


def dequantize_q4_0(raw: np.ndarray, n_elements: int) -> np.ndarray:
    blocks = _blocks(raw, "Q4_0", n_elements)
    n_blocks = blocks.shape[0]
    d = _half(blocks, 0)
    q = np.empty((n_blocks, 2, 16), dtype=np.uint8)
    _split_nibbles(blocks[:, 2:], q)
    signed = q.view(np.int8).reshape(n_blocks, 32)
    np.subtract(signed, 8, out=signed)
    return np.multiply(signed, d, dtype=np.float32).reshape(-1)


def dequantize_q4_1(raw: np.ndarray, n_elements: int) -> np.ndarray:
    blocks = _blocks(raw, "Q4_1", n_elements)
    n_blocks = blocks.shape[0]
    d = _half(blocks, 0)
    m = _half(blocks, 2)
    q = np.empty((n_blocks, 2, 16), dtype=np.uint8)
    _split_nibbles(blocks[:, 4:], q)
    out = np.multiply(q.reshape(n_blocks, 32), d, dtype=np.float32)
    out += m
    return out.reshape(-1)


def _q4_k_scales_mins(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unpack the 12 scale bytes of each Q4_K block into 8 six-bit scales and 8 mins.

    Bytes 0-3 hold scales 0-3 (low 6 bits) and the top 2 bits of scales 4-7; bytes 4-7 the same
    for mins; bytes 8-11 the low 4 bits of scale (low nibble) and min (high nibble) 4-7.
    """
    n_blocks = scales.shape[0]
    s = scales.reshape(n_blocks, 3, 4)
    lo_sc, lo_mn, hi = s[:, 0], s[:, 1], s[:, 2]
    sc = np.empty((n_blocks, 2, 4), dtype=np.uint8)
    mn = np.empty((n_blocks, 2, 4), dtype=np.uint8)
    np.bitwise_and(lo_sc, 0x3F, out=sc[:, 0])
    np.bitwise_or(hi & 0x0F, (lo_sc >> 2) & 0x30, out=sc[:, 1])
    np.bitwise_and(lo_mn, 0x3F, out=mn[:, 0])
    np.bitwise_or(hi >> 4, (lo_mn >> 2) & 0x30, out=mn[:, 1])
    return sc.reshape(n_blocks, 8), mn.reshape(n_blocks, 8)


def dequantize_q4_k(raw: np.ndarray, n_elements: int) -> np.ndarray:
    blocks = _blocks(raw, "Q4_K", n_elements)
    n_blocks = blocks.shape[0]
    d = _half(blocks, 0)
    dmin = _half(blocks, 2)
    sc, mn = _q4_k_scales_mins(blocks[:, 4:16])
    scale = (d * sc.astype(np.float32)).reshape(n_blocks, 8, 1)
    offset = (dmin * mn.astype(np.float32)).reshape(n_blocks, 8, 1)
    # 4 groups of 32 bytes; low nibbles are sub-block 2g, high nibbles sub-block 2g+1.
    q = np.empty((n_blocks, 4, 2, 32), dtype=np.uint8)
    _split_nibbles(blocks[:, 16:].reshape(n_blocks, 4, 32), q)
    out = np.multiply(q.reshape(n_blocks, 8, 32), scale, dtype=np.float32)
    out -= offset
    return out.reshape(-1)


def dequantize_q6_k(raw: np.ndarray, n_elements: int) -> np.ndarray:
    blocks = _blocks(raw, "Q6_K", n_elements)
    n_blocks = blocks.shape[0]
    ql = blocks[:, :128].reshape(n_blocks, 2, 64)
    qh = blocks[:, 128:192].reshape(n_blocks, 2, 1, 32)
    scales = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _half(blocks, 208)
    # Per half of 128 values: low 4 bits of values 0-63 come from ql's low nibbles, of values
    # 64-127 from its high nibbles; 2-bit pairs of qh at shifts 0,2,4,6 give the top bits of
    # the four runs of 32.
    low = np.empty((n_blocks, 2, 2, 64), dtype=np.uint8)
    _split_nibbles(ql, low)
    high = np.right_shift(qh, np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1))
    high &= 0x03
    high <<= 4
    low |= high.reshape(n_blocks, 2, 2, 64)
    q = low.view(np.int8)
    q -= 32
    scale = (d * scales).reshape(n_blocks, 16, 1)
    return np.multiply(q.reshape(n_blocks, 16, 16), scale, dtype=np.float32).reshape(-1)


DEQUANTIZERS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "F32": dequantize_f32,
    "F16": dequantize_f16,
    "BF16": dequantize_bf16,
    "Q8_0": dequantize_q8_0,
    "Q4_0": dequantize_q4_0,
    "Q4_1": dequantize_q4_1,
    "Q4_K": dequantize_q4_k,
    "Q6_K": dequantize_q6_k,
}


def dequantize(raw: np.ndarray, type_name: str, n_elements: int) -> np.ndarray:
    """Float32 values of a tensor stored as `type_name`; ValueError for an unsupported type."""
    try:
        fn = DEQUANTIZERS[type_name]
    except KeyError:
        raise ValueError(
            f"unsupported GGUF tensor type {type_name}; supported: {sorted(DEQUANTIZERS)}"
        ) from None
    return fn(raw, n_elements)
