"""The batched LoRA kernel (``_C.ops.lora_apply``, ``ops.lora_apply``) against a float64 numpy
reference: mixed adapters and ranks in one batch, tokens without an adapter, non-contiguous tokens
of a slot, ``out`` as a column slice of a wider row, sizes off the vector widths; a token's row is
the same bits alone or in any batch; bad arguments are ValueErrors. ``test_every_cpu_isa`` runs
the numpy tests again under each FASTLLM_CPU_ISA cap (the code path is picked once per process).

Module-level imports stay torch-free so those reruns start fast; the torch op test imports it."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import pytest

from fastllm import _C, kernels

NULL = None  # a slot without an adapter on this module (null A)


@dataclass
class Adapters:
    """Per-slot A [r, k] / B [n, r] float32 matrices (None = null slot) and the kernel's arrays.
    Holds the matrices, so the addresses stay valid while the object lives."""

    a: list
    b: list
    ranks: np.ndarray
    scales: np.ndarray
    a_ptrs: np.ndarray
    b_ptrs: np.ndarray


def make_adapters(rng, k, n, ranks, scales=None) -> Adapters:
    a, b = [], []
    for rank in ranks:
        if rank is NULL:
            a.append(None)
            b.append(None)
            continue
        # Scaled so h and the update are O(1): float32 rounding then sits near 1e-7 relative.
        a.append((rng.standard_normal((rank, k)) / np.sqrt(k)).astype(np.float32))
        b.append((rng.standard_normal((n, rank)) / np.sqrt(rank)).astype(np.float32))
    if scales is None:
        scales = rng.uniform(0.25, 2.0, len(ranks))
    return Adapters(
        a=a,
        b=b,
        ranks=np.array([4 if r is NULL else r for r in ranks], np.int32),  # rank of a null slot
        scales=np.asarray(scales, np.float32),                              # is never read
        a_ptrs=np.array([0 if m is None else m.ctypes.data for m in a], np.uint64),
        b_ptrs=np.array([0 if m is None else m.ctypes.data for m in b], np.uint64),
    )


def apply(out, x, slots, ad: Adapters, **kw):
    _C.ops.lora_apply(out, x, np.asarray(slots, np.int32), ad.a_ptrs, ad.b_ptrs, ad.ranks,
                      ad.scales, **kw)


def reference(out, x, slots, ad: Adapters) -> np.ndarray:
    want = out.astype(np.float64)
    for t, s in enumerate(slots):
        if s < 0 or ad.a[s] is None:
            continue
        h = x[t].astype(np.float64) @ ad.a[s].astype(np.float64).T
        want[t] += float(ad.scales[s]) * (h @ ad.b[s].astype(np.float64).T)
    return want


# Slot 0..3: ranks 1, 8, 16, 64; slot 4 has no adapter on this module; -1 = base model.
RANKS = [1, 8, 16, 64, NULL]


def mixed_slots(rng, num_tokens):
    # Every slot's tokens scattered through the batch (never one contiguous run).
    return rng.integers(-1, len(RANKS), num_tokens).astype(np.int32)


@pytest.mark.parametrize(
    "k, n",
    [(67, 45), (300, 520), (16, 32), (1, 3), (129, 17)],  # off and on the 8/16-float vectors
)
def test_mixed_batch_matches_reference(k, n):
    rng = np.random.default_rng(k * 1000 + n)
    ad = make_adapters(rng, k, n, RANKS)
    num_tokens = 41
    slots = mixed_slots(rng, num_tokens)
    slots[:6] = [0, 1, 2, 3, -1, 4]  # every kind at least once
    x = rng.standard_normal((num_tokens, k)).astype(np.float32)
    # out is a column slice of a wider row (the q part of a fused qkv): out_stride > n.
    wide = rng.standard_normal((num_tokens, n + 13)).astype(np.float32)
    before = wide.copy()
    out = wide[:, 5 : 5 + n]
    want = reference(out, x, slots, ad)
    apply(out, x, slots, ad)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)
    # Columns around the slice and rows without an adapter keep their bits.
    assert np.array_equal(wide[:, :5], before[:, :5])
    assert np.array_equal(wide[:, 5 + n :], before[:, 5 + n :])
    untouched = (slots < 0) | (slots == 4)
    assert np.array_equal(wide[untouched], before[untouched])
    assert not np.array_equal(wide[~untouched], before[~untouched])


@pytest.mark.parametrize("k, n", [(67, 45), (300, 520), (129, 17)])
def test_transposed_b_gives_the_same_bits(k, n):
    """B kept transposed ([rank, n], the executors' layout) reads the same values: the result
    is bit-identical to PEFT's [n, rank] layout."""
    rng = np.random.default_rng(k + 7 * n)
    ad = make_adapters(rng, k, n, RANKS)
    bt = [None if b is None else np.ascontiguousarray(b.T) for b in ad.b]
    bt_ptrs = np.array([0 if m is None else m.ctypes.data for m in bt], np.uint64)
    slots = mixed_slots(rng, 37)
    x = rng.standard_normal((37, k)).astype(np.float32)
    start = rng.standard_normal((37, n)).astype(np.float32)
    plain, transposed = start.copy(), start.copy()
    apply(plain, x, slots, ad)
    _C.ops.lora_apply(transposed, x, slots, ad.a_ptrs, bt_ptrs, ad.ranks, ad.scales,
                      b_transposed=True)
    assert np.array_equal(plain, transposed)
    np.testing.assert_allclose(transposed, reference(start, x, slots, ad), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_float16_weights_read_exactly(transposed):
    """float16 A and B are converted exactly as they are read: the result has the bits of the
    float32 kernel on the same (float16-rounded) values."""
    rng = np.random.default_rng(23)
    k, n = 131, 77
    ad = make_adapters(rng, k, n, RANKS)
    a16 = [None if m is None else m.astype(np.float16) for m in ad.a]
    b16 = [None if m is None else np.ascontiguousarray((m.T if transposed else m).astype(np.float16))
           for m in ad.b]
    a32 = [None if m is None else m.astype(np.float32) for m in a16]
    b32 = [None if m is None else m.astype(np.float32) for m in b16]

    def ptrs(ms):
        return np.array([0 if m is None else m.ctypes.data for m in ms], np.uint64)

    slots = mixed_slots(rng, 29)
    x = rng.standard_normal((29, k)).astype(np.float32)
    start = rng.standard_normal((29, n)).astype(np.float32)
    half, single = start.copy(), start.copy()
    _C.ops.lora_apply(half, x, slots, ptrs(a16), ptrs(b16), ad.ranks, ad.scales,
                      b_transposed=transposed, weight_dtype="float16")
    _C.ops.lora_apply(single, x, slots, ptrs(a32), ptrs(b32), ad.ranks, ad.scales,
                      b_transposed=transposed)
    assert np.array_equal(half, single)
    assert not np.array_equal(half, start)
    with pytest.raises(ValueError, match="weight_dtype"):
        _C.ops.lora_apply(half, x, slots, ptrs(a16), ptrs(b16), ad.ranks, ad.scales,
                          weight_dtype="bfloat16")


def test_long_prefill_of_one_adapter_beside_decodes():
    # Many tokens of one slot: several token blocks and column tasks of the CPU kernel.
    rng = np.random.default_rng(7)
    k, n = 256, 384
    ad = make_adapters(rng, k, n, [64, 8, NULL])
    slots = np.zeros(300, np.int32)
    slots[rng.choice(300, 40, replace=False)] = rng.integers(-1, 3, 40)
    x = rng.standard_normal((300, k)).astype(np.float32)
    out = rng.standard_normal((300, n)).astype(np.float32)
    want = reference(out, x, slots, ad)
    apply(out, x, slots, ad, max_rank=64)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("k, n", [(67, 45), (300, 520), (4096, 160)])
def test_token_result_does_not_depend_on_the_batch(k, n):
    rng = np.random.default_rng(11)
    ad = make_adapters(rng, k, n, RANKS)
    num_tokens = 37
    slots = mixed_slots(rng, num_tokens)
    slots[:4] = [0, 1, 2, 3]
    x = rng.standard_normal((num_tokens, k)).astype(np.float32)
    out0 = rng.standard_normal((num_tokens, n)).astype(np.float32)
    batch = out0.copy()
    apply(batch, x, slots, ad)
    for t in range(num_tokens):
        alone = out0[t : t + 1].copy()
        apply(alone, x[t : t + 1], slots[t : t + 1], ad)
        assert np.array_equal(alone[0], batch[t]), t
    # The same tokens reordered, and inside a long run of their own slot (a prefill): same bits.
    perm = rng.permutation(num_tokens)
    shuffled = out0[perm].copy()
    apply(shuffled, x[perm], slots[perm], ad)
    assert np.array_equal(shuffled, batch[perm])
    t = int(np.flatnonzero(slots == 3)[0])
    many = np.repeat(out0[t : t + 1], 50, axis=0)
    apply(many, np.repeat(x[t : t + 1], 50, axis=0), np.full(50, 3, np.int32), ad)
    assert all(np.array_equal(row, batch[t]) for row in many)


def test_nothing_to_do_leaves_out_alone():
    rng = np.random.default_rng(3)
    ad = make_adapters(rng, 8, 8, [4, NULL])
    x = rng.standard_normal((3, 8)).astype(np.float32)
    out = rng.standard_normal((3, 8)).astype(np.float32)
    before = out.copy()
    apply(out, x, [-1, 1, -5], ad)  # base model, null slot, any negative slot
    assert np.array_equal(out, before)
    apply(np.empty((0, 8), np.float32), np.empty((0, 8), np.float32), [], ad)
    empty = make_adapters(rng, 8, 8, [])
    apply(out, x, [-1, -1, -1], empty)
    assert np.array_equal(out, before)


def test_int64_address_arrays_and_strided_input():
    # torch has no uint64: data_ptr()s arrive as int64. The input may be a row slice too.
    rng = np.random.default_rng(5)
    ad = make_adapters(rng, 24, 40, [8, 16])
    ad.a_ptrs, ad.b_ptrs = ad.a_ptrs.astype(np.int64), ad.b_ptrs.astype(np.int64)
    big = rng.standard_normal((6, 50)).astype(np.float32)
    x = big[:, 10:34]
    slots = np.array([1, 0, 1, -1, 0, 1], np.int32)
    out = rng.standard_normal((6, 40)).astype(np.float32)
    want = reference(out, x, slots, ad)
    apply(out, x, slots, ad)
    np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5)


def _bad_calls():
    """(name, kwargs overrides, message) for calls the binding or kernel must refuse."""
    rng = np.random.default_rng(9)
    ad = make_adapters(rng, 16, 24, [8, 4, NULL])
    x = rng.standard_normal((4, 16)).astype(np.float32)
    out = rng.standard_normal((4, 24)).astype(np.float32)
    base = {
        "out": out,
        "input": x,
        "token_slots": np.array([0, 1, -1, 2], np.int32),
        "lora_a_ptrs": ad.a_ptrs,
        "lora_b_ptrs": ad.b_ptrs,
        "ranks": ad.ranks,
        "scales": ad.scales,
    }
    null_b = ad.b_ptrs.copy()
    null_b[1] = 0
    cases = [
        ("slot past the slots", {"token_slots": np.array([0, 3, -1, 0], np.int32)},
         "token 1 has slot 3, but there are 3 slots"),
        ("rank 0", {"ranks": np.array([0, 4, 4], np.int32)}, "slot 0 has rank 0"),
        ("rank above max_rank", {"max_rank": 4}, "slot 0 has rank 8, outside \\[1, 4\\]"),
        ("rank above 512", {"ranks": np.array([8, 600, 4], np.int32)}, "rank 600"),
        ("max_rank above 512", {"max_rank": 1024}, "max_rank"),
        ("A without B", {"lora_b_ptrs": null_b}, "slot 1 has an A matrix but no B matrix"),
        ("float64 input", {"input": x.astype(np.float64)}, "float32"),
        ("float64 out", {"out": out.astype(np.float64)}, "float32"),
        ("1-D input", {"input": x[0]}, "2-D"),
        ("rows differ", {"input": x[:3]}, "same number of rows"),
        ("strided columns", {"out": np.zeros((4, 48), np.float32)[:, ::2]}, "contiguous"),
        ("int64 slots", {"token_slots": np.array([0, 1, -1, 2], np.int64)}, "token_slots"),
        ("slots length", {"token_slots": np.array([0, 1], np.int32)}, "token_slots"),
        ("float addresses", {"lora_a_ptrs": ad.a_ptrs.astype(np.float64)}, "uint64 or int64"),
        ("address count", {"lora_b_ptrs": ad.b_ptrs[:2]}, "lora_b_ptrs must be 1-D"),
        ("int64 ranks", {"ranks": ad.ranks.astype(np.int64)}, "ranks"),
        ("float64 scales", {"scales": ad.scales.astype(np.float64)}, "scales"),
        ("scales count", {"scales": ad.scales[:2]}, "ranks and scales"),
    ]
    return ad, base, cases


BAD_CALL_NAMES = [name for name, _, _ in _bad_calls()[2]]


@pytest.mark.parametrize("case", range(len(BAD_CALL_NAMES)), ids=BAD_CALL_NAMES)
def test_bad_arguments_are_value_errors(case):
    adapters, base, cases = _bad_calls()  # adapters holds the matrices the addresses point to
    _, overrides, message = cases[case]
    args = {**base, **overrides}
    before = args["out"].copy()
    with pytest.raises(ValueError, match=message):
        _C.ops.lora_apply(**args)
    assert np.array_equal(args["out"], before)  # refused before writing anything
    del adapters


def test_workspace_size():
    assert kernels.lora_workspace_bytes(10, 16) == 10 * 16 * 4
    assert kernels.lora_workspace_bytes(3) == 3 * 512 * 4  # max_rank 0 = 512
    with pytest.raises(ValueError):
        kernels.lora_workspace_bytes(3, 513)


def test_torch_op_into_a_fused_qkv_slice():
    torch = pytest.importorskip("torch")
    from fastllm import ops

    gen = torch.Generator().manual_seed(0)
    k, q_size, kv_size = 48, 64, 16
    a = [torch.randn(r, k, generator=gen) / k**0.5 for r in (8, 16)]
    b = [torch.randn(q_size, r, generator=gen) / r**0.5 for r in (8, 16)]
    a_ptrs = ops.lora_slot_pointers([a[0], None, a[1]])
    b_ptrs = ops.lora_slot_pointers([b[0], None, b[1]])
    ranks = torch.tensor([8, 1, 16], dtype=torch.int32)
    scales = torch.tensor([2.0, 1.0, 0.5])
    slots = torch.tensor([2, -1, 0, 1, 0, 2], dtype=torch.int32)
    x = torch.randn(6, k, generator=gen)
    qkv = torch.randn(6, q_size + 2 * kv_size, generator=gen)
    want = qkv.double().clone()
    for t, s in enumerate(slots.tolist()):
        if s in (0, 2):
            i = 0 if s == 0 else 1
            delta = (x[t].double() @ a[i].double().T) @ b[i].double().T
            want[t, :q_size] += scales[s].double() * delta
    ops.lora_apply(qkv[:, :q_size], x, slots, a_ptrs, b_ptrs, ranks, scales, 16)
    torch.testing.assert_close(qkv.double(), want, rtol=2e-5, atol=2e-5)
    torch.library.opcheck(
        torch.ops.fastllm.lora_apply.default,
        (torch.zeros(6, q_size), x, slots, a_ptrs, b_ptrs, ranks, scales, 16),
        test_utils=("test_schema", "test_faketensor"),
    )
    with pytest.raises(ValueError, match="contiguous 2-D float32"):
        ops.lora_slot_pointers([a[0].T])


ISA_ORDER = ["scalar", "avx2", "avx512"]


def test_every_cpu_isa():
    """Each FASTLLM_CPU_ISA cap picks its path (or the CPU's best below it) and passes the tests
    above on it; the path is chosen once per process, hence the fresh processes."""

    def run(cap, *args):
        env = {key: v for key, v in os.environ.items() if key != "FASTLLM_CPU_ISA"}
        if cap is not None:
            env["FASTLLM_CPU_ISA"] = cap
        return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True,
                              timeout=300, check=False)

    name = "from fastllm import _C; print(_C.ops.lora_cpu_isa())"
    best = run(None, "-c", name).stdout.strip()
    assert best in ISA_ORDER
    for cap, wanted in [("scalar", "scalar"), ("avx2", "avx2"), ("avx_vnni", "avx2"),
                        ("avx512", "avx512")]:
        effective = ISA_ORDER[min(ISA_ORDER.index(wanted), ISA_ORDER.index(best))]
        assert run(cap, "-c", name).stdout.strip() == effective, cap
        if cap == "avx_vnni":
            continue  # the avx2 path, tested under its own name
        proc = run(cap, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                   "-k", "not every_cpu_isa and not torch_op")
        assert proc.returncode == 0, f"FASTLLM_CPU_ISA={cap}\n{proc.stdout}\n{proc.stderr}"
