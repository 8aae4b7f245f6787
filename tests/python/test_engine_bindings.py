"""The native engine driven from Python: a Python executor, the loop thread, errors, the GIL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from fastllm import _C

VOCAB = 500
EOS = 3


class NumpyExecutor(_C.Executor):
    """A Python model stand-in over a real paged cache held in numpy.

    Every new token is written to its slot; the next token is a function of the whole context read
    back through the block table, so a wrong slot, block table or preemption changes the output.
    """

    def __init__(self, num_blocks: int, block_size: int):
        super().__init__()
        self.cache = np.full((num_blocks * block_size,), -1, dtype=np.int64)
        self.block_size = block_size
        self.calls = 0
        self.fail_for: str | None = None
        self.thread_ids: set[int] = set()

    def execute(self, plan):
        self.calls += 1
        self.thread_ids.add(threading.get_ident())
        if self.fail_for is not None and self.fail_for in plan.request_ids:
            raise RuntimeError(f"model failure on {self.fail_for}")
        # Token and position packed into one int64 per slot.
        self.cache[plan.slot_mapping] = plan.token_ids.astype(np.int64) * 100_000 + plan.positions
        tables = plan.block_tables
        out = np.empty(plan.num_samples, dtype=np.int32)
        for r in range(plan.num_samples):
            seq = plan.sample_seq_indices[r]
            ctx = plan.context_lens[seq]
            pos = np.arange(ctx)
            slots = tables[seq, pos // self.block_size] * self.block_size + pos % self.block_size
            packed = self.cache[slots]
            assert np.array_equal(packed % 100_000, pos), "KV cache holds the wrong positions"
            out[r] = reference_next(packed // 100_000)
        return _C.StepResult(out)


def reference_next(context: np.ndarray) -> int:
    weights = np.arange(1, len(context) + 1, dtype=np.int64)
    return int((int((context.astype(np.int64) * weights).sum()) * 7919 + len(context)) % VOCAB)


def reference_generate(prompt: list[int], max_tokens: int, ignore_eos: bool = False) -> list[int]:
    seq = list(prompt)
    out: list[int] = []
    while len(out) < max_tokens:
        tok = reference_next(np.array(seq))
        seq.append(tok)
        out.append(tok)
        if tok == EOS and not ignore_eos:
            break
    return out


def make_config(num_blocks=64, block_size=16, budget=256, max_model_len=256, **kw):
    cfg = _C.EngineConfig()
    cfg.cache.num_gpu_blocks = num_blocks
    cfg.cache.block_size = block_size
    cfg.cache.enable_prefix_caching = kw.get("prefix", True)
    cfg.scheduler.max_num_batched_tokens = budget
    cfg.scheduler.max_model_len = max_model_len
    cfg.scheduler.max_num_seqs = kw.get("max_num_seqs", 32)
    cfg.eos_token_ids = [EOS]
    cfg.vocab_size = VOCAB
    return cfg


def params(max_tokens=16, **kw) -> _C.SamplingParams:
    p = _C.SamplingParams()
    p.max_tokens = max_tokens
    for k, v in kw.items():
        setattr(p, k, v)
    return p


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(10, VOCAB, size=int(rng.integers(3, 90))).tolist() for _ in range(n)]


def collect(outputs, tokens, reasons):
    for o in outputs:
        tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
        if o.finished:
            assert o.request_id not in reasons
            reasons[o.request_id] = o.finish_reason


def run_sync(engine, reqs, max_tokens=24):
    for i, p in enumerate(reqs):
        engine.add_request(f"r{i}", p, params(max_tokens))
    tokens, reasons = {}, {}
    while engine.has_unfinished_requests():
        collect(engine.step(), tokens, reasons)
    return tokens, reasons


def test_python_executor_generates_reference_tokens():
    cfg = make_config()
    ex = NumpyExecutor(64, 16)
    engine = _C.Engine(cfg, ex)
    reqs = prompts(10)
    tokens, reasons = run_sync(engine, reqs)
    for i, p in enumerate(reqs):
        expected = reference_generate(p, 24)
        assert tokens[f"r{i}"] == expected
        assert reasons[f"r{i}"] == ("stop" if expected[-1] == EOS else "length")
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks == 63
    assert stats.num_generated_tokens == sum(len(t) for t in tokens.values())


def test_small_pool_preempts_and_keeps_tokens():
    reqs = prompts(12, seed=1)
    big_tokens, _ = run_sync(_C.Engine(make_config(200), NumpyExecutor(200, 16)), reqs)
    small = _C.Engine(make_config(17, budget=64), NumpyExecutor(17, 16))
    small_tokens, _ = run_sync(small, reqs)
    assert small_tokens == big_tokens
    assert small.stats().num_preemptions > 0


def test_plan_arrays_are_consistent():
    seen = []

    class Recorder(NumpyExecutor):
        def execute(self, plan):
            qsl = plan.query_start_loc
            assert qsl.dtype == np.int32 and len(qsl) == plan.num_seqs + 1
            assert qsl[-1] == plan.num_tokens == len(plan.token_ids) == len(plan.slot_mapping)
            assert plan.block_tables.shape == (plan.num_seqs, plan.max_blocks_per_seq)
            assert plan.slot_mapping.dtype == np.int64
            assert len(plan.temperature) == plan.num_samples
            seen.append((plan.num_seqs, plan.num_tokens, list(plan.request_ids)))
            return super().execute(plan)

    engine = _C.Engine(make_config(budget=32), Recorder(64, 16))
    engine.add_request("a", list(range(10, 50)), params(3))  # 40 tokens: two chunks of 32 + 8
    while engine.has_unfinished_requests():
        engine.step()
    assert seen[0] == (1, 32, ["a"])
    assert seen[1] == (1, 8, ["a"])
    assert [s[1] for s in seen[2:]] == [1, 1]


def test_bad_requests_raise_value_error_and_engine_keeps_serving():
    engine = _C.Engine(make_config(), NumpyExecutor(64, 16))
    with pytest.raises(ValueError, match="at least one token"):
        engine.add_request("x", [], params())
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("x", [11] * 300, params())
    with pytest.raises(ValueError, match="max_tokens"):
        engine.add_request("x", [11], params(0))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("x", [VOCAB + 1], params())
    with pytest.raises(ValueError, match="temperature"):
        engine.add_request("x", [11], params(temperature=-0.5))
    engine.add_request("x", [11, 12], params(4))
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("x", [11, 12], params(4))
    tokens, reasons = {}, {}
    while engine.has_unfinished_requests():
        collect(engine.step(), tokens, reasons)
    assert tokens["x"] == reference_generate([11, 12], 4)


def test_bad_config_raises_value_error():
    with pytest.raises(ValueError, match="max_model_len"):
        _C.Engine(make_config(num_blocks=4), NumpyExecutor(4, 16))
    with pytest.raises(ValueError, match="block_size"):
        _C.Engine(make_config(block_size=12), NumpyExecutor(64, 12))


def test_python_executor_exception_fails_only_its_step():
    cfg = make_config(max_num_seqs=1)
    ex = NumpyExecutor(64, 16)
    ex.fail_for = "bad"
    engine = _C.Engine(cfg, ex)
    engine.add_request("bad", [20, 21], params(4))
    engine.add_request("good", [30, 31], params(4))
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    bad = [o for o in outputs if o.request_id == "bad"]
    assert bad[-1].finish_reason == "error" and "model failure on bad" in bad[-1].error
    good_tokens = [t for o in outputs if o.request_id == "good" for t in o.new_token_ids]
    assert good_tokens == reference_generate([30, 31], 4)
    assert engine.stats().num_free_blocks == 63


def test_wrong_number_of_sampled_tokens_is_an_error():
    class Short(NumpyExecutor):
        def execute(self, plan):
            return []

    engine = _C.Engine(make_config(), Short(64, 16))
    engine.add_request("a", [11, 12], params(2))
    (out,) = engine.step()
    assert out.finished and out.finish_reason == "error"
    assert "0 tokens for 1 sample rows" in out.error


def test_abort_frees_blocks():
    engine = _C.Engine(make_config(), NumpyExecutor(64, 16))
    for i, p in enumerate(prompts(5, seed=3)):
        engine.add_request(f"r{i}", p, params(100, ignore_eos=True))
    engine.step()
    engine.step()
    assert engine.stats().num_free_blocks < 63
    assert all(engine.abort(f"r{i}") for i in range(5))
    assert not engine.abort("missing")
    outs = engine.step()
    assert sorted(o.request_id for o in outs if o.finish_reason == "abort") == [
        f"r{i}" for i in range(5)
    ]
    assert engine.stats().num_free_blocks == 63
    assert not engine.has_unfinished_requests()


def test_loop_thread_with_asyncio_reader():
    """The native loop runs the Python executor on its own thread and wakes asyncio via the fd."""
    ex = NumpyExecutor(64, 16)
    engine = _C.Engine(make_config(), ex)
    reqs = prompts(6, seed=4)

    async def main():
        loop = asyncio.get_running_loop()
        done: dict[str, asyncio.Future] = {f"r{i}": loop.create_future() for i in range(len(reqs))}
        tokens: dict[str, list[int]] = {}

        def on_readable():
            for o in engine.take_outputs():
                tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finished:
                    done[o.request_id].set_result(o.finish_reason)

        loop.add_reader(engine.output_fd, on_readable)
        engine.start()
        for i, p in enumerate(reqs):
            engine.add_request(f"r{i}", p, params(20))
        await asyncio.wait_for(asyncio.gather(*done.values()), timeout=30)
        loop.remove_reader(engine.output_fd)
        return tokens

    tokens = asyncio.run(main())
    engine.stop()
    for i, p in enumerate(reqs):
        assert tokens[f"r{i}"] == reference_generate(p, 20)
    assert threading.get_ident() not in ex.thread_ids  # ran on the engine thread


def test_native_loop_runs_without_the_gil():
    """With a C++ executor the loop never needs the GIL: it makes progress while Python holds it."""
    cfg = make_config(num_blocks=256, max_model_len=1024, budget=1024)
    engine = _C.Engine(cfg, _C.FakeExecutor(256, 0, 16, VOCAB, True))
    for i, p in enumerate(prompts(8, seed=5)):
        engine.add_request(f"r{i}", p, params(400, ignore_eos=True))
    old = sys.getswitchinterval()
    sys.setswitchinterval(100.0)  # no thread that waits for the GIL would get it in this test
    try:
        engine.start()
        deadline = time.monotonic() + 0.5
        spins = 0
        while time.monotonic() < deadline:  # pure Python: holds the GIL throughout
            spins += 1
        steps_while_busy = engine.stats().num_steps
    finally:
        sys.setswitchinterval(old)
        engine.stop()
    assert spins > 0
    assert steps_while_busy > 0


def test_fake_executor_from_python_matches_its_reference():
    cfg = make_config(num_blocks=64)
    cfg.vocab_size = 1000
    cfg.eos_token_ids = [7]
    engine = _C.Engine(cfg, _C.FakeExecutor(64, 0, 16, 1000))
    engine.add_request("a", [5, 6, 7, 8], params(30))
    tokens, _ = {}, {}
    while engine.has_unfinished_requests():
        collect(engine.step(), tokens, _)
    assert tokens["a"] == _C.FakeExecutor.reference_generate([5, 6, 7, 8], 30, 1000, [7])


def test_extension_does_not_link_libtorch():
    so = Path(_C.__file__)
    needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True)
    libs = [line.split("[")[1].rstrip("]") for line in needed.stdout.splitlines() if "NEEDED" in line]
    assert libs, "readelf found no NEEDED entries"
    for lib in libs:
        assert not lib.startswith(("libtorch", "libc10", "libcudart", "libpython")), lib


def test_n_is_one_request_with_children_and_one_prefill():
    """n = 4 through _C.Engine: one prefill, four children with seq_index 0..3, child i seeded
    like a separate request with seed + i, every block back after the request."""
    cfg = make_config(num_blocks=64)
    cfg.vocab_size = 1000
    cfg.eos_token_ids = [7]
    engine = _C.Engine(cfg, _C.FakeExecutor(64, 0, 16, 1000))
    prompt = list(range(100, 121))  # 21 tokens: the last block is shared until a child writes
    engine.add_request("fan", prompt, params(8, n=4, seed=10, ignore_eos=True))
    first = engine.step()
    assert [o.seq_index for o in first] == [0, 1, 2, 3]
    assert all(o.request_id == "fan" and len(o.new_token_ids) == 1 for o in first)
    assert engine.stats().num_running == 4
    tokens, finished = {}, []
    for o in first:
        tokens.setdefault(o.seq_index, []).extend(o.new_token_ids)
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens.setdefault(o.seq_index, []).extend(o.new_token_ids)
            if o.request_finished:
                finished.append(o.seq_index)
    assert sorted(tokens) == [0, 1, 2, 3]
    for i in range(4):
        assert tokens[i] == _C.FakeExecutor.reference_generate(prompt, 8, 1000, [], 0, 10 + i)
    assert len(finished) == 1
    stats = engine.stats()
    assert stats.num_prompt_tokens_computed == len(prompt)  # one prefill, not four
    assert stats.num_generated_tokens == 4 * 8
    assert stats.num_free_blocks == stats.num_total_blocks


def test_abort_of_a_fanned_out_request_ends_every_child():
    cfg = make_config(num_blocks=64)
    engine = _C.Engine(cfg, _C.FakeExecutor(64, 0, 16, VOCAB))
    engine.add_request("fan", list(range(10, 40)), params(100, n=3, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.stats().num_running == 3
    assert engine.abort("fan")
    outs = engine.step()
    assert sorted(o.seq_index for o in outs) == [0, 1, 2]
    assert all(o.finished and o.finish_reason == "abort" for o in outs)
    assert [o.request_finished for o in outs].count(True) == 1
    assert not engine.has_unfinished_requests()
    assert engine.stats().num_free_blocks == engine.stats().num_total_blocks
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine.add_request("big", [1, 2, 3], params(4, n=cfg.scheduler.max_num_seqs + 1))


def test_to_native_fans_out_only_when_asked():
    from fastllm.sampling_params import SamplingParams

    sp = SamplingParams(n=2, best_of=4, seed=3)
    assert sp.to_native().n == 1  # today's front end adds one engine request per sample
    native = sp.to_native(fan_out=True)
    assert native.n == 4 and native.seed == 3
    assert native.logprobs == 0  # best_of ranks by logprob
    assert SamplingParams(n=3, logprobs=2).to_native(fan_out=True).logprobs == 2
@pytest.mark.parametrize("algo", ["SHA256", "FAST", "TEST_WEAK"])
def test_prefix_cache_hash_algos_share_equal_prefixes_only(algo):
    # TEST_WEAK makes block i of every prompt collide: only the check of the cached tokens keeps
    # the prompts that differ from reading each other's KV (the fake model's tokens derive from
    # the KV it reads back, through the prompt-tail copies too).
    cfg = make_config(num_blocks=64, block_size=16)
    cfg.cache.hash_algo = getattr(_C.PrefixHashAlgo, algo)
    engine = _C.Engine(cfg, _C.FakeExecutor(64, 0, 16, VOCAB, True))
    rng = np.random.default_rng(3)
    shared = rng.integers(10, VOCAB, size=32).tolist()
    first = shared + rng.integers(10, VOCAB, size=5).tolist()
    run_sync(engine, [first], max_tokens=8)
    others = [
        first,  # every block and all but the last tail token
        shared[:16] + rng.integers(10, VOCAB, size=21).tolist(),  # the first block
        rng.integers(10, VOCAB, size=37).tolist(),  # nothing
    ]
    for i, p in enumerate(others):
        engine.add_request(f"o{i}", p, params(8))
    tokens, cached = {}, {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                cached[o.request_id] = o.num_cached_tokens
    for i, p in enumerate(others):
        assert tokens[f"o{i}"] == _C.FakeExecutor.reference_generate(p, 8, VOCAB, [EOS])
    assert [cached[f"o{i}"] for i in range(3)] == [36, 16, 0]
    stats = engine.stats()
    assert stats.prefix_hits == 36 + 16
    assert (stats.prefix_hash_collisions > 0) == (algo == "TEST_WEAK")


def test_output_arrays_are_read_only_views_not_copies():
    """Reading an output array twice gives the same memory (a view, not a new list per read:
    indexing a copied field inside a loop was quadratic)."""
    cfg = make_config(num_blocks=64, block_size=16)
    engine = _C.Engine(cfg, _C.FakeExecutor(64, 0, 16, VOCAB, True))
    p = params(2)
    p.prompt_logprobs = 3
    p.logprobs = 2
    engine.add_request("v", list(range(10, 60)), p)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    first = next(o for o in outs if len(o.prompt_logprobs))
    assert isinstance(first.new_token_ids, list) and first.new_token_ids is not \
        first.new_token_ids  # a fresh list of the step's few tokens each time
    for name in ("new_logprobs", "top_token_ids", "top_logprobs",
                 "prompt_logprobs", "prompt_top_token_ids", "prompt_top_logprobs"):
        a, b = getattr(first, name), getattr(first, name)
        assert isinstance(a, np.ndarray) and not a.flags.writeable, name
        if a.size:
            assert a.__array_interface__["data"][0] == b.__array_interface__["data"][0], name
    assert len(first.prompt_logprobs) == 49
    assert len(first.prompt_top_token_ids) == 49 * first.num_prompt_top_logprobs
    assert first.new_logprobs.dtype == np.float32 and first.prompt_logprobs.dtype == np.float32


def test_plan_holds_penalty_lists_and_prompt_logprob_targets_in_kernel_form():
    """Both executors read these straight off the plan: each penalised row's prompt and output
    tokens as two CSR lists, and the prompt rows to score with the token each one scores."""
    seen, seeds = [], []

    class Recorder(_C.Executor):
        def execute(self, plan):
            seen.append({name: np.array(getattr(plan, name)) for name in (
                "penalty_prompt_offsets", "penalty_prompt_ids", "penalty_output_offsets",
                "penalty_output_ids", "prompt_logprob_rows", "prompt_logprob_targets",
                "prompt_logprob_seqs", "token_ids")})
            seeds.append((plan.step_id, plan.sampling_seed))
            return _C.StepResult(np.full(plan.num_samples, 11, dtype=np.int32))

    cfg = make_config(num_blocks=64, block_size=16, budget=8)  # the prompt takes two chunks
    cfg.seed = 7
    engine = _C.Engine(cfg, Recorder())
    prompt = list(range(20, 32))
    engine.add_request("pen", prompt, params(3, repetition_penalty=1.2, prompt_logprobs=1))
    engine.add_request("plain", [40, 41], params(3))
    while engine.has_unfinished_requests():
        engine.step()
    first, second = seen[0], seen[1]
    # Chunk 1 (positions 0-7 of "pen", and "plain" whole): rows 0-7 score prompt[1:9].
    assert first["prompt_logprob_rows"].tolist() == list(range(8))
    assert first["prompt_logprob_targets"].tolist() == prompt[1:9]
    assert first["prompt_logprob_seqs"].tolist() == [0] * 8
    # Chunk 2: positions 8-11; position 11 is the prompt's last and scores nothing.
    assert second["prompt_logprob_targets"].tolist() == prompt[9:12]
    # The first sampled step of "pen" (chunk 2) has its prompt and no output yet; "plain" uses no
    # penalties and gets empty spans.
    assert second["penalty_prompt_ids"].tolist() == prompt
    assert second["penalty_output_ids"].tolist() == []
    later = seen[2]
    assert later["penalty_prompt_ids"].tolist() == prompt
    assert later["penalty_output_ids"].tolist() == [11]
    assert later["penalty_prompt_offsets"].tolist() == [0, 12, 12]
    assert later["penalty_output_offsets"].tolist() == [0, 1, 1]
    assert len(later["prompt_logprob_rows"]) == 0
    # Unseeded rows' stream of each step: the engine's seed mixed with the step id.
    assert seeds and all(seed == (7 * 1_000_003 + step) & 0x7FFFFFFFFFFFFFFF
                         for step, seed in seeds)
