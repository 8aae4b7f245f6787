"""Tensor and pipeline parallelism (fastllm.distributed) on the CPU: gloo between worker
processes of one thread each, tiny random fp32 Llama models.

The split models must give exactly the greedy tokens of the unsplit one, with chunked prefill and
preemption on. That is sound only when every greedy step's winner leads clearly: an all-reduce
adds the ranks' partial sums in another order than one GEMM does, which moves logits in their last
bits (~1e-6 here). The models are therefore drawn with a wide init (std 0.2), and the reference run
asserts its smallest top-1 lead (LEAD) before the comparisons; logprobs agree within LOGPROB_TOL.
"""

from __future__ import annotations

import concurrent.futures
import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

torch = pytest.importorskip("torch")

import httpx

import model_fixtures
from fastllm import LLM, SamplingParams
from fastllm.engine.data_parallel import STATS_INTERVAL_S
from fastllm.guided import GuidedDecodingParams

os.environ.setdefault("FASTLLM_WORKER_THREADS", "1")

LOGPROB_TOL = 1e-4
LEAD = 1e-3
PROMPTS = [[1, 5, 9, 200, 1000, 47], list(range(100, 160)), [400, 2, 2, 7],
           list(range(1500, 1530))]
# Chunked prefill (16-token steps) and too few KV blocks for all four at once: preemption.
ENGINE = {"max_model_len": 128, "max_num_batched_tokens": 16, "num_gpu_blocks_override": 20}
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2)
PHONE = r"[0-9]{3}-[0-9]{4}"


def build_model(path: str, **overrides) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
           "vocab_size": 49152, "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           "initializer_range": 0.2}
    cfg.update(overrides)
    torch.manual_seed(7)
    LlamaForCausalLM(LlamaConfig(**cfg)).eval().save_pretrained(path, safe_serialization=True)
    model_fixtures.write_smollm2_tokenizer_files(path, model_fixtures.default_gguf_path())
    return path


@pytest.fixture(scope="module")
def untied_model(tmp_path_factory) -> str:
    """GQA, its own output projection, the tokenizer's whole vocabulary."""
    return build_model(str(tmp_path_factory.mktemp("dist") / "untied"))


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> str:
    """Tied embeddings (the last stage needs the embedding as its output projection) and a
    vocabulary that two ranks do not split evenly (a padding row)."""
    return build_model(str(tmp_path_factory.mktemp("dist") / "tied"), tie_word_embeddings=True,
                       vocab_size=2047)


def generate(model: str, tp: int, pp: int, guided: bool = False, **kwargs):
    llm = LLM(model=model, tensor_parallel_size=tp, pipeline_parallel_size=pp, **ENGINE,
              **kwargs)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY, use_tqdm=False)
        preemptions = llm.llm_engine.stats().num_preemptions
        phone = None
        if guided:
            phone = llm.generate("Call me at", SamplingParams(
                temperature=0.0, max_tokens=12,
                guided_decoding=GuidedDecodingParams(regex=PHONE)), use_tqdm=False)
            phone = phone[0].outputs[0].text
    finally:
        llm.shutdown()
    return outs, preemptions, phone


def top1_lead(outs) -> float:
    leads = []
    for out in outs:
        for entry in out.outputs[0].logprobs:
            best, second = sorted((lp.logprob for lp in entry.values()), reverse=True)[:2]
            leads.append(best - second)
    return min(leads)


def assert_same(reference, outs) -> None:
    for ref, out in zip(reference, outs):
        ref_c, out_c = ref.outputs[0], out.outputs[0]
        assert out_c.token_ids == ref_c.token_ids
        for token, ref_lp, out_lp in zip(ref_c.token_ids, ref_c.logprobs, out_c.logprobs):
            assert abs(out_lp[token].logprob - ref_lp[token].logprob) < LOGPROB_TOL


@pytest.fixture(scope="module")
def untied_reference(untied_model):
    outs, preemptions, phone = generate(untied_model, 1, 1, guided=True)
    assert preemptions > 0  # the runs below go through preemption too
    assert top1_lead(outs) > LEAD
    return outs, phone


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)])
def test_split_model_gives_the_unsplit_tokens(untied_model, untied_reference, tp, pp):
    reference, ref_phone = untied_reference
    # tp x pp = 4 also runs a guided request: its steps come back as logits and are sampled
    # in the engine's process, where the guided-decoding hook lives.
    outs, preemptions, phone = generate(untied_model, tp, pp, guided=(tp * pp == 4))
    assert preemptions > 0
    assert_same(reference, outs)
    if phone is not None:
        assert phone == ref_phone
        assert len(phone) == 8 and phone[3] == "-"


def test_tied_embeddings_and_uneven_vocabulary(tied_model):
    reference, _, _ = generate(tied_model, 1, 1)
    assert top1_lead(reference) > LEAD
    outs, _, _ = generate(tied_model, 2, 2)
    assert_same(reference, outs)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"tensor_parallel_size": 3}, "attention heads (4) is not divisible"),
    ({"tensor_parallel_size": 4}, "KV heads (2) is not divisible"),
    ({"pipeline_parallel_size": 5}, "5 pipeline stages for 4 layers"),
    ({"tensor_parallel_size": 2, "enable_lora": True}, "LoRA"),
    ({"distributed_executor_backend": "mp", "worker_use_ray": True}, "give one"),
    ({"data_parallel_size": 2}, "behind a server (fastllm-serve)"),
])
def test_bad_parallel_configs_name_the_problem(untied_model, kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        LLM(model=untied_model, **kwargs)


def test_server_exits_naming_a_bad_split(untied_model):
    r = subprocess.run([sys.executable, "-m", "fastllm.entrypoints.openai.api_server",
                        "--model", untied_model, "--port", "0", "-tp", "3"],
                       check=False, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "attention heads (4) is not divisible by the tensor-parallel size 3" in r.stderr


def test_ray_backend_without_ray_names_the_extra(untied_model, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ValueError, match=r"needs Ray.*fastllm\[ray\]"):
        LLM(model=untied_model, tensor_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match="needs Ray"):
        LLM(model=untied_model, engine_use_ray=True)


# ---- the server: data parallelism, a dead worker -------------------------------------------------


def start_server(args: list[str], log_path) -> tuple[subprocess.Popen, str]:
    """fastllm-serve on a free port (its output to log_path: replicas and workers log too)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(log_path, "w")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen([sys.executable, "-m", "fastllm.entrypoints.openai.api_server",
                             "--host", "127.0.0.1", "--port", str(port), "--disable-log-stats",
                             *args], stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(log_path) as f:
                raise AssertionError(f.read())
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError("the server did not become healthy")


def completion(base: str, model: str, prompt: list[int], max_tokens: int = 12) -> list[int]:
    r = httpx.post(f"{base}/v1/completions", timeout=120, json={
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": True, "logprobs": 0, "return_tokens_as_token_ids": True})
    assert r.status_code == 200, r.text
    tokens = r.json()["choices"][0]["logprobs"]["tokens"]
    return [int(t.removeprefix("token_id:")) for t in tokens]


def metric(text: str, name: str, **labels) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_data_parallel_serves_from_both_replicas(untied_model, tmp_path):
    prompts = [[1, 2, 3, i, *range(200 + 10 * i, 220 + 10 * i)] for i in range(8)]
    llm = LLM(model=untied_model, max_model_len=128)
    expected = [o.outputs[0].token_ids for o in llm.generate(
        [{"prompt_token_ids": p} for p in prompts],
        SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True), use_tqdm=False)]
    proc, base = start_server(["--model", untied_model, "--data-parallel-size", "2",
                               "--max-model-len", "128"], tmp_path / "server.log")
    try:
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            got = list(pool.map(lambda p: completion(base, untied_model, p), prompts))
        assert got == expected
        text = httpx.get(f"{base}/metrics").text
        routed = [metric(text, "fastllm:data_parallel_requests_total", replica=i)
                  for i in range(2)]
        assert sum(routed) == len(prompts) and min(routed) > 0, routed
        # A repeated prompt goes where its prefix is cached (the replicas report their
        # counters every STATS_INTERVAL_S).
        assert completion(base, untied_model, prompts[0]) == expected[0]
        deadline = time.monotonic() + 10
        while metric(httpx.get(f"{base}/metrics").text, "fastllm:prefix_cache_hits") == 0:
            assert time.monotonic() < deadline, "no prefix-cache hit"
            time.sleep(STATS_INTERVAL_S)
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0


def test_dead_worker_fails_requests_and_ends_the_server(untied_model, tmp_path):
    proc, base = start_server(["--model", untied_model, "-tp", "2", "--max-model-len", "256"],
                              tmp_path / "server.log")
    try:
        workers = [pid for pid in child_pids(proc.pid)
                   if b"fastllm.distributed.mp_workers" in cmdline(pid)]
        assert len(workers) == 2
        body = []
        with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
                "model": untied_model, "prompt": [1, 2, 3], "max_tokens": 200,
                "temperature": 0.0, "ignore_eos": True, "stream": True}) as r:
            lines = r.iter_lines()
            body.append(next(lines))  # the request runs
            os.kill(workers[1], signal.SIGKILL)
            body.extend(lines)
        text = "\n".join(body)
        assert '"error"' in text and "worker 1" in text, text[-500:]
        t0 = time.monotonic()
        assert proc.wait(timeout=30) == 1
        assert time.monotonic() - t0 < 30
        assert all(not os.path.exists(f"/proc/{pid}") for pid in workers)
    finally:
        if proc.poll() is None:
            proc.kill()


def child_pids(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        out.append(int(entry))
            except OSError:
                pass
    return out


def cmdline(pid: int) -> bytes:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()


# ---- Ray ------------------------------------------------------------------------------------------


def test_ray_backend_gives_the_unsplit_tokens(untied_model, untied_reference):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2)  # a local cluster: one CPU bundle per worker
    try:
        outs, preemptions, _ = generate(untied_model, 2, 1,
                                        distributed_executor_backend="ray")
    finally:
        ray.shutdown()
    assert preemptions > 0
    assert_same(untied_reference[0], outs)


def test_engine_use_ray_serves_from_a_ray_actor(untied_model, untied_reference, tmp_path):
    pytest.importorskip("ray")
    proc, base = start_server(["--model", untied_model, "--engine-use-ray",
                               "--max-model-len", "128"], tmp_path / "server.log")
    try:
        prompt = PROMPTS[0]
        expected = untied_reference[0][0].outputs[0].token_ids[:12]
        assert completion(base, untied_model, prompt) == expected
    finally:
        proc.terminate()
        assert proc.wait(timeout=60) == 0
