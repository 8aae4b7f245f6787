"""fastllm kernels against plain torch references (CPU always; CUDA when a device is present)."""

from __future__ import annotations

import math
import os
import random
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from fastllm import _C, ops

CUDA = torch.cuda.is_available() and _C.ops.built_with_cuda()
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
]
FP8 = torch.float8_e4m3fn
FP8_E5M2 = torch.float8_e5m2
# Largest finite value of each float8 cache type: the kernels saturate there.
FP8_MAX = {FP8: 448.0, FP8_E5M2: 57344.0}
# Test parameter -> cache dtype (None: the same dtype as the activations).
CACHES = {"same": None, "fp8": FP8, "fp8_e5m2": FP8_E5M2}


def _to_fp8(x, dtype):
    """torch's round-to-nearest-even cast, saturating as the kernels do."""
    return x.clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _tol(dtype):
    return {"atol": TOL[dtype] * 4, "rtol": TOL[dtype] * 4}


# ---- paged KV-cache helpers ---------------------------------------------------------------------


class PagedCase:
    """Random sequences laid out in a paged cache [num_blocks, block_size, kv_heads, head_size]."""

    def __init__(
        self,
        seqs,
        num_heads,
        num_kv_heads,
        head_size,
        block_size,
        dtype,
        cache_dtype,
        device,
        seed=0,
        scale_kv=1.0,
    ):
        gen = torch.Generator().manual_seed(seed)
        self.seqs = seqs  # list of (query_len, context_len)
        self.block_size = block_size
        self.num_heads, self.num_kv_heads, self.head_size = num_heads, num_kv_heads, head_size
        self.dtype, self.cache_dtype = dtype, cache_dtype
        blocks_per_seq = [max(1, math.ceil(c / block_size)) for _, c in seqs]
        num_blocks = sum(blocks_per_seq) + 3
        ids = list(range(1, num_blocks))
        random.Random(seed).shuffle(ids)
        max_blocks = max(blocks_per_seq) + 1
        table = torch.zeros((len(seqs), max_blocks), dtype=torch.int32)
        cursor = 0
        for s, n in enumerate(blocks_per_seq):
            table[s, :n] = torch.tensor(ids[cursor : cursor + n], dtype=torch.int32)
            cursor += n
        fp8 = cache_dtype in FP8_MAX
        self.k_scale = 0.05 if fp8 else 1.0
        self.v_scale = 0.04 if fp8 else 1.0
        shape = (num_blocks, block_size, num_kv_heads, head_size)
        # Unused slots hold NaN: reading one would poison the output.
        k_full = torch.full(shape, float("nan"))
        v_full = torch.full(shape, float("nan"))
        self.keys, self.values = [], []
        for s, (_, ctx) in enumerate(seqs):
            k = torch.randn((ctx, num_kv_heads, head_size), generator=gen) * scale_kv
            v = torch.randn((ctx, num_kv_heads, head_size), generator=gen) * scale_kv
            for j in range(ctx):
                b, o = int(table[s, j // block_size]), j % block_size
                k_full[b, o], v_full[b, o] = k[j], v[j]
        if fp8:
            self.key_cache = _to_fp8(k_full / self.k_scale, cache_dtype)
            self.value_cache = _to_fp8(v_full / self.v_scale, cache_dtype)
        else:
            self.key_cache = k_full.to(cache_dtype)
            self.value_cache = v_full.to(cache_dtype)
        qlens = [q for q, _ in seqs]
        self.query_start_loc = torch.tensor(
            [0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32
        )
        self.context_lens = torch.tensor([c for _, c in seqs], dtype=torch.int32)
        self.block_tables = table
        self.query = torch.randn((sum(qlens), num_heads, head_size), generator=gen).to(dtype)
        self.device = device

    def dequant(self, cache, scale):
        return cache.float() * scale

    def reference(self, scale, sliding_window=-1, softcap=0.0):
        kc = self.dequant(self.key_cache, self.k_scale)
        vc = self.dequant(self.value_cache, self.v_scale)
        group = self.num_heads // self.num_kv_heads
        out = torch.empty(self.query.shape, dtype=torch.float32)
        for s, (qlen, ctx) in enumerate(self.seqs):
            if qlen == 0:
                continue
            nb = math.ceil(ctx / self.block_size)
            blocks = self.block_tables[s, :nb].long()
            k = kc[blocks].reshape(-1, self.num_kv_heads, self.head_size)[:ctx]
            v = vc[blocks].reshape(-1, self.num_kv_heads, self.head_size)[:ctx]
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
            start = int(self.query_start_loc[s])
            q = self.query[start : start + qlen].float()
            scores = torch.einsum("qhd,khd->hqk", q, k) * scale
            if softcap > 0:
                scores = softcap * torch.tanh(scores / softcap)
            pos = torch.arange(ctx - qlen, ctx)[:, None]
            key = torch.arange(ctx)[None, :]
            mask = key <= pos
            if sliding_window > 0:
                mask &= key > pos - sliding_window
            scores = scores.masked_fill(~mask[None], float("-inf"))
            out[start : start + qlen] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
        return out

    def run(self, scale, sliding_window=-1, softcap=0.0):
        d = self.device
        return ops.paged_attention(
            self.query.to(d),
            self.key_cache.to(d),
            self.value_cache.to(d),
            self.query_start_loc.to(d),
            self.context_lens.to(d),
            self.block_tables.to(d),
            scale,
            sliding_window,
            softcap,
            self.k_scale,
            self.v_scale,
            int(self.context_lens.max()),
        ).cpu()


# ---- paged attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_paged_attention_head_and_block_sizes(device, head_size, block_size):
    # Decode rows, a full prefill, and chunked prefill with part of the context already cached.
    seqs = [(1, 1), (1, 37), (13, 13), (5, 2 * block_size + 3), (1, 3 * block_size)]
    case = PagedCase(
        seqs,
        4,
        2,
        head_size,
        block_size,
        torch.float32,
        torch.float32,
        device,
        seed=head_size + block_size,
    )
    scale = head_size**-0.5
    torch.testing.assert_close(case.run(scale), case.reference(scale), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "heads", [(4, 4), (8, 2), (9, 3), (6, 1)], ids=["mha", "gqa4", "gqa3", "mqa"]
)
@pytest.mark.parametrize("window,softcap", [(-1, 0.0), (7, 0.0), (-1, 20.0), (24, 5.0)])
def test_paged_attention_gqa_window_softcap(device, heads, window, softcap):
    seqs = [(1, 50), (17, 17), (9, 40), (0, 5), (2, 9)]
    case = PagedCase(
        seqs,
        heads[0],
        heads[1],
        64,
        16,
        torch.float32,
        torch.float32,
        device,
        seed=heads[0] * 10 + heads[1],
        scale_kv=2.0,
    )
    torch.testing.assert_close(
        case.run(0.125, window, softcap),
        case.reference(0.125, window, softcap),
        atol=3e-5,
        rtol=3e-5,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cache", list(CACHES))
def test_paged_attention_dtypes(device, dtype, cache):
    cache_dtype = CACHES[cache] or dtype
    seqs = [(1, 70), (11, 30), (1, 5)]
    case = PagedCase(seqs, 8, 2, 128, 16, dtype, cache_dtype, device, seed=3)
    got = case.run(128**-0.5).float()
    torch.testing.assert_close(got, case.reference(128**-0.5), **_tol(dtype))


def test_paged_attention_cpu_mixed_precision_cache():
    # On the CPU a float32 model may keep its KV cache in float16 or bfloat16.
    for cache_dtype in (torch.float16, torch.bfloat16):
        case = PagedCase([(1, 90), (6, 20)], 9, 3, 64, 16, torch.float32, cache_dtype, "cpu")
        torch.testing.assert_close(case.run(0.125), case.reference(0.125), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_paged_attention_long_context_partitions(device):
    # Longer than one CUDA partition (512 keys), with a window crossing partitions.
    seqs = [(1, 1500), (3, 700)]
    case = PagedCase(seqs, 4, 2, 64, 32, torch.float32, torch.float32, device, seed=9)
    torch.testing.assert_close(case.run(0.125), case.reference(0.125), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(
        case.run(0.125, 600), case.reference(0.125, 600), atol=2e-5, rtol=2e-5
    )


def test_paged_attention_rejects_bad_arguments():
    case = PagedCase([(1, 4)], 4, 2, 64, 16, torch.float32, torch.float32, "cpu")
    with pytest.raises(ValueError, match="head_size"):
        ops.paged_attention(
            case.query[..., :32].contiguous(),
            case.key_cache[..., :32].contiguous(),
            case.value_cache[..., :32].contiguous(),
            case.query_start_loc,
            case.context_lens,
            case.block_tables,
            1.0,
        )
    with pytest.raises(ValueError, match="context_lens"):
        ops.paged_attention(
            case.query,
            case.key_cache,
            case.value_cache,
            case.query_start_loc,
            torch.tensor([10_000], dtype=torch.int32),
            case.block_tables,
            1.0,
        )
    with pytest.raises(ValueError, match="dtype"):
        ops.paged_attention(
            case.query,
            case.key_cache,
            case.value_cache,
            case.query_start_loc,
            case.context_lens.long(),
            case.block_tables,
            1.0,
        )


# ---- cache ops ----------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cache", list(CACHES))
def test_reshape_and_cache(device, dtype, cache):
    cache_dtype = CACHES[cache] or dtype
    num_blocks, block_size, kv_heads, head_size, tokens = 7, 8, 2, 80, 13
    gen = torch.Generator().manual_seed(1)
    # key/value as strided views into a fused qkv projection, like a model produces them.
    qkv = torch.randn((tokens, 3, kv_heads, head_size), generator=gen).to(dtype)
    key, value = qkv[:, 1], qkv[:, 2]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[3] = -1
    key_cache = torch.zeros((num_blocks, block_size, kv_heads, head_size), dtype=cache_dtype)
    value_cache = torch.zeros_like(key_cache)
    k_scale, v_scale = (0.02, 0.03) if cache != "same" else (1.0, 1.0)
    kc, vc = key_cache.to(device), value_cache.to(device)
    ops.reshape_and_cache(
        key.to(device), value.to(device), kc, vc, slots.to(device), k_scale, v_scale
    )
    expect_k = torch.zeros_like(key_cache).view(-1, kv_heads, head_size)
    expect_v = torch.zeros_like(value_cache).view(-1, kv_heads, head_size)
    keep = slots >= 0
    if cache != "same":
        expect_k[slots[keep]] = _to_fp8(key[keep].float() / k_scale, cache_dtype)
        expect_v[slots[keep]] = _to_fp8(value[keep].float() / v_scale, cache_dtype)
    else:
        expect_k[slots[keep]] = key[keep]
        expect_v[slots[keep]] = value[keep]
    # Bit-exact, fp8 rounding included.
    assert torch.equal(kc.cpu().view(torch.uint8), expect_k.view(key_cache.shape).view(torch.uint8))
    assert torch.equal(vc.cpu().view(torch.uint8), expect_v.view(key_cache.shape).view(torch.uint8))


def test_fp8_rounding_matches_torch_everywhere():
    # Every float16 value (plus out-of-range ones) round-trips through e4m3 exactly as torch does.
    values = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    values = values[torch.isfinite(values)]
    values = torch.cat([values, torch.tensor([448.0, 449.0, 463.9, 464.0, 1e6, -1e6])])
    n = values.numel()
    key = values.view(n, 1, 1).expand(n, 1, 16).contiguous()
    cache = torch.zeros((n, 1, 1, 16), dtype=FP8)
    ops.reshape_and_cache(key, key, cache, cache.clone(), torch.arange(n), 1.0, 1.0)
    expect = values.clamp(-448, 448).to(FP8)
    assert torch.equal(cache[:, 0, 0, 0].view(torch.uint8), expect.view(torch.uint8))


def _e5m2_codes(values: torch.Tensor, device="cpu") -> torch.Tensor:
    """The kernels' e5m2 codes of float32 values (reshape_and_cache, scale 1), on device."""
    n = values.numel()
    row = values.view(n, 1, 1).expand(n, 1, 8).contiguous().to(device)
    cache = torch.zeros((n, 1, 1, 8), dtype=FP8_E5M2, device=device)
    ops.reshape_and_cache(row, row, cache, cache.clone(), torch.arange(n, device=device))
    codes = cache.cpu().view(torch.uint8)[:, 0, 0]
    assert torch.equal(codes, codes[:, :1].expand(n, 8))  # SIMD body and scalar tail agree
    return codes[:, 0]


def _attend_to_all_codes(fp8_dtype, device) -> torch.Tensor:
    """Attention over one key whose value row holds all 256 codes of fp8_dtype (4 KV heads x 64),
    so the output, flattened, is the decoded value row (v_scale 1)."""
    value_cache = torch.zeros((2, 8, 4, 64), dtype=torch.uint8)
    value_cache[1, 0] = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(4, 64)
    out = ops.paged_attention(
        torch.ones((1, 4, 64)).to(device), torch.zeros((2, 8, 4, 64), dtype=fp8_dtype).to(device),
        value_cache.view(fp8_dtype).to(device), torch.tensor([0, 1], dtype=torch.int32).to(device),
        torch.tensor([1], dtype=torch.int32).to(device),
        torch.tensor([[1]], dtype=torch.int32).to(device), 0.125).cpu()
    return out.flatten()


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_e5m2_matches_torch_bit_for_bit(device):
    """Every e5m2 code decodes to torch's value and encodes back to itself; a sweep of float32
    values (every float16, the ties halfway between neighbouring e5m2 values, random bit patterns,
    subnormals, the saturation edge, infinities and NaN) rounds to torch's code, the finite ones
    and infinities saturating at +-57344 instead of overflowing to inf."""
    all_codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    decoded = all_codes.view(FP8_E5M2).float()
    finite = torch.isfinite(decoded)
    assert torch.equal(_e5m2_codes(decoded[finite], device), all_codes[finite])
    torch.testing.assert_close(_attend_to_all_codes(FP8_E5M2, device), decoded, atol=0, rtol=0,
                               equal_nan=True)

    gen = torch.Generator().manual_seed(5)
    halves = torch.arange(0, 65536, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    grid = torch.sort(decoded[finite & (decoded >= 0)]).values
    ties = (grid[:-1] + grid[1:]) / 2  # exactly representable in float32
    nudge = torch.tensor([1 - 2**-20, 1 + 2**-20])
    near_ties = (ties[:, None] * nudge).flatten()
    bits = torch.randint(-(2**31), 2**31 - 1, (200_000,), generator=gen, dtype=torch.int64)
    random_floats = bits.to(torch.int32).view(torch.float32)
    edges = torch.tensor([57344.0, 57345.0, 61439.99, 61440.0, 61441.0, 65536.0, 1e30,
                          float("inf"), float("nan"), 2.0**-16, 2.0**-17, 3 * 2.0**-18,
                          2.0**-14, 2.0**-14 - 2.0**-17, 1e-40, 0.0])
    sweep = torch.cat([halves, ties, near_ties, random_floats, edges])
    sweep = torch.cat([sweep, -sweep])
    expect = torch.where(torch.isnan(sweep), sweep, sweep.clamp(-57344.0, 57344.0))
    expect = expect.to(FP8_E5M2).view(torch.uint8)
    got = _e5m2_codes(sweep, device)
    bad = (got != expect).nonzero().flatten()
    assert bad.numel() == 0, [(sweep[i].item(), int(got[i]), int(expect[i])) for i in bad[:8]]
    assert _e5m2_codes(torch.tensor([1e6, -float("inf")]), device).tolist() == [0x7B, 0xFB]


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_e4m3_codes_decode_in_attention(device):
    """Every e4m3fn code read from a value cache decodes to torch's value (the AVX2 path builds
    float16 bits from the code instead of a table lookup): subnormals, the largest finite
    magnitude 448, both zeros, and NaN for 0x7F / 0xFF."""
    all_codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    decoded = all_codes.view(FP8).float()
    out = _attend_to_all_codes(FP8, device)
    torch.testing.assert_close(out, decoded, atol=0, rtol=0, equal_nan=True)
    assert torch.isnan(out[[0x7F, 0xFF]]).all() and out[0x7E] == 448.0


def test_fp8_on_the_scalar_cpu_path():
    """The portable code path (picked once per process, so in a fresh one) converts and reads
    e5m2, and reads e4m3, as the SIMD one does."""
    env = {**os.environ, "FASTLLM_CPU_ISA": "scalar"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                           "-k", "(e5m2 or e4m3_codes_decode) and not scalar_cpu_path and cpu"],
                          env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" in proc.stdout and "failed" not in proc.stdout


@pytest.mark.parametrize("device", DEVICES)
def test_copy_blocks(device):
    cache = torch.randn((6, 16, 2, 64)).to(device)
    before = cache.clone()
    mapping = torch.tensor([[1, 4], [2, 5]], dtype=torch.int32, device=device)
    ops.copy_blocks(cache, mapping)
    expect = before.clone()
    expect[4], expect[5] = before[1], before[2]
    torch.testing.assert_close(cache, expect, atol=0, rtol=0)


def test_copy_blocks_rejects_bad_pairs():
    cache = torch.zeros((4, 8, 1, 64))
    with pytest.raises(ValueError, match="bad block pair"):
        ops.copy_blocks(cache, torch.tensor([[1, 4]], dtype=torch.int32))


@pytest.mark.parametrize(
    "src_device,dst_device",
    [
        ("cpu", "cpu"),
        pytest.param("cuda", "cpu", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
        pytest.param("cpu", "cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float16, FP8, FP8_E5M2])
def test_swap_blocks(src_device, dst_device, dtype):
    src = torch.randn((5, 8, 2, 64)).to(dtype).to(src_device)
    dst = torch.zeros((3, 8, 2, 64)).to(dtype).to(dst_device)
    ops.swap_blocks(src, dst, torch.tensor([[4, 0], [1, 2]], dtype=torch.int64))
    assert torch.equal(dst[0].cpu().view(torch.uint8), src[4].cpu().view(torch.uint8))
    assert torch.equal(dst[2].cpu().view(torch.uint8), src[1].cpu().view(torch.uint8))
    assert not dst[1].cpu().float().any()
    with pytest.raises(ValueError):
        ops.swap_blocks(src, dst, torch.tensor([[0, 3]], dtype=torch.int64))


# ---- norms, rotary, activations -----------------------------------------------------------------


def _rms_ref(x, w, eps):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 576, 1000])
def test_rms_norm(device, dtype, hidden):
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn((7, hidden + 3), generator=gen) * 3).to(dtype)[:, :hidden]  # strided rows
    w = torch.randn(hidden, generator=gen).to(dtype)
    got = ops.rms_norm(x.to(device), w.to(device), 1e-5).cpu()
    torch.testing.assert_close(got, _rms_ref(x, w, 1e-5), **_tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_add_rms_norm(device, dtype):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn((3, 5, 576), generator=gen).to(dtype)
    r = torch.randn((3, 5, 576), generator=gen).to(dtype)
    w = torch.randn(576, generator=gen).to(dtype)
    expect_r = (x.float() + r.float()).to(dtype)
    expect_x = _rms_ref(expect_r, w, 1e-6)
    xd, rd = x.to(device), r.to(device)
    ops.fused_add_rms_norm(xd, rd, w.to(device), 1e-6)
    torch.testing.assert_close(rd.cpu(), expect_r, atol=0, rtol=0)
    torch.testing.assert_close(xd.cpu(), expect_x, **_tol(dtype))


def _rope_ref(x, positions, cache, head_size, is_neox):
    rot = cache.shape[1]
    cos, sin = cache[positions].chunk(2, dim=-1)
    x = x.float().view(x.shape[0], -1, head_size).clone()
    part = x[..., :rot]
    if is_neox:
        x1, x2 = part[..., : rot // 2], part[..., rot // 2 :]
        c, s = cos[:, None], sin[:, None]
        out = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    else:
        x1, x2 = part[..., 0::2], part[..., 1::2]
        c, s = cos[:, None], sin[:, None]
        out = torch.stack([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).flatten(-2)
    x[..., :rot] = out
    return x.flatten(1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("is_neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [64, 32])
def test_rotary_embedding(device, dtype, is_neox, rotary_dim):
    head_size, heads, kv_heads, tokens = 64, 9, 3, 11
    gen = torch.Generator().manual_seed(rotary_dim)
    cache = ops.build_rope_cos_sin_cache(rotary_dim, 256, 10000.0)
    positions = torch.randint(0, 256, (tokens,), generator=gen)
    qkv = torch.randn((tokens, (heads + 2 * kv_heads) * head_size), generator=gen).to(dtype)
    qkv_d = qkv.clone().to(device)
    q, k, _ = qkv_d.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
    ops.rotary_embedding(positions.to(device), q, k, cache.to(device), head_size, is_neox)
    q_ref = _rope_ref(qkv[:, : heads * head_size], positions, cache, head_size, is_neox)
    k_ref = _rope_ref(
        qkv[:, heads * head_size : (heads + kv_heads) * head_size],
        positions,
        cache,
        head_size,
        is_neox,
    )
    torch.testing.assert_close(q.cpu().float(), q_ref, **_tol(dtype))
    torch.testing.assert_close(k.cpu().float(), k_ref, **_tol(dtype))
    # The V part of the fused tensor is untouched.
    assert torch.equal(
        qkv_d[:, (heads + kv_heads) * head_size :].cpu(), qkv[:, (heads + kv_heads) * head_size :]
    )


def test_rope_cache_scalings():
    base = ops.build_rope_cos_sin_cache(64, 128, 10000.0)
    t = torch.arange(128, dtype=torch.float64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    torch.testing.assert_close(base[:, :32].double(), torch.outer(t, inv).cos(), atol=1e-6, rtol=0)
    linear = ops.build_rope_cos_sin_cache(64, 128, 10000.0, {"rope_type": "linear", "factor": 4.0})
    torch.testing.assert_close(
        linear[:, :32].double(), torch.outer(t / 4, inv).cos(), atol=1e-6, rtol=0
    )
    dynamic = ops.build_rope_cos_sin_cache(64, 128, 10000.0, {"type": "dynamic", "factor": 2.0})
    assert dynamic.shape == (256, 64)
    llama3 = ops.build_rope_cos_sin_cache(
        64,
        128,
        500000.0,
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    )
    assert llama3.shape == (128, 64)
    # High frequencies are unchanged by llama3 scaling, the lowest are divided by the factor.
    plain = ops.build_rope_cos_sin_cache(64, 128, 500000.0)
    torch.testing.assert_close(llama3[:, 0], plain[:, 0])
    yarn = ops.build_rope_cos_sin_cache(
        64,
        128,
        10000.0,
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128},
    )
    assert yarn.shape == (512, 64)
    mscale = 0.1 * math.log(4.0) + 1.0
    torch.testing.assert_close(yarn[0, :32], torch.full((32,), mscale, dtype=torch.float32))
    with pytest.raises(ValueError):
        ops.build_rope_cos_sin_cache(64, 128, 10000.0, {"rope_type": "mystery", "factor": 2.0})


def test_rope_cache_longrope():
    # Phi-3's LongRoPE: inv_freq / short_factor up to original positions, / long_factor past
    # them; cos and sin scaled by sqrt(1 + ln(factor) / ln(original)), factor = max / original.
    short = [1.0 + 0.1 * i for i in range(32)]
    long = [2.0 + 0.3 * i for i in range(32)]
    cache = ops.build_rope_cos_sin_cache(64, 512, 10000.0, {
        "rope_type": "longrope", "short_factor": short, "long_factor": long,
        "original_max_position_embeddings": 128})
    assert cache.shape == (512, 64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    mscale = math.sqrt(1 + math.log(4.0) / math.log(128))
    t = torch.arange(512, dtype=torch.float64)
    expect_short = torch.outer(t[:128], inv / torch.tensor(short, dtype=torch.float64))
    expect_long = torch.outer(t[128:], inv / torch.tensor(long, dtype=torch.float64))
    torch.testing.assert_close(cache[:128, :32].double(), expect_short.cos() * mscale, atol=1e-6,
                               rtol=0)
    torch.testing.assert_close(cache[128:, 32:].double(), expect_long.sin() * mscale, atol=1e-6,
                               rtol=0)
    with pytest.raises(ValueError, match="longrope factors must have 32 entries"):
        ops.build_rope_cos_sin_cache(64, 512, 10000.0, {
            "rope_type": "longrope", "short_factor": short[:4], "long_factor": long,
            "original_max_position_embeddings": 128})


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh"])
def test_act_and_mul(device, dtype, kind):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn((2, 9, 2 * 1536 + 6), generator=gen) * 4).to(dtype)
    x[0, 0, :6] = torch.tensor([-100.0, -90.0, 0.0, 90.0, 100.0, 1e-3]).to(dtype)
    xd = x.to(device)
    if kind == "silu":
        got = ops.silu_and_mul(xd)
        gate, up = x.float().chunk(2, dim=-1)
        expect = F.silu(gate) * up
    else:
        approximate = "tanh" if kind == "gelu_tanh" else "none"
        got = ops.gelu_and_mul(xd, approximate)
        gate, up = x.float().chunk(2, dim=-1)
        expect = F.gelu(gate, approximate=approximate) * up
    torch.testing.assert_close(got.cpu().float(), expect.to(dtype).float(), **_tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hidden", [64, 768, 1000])
@pytest.mark.parametrize("with_bias", [True, False])
def test_layer_norm(device, dtype, hidden, with_bias):
    gen = torch.Generator().manual_seed(hidden)
    # A large common offset per row: the variance must come out right around a big mean.
    x = (torch.randn((7, hidden + 3), generator=gen) * 3 + 40).to(dtype)[:, :hidden]
    w = torch.randn(hidden, generator=gen).to(dtype)
    b = torch.randn(hidden, generator=gen).to(dtype) if with_bias else None
    got = ops.layer_norm(x.to(device), w.to(device), None if b is None else b.to(device),
                         1e-5).cpu()
    expect = F.layer_norm(x.float(), (hidden,), w.float(), None if b is None else b.float(), 1e-5)
    torch.testing.assert_close(got.float(), expect.to(dtype).float(), **_tol(dtype))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["silu", "gelu", "gelu_tanh", "relu"])
def test_activation(device, dtype, kind):
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn((5, 3 * 1024 + 8), generator=gen) * 4).to(dtype)[:, 3:]  # strided rows
    x[0, :6] = torch.tensor([-100.0, -90.0, 0.0, 90.0, 100.0, 1e-3]).to(dtype)
    reference = {"silu": F.silu, "relu": F.relu, "gelu": F.gelu,
                 "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[kind]
    got = ops.activation(x.to(device), kind).cpu()
    torch.testing.assert_close(got.float(), reference(x.float()).to(dtype).float(), **_tol(dtype))
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.activation(x, "swish")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_softcap(device, dtype):
    gen = torch.Generator().manual_seed(4)
    logits = (torch.randn((3, 50001), generator=gen) * 40).to(dtype)
    got = logits.to(device, copy=True)
    ops.softcap(got, 30.0)
    expect = (torch.tanh(logits.float() / 30.0) * 30.0).to(dtype)
    torch.testing.assert_close(got.cpu().float(), expect.float(), **_tol(dtype))
    assert got.abs().max() <= 30.0
    with pytest.raises(ValueError, match="cap must be > 0"):
        ops.softcap(logits.clone(), 0.0)


def test_ops_trace_with_torch_compile():
    def layer(x, w, up):
        h = ops.rms_norm(x, w, 1e-6)
        return ops.silu_and_mul(torch.cat([h, up], dim=-1))

    x, w, up = torch.randn(4, 64), torch.randn(64), torch.randn(4, 64)
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, w, up), layer(x, w, up))


def test_opcheck_fake_implementations():
    x, w = torch.randn(3, 64), torch.randn(64)
    torch.library.opcheck(
        torch.ops.fastllm.rms_norm.default,
        (x, w, 1e-6),
        test_utils=("test_schema", "test_faketensor"),
    )
    torch.library.opcheck(
        torch.ops.fastllm.silu_and_mul.default,
        (torch.randn(3, 128),),
        test_utils=("test_schema", "test_faketensor"),
    )
    for op, args in ((torch.ops.fastllm.layer_norm.default, (x, w, torch.randn(64), 1e-5)),
                     (torch.ops.fastllm.activation.default, (x, "relu")),
                     (torch.ops.fastllm.softcap.default, (x.clone(), 30.0))):
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))


# ---- sampling ------------------------------------------------------------------------------------


def _sample(logits, device="cpu", **kw):
    rows = logits.shape[0]
    args = {}
    for name, value in kw.items():
        if isinstance(value, torch.Tensor):
            value = value.to(device)
        args[name] = value
    for name, dtype in (
        ("temperature", torch.float32),
        ("top_k", torch.int32),
        ("top_p", torch.float32),
        ("min_p", torch.float32),
        ("repetition_penalty", torch.float32),
        ("presence_penalty", torch.float32),
        ("frequency_penalty", torch.float32),
        ("seeds", torch.int64),
        ("generator_offsets", torch.int64),
    ):
        if name in args and not isinstance(args[name], torch.Tensor):
            args[name] = torch.tensor(
                args[name] if isinstance(args[name], list) else [args[name]] * rows,
                dtype=dtype,
                device=device,
            )
    return [t.cpu() for t in ops.sample(logits.to(device), **args)]


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_and_logprobs(device):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((6, 1000), generator=gen) * 3
    logits[2, 17] = logits[2, 18] = logits[2].max() + 1  # tie: lowest id wins
    tokens, logprob, rank, top_lp, top_ids = _sample(
        logits, device, temperature=0.0, num_top_logprobs=20
    )
    expect = logits.argmax(-1)
    assert tokens.tolist() == expect.tolist()
    assert tokens[2] == 17
    log_softmax = torch.log_softmax(logits, -1)
    torch.testing.assert_close(
        logprob, log_softmax.gather(1, expect[:, None])[:, 0], atol=1e-5, rtol=0
    )
    assert rank.tolist() == [1] * 6
    values, ids = log_softmax.topk(20, dim=-1)
    torch.testing.assert_close(top_lp, values, atol=1e-5, rtol=0)
    assert torch.equal(top_ids[[0, 1, 3, 4, 5]], ids[[0, 1, 3, 4, 5]].int())
    assert top_ids[2, :2].tolist() == [17, 18]


@pytest.mark.parametrize("device", DEVICES)
def test_rank_and_logprob_of_sampled_token(device):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn((64, 50), generator=gen)
    tokens, logprob, rank, _, _ = _sample(
        logits, device, temperature=1.0, seeds=7, generator_offsets=list(range(64))
    )
    log_softmax = torch.log_softmax(logits, -1)
    torch.testing.assert_close(
        logprob, log_softmax[torch.arange(64), tokens.long()], atol=1e-5, rtol=0
    )
    chosen = logits[torch.arange(64), tokens.long()]
    assert rank.tolist() == ((logits > chosen[:, None]).sum(-1) + 1).tolist()
    assert len(set(tokens.tolist())) > 10


@pytest.mark.parametrize("device", DEVICES)
def test_top_k_top_p_min_p_never_pick_filtered_tokens(device):
    gen = torch.Generator().manual_seed(2)
    rows, vocab = 200, 300
    logits = torch.randn((1, vocab), generator=gen).repeat(rows, 1) * 2
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    top5 = set(order[:5].tolist())
    offsets = list(range(rows))
    tokens = _sample(logits, device, temperature=1.0, top_k=5, seeds=1, generator_offsets=offsets)[
        0
    ]
    assert set(tokens.tolist()) <= top5 and len(set(tokens.tolist())) >= 4
    # top-p 0.5: the smallest prefix of sorted probabilities holding half the mass.
    cumulative = probs[order].cumsum(0)
    nucleus = set(order[: int((cumulative < 0.5).sum()) + 1].tolist())
    tokens = _sample(
        logits, device, temperature=1.0, top_p=0.5, seeds=2, generator_offsets=offsets
    )[0]
    assert set(tokens.tolist()) <= nucleus and len(set(tokens.tolist())) >= 2
    # min-p 0.3: p >= 0.3 * max p.
    allowed = set(torch.nonzero(probs >= 0.3 * probs.max()).flatten().tolist())
    tokens = _sample(
        logits, device, temperature=1.0, min_p=0.3, seeds=3, generator_offsets=offsets
    )[0]
    assert set(tokens.tolist()) <= allowed
    # All three together, at a high temperature.
    tokens = _sample(
        logits,
        device,
        temperature=3.0,
        top_k=50,
        top_p=0.9,
        min_p=0.05,
        seeds=4,
        generator_offsets=offsets,
    )[0]
    scaled = (logits[0] / 3.0).softmax(-1)
    assert all(scaled[t] >= 0.05 * scaled.max() for t in tokens.tolist())
    assert set(tokens.tolist()) <= set(scaled.argsort(descending=True)[:50].tolist())


@pytest.mark.parametrize("device", DEVICES)
def test_penalties_bias_and_allowed_ids(device):
    logits = torch.tensor([[1.0, 4.0, 3.9, -2.0, 3.0]] * 6)
    prompt_offsets, prompt_ids = ops.to_csr([[], [1], [1], [], [], []])
    output_offsets, output_ids = ops.to_csr([[1], [], [], [1, 1], [], []])
    bias_offsets, bias_ids = ops.to_csr([[], [], [], [], [3], []])
    _, bias_values = ops.to_csr([[], [], [], [], [7.0], []], dtype=torch.float32)
    allowed_offsets, allowed_ids = ops.to_csr([[], [], [], [], [], [0, 4]])
    tokens = _sample(
        logits,
        device,
        temperature=0.0,
        repetition_penalty=[2.0, 2.0, 1.0, 1.0, 1.0, 1.0],
        presence_penalty=[0.0, 0.0, 5.0, 0.0, 0.0, 0.0],
        frequency_penalty=[0.0, 0.0, 0.0, 0.1, 0.0, 0.0],
        prompt_offsets=prompt_offsets,
        prompt_ids=prompt_ids,
        output_offsets=output_offsets,
        output_ids=output_ids,
        bias_offsets=bias_offsets,
        bias_ids=bias_ids,
        bias_values=bias_values,
        allowed_offsets=allowed_offsets,
        allowed_ids=allowed_ids,
    )[0]
    # 0: repetition on an output token (4 -> 2); 1: repetition on a prompt token;
    # 2: presence applies to output tokens only, so the prompt token 1 keeps winning;
    # 3: frequency 0.1 * 2 occurrences (4 -> 3.8 < 3.9); 4: bias; 5: allowed ids.
    assert tokens.tolist() == [2, 2, 1, 2, 3, 4]


def test_negative_logits_repetition_penalty_multiplies():
    logits = torch.tensor([[-1.0, -1.5, -3.0]])
    off, ids = ops.to_csr([[0]])
    token = _sample(
        logits, temperature=0.0, repetition_penalty=2.0, output_offsets=off, output_ids=ids
    )[0]
    assert token.item() == 1  # -1 * 2 = -2 < -1.5


def test_sampling_rejects_out_of_range_ids():
    off, ids = ops.to_csr([[5000]])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        _sample(
            torch.randn(1, 100),
            temperature=1.0,
            repetition_penalty=1.5,
            output_offsets=off,
            output_ids=ids,
        )


def test_sample_binding_takes_named_inputs_and_checks_them():
    logits = torch.zeros(2, 8)
    tokens = torch.empty(2, dtype=torch.int32)
    inputs = _C.ops.SamplingInputs(
        temperature=torch.zeros(2),
        allowed_offsets=torch.tensor([0, 1, 2], dtype=torch.int32),
        allowed_ids=torch.tensor([3, 5], dtype=torch.int32),
    )
    _C.ops.sample(logits, inputs, tokens)
    assert tokens.tolist() == [3, 5]
    with pytest.raises(ValueError, match="temperature"):
        _C.ops.sample(logits, _C.ops.SamplingInputs(temperature=torch.zeros(3)), tokens)
    with pytest.raises(TypeError):
        _C.ops.SamplingInputs(torch.zeros(2))  # keyword-only: every input is named


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_independent_of_batch_position(device):
    gen = torch.Generator().manual_seed(3)
    row = torch.randn(1, 5000, generator=gen)
    alone = [
        _sample(row, device, temperature=1.0, seeds=1234, generator_offsets=o)[0].item()
        for o in range(8)
    ]
    others = torch.randn(9, 5000, generator=gen)
    for position in (0, 4, 9):
        batch = torch.cat([others[:position], row, others[position:]])
        seeds = [99] * 10
        seeds[position] = 1234
        temps = [0.5 + 0.1 * i for i in range(10)]
        temps[position] = 1.0
        for o in range(8):
            offsets = [o + 100] * 10
            offsets[position] = o
            tokens = _sample(
                batch,
                device,
                temperature=temps,
                seeds=seeds,
                generator_offsets=offsets,
                top_k=[0] * 10,
            )[0]
            assert tokens[position].item() == alone[o]
    assert len(set(alone)) > 4  # the offset advances the stream


def test_unseeded_rows_use_global_seed_and_row():
    logits = torch.zeros((16, 1000))
    a = _sample(logits, temperature=1.0, seeds=-1, generator_offsets=5, global_seed=11)[0]
    b = _sample(logits, temperature=1.0, seeds=-1, generator_offsets=5, global_seed=11)[0]
    c = _sample(logits, temperature=1.0, seeds=-1, generator_offsets=6, global_seed=11)[0]
    assert torch.equal(a, b)
    assert len(set(a.tolist())) > 12  # rows draw different numbers
    assert not torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature,top_p", [(0.7, 1.0), (1.3, 0.8)])
def test_sampling_distribution(device, temperature, top_p):
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -0.5, -1.0, 1.5, 0.2]])
    n = 20000
    tokens = _sample(
        logits.repeat(n, 1),
        device,
        temperature=temperature,
        top_p=top_p,
        seeds=42,
        generator_offsets=list(range(n)),
    )[0]
    probs = (logits[0] / temperature).softmax(-1).double()
    if top_p < 1.0:
        order = probs.argsort(descending=True)
        keep = int((probs[order].cumsum(0) < top_p).sum()) + 1
        mask = torch.zeros_like(probs, dtype=torch.bool)
        mask[order[:keep]] = True
        probs = torch.where(mask, probs, torch.zeros_like(probs))
        probs /= probs.sum()
    counts = torch.bincount(tokens.long(), minlength=8).double()
    assert counts[probs == 0].sum() == 0
    expected = probs * n
    nonzero = expected > 0
    chi2 = (((counts - expected)[nonzero]) ** 2 / expected[nonzero]).sum().item()
    # 7 degrees of freedom at most: the 0.999 quantile is 24.3.
    assert chi2 < 24.3, (chi2, counts.tolist(), expected.tolist())


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_sampling_cpu_and_cuda_agree():
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn((32, 4096), generator=gen) * 2
    kw = {
        "temperature": [0.0, 0.6, 1.0, 1.5] * 8,
        "top_k": [0, 40, 0, 5] * 8,
        "top_p": [1.0, 0.9, 0.95, 1.0] * 8,
        "min_p": [0.0, 0.0, 0.05, 0.0] * 8,
        "seeds": [1, -1, 3, 4] * 8,
        "generator_offsets": list(range(32)),
        "global_seed": 5,
        "num_top_logprobs": 5,
    }
    cpu = _sample(logits, "cpu", **kw)
    cuda = _sample(logits, "cuda", **kw)
    assert torch.equal(cpu[0], cuda[0])
    torch.testing.assert_close(cpu[1], cuda[1], atol=1e-5, rtol=0)
    assert torch.equal(cpu[4], cuda[4])
