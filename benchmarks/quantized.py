"""Quantized HF checkpoints against the same model as a Q4_0 GGUF, and an fp8 KV cache against
fp16, on the CPU (offline LLM.generate; N clients = N requests in flight together).

    python benchmarks/quantized.py [--layers 30] [--clients 1,16] [--output-len 64] [--rounds 2]

Models: a Llama shaped like the default SmolLM2-135M (random weights, fixed seed) written three
ways by tests/python/quant_checkpoints.py's packers: GPTQ 4-bit group 64 symmetric (it loads as
Q4_0 rows, the same bytes as the GGUF), AWQ 4-bit group 64 (Q4_1 rows), and a Q4_0 GGUF of the
GPTQ model's exact weights (its output projection Q8_0, as the HF checkpoints' is made at load).
Prints tokens/s per model and client count with the ratio to the GGUF (issue target: within
15 %), then for the GGUF model the KV cache bytes per token (fp16 vs fp8) as planned and as
measured (resident set growth while 16 long sequences fill the cache), and fp8 vs fp16 tok/s.
Asserts nothing; measure on a quiet machine.
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

SHAPE = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
         "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
         "tie_word_embeddings": True, "max_position_embeddings": 2048}


def _load_packers():
    """tests/python/quant_checkpoints.py (and model_fixtures beside it), loaded by path."""
    sys.path.insert(0, str(ROOT / "tests" / "python"))
    return importlib.import_module("quant_checkpoints")


def build_models(root: str, layers: int) -> dict[str, str]:
    qc = _load_packers()
    qc.CONFIG.update(SHAPE, num_hidden_layers=layers)
    # 576 input features: group 64 (128 does not divide them)
    gptq = qc.build_checkpoint(root, "gptq", bits=4, group_size=64, sym=True)
    awq = qc.build_checkpoint(root, "awq", group_size=64)
    gguf_path = os.path.join(root, "same-weights.Q4_0.gguf")
    write_q4_0_gguf(gguf_path, gptq, qc)
    return {"gguf-q4_0": gguf_path, "gptq-4bit": gptq.directory, "awq-4bit": awq.directory,
            "_tokenizer": gptq.directory}


def write_q4_0_gguf(path: str, ckpt, qc) -> None:
    """The GPTQ checkpoint's weights as a llama GGUF: linears as the Q4_0 rows they load as
    (exactly its values), norms F32, the tied embedding Q8_0."""
    import dataclasses

    import gguf

    from fastllm.loader import load_config, resolve_model
    from fastllm.loader.hf_quant import load_hf_quantized
    from fastllm.loader.quantization import detect_quantization

    source = resolve_model(ckpt.directory)
    source = dataclasses.replace(source, quant=detect_quantization(source, load_config(source),
                                                                     None))
    tensors = load_hf_quantized(source, source.quant, quantize_output=True).tensors
    c = ckpt.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_context_length(c["max_position_embeddings"])
    writer.add_embedding_length(c["hidden_size"])
    writer.add_block_count(c["num_hidden_layers"])
    writer.add_feed_forward_length(c["intermediate_size"])
    writer.add_head_count(c["num_attention_heads"])
    writer.add_head_count_kv(c["num_key_value_heads"])
    writer.add_rope_freq_base(c["rope_theta"])
    writer.add_layer_norm_rms_eps(c["rms_norm_eps"])
    writer.add_vocab_size(c["vocab_size"])
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
             "output_norm.weight"}
    per_layer = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                 "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                 "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                 "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                 "post_attention_layernorm": "ffn_norm"}
    for name, t in tensors.items():
        if name in names:
            target = names[name]
        else:
            layer, rest = name.removeprefix("model.layers.").split(".", 1)
            target = f"blk.{layer}.{per_layer[rest.removesuffix('.weight')]}.weight"
        data = np.ascontiguousarray(t.data)
        heads = (c["num_attention_heads"] if target.endswith("attn_q.weight") else
                 c["num_key_value_heads"] if target.endswith("attn_k.weight") else None)
        if heads is not None:  # llama.cpp's interleaved rotary halves
            rows = data.shape[0]
            data = np.ascontiguousarray(data.reshape(heads, 2, rows // heads // 2, -1)
                                        .swapaxes(1, 2).reshape(rows, -1))
        if t.ggml_type in ("F16", "BF16", "F32"):
            from fastllm.loader import dequantize_raw

            writer.add_tensor(target, dequantize_raw(t).astype(np.float32))
        else:
            qtype = getattr(gguf.GGMLQuantizationType, t.ggml_type)
            writer.add_tensor(target, data, raw_shape=data.shape, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def throughput(llm, clients: int, output_len: int, rounds: int) -> float:
    from fastllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    prompts = [{"prompt_token_ids": [(17 * i + 3 * j) % 40000 + 100 for j in range(32)]}
               for i in range(clients)]
    llm.generate(prompts, params, use_tqdm=False)  # warm
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        rates.append(sum(len(o.outputs[0].token_ids) for o in outs) /
                     (time.perf_counter() - t0))
    return statistics.median(rates)


def kv_memory(llm, sequences: int, length: int) -> tuple[float, float]:
    """(planned, measured) KV cache bytes per cached token: the cache's bytes per block over its
    tokens, and the resident set's growth while ``sequences`` prompts of ``length`` tokens fill
    it (the cache is mapped lazily: its pages become resident as they are written; the growth
    also holds the step buffers' first allocation, so use long prompts)."""
    from fastllm import SamplingParams

    core = llm.llm_engine.core
    planned = core.model_config.kv_bytes_per_block(core.block_size, _kv_name(core)) / \
        core.block_size
    prompts = [{"prompt_token_ids": [(31 * i + 7 * j) % 40000 + 100 for j in range(length)]}
               for i in range(sequences)]
    before = _rss_bytes()
    llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
    return planned, (_rss_bytes() - before) / (sequences * length)


def _kv_name(core) -> str:
    name = str(core.kv_dtype).removeprefix("torch.")
    return "float8_e4m3fn" if name == "uint8" else name  # e4m3 or e5m2: one byte either way


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30, help="decoder layers (default 30)")
    ap.add_argument("--clients", default="1,16", help="comma-separated request counts")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--kv-sequences", type=int, default=16)
    ap.add_argument("--kv-length", type=int, default=1024)
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    from fastllm import LLM

    with tempfile.TemporaryDirectory() as root:
        models = build_models(root, args.layers)
        tokenizer = models.pop("_tokenizer")
        rates: dict[str, dict[int, float]] = {}
        for name, path in models.items():
            llm = LLM(model=path, tokenizer=tokenizer, max_model_len=2048)
            rates[name] = {n: throughput(llm, n, args.output_len, args.rounds) for n in clients}
            del llm
        print(f"{'model':<12}" + "".join(f"{n:>10} cl tok/s  vs GGUF" for n in clients))
        for name, by_clients in rates.items():
            cells = "".join(f"{r:>17.1f}  {r / rates['gguf-q4_0'][n]:>6.3f}"
                            for n, r in by_clients.items())
            print(f"{name:<12}{cells}")

        print("\nKV cache on the GGUF model:")
        kv = {}
        for dtype in ("float16", "fp8", "fp8_e5m2"):
            llm = LLM(model=models["gguf-q4_0"], tokenizer=tokenizer, max_model_len=2048,
                      kv_cache_dtype=dtype)
            planned, measured = kv_memory(llm, args.kv_sequences, args.kv_length)
            kv[dtype] = (planned, measured, throughput(llm, max(clients), args.output_len,
                                                       args.rounds))
            del llm
        for dtype, (planned, measured, rate) in kv.items():
            print(f"  {dtype:<8} {planned:8.0f} B/token planned, {measured:8.0f} B/token "
                  f"resident growth, {rate:8.1f} tok/s at {max(clients)} clients "
                  f"({rate / kv['float16'][2]:.3f} of fp16)")


if __name__ == "__main__":
    main()
