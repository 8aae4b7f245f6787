"""The native CPU decoder (fastllm._C.models.CpuDecoder): the quantized default model's layer loop in
one C++ call must give exactly what the per-op Python path gives, with float32, float16 and fp8
(e5m2) KV caches, through chunked prefill and batched decode; bad arguments raise ValueError."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastllm import _C, LLM, SamplingParams, ops

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    ("Write a haiku about the sea, the wind and the long grey afternoons of a northern harbour "
    "town where the boats come home late and the gulls complain about everything."),
    "Q: What is 12 times 7?\nA:",
]


@pytest.fixture(autouse=True)
def _torch_executor(monkeypatch):
    """These tests look inside the torch executor (the default is the torch-free one, which
    test_torch_free.py checks against it)."""
    monkeypatch.setenv("FASTLLM_TORCH_FREE", "0")


def _run(llm: LLM) -> list:
    # Chunks of 32 tokens split the long prompt across steps and mix prefill with decode.
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)
    return llm.generate(PROMPTS, params, use_tqdm=False)


@pytest.mark.parametrize("kv_cache_dtype,element", [("float32", torch.float32),
                                                    ("float16", torch.float16),
                                                    ("fp8_e5m2", torch.float8_e5m2)])
def test_native_and_python_layer_loops_agree(kv_cache_dtype, element):
    llm = LLM(max_model_len=512, kv_cache_dtype=kv_cache_dtype, enable_prefix_caching=False,
              max_num_batched_tokens=32)
    executor = llm.llm_engine.core.executor
    decoder = executor.cpu_decoder
    assert decoder is not None and decoder.num_layers == 30
    assert executor.kv_caches[0][0].dtype == element
    native = _run(llm)
    executor.cpu_decoder = None  # the per-op Python model
    try:
        python = _run(llm)
    finally:
        executor.cpu_decoder = decoder
    for a, b in zip(native, python):
        ca, cb = a.outputs[0], b.outputs[0]
        assert list(ca.token_ids) == list(cb.token_ids)
        for la, lb in zip(ca.logprobs, cb.logprobs):
            assert la.keys() == lb.keys()
            for t in la:
                assert la[t].logprob == pytest.approx(lb[t].logprob, abs=1e-5)


def test_default_engine_uses_native_decoder_and_half_cache():
    llm = LLM(max_model_len=256)
    core = llm.llm_engine.core
    assert core.executor.cpu_decoder is not None
    assert core.kv_dtype == torch.float16
    decoder = core.executor.cpu_decoder
    decoder.set_profiling(True)
    out = llm.generate(["Hello"], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    profile = decoder.profile()
    assert profile["gemm"] > 0 and profile["attention"] > 0 and profile["norms_rope_act"] > 0
    decoder.set_profiling(False)
    assert decoder.profile()["gemm"] == 0


def test_dequantized_weights_keep_the_python_path():
    llm = LLM(max_model_len=256, quantized_weights="dequantize")
    core = llm.llm_engine.core
    assert core.executor.cpu_decoder is None
    assert core.kv_dtype == torch.float32


# ---- argument checks on a one-layer toy decoder ------------------------------------------------

H, HEAD, INTER, BLOCKS, BLOCK = 64, 64, 64, 4, 16
Q8_0 = ops.GGML_QUANT_TYPES["Q8_0"]


def _q8_rows(n: int, k: int) -> np.ndarray:
    return np.zeros((n, k // 32 * 34), dtype=np.uint8)


def _decoder(**overrides):
    kw = {"hidden_size": H, "num_heads": 1, "num_kv_heads": 1, "head_dim": HEAD, "intermediate_size": INTER,
              "rms_eps": 1e-5, "final_norm": np.ones(H, np.float32),
              "rope_cache": np.ones((32, HEAD), np.float32), "rope_neox": True, "attn_scale": 0.125,
              "sliding_window": -1, "block_size": BLOCK, "num_blocks": BLOCKS, "cache_dtype": "float32"}
    kw.update(overrides)
    return _C.models.CpuDecoder(**kw)


def _layer_args(**overrides):
    cache = np.zeros((BLOCKS, BLOCK, 1, HEAD), np.float32)
    kw = {"input_norm": np.ones(H, np.float32), "post_attention_norm": np.ones(H, np.float32),
              "qkv": (_q8_rows(3 * HEAD, H), Q8_0, None), "o_proj": (_q8_rows(H, HEAD), Q8_0, None),
              "gate_up": (_q8_rows(2 * INTER, H), Q8_0, None), "down": (_q8_rows(H, INTER), Q8_0, None),
              "key_cache": cache, "value_cache": cache.copy()}
    kw.update(overrides)
    return kw


def _batch(positions):
    n = len(positions)
    return {"hidden": np.ones((n, H), np.float32), "positions": np.array(positions, np.int32),
                "slot_mapping": np.arange(n, dtype=np.int64),
                "query_start_loc": np.array([0, n], np.int32),
                "context_lens": np.array([n], np.int32),
                "block_tables": np.array([[1, 2]], np.int32), "max_context_len": n}


def test_toy_decoder_runs_and_writes_its_cache():
    dec = _decoder()
    args = _layer_args()
    dec.add_layer(**args)
    batch = _batch([0, 1, 2])
    dec.forward(**batch)
    # Zero weights: every projection is 0, so the output is the final norm of the embeddings.
    assert np.allclose(batch["hidden"], 1.0, atol=1e-4)
    assert np.all(args["key_cache"][0, :3] == 0.0)


@pytest.mark.parametrize("overrides, match", [
    ({"final_norm": np.ones(H + 1, np.float32)}, "final_norm"),
    ({"num_heads": 3, "num_kv_heads": 2}, "multiple"),
    ({"cache_dtype": "int8"}, "cache_dtype"),
])
def test_decoder_rejects_bad_shapes(overrides, match):
    with pytest.raises(ValueError, match=match):
        _decoder(**overrides)


@pytest.mark.parametrize("overrides, match", [
    ({"qkv": (_q8_rows(2 * HEAD, H), Q8_0, None)}, "qkv_proj"),
    ({"down": (_q8_rows(H, INTER), 99, None)}, "quantization type"),
    ({"gate_up": (_q8_rows(2 * INTER, H), Q8_0, np.zeros(3, np.float32))}, "gate_up_proj"),
    ({"key_cache": np.zeros((BLOCKS, BLOCK, 1, HEAD), np.float16)}, "cache_dtype"),
    ({"value_cache": np.zeros((BLOCKS + 1, BLOCK, 1, HEAD), np.float32)}, "KV caches"),
])
def test_add_layer_rejects_bad_layers(overrides, match):
    dec = _decoder()
    with pytest.raises(ValueError, match=match):
        dec.add_layer(**_layer_args(**overrides))
    assert dec.num_layers == 0


def test_forward_rejects_bad_batches():
    dec = _decoder()
    dec.add_layer(**_layer_args())
    with pytest.raises(ValueError, match="position"):
        dec.forward(**_batch([0, 40]))
    bad = _batch([0, 1])
    bad["hidden"] = np.ones((2, H + 1), np.float32)
    with pytest.raises(ValueError, match="hidden"):
        dec.forward(**bad)
    bad = _batch([0, 1])
    bad["slot_mapping"] = np.array([0, 10_000], np.int64)
    with pytest.raises(ValueError, match="slot"):
        dec.forward(**bad)


def test_embed_quant_rows_checks_ids_and_type():
    table = np.zeros((10, 34), np.uint8)
    out = np.empty((1, 32), np.float32)
    with pytest.raises(ValueError, match="out of range"):
        _C.ops.embed_quant_rows(out, table, Q8_0, np.array([10], np.int32))
    with pytest.raises(ValueError):
        _C.ops.embed_quant_rows(out, table, ops.GGML_QUANT_TYPES["Q4_K"],
                                np.array([0], np.int32))
