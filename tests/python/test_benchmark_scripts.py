"""The benchmark scripts run as `python benchmarks/NAME.py`, which puts benchmarks/ first on
sys.path: a script named like an importable package shadows it for every library the script
imports (transformers imports the PyPI package `kernels` when it finds one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


def test_no_benchmark_script_shadows_an_importable_module():
    stems = sorted(p.stem for p in BENCHMARKS.glob("*.py"))
    assert stems, "no benchmark scripts found"
    probe = ("import importlib.util, sys, json; names = json.loads(sys.argv[1]); "
             "print(json.dumps([n for n in names if n in sys.stdlib_module_names "
             "or importlib.util.find_spec(n) is not None]))")
    out = subprocess.run([sys.executable, "-P", "-c", probe, json.dumps(stems)],
                         capture_output=True, text=True, check=True, cwd="/")
    assert json.loads(out.stdout) == []
    # Names that libraries the benchmarks import look for (transformers: `kernels`).
    assert not {"kernels", "torch", "transformers", "numpy", "openai"} & set(stems)


def test_offline_throughput_imports_transformers_from_its_own_directory():
    """What the script does first, run the way users run it (no -P)."""
    code = (f"import sys; sys.path.insert(0, {str(BENCHMARKS)!r}); "
            "import transformers.integrations.hub_kernels")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=BENCHMARKS, timeout=120)
    subprocess.run([sys.executable, str(BENCHMARKS / "offline_throughput.py"), "--help"],
                   check=True, cwd=BENCHMARKS, capture_output=True, timeout=120)


def _spec_decode_plan(*flags: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCHMARKS / "spec_decode.py"), "--dry-run",
                          *flags], check=True, cwd=BENCHMARKS, capture_output=True, text=True,
                         timeout=120)
    return {c["name"]: c for c in json.loads(out.stdout)["configs"]}


def test_spec_decode_help_runs_from_its_directory():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "spec_decode.py"), "--help"],
                         check=True, cwd=BENCHMARKS, capture_output=True, text=True, timeout=120)
    assert "--llama-server" in out.stdout and "--draft-model" in out.stdout


def test_spec_decode_fastllm_commands_parse_to_the_speculation_asked_for():
    """The flags the benchmark gives fastllm-serve are read by its own parser as the intended
    speculative settings (a renamed flag or key would fail here, not in a long run)."""
    from fastllm.config import EngineArgs
    from fastllm.entrypoints.openai.cli_args import parse_args

    plan = _spec_decode_plan("--k", "3", "--ngram-max", "5", "--ngram-min", "2",
                             "--no-adaptive", "--draft-model", "/d/draft.gguf")
    assert sorted(plan) == ["fastllm", "fastllm-draft", "fastllm-ngram"]  # no llama-server

    def settings(name: str):
        argv = plan[name]["commands"]["4"]
        argv = argv[argv.index("--model"):]  # after the interpreter / entry point
        return EngineArgs.from_namespace(parse_args(argv, environ={})).speculative_settings()

    assert settings("fastllm") is None
    ngram = settings("fastllm-ngram")
    assert (ngram.method, ngram.num_speculative_tokens, ngram.prompt_lookup_min,
            ngram.prompt_lookup_max, ngram.adaptive) == ("ngram", 3, 2, 5, False)
    draft = settings("fastllm-draft")
    assert (draft.method, draft.model, draft.num_speculative_tokens) == (
        "draft_model", "/d/draft.gguf", 3)


def test_spec_decode_llama_server_commands():
    plan = _spec_decode_plan("--llama-server", "/opt/llama-server", "--k", "6",
                             "--clients", "1", "4")
    spec = plan["llama-server-ngram"]["commands"]
    assert sorted(spec) == ["1", "4"]  # one server per concurrency
    argv = spec["4"]

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert (value("-np"), value("--spec-type"), value("--spec-draft-n-max")) == (
        "4", "ngram-simple", "6")
    # ngram-simple drafts nothing unless size_n <= size_m: n = min(ngram-max 4, k), m = k.
    assert (value("--spec-ngram-simple-size-n"), value("--spec-ngram-simple-size-m")) == (
        "4", "6")
    assert "--metrics" in argv and "--spec-type" not in plan["llama-server"]["commands"]["1"]
    assert "llama-server-draft" not in plan


@pytest.fixture
def spec_decode(monkeypatch):
    """benchmarks/spec_decode.py as a module (it imports serve and spec_prompts as siblings)."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("spec_decode", "serve", "spec_prompts"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    module = importlib.import_module("spec_decode")
    yield module
    for name in ("spec_decode", "serve", "spec_prompts"):
        sys.modules.pop(name, None)


def test_spec_decode_counts_from_fastllm_metrics(spec_decode):
    """fastllm exports no verify-step count: the benchmark derives it from the mean accepted
    length gauge, (accepted + steps) / steps."""
    def exposition(drafts, accepted, steps):
        mean = (accepted + steps) / steps if steps else 0.0
        return "\n".join([
            "# HELP fastllm:spec_decode_num_draft_tokens Draft tokens the target verified",
            f'fastllm:spec_decode_num_draft_tokens{{model_name="bench"}} {float(drafts)}',
            f'fastllm:spec_decode_num_accepted_tokens{{model_name="bench"}} {float(accepted)}',
            f'fastllm:spec_decode_mean_accepted_length{{model_name="bench"}} {mean!r}',
            'fastllm:spec_decode_draft_time_seconds{model_name="bench"} 0.25',
            'fastllm:spec_decode_verify_time_seconds{model_name="bench"} 4.5'])

    def counts(text):
        return spec_decode.fastllm_spec_counts(spec_decode.parse_metrics(text))

    before = counts(exposition(1000, 613, 257))
    after = counts(exposition(1000 + 4321, 613 + 2999, 257 + 1237))
    assert (before.steps, after.steps) == (257, 1494)
    delta = after - before
    assert (delta.drafts, delta.accepted, delta.steps) == (4321, 2999, 1237)
    assert delta.mean_accepted_length == pytest.approx((2999 + 1237) / 1237)
    assert delta.acceptance == pytest.approx(2999 / 4321)
    assert (delta.draft_s, delta.verify_s) == (0.0, 0.0)
    assert counts(exposition(0, 0, 0)).steps == 0
    # Drafts verified, none accepted: the mean is 1 whatever the step count.
    assert counts(exposition(40, 0, 9)).steps is None
    assert (counts(exposition(50, 10, 20)) - counts(exposition(40, 0, 9))).steps is None


def test_spec_decode_compares_outputs_prompt_by_prompt(spec_decode):
    a, b = spec_decode.Measure(), spec_decode.Measure()
    a.texts = {0: ["same"], 1: ["The quick brown fox"], 2: ["x", "y"]}
    b.texts = {0: ["same"], 1: ["The quick brown cat"], 2: ["x", "x"]}
    same, total, notes = spec_decode.compare_texts(a, b)
    assert (same, total) == (1, 3)
    assert notes[0].startswith("prompt 1: differ at char 16 of 19/19")
    assert "not deterministic" in notes[1]
    assert spec_decode.first_difference("abc", "abcd") == 3
    assert spec_decode.first_difference("abc", "abc") == -1


# ---- serve.py --lora --------------------------------------------------------------------------


def _serve_plan(*flags: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCHMARKS / "serve.py"), "--dry-run", *flags],
                         check=True, cwd=BENCHMARKS, capture_output=True, text=True, timeout=120)
    plan = json.loads(out.stdout)
    return {"clients": plan["clients"], **{s["name"]: s for s in plan["servers"]}}


def test_serve_help_runs_from_its_directory():
    out = subprocess.run([sys.executable, str(BENCHMARKS / "serve.py"), "--help"], check=True,
                         cwd=BENCHMARKS, capture_output=True, text=True, timeout=120)
    assert "--lora" in out.stdout and "--dry-run" in out.stdout


def test_serve_lora_fastllm_commands_serve_every_adapter_the_clients_ask_for():
    """The LoRA server's flags parse (fastllm's own parser) to LoRA on, max_loras = N and the
    N PEFT adapters plus adapter 0's GGUF form; each workload asks only for names it serves;
    the base-only server has LoRA off."""
    from fastllm.config import EngineArgs
    from fastllm.entrypoints.openai.api_server import parse_lora_modules
    from fastllm.entrypoints.openai.cli_args import parse_args

    plan = _serve_plan("--lora", "3")
    assert plan["clients"] == [16]
    assert sorted(plan) == ["clients", "fastllm", "fastllm-lora"]  # no llama-server given

    def parsed(name: str):
        argv = plan[name]["commands"]["16"]
        ns = parse_args(argv[argv.index("--model"):], environ={})
        return ns, EngineArgs.from_namespace(ns)

    ns, args = parsed("fastllm-lora")
    assert (args.enable_lora, args.max_loras, args.max_lora_rank) == (True, 3, 16)
    modules = parse_lora_modules(ns.lora_modules)
    assert modules == [("lora0", "ADAPTERS/lora0", None), ("lora1", "ADAPTERS/lora1", None),
                       ("lora2", "ADAPTERS/lora2", None),
                       ("lora0-gguf", "ADAPTERS/lora0.gguf", None)]
    assert plan["fastllm-lora"]["workloads"] == {"fastllm 3 adapters": ["lora0", "lora1", "lora2"],
                                                 "fastllm 1 adapter": ["lora0-gguf"],
                                                 "fastllm lora-srv base": ["bench"]}
    assert args.served_model_name == ["bench"]
    base_ns, base_args = parsed("fastllm")
    assert not base_args.enable_lora and base_ns.lora_modules is None
    assert plan["fastllm"]["workloads"] == {"fastllm base": ["bench"]}
    assert _serve_plan("--lora")["fastllm-lora"]["workloads"]["fastllm 4 adapters"] == [
        "lora0", "lora1", "lora2", "lora3"]  # N defaults to 4


def test_serve_lora_llama_server_commands():
    plan = _serve_plan("--lora", "--llama-server", "/opt/llama-server", "--clients", "4", "16",
                       "--threads", "3")
    for name in ("llama-server", "llama-server-lora"):
        assert sorted(plan[name]["commands"]) == ["16", "4"]  # one server per concurrency
    argv = plan["llama-server-lora"]["commands"]["16"]

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert argv[0] == "/opt/llama-server"
    assert (value("-np"), value("-t"), value("--lora")) == ("16", "3", "ADAPTERS/lora0.gguf")
    assert "--lora" not in plan["llama-server"]["commands"]["16"]
    assert plan["fastllm"]["commands"].keys() == {"16"}  # one fastllm server for both levels
    assert plan["llama-server-lora"]["workloads"] == {"llama-server 1 adapter": ["bench"]}


def test_serve_plain_plan_is_unchanged_by_lora():
    plan = _serve_plan("--llama-server", "/opt/llama-server")
    assert plan["clients"] == [1, 16, 32]
    assert sorted(plan) == ["clients", "fastllm", "llama-server"]
    assert "--enable-lora" not in plan["fastllm"]["commands"]["32"]
    assert sorted(plan["llama-server"]["commands"]) == ["1", "16", "32"]


@pytest.fixture
def serve(monkeypatch):
    """benchmarks/serve.py as a module."""
    import importlib

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.delitem(sys.modules, "serve", raising=False)
    yield importlib.import_module("serve")
    sys.modules.pop("serve", None)


def test_serve_lora_loads_the_tests_adapter_builders(serve, monkeypatch):
    """--lora makes its adapters with the tests' own builders, found by path."""
    monkeypatch.delitem(sys.modules, "model_fixtures", raising=False)
    fixtures = serve.load_model_fixtures()
    assert fixtures.__file__ == str(Path(__file__).with_name("model_fixtures.py"))
    for name in ("load_hf_reference", "make_peft_adapter", "write_gguf_adapter"):
        assert callable(getattr(fixtures, name))
    assert len(fixtures.LORA_TARGETS) == 7


def test_serve_compares_texts_per_model_and_prompt(serve):
    a = {("lora0", 0): "abcdef", ("lora0", 1): "same", ("lora1", 0): "zzz",
         ("lora0", 2): "only here"}
    b = {("bench", 0): "abcxyz", ("bench", 1): "same", ("lora1", 0): "zzz"}
    assert serve.compare_texts(a, b, "lora0", "bench") == (1, 2, 3)  # prefixes 3 and 4: lower
    assert serve.compare_texts(a, b, "lora1", "lora1") == (1, 1, 3)
    assert serve.compare_texts(a, {}, "lora0", "bench") == (0, 0, 0)


def test_serve_lora_report_names_the_issue_ratios(serve, capsys):
    def result(name: str, tok_s: float, texts: dict) -> object:
        r = serve.Result(name, ready_s=1.0)
        r.levels[16] = serve.Level(16, 32, tokens=int(tok_s * 10), seconds=10.0)
        r.texts = texts
        return r

    base_texts = {("bench", k): f"base {k}" for k in range(8)}
    results = {r.name: r for r in [
        result("fastllm base", 400.0, base_texts),
        result("fastllm 2 adapters", 320.0, {("lora0", 0): "a", ("lora1", 1): "base 1"}),
        result("fastllm 1 adapter", 300.0, {(serve.GGUF_ADAPTER, 0): "a"}),
        result("llama-server 1 adapter", 120.0, {("bench", 0): "ab"}),
    ]}
    serve.report_lora(results, [16], 2, "bench")
    out = capsys.readouterr().out
    assert "16 clients: fastllm 1 adapter / llama-server 1 adapter: 2.50x  [target >= 2x]" in out
    assert "16 clients: fastllm 2 adapters / fastllm base: 0.80x (cost 20.0 %)  [target: cost" in out
    assert "fastllm 1 adapter / fastllm base: 0.75x (cost 25.0 %)\n" in out
    assert "llama-server base" not in out  # not measured: no row, no ratio
    assert "lora0 vs fastllm base: 1/1 changed" in out
    assert "lora1 vs fastllm base: 0/1 changed" in out
    assert "fastllm 1 adapter (GGUF) vs lora0 (PEFT): 1/1 identical" in out
    assert "fastllm 1 adapter vs llama-server 1 adapter: 0/1 identical, median common prefix 1" \
        in out


def test_serve_rounds_report_the_median_round_and_ratio(serve, capsys):
    def result(name: str, tok_s: float) -> object:
        r = serve.Result(name, ready_s=1.0)
        r.levels[16] = serve.Level(16, 32, tokens=int(tok_s * 10), seconds=10.0)
        r.peak_rss_mb[16] = 100.0
        return r

    rounds = [{"fastllm": result("fastllm", a), "llama-server": result("llama-server", b)}
              for a, b in ((300.0, 100.0), (200.0, 100.0), (330.0, 150.0))]
    merged = serve.merge_rounds(rounds)
    assert merged["fastllm"].rounds[16] == [300.0, 200.0, 330.0]
    assert merged["fastllm"].levels[16].tok_s == 300.0  # the median round
    assert merged["llama-server"].levels[16].tok_s == 100.0
    serve.report([merged["fastllm"], merged["llama-server"]], [16])
    out = capsys.readouterr().out
    assert "fastllm / llama-server: throughput 16 clients 3.00x" in out
    assert "300.0 / 100.0 = 3.00x, 200.0 / 100.0 = 2.00x, 330.0 / 150.0 = 2.20x" in out
    assert "median of the rounds' ratios 2.20x" in out
