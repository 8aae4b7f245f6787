"""fastllm-serve's command line and process life: every flag of the specification is known and
classified, bad values fail at parse time with one line, the socket is bound before readiness is
reported, and SIGINT/SIGTERM drain in-flight requests up to --shutdown-timeout, then abort them
with a proper ending."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from fastllm.entrypoints.openai.cli_args import (
    ACTS,
    DEFAULT_MODEL,
    FLAGS,
    IGNORED,
    UNSUPPORTED,
    _OptionalBool,
    ignored_flag_warnings,
    make_parser,
    parse_args,
)

ROOT = Path(__file__).resolve().parents[2]
SPEC_DIR = Path(os.environ.get("FASTLLM_SPEC_DIR", "/work/shared/spec"))
# The pages of the specification that list the server's flags (see the spec's README.md).
SPEC_SERVER_PAGES = ("001_095e10741848e87f.txt", "002_f980969ce578a830.txt",
                     "004_ca2bd3539fe8bc0b.txt")
# Every --flag of those pages, for machines without the specification (kept equal to it below).
SPEC_FLAGS = set(re.findall(r"\S+", """
--allow-credentials --allowed-headers --allowed-methods --allowed-origins --api-key --block-size
--chat-template --code-revision --collect-detailed-traces --config --config-format
--cpu-offload-gb --device --disable-async-output-proc --disable-custom-all-reduce
--disable-frontend-multiprocessing --disable-image-processor --disable-log-requests
--disable-log-stats --disable-logprobs-during-spec-decoding --disable-sliding-window
--distributed-executor-backend --download-dir --dtype --enable-auto-tool-choice
--enable-chunked-prefill --enable-lora --enable-prefix-caching --enable-prompt-adapter
--enforce-eager --engine-use-ray --fully-sharded-loras --gpu-memory-utilization
--guided-decoding-backend --host --ignore-patterns --image-feature-size --image-input-shape
--image-input-type --image-processor --image-processor-revision --image-token-id
--kv-cache-dtype --limit-mm-per-prompt --load-format --long-lora-scaling-factors --lora-dtype
--lora-extra-vocab-size --lora-modules --max-context-len-to-capture --max-cpu-loras
--max-log-len --max-logprobs --max-lora-rank --max-loras --max-model-len
--max-num-batched-tokens --max-num-seqs --max-parallel-loading-workers
--max-prompt-adapter-token --max-prompt-adapters --max-seq-len-to-capture --middleware --model
--model-loader-extra-config --ngram-prompt-lookup-max --ngram-prompt-lookup-min
--num-gpu-blocks-override --num-lookahead-slots --num-scheduler-steps --num-speculative-tokens
--otlp-traces-endpoint --override-neuron-config --pipeline-parallel-size --port
--preemption-mode --preemption_mode --prompt-adapters --qlora-adapter-name-or-path
--quantization --quantization-param-path --ray-workers-use-nsight --response-role
--return-tokens-as-token-ids --revision --root-path --rope-scaling --rope-theta
--scheduler-delay-factor --seed --served-model-name --skip-tokenizer-init
--spec-decoding-acceptance-method --speculative-disable-by-batch-size
--speculative-draft-tensor-parallel-size --speculative-max-model-len --speculative-model
--speculative-model-quantization --ssl-ca-certs --ssl-cert-reqs --ssl-certfile --ssl-keyfile
--swap-space --tensor-parallel-size --tokenizer --tokenizer-mode --tokenizer-pool-extra-config
--tokenizer-pool-size --tokenizer-pool-type --tokenizer-revision --tool-call-parser
--trust-remote-code --typical-acceptance-sampler-posterior-alpha
--typical-acceptance-sampler-posterior-threshold --use-v2-block-manager --uvicorn-log-level
--worker-use-ray
"""))
SPEC_SHORT_FLAGS = ("-pp", "-tp", "-q", "-spec-draft-tp")


def spec_flags() -> set[str]:
    if not SPEC_DIR.is_dir():
        return SPEC_FLAGS
    found: set[str] = set()
    for name in SPEC_SERVER_PAGES:
        found |= set(re.findall(r"--[a-z][a-z0-9_-]*", (SPEC_DIR / name).read_text("utf-8")))
    assert found == SPEC_FLAGS  # the snapshot above follows the specification
    return found


def options() -> dict[str, argparse.Action]:
    return {s: a for a in make_parser()._actions for s in a.option_strings}


def parse_error(argv, capsys, environ=None) -> str:
    with pytest.raises(SystemExit) as e:
        parse_args(argv, environ=environ or {})
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "usage:" not in err, err  # one line, no usage block
    return err.strip()


# ---- item 14: every flag of the specification -------------------------------------------------

def test_every_spec_flag_is_parsed_and_classified():
    known = options()
    missing = sorted(f for f in spec_flags() | set(SPEC_SHORT_FLAGS) if f not in known)
    assert missing == []
    dests = {a.dest for a in known.values()} - {"help"}
    assert dests == set(FLAGS)  # one table classifies every flag, and only flags
    assert {kind for kind, _ in FLAGS.values()} == {ACTS, UNSUPPORTED, IGNORED}
    for dest, (kind, why) in FLAGS.items():
        assert kind == ACTS or why, dest  # unsupported and ignored flags say why


def test_spec_spellings_parse():
    ns = parse_args(["--preemption_mode", "swap", "--enable-chunked-prefill", "false",
                     "--enforce-eager", "--use-v2-block-manager",
                     "--max-seq-len-to-capture", "4096"], environ={})
    assert ns.preemption_mode == "swap" and ns.enable_chunked_prefill is False
    assert parse_args(["--enable-chunked-prefill"], environ={}).enable_chunked_prefill is True
    assert parse_args(["--no-enable-chunked-prefill"],
                      environ={}).enable_chunked_prefill is False
    assert ignored_flag_warnings(ns) == [
        f"--{d.replace('_', '-')} is ignored: {FLAGS[d][1]}"
        for d in ("use_v2_block_manager", "enforce_eager", "max_seq_len_to_capture")]
    assert ignored_flag_warnings(parse_args([], environ={})) == []


def _non_default_argv(flag: str, action: argparse.Action) -> list[str]:
    if isinstance(action, argparse._StoreTrueAction):
        return [flag]
    if isinstance(action, _OptionalBool):
        return [flag, "true"]
    if action.choices:
        return [flag, str(next(c for c in action.choices if c != action.default))]
    if isinstance(action.default, (int, float)) and not isinstance(action.default, bool):
        return [flag, str(int(action.default) + 1)]
    if action.type is not None and getattr(action.type, "ranged", False):
        return [flag, "1"]
    return [flag, "x=y" if action.nargs == "+" else "x"]


@pytest.mark.parametrize("dest", sorted(d for d, (k, _) in FLAGS.items() if k == UNSUPPORTED))
def test_unsupported_flag_exits_naming_itself(dest, capsys):
    flag = "--" + dest.replace("_", "-")
    action = options()[flag]
    assert parse_args([], environ={}) is not None  # its default is accepted
    err = parse_error(_non_default_argv(flag, action), capsys)
    assert err.startswith(f"fastllm-serve: {flag}=") and FLAGS[dest][1] in err


@pytest.mark.parametrize("dest", sorted(d for d, (k, _) in FLAGS.items() if k == IGNORED))
def test_ignored_flag_is_accepted_with_a_warning(dest):
    flag = "--" + dest.replace("_", "-")
    ns = parse_args(_non_default_argv(flag, options()[flag]), environ={})
    assert ignored_flag_warnings(ns) == [f"{flag} is ignored: {FLAGS[dest][1]}"]


def test_unknown_flag_is_one_line_with_a_close_match(capsys):
    assert parse_error(["--max-num-seq", "3"], capsys) == \
        "fastllm-serve: unknown flag --max-num-seq (did you mean --max-num-seqs?)"
    assert parse_error(["--enable-prefix-cache"], capsys) == \
        "fastllm-serve: unknown flag --enable-prefix-cache (did you mean --enable-prefix-caching?)"
    assert parse_error(["--zzzz=1"], capsys) == \
        "fastllm-serve: unknown flag --zzzz (see fastllm-serve --help)"


def test_help_describes_every_flag_and_names_the_default_model():
    parser = make_parser()
    undescribed = [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert undescribed == []
    text = parser.format_help()
    assert DEFAULT_MODEL in " ".join(text.split())
    assert DEFAULT_MODEL in " ".join((ROOT / "README.md").read_text("utf-8").split())


# ---- item 15: the environment ----------------------------------------------------------------

def test_readme_names_the_environment_exclusions():
    from fastllm.entrypoints.openai.cli_args import _ENV_EXCLUDED

    readme = " ".join((ROOT / "README.md").read_text("utf-8").split())
    for dest in _ENV_EXCLUDED:
        assert f"`FASTLLM_{dest.upper()}`" in readme
    assert "FASTLLM_PORT" in readme and "not read" in readme
    # and they really are not read
    assert parse_args([], environ={"FASTLLM_PORT": "9", "FASTLLM_HOST": "h"}).port == 8000


# ---- item 8: ranges at parse time --------------------------------------------------------------

@pytest.mark.parametrize("argv", [
    ["--port", "99999"], ["--port", "-1"], ["--port", "80.5"], ["--max-num-seqs", "0"],
    ["--gpu-memory-utilization", "0"], ["--gpu-memory-utilization", "1.5"],
    ["--gpu-memory-utilization", "nan"], ["--swap-space", "-1"], ["--max-logprobs", "-1"],
    ["--max-model-len", "1"], ["--seed", "-3"], ["--max-num-batched-tokens", "0"],
    ["--num-gpu-blocks-override", "0"], ["--shutdown-timeout", "-1"], ["--max-log-len", "-2"],
    ["--rope-theta", "0"], ["--ssl-cert-reqs", "3"], ["--tensor-parallel-size", "0"],
])
def test_numeric_flag_out_of_range_fails_at_parse_time(argv, capsys):
    err = parse_error(argv, capsys)
    assert err.startswith(f"fastllm-serve: argument {argv[0]}") and argv[1] in err


def test_ranges_also_apply_to_environment_and_config(tmp_path, capsys):
    err = parse_error([], capsys, environ={"FASTLLM_MAX_NUM_SEQS": "0"})
    assert "FASTLLM_MAX_NUM_SEQS='0'" in err and ">= 1" in err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("gpu-memory-utilization: 2\n")
    err = parse_error(["--config", str(cfg)], capsys)
    assert "gpu-memory-utilization" in err and "(0, 1]" in err
    ns = parse_args(["--port", "65535", "--gpu-memory-utilization", "1", "--swap-space", "0",
                     "--max-logprobs", "0", "--max-model-len", "2"], environ={})
    assert (ns.port, ns.gpu_memory_utilization, ns.swap_space, ns.max_logprobs,
            ns.max_model_len) == (65535, 1.0, 0.0, 0, 2)


# ---- the real server ---------------------------------------------------------------------------

class Server:
    """fastllm-serve in a subprocess on a free port (--port 0); collects its output."""

    def __init__(self, *args: str):
        cmd = [sys.executable, "-m", "fastllm.entrypoints.openai.api_server", "--host",
               "127.0.0.1", "--port", "0", "--disable-log-stats", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self.ready = threading.Event()
        self.base = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(120):
            self.proc.kill()
            raise RuntimeError("server did not start:\n" + self.output)

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"serving .* at (http://127\.0\.0\.1:(\d+))", line)
            if m and not self.ready.is_set():
                self.base = m.group(1)
                self.ready.set()
        self.ready.set()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()


def test_taken_port_fails_with_one_line_before_loading():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "fastllm.entrypoints.openai.api_server",
                              "--host", "127.0.0.1", "--port", str(port)],
                             check=False, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines()[-1].startswith(
        f"fastllm-serve: cannot listen on 127.0.0.1:{port}: ")
    assert "Traceback" not in out.stderr
    assert "serving" not in out.stderr + out.stdout and "startup complete" not in out.stderr


def read_stream(response: httpx.Response, on_first=None) -> list[str]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(line[len("data: "):])
            if len(events) == 1 and on_first is not None:
                on_first()
    return events


def test_sigterm_drains_then_aborts_the_rest():
    server = Server("--shutdown-timeout", "2", "--enforce-eager", "--return-tokens-as-token-ids")
    try:
        # readiness is reported only once the socket listens
        assert httpx.get(f"{server.base}/health", timeout=5).status_code == 200
        assert "--enforce-eager is ignored" in server.output
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time",
                "max_tokens": 2, "logprobs": 1, "temperature": 0}
        out = httpx.post(f"{server.base}/v1/completions", json=body, timeout=60).json()
        assert all(t.startswith("token_id:") for t in out["choices"][0]["logprobs"]["tokens"])

        sent = []

        def terminate():
            server.proc.send_signal(signal.SIGTERM)
            sent.append(time.monotonic())

        long = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time",
                "max_tokens": 3000, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.base}/v1/completions", json=long,
                          timeout=60) as r:
            events = read_stream(r, terminate)
        rc = server.wait(15)
        elapsed = time.monotonic() - sent[0]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["choices"][0]["finish_reason"] == "abort"
    assert rc == 0
    assert 1.8 <= elapsed < 2 + 10  # the request had its 2 s, then the process ended promptly
    assert "Traceback" not in server.output
    assert "aborted 1 unfinished request" in server.output


def test_in_flight_request_finishing_before_the_deadline_completes():
    server = Server("--shutdown-timeout", "60")
    try:
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time",
                "max_tokens": 16, "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{server.base}/v1/completions", json=body, timeout=60) as r:
            events = read_stream(r, lambda: server.proc.send_signal(signal.SIGTERM))
        rc = server.wait(20)  # well before the 60 s deadline
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    assert rc == 0 and "Traceback" not in server.output


def test_second_sigint_aborts_at_once_and_exits_quietly():
    server = Server("--shutdown-timeout", "120")
    result = {}
    try:
        body = {"model": "SmolLM2-135M-Instruct", "prompt": "Once upon a time",
                "max_tokens": 3000, "ignore_eos": True}

        def post():
            result["r"] = httpx.post(f"{server.base}/v1/completions", json=body, timeout=120)

        client = threading.Thread(target=post)
        client.start()
        time.sleep(1.5)
        server.proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        server.proc.send_signal(signal.SIGINT)
        rc = server.wait(15)  # not the 120 s drain
        client.join(15)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert rc == 0
    out = result["r"].json()
    assert out["choices"][0]["finish_reason"] == "abort"
    assert out["usage"]["completion_tokens"] > 0
    assert "Traceback" not in server.output and "CancelledError" not in server.output


# ---- EngineArgs is the one definition of the engine flags ----------------------------------------

def test_engine_flags_derive_from_engine_args(capsys):
    from dataclasses import fields

    from fastllm.config import BLOCK_SIZES, EngineArgs

    known = options()
    flag_fields = EngineArgs.flag_fields()
    assert {"block_size", "max_num_seqs", "enable_chunked_prefill"} <= {f.name for f in
                                                                         flag_fields}
    for f in flag_fields:
        action = known["--" + f.name.replace("_", "-")]
        assert action.dest == f.name and action.default == f.default, f.name
        # An engine field may be "ignored" when the Python API must accept it too (e.g.
        # disable_logprobs_during_spec_decoding: logprobs cost no extra pass here).
        assert action.help == f.metadata["help"] and FLAGS[f.name][0] in (ACTS, UNSUPPORTED,
                                                                           IGNORED)
    # Fields that are not flags stay off the command line.
    assert not any(f.name in FLAGS for f in fields(EngineArgs) if f not in flag_fields)
    assert known["--block-size"].choices == list(BLOCK_SIZES)
    assert parse_error(["--block-size", "12"], capsys).startswith(
        "fastllm-serve: argument --block-size: invalid choice: 12")
    # The command line, FASTLLM_* and --config become EngineArgs without a hand copy.
    ns = parse_args(["--block-size", "32", "--max-num-seqs", "3", "--no-enable-chunked-prefill",
                     "-tp", "1", "--rope-scaling", '{"rope_type": "linear", "factor": 2.0}'],
                    environ={"FASTLLM_MAX_LOGPROBS": "7"})
    args = EngineArgs.from_namespace(ns)
    assert (args.block_size, args.max_num_seqs, args.enable_chunked_prefill, args.max_logprobs,
            args.rope_scaling) == (32, 3, False, 7, {"rope_type": "linear", "factor": 2.0})
    assert EngineArgs.from_namespace(parse_args([], environ={})) == EngineArgs()
    args.validate()


def test_block_size_is_checked_once_against_the_allowed_values():
    from fastllm.config import BLOCK_SIZES, EngineArgs

    for size in BLOCK_SIZES:
        EngineArgs(block_size=size).validate()
    with pytest.raises(ValueError, match=r"^block_size must be 8, 16 or 32, got 12$"):
        EngineArgs(block_size=12).validate()
