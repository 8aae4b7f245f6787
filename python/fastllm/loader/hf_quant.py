"""HF quantized checkpoints (GPTQ, AWQ, compressed-tensors, FP8) as the CPU's block encodings.

    checkpoint = load_hf_quantized(source, scheme, quantize_output=True)
    checkpoint.tensors["model.layers.0.mlp.down_proj.weight"]   # RawGGUFTensor, Q4_0 rows
    checkpoint.kv_scales                                        # {layer: (k_scale, v_scale)}

Every quantized linear is decoded to integer codes q [N, K], scales s [N, G] and zero points z
[N, G] (w[n, k] = s[n, g(k)] * (q[n, k] - z[n, g(k)]), g(k) = k // group_size or g_idx[k]) and
rewritten as rows the integer GEMM kernels read (``RawGGUFTensor``, the GGUF loader's type), so
both CPU executors run them as they run a GGUF file:

* symmetric 4-bit (z = 8 everywhere): Q4_0, d = s in fp16, nibble = q;
* asymmetric 4-bit: Q4_1, d = s, m = -s * z in fp16 (rounded when s * z needs more than fp16's
  11 significant bits: at most 2^-12 of |m| per block, counted in ``stats``);
* symmetric 8-bit (z = 128; int8 W8A8 weights): Q8_0, d = s, q - 128;
* exact when each 32-value block lies in one group (group 32/64/128/..., per-channel, a g_idx
  that is constant over every 32 columns) and the scales are fp16 values (GPTQ/AWQ store fp16;
  bf16 scales convert exactly; fp32 ones are rounded, counted in ``stats``);
* otherwise (asymmetric 8-bit, a desc_act g_idx that mixes groups inside a 32-value block,
  groups smaller than 32), and for FP8 weights: the values dequantized to float and requantized
  to Q8_0 (round to nearest, scale max|w| / 127 per 32 values: error at most half a step of the
  block's largest value; for e4m3 weights that is below e4m3's own step except for a block's
  smallest values). In-features that are not a multiple of 32 stay float.

FP8 weights with a per-tensor or per-channel scale are decoded to ``Fp8Rows`` (the stored e4m3
codes and one scale per output row). Where ``keeps_fp8_rows(device)`` (CUDA) they stay so, in
``HFQuantCheckpoint.fp8``, for the ``fp8_gemm`` kernel; elsewhere they become Q8_0 as above. Block
or group scales (``weight_block_size``, group strategy) always take the Q8_0 route.

Float tensors (norms, embeddings, biases, layers a checkpoint leaves unquantized) pass through as
F32/F16/BF16 rows. ``quantize_output``: a float output projection (the tied embedding) becomes
Q8_0, as GGUF files store it, so the CPU's integer kernels and its torch-free executor take it.
Activation scales (FP8 ``input_scale``, W8A8's dynamic per-token scheme) are not applied on the
CPU: its kernels quantize activations to int8 per 32 values instead (finer than per token).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from .gguf_raw import RawGGUFTensor
from .quantization import QuantScheme
from .safetensors_np import FP8_E4M3_VALUES, SafetensorsIndex
from .source import ModelSource

logger = logging.getLogger(__name__)

Q4_0, Q4_1, Q8_0 = 2, 3, 8  # ggml type ids
_BLOCK = 32
# AWQ's GEMM layout stores output column ORDER[i] of each group of 8 in nibble i.
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_AWQ_COLUMN_NIBBLE = tuple(AWQ_ORDER.index(c) for c in range(8))
_FLOAT_TYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16"}
_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(?:([kv])_scale|([kv])_proj\.output_scale)$")
# Per-linear tensors that are read with the weight or not needed on the CPU.
_SIDE_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx", "weight_packed", "weight_scale",
                  "weight_zero_point", "weight_g_idx", "weight_shape", "weight_scale_inv",
                  "input_scale", "input_zero_point", "output_scale", "output_zero_point")


@dataclass
class IntLinear:
    """w[n, k] = scale[n, g(k)] * (codes[n, k] - zero[n, g(k)]); zero None: 2^(bits-1)."""

    name: str
    bits: int
    codes: np.ndarray  # uint8 [N, K], unsigned
    scale: np.ndarray  # float32 [N, G]
    zero: np.ndarray | None  # int16 [N, G], unsigned (None: symmetric)
    group_size: int  # K for per-channel
    g_idx: np.ndarray | None = None  # int [K] (None: k // group_size)

    def groups(self) -> np.ndarray:
        k = self.codes.shape[1]
        return self.g_idx if self.g_idx is not None else np.arange(k) // self.group_size

    def dequantize(self) -> np.ndarray:
        g = self.groups()
        zero = (1 << (self.bits - 1)) if self.zero is None else self.zero[:, g]
        return (self.scale[:, g] * (self.codes.astype(np.float32) - zero)).astype(np.float32)


@dataclass
class Fp8Rows:
    """An FP8 linear as ``fp8_gemm`` reads it: w[n, k] = scale[n] * e4m3(codes[n, k]) (a
    per-tensor scale repeated on every row)."""

    name: str
    codes: np.ndarray  # uint8 [N, K], the checkpoint's e4m3fn bytes
    scale: np.ndarray  # float32 [N]

    def dequantize(self) -> np.ndarray:
        # The float32 products the checkpoint's values are defined by (value * scale).
        return FP8_E4M3_VALUES[self.codes] * self.scale[:, None]


def keeps_fp8_rows(device_type: str) -> bool:
    """Whether FP8 linears stay e4m3 rows with per-row scales (``Fp8Rows``, run by fp8_gemm) on a
    device of this type: on CUDA, yes. On the CPU they become Q8_0: the integer kernels read
    ~1.06 bytes per weight too and run several times faster than float dot products."""
    return device_type == "cuda"


@dataclass
class ConversionStats:
    exact: int = 0  # linears whose rows hold the checkpoint's values
    rounded_scales: int = 0  # linears with scales or Q4_1 mins rounded to fp16
    requantized: int = 0  # linears requantized to Q8_0 (FP8, mixed groups, asym 8-bit)
    kept_float: int = 0
    fp8_rows: int = 0  # FP8 linears kept as e4m3 rows (keep_fp8)

    def describe(self) -> str:
        return (f"{self.exact} exact, {self.rounded_scales} with fp16-rounded scales/mins, "
                f"{self.requantized} requantized to Q8_0, {self.kept_float} kept float"
                + (f", {self.fp8_rows} kept as fp8 rows" if self.fp8_rows else ""))


@dataclass
class HFQuantCheckpoint:
    tensors: dict[str, RawGGUFTensor]
    kv_scales: dict[int, tuple[float, float]] = field(default_factory=dict)
    stats: ConversionStats = field(default_factory=ConversionStats)
    # FP8 linears kept as e4m3 rows (keep_fp8), by weight name; not in tensors
    fp8: dict[str, Fp8Rows] = field(default_factory=dict)


# ---- encodings ------------------------------------------------------------------------------


def _unpack(words: np.ndarray, bits: int, axis: int) -> np.ndarray:
    """uint8 codes of int32 words packing 32 / bits values along ``axis`` (value i at bits *
    i), the axis growing by that factor."""
    w = np.ascontiguousarray(words).view(np.uint32)
    shifts = np.arange(32 // bits, dtype=np.uint32) * np.uint32(bits)
    mask = np.uint32((1 << bits) - 1)
    if axis == 1:
        out = (w[:, :, None] >> shifts) & mask
        return out.reshape(w.shape[0], -1).astype(np.uint8)
    out = (w[:, None, :] >> shifts[None, :, None]) & mask
    return out.reshape(-1, w.shape[1]).astype(np.uint8)


def _rows(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    return np.ascontiguousarray(blocks).reshape(n, -1)


def _half_bytes(values: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(values.astype(np.float16)).view(np.uint8).reshape(
        *values.shape, 2)


def q4_rows(d: np.ndarray, m: np.ndarray | None, codes: np.ndarray) -> np.ndarray:
    """Q4_0 (m None) or Q4_1 rows from fp16-representable d [N, KB], m [N, KB] and 4-bit codes
    [N, KB * 32]: byte j of a block holds value j (low nibble) and value j + 16 (high)."""
    n, kb = d.shape
    q = codes.reshape(n, kb, _BLOCK)
    head = 2 if m is None else 4
    out = np.empty((n, kb, head + 16), np.uint8)
    out[..., 0:2] = _half_bytes(d)
    if m is not None:
        out[..., 2:4] = _half_bytes(m)
    out[..., head:] = q[..., :16] | (q[..., 16:] << 4)
    return _rows(out)


def q8_rows(d: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Q8_0 rows from d [N, KB] and int8 values [N, KB * 32]."""
    n, kb = d.shape
    out = np.empty((n, kb, 2 + _BLOCK), np.uint8)
    out[..., 0:2] = _half_bytes(d)
    out[..., 2:] = values.reshape(n, kb, _BLOCK).astype(np.int8).view(np.uint8)
    return _rows(out)


def requantize_q8_0(values: np.ndarray) -> np.ndarray:
    """Q8_0 rows of float32 values [N, K] (K % 32 == 0): d = max|w| / 127 per 32 values in fp16,
    q = w / d (against the stored fp16 d, so each value is off by at most half a step) rounded
    half away from zero."""
    n, k = values.shape
    blocks = np.asarray(values, np.float32).reshape(n, k // _BLOCK, _BLOCK)
    d = (np.abs(blocks).max(axis=-1) / np.float32(127)).astype(np.float16).astype(np.float32)
    inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    scaled = blocks * inverse[..., None]
    q = np.clip(np.trunc(scaled + np.copysign(np.float32(0.5), scaled)), -127, 127)
    return q8_rows(d, q.reshape(n, k))


def _block_groups(lin: IntLinear) -> np.ndarray | None:
    """The group of every 32-value block of a row, or None when a block spans groups."""
    k = lin.codes.shape[1]
    if lin.g_idx is not None:
        g = lin.g_idx.reshape(k // _BLOCK, _BLOCK)
        return g[:, 0] if bool((g == g[:, :1]).all()) else None
    if lin.group_size % _BLOCK:
        return None
    return np.arange(k // _BLOCK) * _BLOCK // lin.group_size


def _fp16_exact(values: np.ndarray) -> bool:
    half = values.astype(np.float16)
    return bool(np.isfinite(half).all() and (half.astype(np.float32) == values).all())


def encode_int_linear(lin: IntLinear, stats: ConversionStats) -> tuple[str, np.ndarray]:
    """(ggml type name, uint8 rows) of ``lin`` for the CPU kernels (see the module docstring)."""
    k = lin.codes.shape[1]
    if k % _BLOCK:
        stats.kept_float += 1
        return "F32", lin.dequantize().view(np.uint8)
    groups = _block_groups(lin)
    scale = None if groups is None else lin.scale[:, groups]
    if scale is not None and np.isfinite(scale.astype(np.float16)).all():
        zero = None if lin.zero is None else lin.zero[:, groups].astype(np.float32)
        half = 1 << (lin.bits - 1)
        exact = _fp16_exact(scale)
        if lin.bits == 4 and (zero is None or bool((zero == half).all())):
            stats.exact += exact
            stats.rounded_scales += not exact
            return "Q4_0", q4_rows(scale, None, lin.codes)
        if lin.bits == 4:
            m = -scale * zero
            exact = exact and _fp16_exact(m)
            stats.exact += exact
            stats.rounded_scales += not exact
            return "Q4_1", q4_rows(scale, m, lin.codes)
        if lin.bits == 8 and (zero is None or bool((zero == half).all())):
            stats.exact += exact
            stats.rounded_scales += not exact
            return "Q8_0", q8_rows(scale, lin.codes.astype(np.int16) - half)
    stats.requantized += 1
    return "Q8_0", requantize_q8_0(lin.dequantize())


# ---- formats --------------------------------------------------------------------------------


class _Reader:
    """Tensors of one checkpoint, with errors that name the tensor and the problem."""

    def __init__(self, index: SafetensorsIndex, where: str):
        self.index, self.where = index, where

    def has(self, name: str) -> bool:
        return name in self.index

    def get(self, name: str, what: str) -> np.ndarray:
        if name not in self.index:
            raise ValueError(f"{self.where}: {what} {name} is missing from the checkpoint")
        return self.index.array(name)

    def floats(self, name: str, what: str) -> np.ndarray:
        self.get(name, what)
        return self.index.float32(name)


def _bits(value, prefix: str, method: str, allowed=(4, 8)) -> int:
    if value not in allowed:
        raise ValueError(f"{prefix}: {method} with {value} bits is not supported; supported: "
                         + ", ".join(map(str, allowed)))
    return int(value)


def _group_size(value, k: int, prefix: str) -> int:
    group = k if value in (None, -1, 0) else int(value)
    if group <= 0 or k % group:
        raise ValueError(f"{prefix}: group size {value} does not divide the {k} input features")
    return group


def _check_shape(array: np.ndarray, shape: tuple[int, ...], name: str, why: str) -> None:
    if tuple(array.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(array.shape)}, expected {tuple(shape)} "
                         f"({why})")


def _g_idx(r: _Reader, name: str, k: int, groups: int, group_size: int) -> np.ndarray | None:
    if not r.has(name):
        return None
    g = np.asarray(r.get(name, "g_idx"), dtype=np.int64).reshape(-1)
    _check_shape(g, (k,), name, "one group index per input feature")
    if g.size and (g.min() < 0 or g.max() >= groups):
        raise ValueError(f"{name} names groups outside 0..{groups - 1}")
    return None if np.array_equal(g, np.arange(k) // group_size) else g


def decode_gptq(r: _Reader, prefix: str, cfg: dict) -> IntLinear:
    bits = _bits(cfg.get("bits"), prefix, "GPTQ")
    per_word = 32 // bits
    qweight = r.get(f"{prefix}.qweight", "GPTQ weight")
    k, n = qweight.shape[0] * per_word, qweight.shape[1]
    group = _group_size(cfg.get("group_size"), k, prefix)
    groups = k // group
    scales = r.floats(f"{prefix}.scales", "GPTQ scales")
    _check_shape(scales, (groups, n), f"{prefix}.scales", f"group size {group}")
    qzeros = r.get(f"{prefix}.qzeros", "GPTQ zero points")
    _check_shape(qzeros, (groups, -(-n // per_word)), f"{prefix}.qzeros", f"group size {group}")
    zero = _unpack(qzeros, bits, axis=1)[:, :n].T.astype(np.int16)
    # GPTQ v1 ("gptq", the default) stores zero - 1; gptq_v2 stores the zero itself.
    if cfg.get("checkpoint_format", "gptq") != "gptq_v2":
        zero += 1
    return IntLinear(prefix, bits, np.ascontiguousarray(_unpack(qweight, bits, axis=0).T),
                     np.ascontiguousarray(scales.T), zero, group,
                     _g_idx(r, f"{prefix}.g_idx", k, groups, group))


def decode_awq(r: _Reader, prefix: str, cfg: dict) -> IntLinear:
    _bits(cfg.get("bits", cfg.get("w_bit")), prefix, "AWQ", allowed=(4,))
    version = str(cfg.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"{prefix}: AWQ version {version!r} is not supported; supported: gemm")
    if cfg.get("zero_point") is False:
        raise ValueError(f"{prefix}: AWQ without zero points is not supported")
    qweight = r.get(f"{prefix}.qweight", "AWQ weight")
    k, n = qweight.shape[0], qweight.shape[1] * 8
    group = _group_size(cfg.get("group_size", cfg.get("q_group_size")), k, prefix)
    groups = k // group
    scales = r.floats(f"{prefix}.scales", "AWQ scales")
    _check_shape(scales, (groups, n), f"{prefix}.scales", f"group size {group}")
    qzeros = r.get(f"{prefix}.qzeros", "AWQ zero points")
    _check_shape(qzeros, (groups, n // 8), f"{prefix}.qzeros", f"group size {group}")
    order = np.array(_AWQ_COLUMN_NIBBLE)

    def columns(words: np.ndarray) -> np.ndarray:
        nibbles = _unpack(words, 4, axis=1)
        return nibbles.reshape(nibbles.shape[0], -1, 8)[:, :, order].reshape(nibbles.shape[0], -1)

    return IntLinear(prefix, 4, np.ascontiguousarray(columns(qweight).T),
                     np.ascontiguousarray(scales.T),
                     np.ascontiguousarray(columns(qzeros).T.astype(np.int16)), group)


def _ct_scheme(cfg: dict, prefix: str) -> dict:
    """The weights' QuantizationArgs of the config group that targets ``prefix``."""
    for group in (cfg.get("config_groups") or {}).values():
        for target in group.get("targets", []):
            hit = (target == "Linear" or
                   (target.startswith("re:") and re.match(target[3:], prefix)) or
                   prefix == target or prefix.endswith("." + target))
            if hit:
                return group.get("weights") or {}
    raise ValueError(f"{prefix}: no config group of quantization_config targets this layer")


def _float_scale(scale: np.ndarray, n: int, k: int, name: str) -> np.ndarray:
    """A per-tensor, per-channel or per-group scale as [N, G] (G dividing K)."""
    if scale.size == 1:
        return np.full((n, 1), float(scale.reshape(-1)[0]), np.float32)
    scale = scale.reshape(n, -1) if scale.size % n == 0 and scale.shape[0] == n else None
    if scale is None or k % scale.shape[1]:
        raise ValueError(f"{name}: scale shape does not fit a [{n}, {k}] weight")
    return scale


def _fp8_linear(r: _Reader, prefix: str, scale: np.ndarray) -> Fp8Rows | np.ndarray:
    """Fp8Rows for a per-tensor / per-channel scale [N, 1], else the float32 values."""
    if scale.shape[1] == 1:
        codes = np.ascontiguousarray(r.index.array(f"{prefix}.weight"))
        return Fp8Rows(prefix, codes, np.ascontiguousarray(scale[:, 0], np.float32))
    values = r.index.float32(f"{prefix}.weight")
    return values * np.repeat(scale, values.shape[1] // scale.shape[1], axis=1)


def decode_compressed(r: _Reader, prefix: str, cfg: dict) -> IntLinear | Fp8Rows | np.ndarray:
    """An integer linear, or a float8 one (Fp8Rows, or float32 values for group scales)."""
    args = _ct_scheme(cfg, prefix)
    if r.has(f"{prefix}.weight_packed"):
        bits = _bits(args.get("num_bits"), prefix, "pack-quantized compressed-tensors")
        packed = r.get(f"{prefix}.weight_packed", "packed weight")
        n = packed.shape[0]
        k = packed.shape[1] * (32 // bits)
        if r.has(f"{prefix}.weight_shape"):
            n, k = (int(v) for v in np.asarray(r.get(f"{prefix}.weight_shape", "")).reshape(-1))
        codes = np.ascontiguousarray(_unpack(packed, bits, axis=1)[:, :k])
    elif r.has(f"{prefix}.weight") and r.index.dtype(f"{prefix}.weight") == "I8":
        bits = _bits(args.get("num_bits", 8), prefix, "int-quantized compressed-tensors", (8,))
        codes = (np.asarray(r.get(f"{prefix}.weight", "")).astype(np.int16) + 128).astype(
            np.uint8)
        n, k = codes.shape
    else:
        weight = r.get(f"{prefix}.weight", "weight")
        if r.index.dtype(f"{prefix}.weight") != "F8_E4M3":
            raise ValueError(f"{prefix}.weight: compressed-tensors weight of dtype "
                             f"{r.index.dtype(f'{prefix}.weight')} is not supported")
        scale = r.floats(f"{prefix}.weight_scale", "weight scale")
        return _fp8_linear(r, prefix, _float_scale(scale, *weight.shape,
                                                   f"{prefix}.weight_scale"))
    scale = _float_scale(r.floats(f"{prefix}.weight_scale", "weight scale"), n, k,
                         f"{prefix}.weight_scale")
    strategy = args.get("strategy", "group")
    group = k // scale.shape[1]
    if strategy == "group" and args.get("group_size") not in (None, group):
        raise ValueError(f"{prefix}: group size {args.get('group_size')} does not match the "
                         f"scales' {scale.shape[1]} groups over {k} input features")
    half = 1 << (bits - 1)
    zero = None
    if not args.get("symmetric", True) and r.has(f"{prefix}.weight_zero_point"):
        stored = r.get(f"{prefix}.weight_zero_point", "zero point")
        if stored.dtype == np.int32 and bits < 8:  # packed along the output dimension
            zero = _unpack(stored, bits, axis=0)[:n].astype(np.int16)  # stored + half
        else:
            zero = np.asarray(stored).reshape(n, -1).astype(np.int16) + half
        _check_shape(zero, scale.shape, f"{prefix}.weight_zero_point", "one per group")
    elif not args.get("symmetric", True):
        raise ValueError(f"{prefix}: asymmetric scheme without {prefix}.weight_zero_point")
    return IntLinear(prefix, bits, codes, np.ascontiguousarray(scale, np.float32), zero, group,
                     _g_idx(r, f"{prefix}.weight_g_idx", k, scale.shape[1], group))


def decode_fp8(r: _Reader, prefix: str, cfg: dict) -> Fp8Rows | np.ndarray:
    name = f"{prefix}.weight"
    if r.index.dtype(name) != "F8_E4M3":
        raise ValueError(f"{name}: fp8 checkpoint weight of dtype {r.index.dtype(name)}; "
                         "supported: F8_E4M3")
    n, k = r.index.shape(name)
    block = cfg.get("weight_block_size")
    if block:
        bn, bk = (int(v) for v in block)
        scale = r.floats(f"{prefix}.weight_scale_inv", "block scale")
        _check_shape(scale, (-(-n // bn), -(-k // bk)), f"{prefix}.weight_scale_inv",
                     f"weight_block_size {block}")
        full = np.repeat(np.repeat(scale, bn, axis=0), bk, axis=1)[:n, :k]
        return r.index.float32(name) * full
    return _fp8_linear(r, prefix, _float_scale(r.floats(f"{prefix}.weight_scale",
                                                        "weight scale"), n, k,
                                               f"{prefix}.weight_scale"))


_DECODERS: dict[str, Callable] = {"gptq": decode_gptq, "awq": decode_awq,
                                  "compressed-tensors": decode_compressed, "fp8": decode_fp8}


def _quantized_prefixes(index: SafetensorsIndex, method: str) -> list[str]:
    names = index.names()
    if method in ("gptq", "awq"):
        return [n[: -len(".qweight")] for n in names if n.endswith(".qweight")]
    if method == "fp8":
        return [n[: -len(".weight")] for n in names if n.endswith(".weight")
                and index.dtype(n) == "F8_E4M3"]
    out = [n[: -len(".weight_packed")] for n in names if n.endswith(".weight_packed")]
    out += [n[: -len(".weight")] for n in names if n.endswith(".weight")
            and index.dtype(n) in ("I8", "F8_E4M3")]
    return out


def _decoded(source: ModelSource, scheme: QuantScheme
             ) -> Iterator[tuple[str, IntLinear | Fp8Rows | np.ndarray | RawGGUFTensor]]:
    """(HF weight name, decoded linear / float32 values / stored float tensor) for every tensor
    the model needs; KV scales come as float32 arrays under their own names."""
    index = SafetensorsIndex(source.weight_files)
    reader = _Reader(index, source.model_dir)
    decode = _DECODERS[scheme.method]
    quantized = set(_quantized_prefixes(index, scheme.method))
    if not quantized:
        raise ValueError(f"{source.model_dir}: config.json names {scheme.method} quantization "
                         "but no tensor of the checkpoint is quantized that way")
    for prefix in sorted(quantized):
        yield f"{prefix}.weight", decode(reader, prefix, scheme.config)
    for name in index.names():
        if _KV_SCALE.match(name):
            yield name, index.float32(name)
            continue
        prefix, _, suffix = name.rpartition(".")
        if prefix in quantized and (suffix in _SIDE_SUFFIXES or suffix == "weight"):
            continue
        if suffix in _SIDE_SUFFIXES or name.endswith("rotary_emb.inv_freq"):
            continue
        dtype = index.dtype(name)
        if dtype not in _FLOAT_TYPES:
            raise ValueError(f"{source.model_dir}: tensor {name} of dtype {dtype} belongs to "
                             f"no quantized layer of this {scheme.method} checkpoint")
        array = index.array(name)
        rows = array.shape[0] if array.ndim > 1 else 1
        yield name, RawGGUFTensor(name, _FLOAT_TYPES[dtype], tuple(array.shape),
                                  array.view(np.uint8).reshape(rows, -1))


def _kv_layer(name: str) -> tuple[int, str] | None:
    m = _KV_SCALE.match(name)
    return None if m is None else (int(m.group(1)), m.group(2) or m.group(3))


def float_rows(name: str, values: np.ndarray, stats: ConversionStats) -> RawGGUFTensor:
    """A float linear's values [N, K] as Q8_0 rows (F32 when K is not whole blocks)."""
    n, k = values.shape
    if k % _BLOCK == 0:
        stats.requantized += 1
        return RawGGUFTensor(name, "Q8_0", (n, k), requantize_q8_0(values))
    stats.kept_float += 1
    return RawGGUFTensor(name, "F32", (n, k),
                         np.ascontiguousarray(values, np.float32).view(np.uint8))


def load_hf_quantized(source: ModelSource, scheme: QuantScheme, quantize_output: bool,
                      keep_fp8: bool = False) -> HFQuantCheckpoint:
    """Every tensor of a quantized HF checkpoint as CPU rows (see the module docstring);
    ``keep_fp8``: FP8 linears with per-row scales go to ``fp8`` as e4m3 rows instead."""
    out = HFQuantCheckpoint({})
    kv: dict[int, dict[str, float]] = {}
    for name, item in _decoded(source, scheme):
        layer = _kv_layer(name)
        if layer is not None:
            kv.setdefault(layer[0], {})[layer[1]] = float(np.asarray(item).reshape(-1)[0])
            continue
        if isinstance(item, RawGGUFTensor):
            out.tensors[name] = item
            continue
        if isinstance(item, Fp8Rows) and keep_fp8:
            out.fp8[name] = item
            out.stats.fp8_rows += 1
            continue
        if isinstance(item, IntLinear):
            n, k = item.codes.shape
            quant_type, rows = encode_int_linear(item, out.stats)
            out.tensors[name] = RawGGUFTensor(name, quant_type, (n, k), rows)
        else:
            values = item.dequantize() if isinstance(item, Fp8Rows) else item
            out.tensors[name] = float_rows(name, values, out.stats)
    if quantize_output:
        for name in ("lm_head.weight", "model.embed_tokens.weight"):
            t = out.tensors.get(name)
            if t is not None and t.ggml_type in _FLOAT_TYPES.values() and t.shape[1] % _BLOCK == 0:
                from .gguf_raw import dequantize_raw

                out.tensors[name] = t._replace(ggml_type="Q8_0",
                                               data=requantize_q8_0(dequantize_raw(t)))
    out.kv_scales = {i: (s.get("k", 1.0), s.get("v", 1.0)) for i, s in kv.items()}
    logger.info("%s checkpoint: linears %s%s", scheme.describe(), out.stats.describe(),
                f"; KV cache scales for {len(kv)} layers" if kv else "")
    return out


def iterate_dequantized(source: ModelSource, scheme: QuantScheme
                        ) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 values) of every weight, quantized linears dequantized (the float path:
    --quantized-weights dequantize, or a device without kernels for the format)."""
    from .gguf_raw import dequantize_raw

    for name, item in _decoded(source, scheme):
        if _kv_layer(name) is not None:
            continue
        if isinstance(item, RawGGUFTensor):
            yield name, dequantize_raw(item)
        elif isinstance(item, (IntLinear, Fp8Rows)):
            yield name, item.dequantize()
        else:
            yield name, item


def read_kv_scales(source: ModelSource) -> dict[int, tuple[float, float]]:
    """Per-layer (k_scale, v_scale) stored in an HF checkpoint (empty for none, or a GGUF)."""
    if source.is_gguf or source.load_format != "safetensors":
        return {}
    index = SafetensorsIndex(source.weight_files)
    kv: dict[int, dict[str, float]] = {}
    for name in index.names():
        layer = _kv_layer(name)
        if layer is not None:
            kv.setdefault(layer[0], {})[layer[1]] = float(index.float32(name).reshape(-1)[0])
    return {i: (s.get("k", 1.0), s.get("v", 1.0)) for i, s in kv.items()}


class _NoPages:
    """An HF checkpoint's tensors are new arrays: nothing of a file to release."""

    def release_pages(self, name: str | None = None) -> None:
        return None


def open_quantized_tensors(source: ModelSource, quantize_output: bool = True,
                           keep_fp8: bool = False):
    """(tensors by HF name as RawGGUFTensor, an object whose ``release_pages(name)`` drops a
    tensor's file pages, FP8 linears kept as ``Fp8Rows`` by weight name: only with
    ``keep_fp8``) of a GGUF file or an HF quantized checkpoint (``source.quant``)."""
    if source.is_gguf:
        from .gguf_file import open_gguf
        from .gguf_raw import iterate_gguf_raw

        return ({t.name: t for t in iterate_gguf_raw(source.gguf_path)},
                open_gguf(source.gguf_path), {})
    checkpoint = load_hf_quantized(source, source.quant, quantize_output, keep_fp8)
    return checkpoint.tensors, _NoPages(), checkpoint.fp8


def kv_cache_scales(source: ModelSource, num_layers: int, path: str | None = None
                    ) -> list[tuple[float, float]]:
    """Per-layer (k_scale, v_scale) of an fp8 KV cache: from ``path`` (vLLM's JSON, {"kv_cache":
    {"scaling_factor": {"0": {"<layer>": scale}}}}, one scale for K and V), else the
    checkpoint's k_scale / v_scale tensors, else 1.0. ValueError for a bad file or scale."""
    import json
    import math

    if path is not None:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            table = data["kv_cache"]["scaling_factor"]["0"]
            found = {int(layer): float(v) for layer, v in table.items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"quantization_param_path {path}: expected JSON with "
                             f"kv_cache.scaling_factor.0.<layer> scales ({e})") from e
        missing = [i for i in range(num_layers) if i not in found]
        if missing:
            raise ValueError(f"quantization_param_path {path}: no scale for layer(s) "
                             f"{missing[:5]}")
        scales = [(found[i], found[i]) for i in range(num_layers)]
    else:
        stored = read_kv_scales(source)
        scales = [stored.get(i, (1.0, 1.0)) for i in range(num_layers)]
    for i, pair in enumerate(scales):
        if not all(math.isfinite(s) and s > 0 for s in pair):
            raise ValueError(f"KV cache scale of layer {i} must be positive and finite, got "
                             f"{pair}")
    return scales
