"""Multi-LoRA serving: PEFT adapters (made offline with peft, non-zero lora_B) and GGUF adapters,
checked token for token against transformers + PEFT, in mixed batches, with more adapters than
slots, across the prefix cache, on the torch path and the native CPU path, and over HTTP."""

from __future__ import annotations

import copy

import httpx
import pytest

from fastllm import LLM, LoRARequest, SamplingParams
from model_fixtures import LORA_TARGETS, make_peft_adapter, write_gguf_adapter

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
PROMPTS = [[1, 5, 9, 13, 17, 21, 25, 29], [1, 100, 200, 300, 400], [1] + list(range(500, 530))]

# name -> (rank, alpha, targets, rslora)
ADAPTERS = {
    "all": (8, 16, LORA_TARGETS, False),
    "qv": (4, 8, ["q_proj", "v_proj"], False),
    "mlp": (16, 32, ["gate_proj", "up_proj", "down_proj"], True),
}


def hf_peft_greedy(base_model, adapter_path: str | None, prompt: list[int], n: int) -> list[int]:
    import torch

    model = base_model
    if adapter_path is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(copy.deepcopy(base_model), adapter_path).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tiny_base(tiny_llama_dir):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tiny_adapters(tiny_base, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for i, (name, (rank, alpha, targets, rslora)) in enumerate(ADAPTERS.items()):
        paths[name] = str(root / name)
        make_peft_adapter(tiny_base, paths[name], rank, alpha, targets, rslora, seed=i)
    return paths


@pytest.fixture(scope="module")
def hf_expected(tiny_base, tiny_adapters) -> dict[str | None, list[list[int]]]:
    out = {None: [hf_peft_greedy(tiny_base, None, p, GREEDY.max_tokens) for p in PROMPTS]}
    for name, path in tiny_adapters.items():
        out[name] = [hf_peft_greedy(tiny_base, path, p, GREEDY.max_tokens) for p in PROMPTS]
    return out


def lora(name: str, paths: dict[str, str]) -> LoRARequest:
    return LoRARequest(name, 1 + list(ADAPTERS).index(name), paths[name])


def tokens(results) -> list[list[int]]:
    return [list(r.outputs[0].token_ids) for r in results]


def test_each_adapter_equals_transformers_and_peft(tiny_llama_dir, tiny_adapters, hf_expected):
    llm = LLM(model=tiny_llama_dir, max_model_len=256, enable_lora=True, max_lora_rank=16)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False)) == hf_expected[None]
    for name in ADAPTERS:
        got = tokens(llm.generate(prompts, GREEDY, use_tqdm=False,
                                  lora_request=lora(name, tiny_adapters)))
        assert got == hf_expected[name], name
        assert got != hf_expected[None]  # the adapter changes the model


@pytest.mark.parametrize("max_loras", [4, 2, 1])
def test_mixed_batch_gives_each_request_its_solo_output(tiny_llama_dir, tiny_adapters,
                                                        hf_expected, max_loras):
    """Every adapter and the base in one call: with fewer slots than adapters, requests wait for
    a slot and adapters are evicted and reloaded, and every output is still exact."""
    llm = LLM(model=tiny_llama_dir, max_model_len=256, enable_lora=True, max_loras=max_loras,
              max_cpu_loras=max(max_loras, 2), max_lora_rank=16)
    names = [None, *ADAPTERS] * 2
    prompts, requests, expected = [], [], []
    for i, name in enumerate(names):
        k = i % len(PROMPTS)
        prompts.append({"prompt_token_ids": PROMPTS[k]})
        requests.append(None if name is None else lora(name, tiny_adapters))
        expected.append(hf_expected[name][k])
    assert tokens(llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=requests)) == \
        expected
    assert llm.llm_engine.core.lora.num_loaded() <= max(max_loras, 2)


def test_prefix_cache_never_shares_kv_between_adapters(tiny_llama_dir, tiny_adapters,
                                                       hf_expected):
    llm = LLM(model=tiny_llama_dir, max_model_len=256, enable_lora=True, max_lora_rank=16)
    prompt = [{"prompt_token_ids": PROMPTS[2]}]  # 31 tokens: whole cached blocks
    order = ["all", None, "qv", "all", None, "mlp", "qv"]
    for name in order:
        req = None if name is None else lora(name, tiny_adapters)
        out = llm.generate(prompt, GREEDY, use_tqdm=False, lora_request=req)[0]
        assert list(out.outputs[0].token_ids) == hf_expected[name][2], name
    s = llm.llm_engine.core.native.stats()
    assert s.prefix_hits > 0  # the repeats ("all", None, "qv") hit their own blocks


def test_bad_adapters_are_clear_errors(tiny_llama_dir, tiny_base, tiny_adapters, tmp_path):
    llm = LLM(model=tiny_llama_dir, max_model_len=256, enable_lora=True, max_lora_rank=8)
    prompt = [{"prompt_token_ids": PROMPTS[0]}]
    with pytest.raises(ValueError, match="rank 16, above max_lora_rank 8"):
        llm.generate(prompt, GREEDY, lora_request=lora("mlp", tiny_adapters))
    head = str(tmp_path / "head")
    make_peft_adapter(tiny_base, head, 4, 8, ["lm_head"])
    with pytest.raises(ValueError, match="unsupported target module"):
        llm.generate(prompt, GREEDY, lora_request=LoRARequest("head", 7, head))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": 4, "target_modules": ["q_proj"]}')
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="cannot read"):
        llm.generate(prompt, GREEDY, lora_request=LoRARequest("broken", 8, str(broken)))
    with pytest.raises(ValueError, match="does not exist"):
        llm.generate(prompt, GREEDY, lora_request=LoRARequest("gone", 9, str(tmp_path / "x")))
    # After every refusal the engine serves on, and nothing was loaded.
    assert llm.llm_engine.core.lora.num_loaded() == 0
    assert len(tokens(llm.generate(prompt, GREEDY, use_tqdm=False))[0]) == GREEDY.max_tokens
    with pytest.raises(ValueError, match="enable_lora"):
        LLM(model=tiny_llama_dir, max_model_len=256).generate(
            prompt, GREEDY, lora_request=lora("qv", tiny_adapters))
    with pytest.raises(ValueError, match="positive integer"):
        LoRARequest("x", 0, "/tmp")


def test_adapter_for_another_base_model_is_refused(tiny_llama_dir, tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from model_fixtures import TINY_LLAMA_CONFIG

    other = LlamaForCausalLM(LlamaConfig(**{**TINY_LLAMA_CONFIG, "hidden_size": 96,
                                            "num_hidden_layers": 1}))
    torch.manual_seed(0)
    path = str(tmp_path / "other_base")
    make_peft_adapter(other, path, 4, 8, ["q_proj", "down_proj"])
    llm = LLM(model=tiny_llama_dir, max_model_len=256, enable_lora=True)
    with pytest.raises(ValueError, match="another base model"):
        llm.generate([{"prompt_token_ids": PROMPTS[0]}], GREEDY,
                     lora_request=LoRARequest("other", 3, path))


# ---- the default model: native CPU path, dequantized path, GGUF adapters ----------------------

@pytest.fixture(scope="module")
def smollm_adapter(hf_reference_model, tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("smollm_lora") / "adapter")
    make_peft_adapter(hf_reference_model.model, path, 8, 16, LORA_TARGETS, seed=5)
    return path


def test_default_model_adapter_on_every_path(hf_reference_model, smollm_adapter):
    """fp32 (dequantized) path = transformers + PEFT; the native CPU path runs the adapter on
    the quantized model exactly as the torch path over the same quantized weights does."""
    tok = hf_reference_model.tokenizer
    prompts = [tok("The capital of France is")["input_ids"], tok("Once upon a time")["input_ids"]]
    ids = [{"prompt_token_ids": p} for p in prompts]
    request = LoRARequest("smol", 1, smollm_adapter)
    fp32 = LLM(max_model_len=256, quantized_weights="dequantize", enable_lora=True)
    expected = [hf_peft_greedy(hf_reference_model.model, smollm_adapter, p, 16) for p in prompts]
    assert tokens(fp32.generate(ids, GREEDY, use_tqdm=False, lora_request=request)) == expected
    native = LLM(max_model_len=256, enable_lora=True)
    assert type(native.llm_engine.core.executor).__name__ == "CpuExecutor"
    got = tokens(native.generate(ids, GREEDY, use_tqdm=False, lora_request=request))
    base = tokens(native.generate(ids, GREEDY, use_tqdm=False))
    assert got != base
    from fastllm.engine.llm_engine import LLMEngine

    torch_path = LLM.__new__(LLM)
    torch_path.engine_args = native.engine_args
    torch_path.llm_engine = LLMEngine(native.engine_args, torch_free=False)
    assert tokens(torch_path.generate(ids, GREEDY, use_tqdm=False, lora_request=request)) == got


def test_float16_adapter_storage_stays_close_to_float32(hf_reference_model, tmp_path):
    """--lora-dtype float16 (the quantized CPU path's default) rounds A and B to float16: on the
    float model that moves the next-token logprobs by under 0.005 (0.0009 measured) for an
    adapter of realistic size (weights of std 0.05; the fixtures' std 0.3 ones swamp the model,
    where any rounding is amplified)."""
    path = str(tmp_path / "realistic")
    make_peft_adapter(hf_reference_model.model, path, 16, 16, LORA_TARGETS, seed=3, std=0.05)
    tok = hf_reference_model.tokenizer
    ids = [{"prompt_token_ids": tok(t)["input_ids"]} for t in
           ("The capital of France is", "def quicksort(arr):", "Water boils at")]
    params = SamplingParams(temperature=0, max_tokens=1, logprobs=10)
    request = LoRARequest("realistic", 1, path)
    out = {}
    for dtype in ("float32", "float16"):
        llm = LLM(max_model_len=256, quantized_weights="dequantize", enable_lora=True,
                  lora_dtype=dtype)
        assert llm.llm_engine.core.lora.dtype == dtype
        out[dtype] = [r.outputs[0].logprobs[0] for r in
                      llm.generate(ids, params, use_tqdm=False, lora_request=request)]
    for a, b in zip(out["float32"], out["float16"]):
        common = set(a) & set(b)
        assert len(common) >= 8
        assert max(abs(a[t].logprob - b[t].logprob) for t in common) < 0.005


def test_gguf_adapter_equals_its_peft_source(smollm_adapter, tmp_path, hf_reference_model):
    cfg = hf_reference_model.model.config
    path = str(tmp_path / "adapter.gguf")
    write_gguf_adapter(smollm_adapter, path, cfg.num_attention_heads, cfg.num_key_value_heads)
    llm = LLM(max_model_len=256, enable_lora=True)
    ids = [{"prompt_token_ids": hf_reference_model.tokenizer("The capital of France is")
            ["input_ids"]}]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    a = llm.generate(ids, params, use_tqdm=False,
                     lora_request=LoRARequest("peft", 1, smollm_adapter))[0].outputs[0]
    b = llm.generate(ids, params, use_tqdm=False,
                     lora_request=LoRARequest("gguf", 2, path))[0].outputs[0]
    assert list(a.token_ids) == list(b.token_ids)
    for x, y in zip(a.logprobs, b.logprobs):
        assert {t: v.logprob for t, v in x.items()} == {t: v.logprob for t, v in y.items()}


# ---- the server -------------------------------------------------------------------------------

def test_server_serves_adapters_by_name(smollm_adapter, tmp_path):
    from test_server import start_server, stop_server

    proc, base = start_server(
        ["--max-model-len", "512", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
         "--lora-modules", f"smol={smollm_adapter}",
         f'{{"name": "smol2", "path": "{smollm_adapter}", "base_model_name": "x"}}'],
        env={"FASTLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"})
    try:
        models = httpx.get(f"{base}/v1/models").json()["data"]
        cards = {m["id"]: m for m in models}
        assert cards["smol"]["parent"] == "SmolLM2-135M-Instruct" and "smol2" in cards

        def complete(model: str):
            return httpx.post(f"{base}/v1/completions", json={
                "model": model, "prompt": "The capital of France is", "max_tokens": 12,
                "temperature": 0}, timeout=60)

        base_text = complete("SmolLM2-135M-Instruct").json()["choices"][0]["text"]
        lora_text = complete("smol").json()["choices"][0]["text"]
        assert lora_text != base_text
        assert complete("smol2").json()["choices"][0]["text"] == lora_text
        missing = complete("nope")
        assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
        # Runtime loading: a bad adapter is refused with the reason and nothing is listed.
        r = httpx.post(f"{base}/v1/load_lora_adapter",
                       json={"lora_name": "bad", "lora_path": str(tmp_path / "none")})
        assert r.status_code == 400 and "does not exist" in r.json()["error"]["message"]
        r = httpx.post(f"{base}/v1/load_lora_adapter",
                       json={"lora_name": "late", "lora_path": smollm_adapter})
        assert r.status_code == 200
        assert complete("late").json()["choices"][0]["text"] == lora_text
        assert "bad" not in {m["id"] for m in httpx.get(f"{base}/v1/models").json()["data"]}
        # Unloading while a request uses the adapter is refused; that request is unharmed.
        with httpx.stream("POST", f"{base}/v1/completions", json={
                "model": "late", "prompt": "The capital of France is", "max_tokens": 300,
                "ignore_eos": True, "temperature": 0, "stream": True}, timeout=60) as stream:
            lines = stream.iter_lines()
            next(line for line in lines if line.startswith("data: {"))
            busy = httpx.post(f"{base}/v1/unload_lora_adapter", json={"lora_name": "late"})
            assert busy.status_code == 400 and "in flight" in busy.json()["error"]["message"]
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]"
        assert httpx.post(f"{base}/v1/unload_lora_adapter",
                          json={"lora_name": "late"}).status_code == 200
        assert complete("late").status_code == 404
        assert httpx.post(f"{base}/v1/unload_lora_adapter",
                          json={"lora_name": "late"}).status_code == 404
    finally:
        stop_server(proc)
