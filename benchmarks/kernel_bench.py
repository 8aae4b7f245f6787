"""Kernel benchmarks: decode paged attention against memory bandwidth and torch SDPA.

Run: python benchmarks/kernel_bench.py [--device cpu|cuda] [--iters N] [--small-only]

Prints, for decode at batch 32 x context 1,024, the achieved K/V read bandwidth, its ratio to a
STREAM-like copy measured in the same run (copy GB/s counts bytes read + written), and the speedup
over torch.nn.functional.scaled_dot_product_attention on gathered (unpaged) K/V. Asserts nothing.

First, the small decode step a CPU server runs most: 16 sequences x context 128, 8 heads / 4 KV
heads, head_dim 64, float16 cache, on the attention code path FASTLLM_CPU_ISA leaves (compare
paths with FASTLLM_CPU_ISA=avx2 / avx512 runs of --small-only). Its K/V (1 MiB) stays in cache,
so it times the kernels' arithmetic rather than memory bandwidth.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from fastllm import _C, ops


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, iters, warmup=3):
    for _ in range(warmup):
        fn()
    _sync(device)
    samples = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def copy_bandwidth(device, iters, nbytes=256 << 20):
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = timeit(lambda: dst.copy_(src), device, iters)
    return 2 * nbytes / seconds / 1e9


def decode_case(
    batch, context, num_heads, num_kv_heads, head_size, kv_dtype, device, iters, block_size=16
):
    q_dtype = torch.float32 if device == "cpu" else kv_dtype
    blocks_per_seq = context // block_size
    num_blocks = batch * blocks_per_seq + 1
    gen = torch.Generator().manual_seed(0)
    key_cache = torch.randn((num_blocks, block_size, num_kv_heads, head_size), generator=gen)
    value_cache = torch.randn((num_blocks, block_size, num_kv_heads, head_size), generator=gen)
    key_cache = key_cache.to(kv_dtype).to(device)
    value_cache = value_cache.to(kv_dtype).to(device)
    perm = torch.randperm(num_blocks - 1, generator=gen) + 1  # scattered blocks, as after churn
    block_tables = perm.view(batch, blocks_per_seq).to(torch.int32).to(device)
    query = torch.randn((batch, num_heads, head_size), generator=gen).to(q_dtype).to(device)
    query_start_loc = torch.arange(batch + 1, dtype=torch.int32, device=device)
    context_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    scale = head_size**-0.5

    def run():
        ops.paged_attention(
            query,
            key_cache,
            value_cache,
            query_start_loc,
            context_lens,
            block_tables,
            scale,
            -1,
            0.0,
            1.0,
            1.0,
            context,
        )

    seconds = timeit(run, device, iters)
    kv_bytes = 2 * batch * context * num_kv_heads * head_size * key_cache.element_size()

    # torch reference on gathered, contiguous K/V [batch, kv_heads, context, head_size].
    def gathered(cache):
        g = cache[block_tables.long()].reshape(batch, context, num_kv_heads, head_size)
        return g.transpose(1, 2).contiguous()

    k, v = gathered(key_cache), gathered(value_cache)
    q = query.to(kv_dtype).view(batch, num_heads, 1, head_size)

    def run_sdpa():
        F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=num_heads != num_kv_heads)

    sdpa_seconds = timeit(run_sdpa, device, iters)
    return seconds, kv_bytes, sdpa_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--small-only", action="store_true",
                        help="time only the 16 x 128 decode step (no copy, no batch x context)")
    args = parser.parse_args()
    device = args.device
    print(
        f"device={device} cpu_isa={_C.ops.cpu_isa()} "
        f"attention_cpu_isa={_C.ops.attention_cpu_isa()} cpu_threads={_C.ops.cpu_num_threads()} "
        f"torch_threads={torch.get_num_threads()}"
    )
    seconds, _, sdpa_seconds = decode_case(16, 128, 8, 4, 64, torch.float16, device,
                                           max(args.iters, 200))
    print(
        f"decode paged attention, 16 x context 128, 8/4/64 float16: {seconds * 1e6:.1f} us "
        f"(sdpa {sdpa_seconds * 1e6:.1f} us)"
    )
    if args.small_only:
        return
    # The copy is measured before and after the attention runs (best of both), so a busy machine
    # shows up in both figures rather than only in the ratio.
    copy_gbs = copy_bandwidth(device, max(5, args.iters // 2))
    print(f"STREAM-like copy: {copy_gbs:.1f} GB/s (read + write)")
    results = []
    configs = [
        (9, 3, 64, torch.float32),
        (9, 3, 64, torch.float16),
        (9, 3, 64, torch.bfloat16),
        (32, 8, 128, torch.float32 if device == "cpu" else torch.float16),
        (32, 8, 128, torch.bfloat16),
    ]
    header = (
        f"{'heads/kv/dim':>13} {'kv dtype':>9} {'us':>9} {'GB/s':>7} {'vs copy':>8} "
        f"{'sdpa us':>9} {'vs sdpa':>8}"
    )
    print(f"decode paged attention, batch {args.batch} x context {args.context}")
    for heads, kv_heads, dim, kv_dtype in configs:
        seconds, nbytes, sdpa_seconds = decode_case(
            args.batch, args.context, heads, kv_heads, dim, kv_dtype, device, args.iters
        )
        results.append((heads, kv_heads, dim, kv_dtype, seconds, nbytes, sdpa_seconds))
    copy_after = copy_bandwidth(device, max(5, args.iters // 2))
    copy_gbs = max(copy_gbs, copy_after)
    print(f"STREAM-like copy after: {copy_after:.1f} GB/s; ratios use {copy_gbs:.1f} GB/s")
    print(header)
    for heads, kv_heads, dim, kv_dtype, seconds, nbytes, sdpa_seconds in results:
        gbs = nbytes / seconds / 1e9
        print(
            f"{heads:>5}/{kv_heads}/{dim:<4} {str(kv_dtype).replace('torch.', ''):>9} "
            f"{seconds * 1e6:9.0f} {gbs:7.1f} {gbs / copy_gbs:7.0%} {sdpa_seconds * 1e6:9.0f} "
            f"{sdpa_seconds / seconds:7.2f}x"
        )


if __name__ == "__main__":
    main()
