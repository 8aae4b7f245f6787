"""Model breadth: one tiny random model per architecture (tests/python/model_fixtures.py) against
HF transformers fp32 (greedy tokens and logprobs, with chunked prefill and preemption), their
GGUF files in llama.cpp's layouts (F32 against HF; Q8_0 / Q4_0 on the quantized CPU path by
perplexity), the registry, the executors' fallbacks, and `fastllm-serve` on an OPT directory."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys

import openai
import pytest
import torch

import model_fixtures as mf
from fastllm import LLM, SamplingParams
from fastllm.models import get_model_class, model_spec, supported_architectures
from test_llm import hf_greedy, hf_token_logprobs
from test_server import start_server, stop_server

NEW_TOKENS = 64
PROMPTS = [
    "The history of the printing press",
    "def fibonacci(n):\n    return",
    "Q: What is the tallest mountain on Earth, and how tall is it?\nA:",
    ("Write a short poem about the sea. The waves roll in, the tide goes out, and the gulls "
     "circle over the harbour while the fishermen mend their nets."),
]
# A fixed text for perplexity: the prompt below followed by the fp32 model's own greedy
# continuation (a text the model is confident about, so quantization error shows).
PPL_PROMPT = "The waves roll in, the tide goes out, and the gulls circle over the harbour"

GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=0)


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("tiny_models"))


_cache: dict[str, dict] = {}


def tiny(tiny_root: str, name: str) -> dict:
    """The tiny model `name`: its directory, HF model, prompt ids and HF greedy outputs."""
    if name not in _cache:
        directory = mf.build_tiny_model(tiny_root, name)
        hf = mf.load_tiny_hf_model(directory)
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
        ids = [tok.encode(p).ids for p in PROMPTS]
        _cache[name] = {"dir": directory, "hf": hf, "ids": ids, "tok": tok,
                        "refs": [hf_greedy(hf, i, NEW_TOKENS) for i in ids]}
    return _cache[name]


def check_against_hf(outs, model: dict, prompts: int | None = None) -> None:
    for out, ids, ref in list(zip(outs, model["ids"], model["refs"]))[:prompts]:
        comp = out.outputs[0]
        assert comp.token_ids == ref
        ours = torch.tensor([d[t].logprob for t, d in zip(comp.token_ids, comp.logprobs)])
        theirs = hf_token_logprobs(model["hf"], ids, comp.token_ids)
        assert torch.allclose(ours, theirs, atol=1e-3), (ours - theirs).abs().max()


# ---- HF directories on the torch executor ------------------------------------------------------


# gemma2_tied (the GGUF's source; its greedy text loops) is checked through its F32 GGUF.
@pytest.mark.parametrize("name", [n for n in mf.TINY_CONFIGS if n != "gemma2_tied"])
def test_greedy_matches_hf_with_chunked_prefill_and_preemption(tiny_root, name):
    model = tiny(tiny_root, name)
    # The outputs are varied text, not one repeated token (a check that could not fail).
    assert all(len(set(ref)) > 8 for ref in model["refs"])
    # 16-token chunks; 20 blocks of 8 tokens hold one sequence of max_model_len (128) but not
    # the four, so sequences are preempted and recomputed.
    llm = LLM(model=model["dir"], max_model_len=128, max_num_batched_tokens=16, block_size=8,
              num_gpu_blocks_override=20, enable_prefix_caching=False)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in model["ids"]], GREEDY,
                        use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [NEW_TOKENS] * len(PROMPTS)
    check_against_hf(outs, model)
    assert llm.llm_engine.stats().num_preemptions > 0


def _hf_variant(directory: str, **overrides):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32,
                                                **overrides).eval()


@pytest.mark.parametrize("name,overrides", [
    ("mistral", {"sliding_window": None}),
    ("gemma2", {"attn_logit_softcapping": None}),
    ("gemma2", {"sliding_window": 4096}),
])
def test_the_fixtures_exercise_each_feature(tiny_root, name, overrides):
    # The sequences are longer than the windows and the scores large enough for the cap:
    # without the feature, HF's own greedy output changes (so matching it tests the feature).
    model = tiny(tiny_root, name)
    variant = _hf_variant(model["dir"], **overrides)
    assert [hf_greedy(variant, ids, NEW_TOKENS) for ids in model["ids"]] != model["refs"]


def test_final_softcap_changes_the_logprobs(tiny_root):
    # A cap is monotonic (greedy tokens stay), so it shows in the logprobs matched to 1e-3.
    model = tiny(tiny_root, "gemma2")
    ids, ref = model["ids"][0], model["refs"][0]
    uncapped = _hf_variant(model["dir"], final_logit_softcapping=None)
    diff = hf_token_logprobs(uncapped, ids, ref) - hf_token_logprobs(model["hf"], ids, ref)
    assert diff.abs().max() > 0.05


def test_longrope_factors_matter(tiny_root):
    # Phi-3's short factors change the rotation: the plain table gives other tokens.
    phi = tiny(tiny_root, "phi3")
    plain = _hf_variant(phi["dir"], rope_parameters={"rope_type": "default",
                                                     "rope_theta": 10000.0})
    assert [hf_greedy(plain, ids, NEW_TOKENS) for ids in phi["ids"]] != phi["refs"]


def test_bare_opt_checkpoint_names_load(tiny_root, tmp_path):
    # facebook/opt-* checkpoints are OPTModel state dicts: decoder.* without the model. prefix.
    from safetensors.torch import load_file, save_file

    model = tiny(tiny_root, "opt")
    bare = tmp_path / "opt"
    bare.mkdir()
    state = load_file(os.path.join(model["dir"], "model.safetensors"))
    save_file({k.removeprefix("model."): v for k, v in state.items()},
              str(bare / "model.safetensors"))
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(model["dir"], f), bare / f)
    llm = LLM(model=str(bare), max_model_len=128)
    outs = llm.generate([{"prompt_token_ids": ids} for ids in model["ids"][:2]], GREEDY,
                        use_tqdm=False)
    check_against_hf(outs, model, prompts=2)


# ---- GGUF files ----------------------------------------------------------------------------------


def _gguf(tiny_root: str, name: str, qtype: str) -> str:
    path = os.path.join(tiny_root, f"{name}-{qtype}.gguf")
    if not os.path.exists(path):
        mf.write_tiny_gguf(tiny(tiny_root, name)["dir"], path, qtype)
    return path


def _perplexity(llm: LLM, ids: list[int], start: int) -> float:
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)[0]
    lps = [d[t].logprob for t, d in zip(ids[start:], out.prompt_logprobs[start:])]
    return math.exp(-sum(lps) / len(lps))


@pytest.mark.parametrize("name", list(mf.GGUF_ARCHS))
def test_gguf_f32_matches_hf(tiny_root, name):
    model = tiny(tiny_root, name)
    # A float32 KV cache: a GGUF on the CPU gets float16 by default.
    llm = LLM(model=_gguf(tiny_root, name, "F32"), tokenizer=model["dir"], max_model_len=128,
              max_num_batched_tokens=16, kv_cache_dtype="float32")
    assert llm.llm_engine.core.model_config.architecture == model_spec(
        llm.llm_engine.core.model_config.architecture).architecture
    outs = llm.generate([{"prompt_token_ids": ids} for ids in model["ids"][:2]], GREEDY,
                        use_tqdm=False)
    check_against_hf(outs, model, prompts=2)


@pytest.mark.parametrize("name", list(mf.GGUF_ARCHS))
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0"])
def test_gguf_quantized_perplexity(tiny_root, name, qtype):
    """The quantized CPU path (integer GEMMs, int8 activations, float16 KV cache) within 1 % of
    the perplexity of the same file's weights computed in fp32. (What the format itself loses
    against the fp32 checkpoint is the format's, not the kernels': on these random tiny models
    0.5-1.4 % for Q8_0 and 5-70 % for Q4_0, far more than on trained models.)"""
    model = tiny(tiny_root, name)
    prompt = model["tok"].encode(PPL_PROMPT).ids
    ids = prompt + hf_greedy(model["hf"], prompt, 48)
    fp32 = _perplexity(LLM(model=model["dir"], max_model_len=128), ids, len(prompt))
    assert fp32 < 100  # the text is one the model predicts far better than chance (1001)
    path = _gguf(tiny_root, name, qtype)
    quantized = _perplexity(LLM(model=path, tokenizer=model["dir"], max_model_len=128), ids,
                            len(prompt))
    reference = _perplexity(LLM(model=path, tokenizer=model["dir"], max_model_len=128,
                                quantized_weights="dequantize", kv_cache_dtype="float32"),
                            ids, len(prompt))
    assert abs(quantized / reference - 1) < 0.01, (quantized, reference, fp32)


@pytest.mark.parametrize("name", ["qwen2", "qwen3"])
def test_native_and_torch_executors_agree_on_quantized_gguf(tiny_root, name, monkeypatch):
    model = tiny(tiny_root, name)
    path = _gguf(tiny_root, name, "Q8_0")
    prompts = [{"prompt_token_ids": ids} for ids in model["ids"]]
    native = LLM(model=path, tokenizer=model["dir"], max_model_len=128, max_num_batched_tokens=16,
                 block_size=8, num_gpu_blocks_override=20, enable_prefix_caching=False)
    core = native.llm_engine.core
    assert type(core.executor).__name__ == "CpuExecutor" or core.executor.cpu_decoder is not None
    monkeypatch.setenv("FASTLLM_CPU_NATIVE_DECODER", "0")
    torch_llm = LLM(model=path, tokenizer=model["dir"], max_model_len=128)
    assert torch_llm.llm_engine.core.executor.cpu_decoder is None
    a = native.generate(prompts, GREEDY, use_tqdm=False)
    b = torch_llm.generate(prompts, GREEDY, use_tqdm=False)
    assert native.llm_engine.stats().num_preemptions > 0
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        lx = torch.tensor([d[t].logprob for t, d in zip(x.outputs[0].token_ids,
                                                         x.outputs[0].logprobs)])
        ly = torch.tensor([d[t].logprob for t, d in zip(y.outputs[0].token_ids,
                                                         y.outputs[0].logprobs)])
        assert torch.allclose(lx, ly, atol=1e-3)


def test_torch_free_path_refuses_what_it_cannot_run(tiny_root):
    """Without torch, a GGUF of an architecture the native decoder does not run is refused with
    the extra to install, before anything is loaded."""
    path = _gguf(tiny_root, "gemma2_tied", "Q8_0")
    code = ("import sys; sys.modules['torch'] = None\n"
            "from fastllm.config import EngineArgs\n"
            "from fastllm.engine.llm_engine import LLMEngine\n"
            f"LLMEngine(EngineArgs(model={path!r}, tokenizer={tiny(tiny_root, 'gemma2_tied')['dir']!r},"
            " max_model_len=128))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False,
                          timeout=120, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode != 0
    assert "Gemma2ForCausalLM, which only the torch executor runs" in proc.stderr
    assert 'pip install "fastllm[torch]"' in proc.stderr


# ---- the registry --------------------------------------------------------------------------------


def test_registry_rows():
    expected = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                "Phi3ForCausalLM", "Gemma2ForCausalLM", "OPTForCausalLM", "GPT2LMHeadModel"}
    assert expected <= set(supported_architectures())
    for arch in expected:
        spec = model_spec(arch)
        assert "torch" in spec.executors
        assert spec.load_class().__name__ in (arch, "LlamaForCausalLM")
    assert "native_cpu" in model_spec("Qwen3ForCausalLM").executors
    assert "native_cpu" not in model_spec("GPT2LMHeadModel").executors


def test_unknown_architecture_names_the_supported_ones(tmp_path):
    from fastllm.config import ModelConfig

    config = ModelConfig.from_dict({"architectures": ["BloomForCausalLM"], "hidden_size": 64,
                                    "intermediate_size": 128, "num_hidden_layers": 1,
                                    "num_attention_heads": 1, "vocab_size": 10})
    with pytest.raises(ValueError, match="BloomForCausalLM.*supported: .*GPT2LMHeadModel"):
        get_model_class(config)


def test_fallback_to_torch_is_logged(tiny_root, caplog):
    import logging

    path = _gguf(tiny_root, "gpt2", "Q8_0")
    with caplog.at_level(logging.INFO, logger="fastllm.engine.llm_engine"):
        LLM(model=path, tokenizer=tiny(tiny_root, "gpt2")["dir"], max_model_len=128)
    assert "GPT2LMHeadModel runs on the torch executor" in caplog.text


# ---- the server on the spec's default architecture ------------------------------------------------


def test_server_serves_an_opt_directory(tiny_root):
    model = tiny(tiny_root, "opt")
    proc, base = start_server(["--model", model["dir"], "--max-model-len", "128",
                               "--disable-log-stats"])
    try:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0)
        name = client.models.list().data[0].id
        out = client.completions.create(model=name, prompt=PROMPTS[0], max_tokens=16,
                                        temperature=0, logprobs=1,
                                        extra_body={"ignore_eos": True})
        expected = model["tok"].decode(model["refs"][0][:16])
        assert out.choices[0].text == expected
        assert out.usage.completion_tokens == 16
    finally:
        stop_server(proc)
