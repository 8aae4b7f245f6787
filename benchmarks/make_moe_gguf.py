"""Writes a random Mixtral-shaped GGUF for the MoE serving benchmark (offline, seeded):

    python benchmarks/make_moe_gguf.py OUT.gguf [--hidden 512] [--experts 8] [--top-k 2]
                                       [--layers 8] [--intermediate 1408] [--quant Q4_0]
    python benchmarks/serve.py --model OUT.gguf --llama-server PATH --clients 1 16

The file is laid out as llama.cpp's converter writes a Mixtral (arch llama with expert_count,
stacked ffn_{gate,up,down}_exps, the router ffn_gate_inp in F32, Q/K rows in llama.cpp's rotary
order) with the default model's tokenizer (SmolLM2, 49152 tokens), so llama-server and fastllm
load the same file. Weights are N(0, 0.02) (norms 1): the text is noise, the speed is a model's.
The writer is the tests' (tests/python/model_fixtures.py, loaded by path).
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def _fixtures():
    spec = importlib.util.spec_from_file_location(
        "model_fixtures", ROOT / "tests" / "python" / "model_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("model_fixtures", module)  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def moe_config(hidden: int, experts: int, top_k: int, layers: int, intermediate: int,
               vocab: int) -> dict:
    head_dim = 64
    return {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"],
            "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": hidden // head_dim,
            "num_key_value_heads": max(1, hidden // head_dim // 2), "head_dim": head_dim,
            "vocab_size": vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_theta": 1e6, "num_local_experts": experts, "num_experts_per_tok": top_k}


def random_state(config: dict, seed: int) -> dict[str, np.ndarray]:
    """An HF Mixtral state dict (per-expert w1/w3/w2) of N(0, 0.02) weights."""
    rng = np.random.default_rng(seed)
    h, inter = config["hidden_size"], config["intermediate_size"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float32)

    state = {"model.embed_tokens.weight": normal(config["vocab_size"], h),
             "lm_head.weight": normal(config["vocab_size"], h),
             "model.norm.weight": np.ones(h, np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        state.update({f"{p}.input_layernorm.weight": np.ones(h, np.float32),
                      f"{p}.post_attention_layernorm.weight": np.ones(h, np.float32),
                      f"{p}.self_attn.q_proj.weight": normal(q, h),
                      f"{p}.self_attn.k_proj.weight": normal(kv, h),
                      f"{p}.self_attn.v_proj.weight": normal(kv, h),
                      f"{p}.self_attn.o_proj.weight": normal(h, q),
                      f"{p}.block_sparse_moe.gate.weight": normal(config["num_local_experts"], h)})
        for e in range(config["num_local_experts"]):
            moe = f"{p}.block_sparse_moe.experts.{e}"
            state.update({f"{moe}.w1.weight": normal(inter, h), f"{moe}.w3.weight": normal(inter, h),
                          f"{moe}.w2.weight": normal(h, inter)})
    return state


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="the GGUF file to write")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--quant", choices=["F32", "Q8_0", "Q4_0"], default="Q4_0")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    fixtures = _fixtures()
    from fastllm.loader import default_gguf_path

    tokenizer_gguf = default_gguf_path()
    t0 = time.perf_counter()
    config = moe_config(args.hidden, args.experts, args.top_k, args.layers, args.intermediate,
                        49152)
    tensors = fixtures.moe_gguf_tensors(random_state(config, args.seed), config)
    fixtures.write_moe_gguf(args.out, config, tensors, args.quant, tokenizer_gguf)
    size = Path(args.out).stat().st_size
    print(f"wrote {args.out}: {size / 2**20:.1f} MiB, {args.layers} layers, {args.experts} experts "
          f"top-{args.top_k}, hidden {args.hidden}, {args.quant} ({time.perf_counter() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
