"""Fidelity benchmark: fastllm's and llama.cpp's quantized CPU paths against the fp32 model.

How far each path's next-token distribution is from the fp32 model's, for both engines on the
same GGUF, scored alike in one run.

    python benchmarks/fidelity.py [--llama-perplexity PATH] [--llama-server PATH]
                                  [--model GGUF] [--chunks 48] [--ablation] [--greedy 64]

Text: the docstrings of a fixed list of Python standard library modules (each module's and its
public classes' and functions' docstrings, inspect.getdoc, in a fixed order), generated at run time
(~48k tokens with the default model's tokenizer; its sha256 is printed: another Python version
gives another text). The first chunks x 512 tokens are used (default 24,576).

Method: llama.cpp's `llama-perplexity --kl-divergence`. Each chunk of 512 tokens runs as one
sequence from position 0; positions 256..510 are scored (12,240 tokens at 48 chunks) against the
fp32 reference's distribution there: per-token KL(reference || path) over the entries the
reference gives more than e^-16, agreement of the two argmaxes (top-1), and the perplexity of
the next tokens (dPPL = path - reference).

Reference: HF transformers' LlamaForCausalLM in float32 on the GGUF's weights dequantized by
fastllm's loader (the values llama.cpp's Q4_1 -> F32 requantization writes too). Its
log-probabilities go into llama-perplexity's base-file format (uint16 per entry, cached in
--workdir); llama.cpp reads that file (its tokens included) and fastllm's paths are scored against
its decoded values with llama.cpp's formulas, so both engines meet one reference and one scoring.

Paths: fastllm's default CPU path as it loads on this CPU (the C++ decoder and output
projection the server runs, with its KV cache dtype; the output projection's layout depends on
VNNI, see FASTLLM_CPU_Q7_LM_HEAD) and its former default (7-bit output projection, no
refinement); with
--llama-perplexity, llama.cpp's Q4_1 run with its defaults, and its F32 run of the same weights
(the F32 file is made once with llama-quantize --allow-requantize from beside the binary) which
shows how near llama.cpp's own fp32 arithmetic is to the reference. --ablation switches the
former default's sources of divergence off one at a time (README "Fidelity").

Greedy agreement (the issue's measure, --greedy N passages, 0 to skip): N prompts of 64 tokens
from the text, 48 greedy tokens each (ignore_eos); per passage the tokens that equal the fp32
path's (fastllm's dequantized torch model) before the first difference; mean and the count of
passages that agree throughout. llama.cpp's come from --llama-server (started here).

Asserts nothing; never run by CI. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib
import inspect
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

N_CTX = 512
FIRST = N_CTX // 2  # llama-perplexity scores positions FIRST .. N_CTX - 2
SCORED = N_CTX - 1 - FIRST
MARGIN = 16.0  # llama-perplexity's: reference entries below e^-16 do not enter the KL sum

DOC_MODULES = (
    "textwrap", "string", "json", "collections", "itertools", "functools", "argparse", "logging",
    "pathlib", "datetime", "re", "random", "statistics", "fractions", "decimal", "heapq",
    "bisect", "difflib", "csv", "shutil", "subprocess", "threading", "queue", "contextlib",
    "dataclasses", "enum", "typing", "unittest", "doctest", "pydoc", "zipfile", "tarfile",
    "sqlite3", "urllib.parse", "http.client", "email.message", "base64", "hashlib")


def doc_text() -> str:
    """The standard library's own documentation as one text (module docstrings, then the public
    classes' and functions' docstrings longer than 200 characters, by name)."""
    parts = []
    for name in DOC_MODULES:
        module = importlib.import_module(name)
        if doc := inspect.getdoc(module):
            parts.append(doc)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or not (inspect.isclass(obj) or inspect.isfunction(obj)):
                continue
            if getattr(obj, "__module__", None) != module.__name__:
                continue
            doc = inspect.getdoc(obj)
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(parts)


# ---- llama-perplexity's base file ---------------------------------------------------------------


def row_width(vocab: int) -> int:
    """uint16 entries per scored row: 4 for the scale and offset (two floats), then the vocab."""
    return 2 * ((vocab + 1) // 2) + 4


def encode_rows(logits: np.ndarray) -> np.ndarray:
    """llama-perplexity's log_softmax to uint16: entries within 16 of the row's maximum on a
    65535-step scale, the rest 0."""
    logits = logits.astype(np.float32)
    top = logits.max(-1, keepdims=True)
    low = np.maximum(logits.min(-1, keepdims=True), top - np.float32(MARGIN))
    lse = np.log(np.exp((logits - top).astype(np.float64)).sum(-1, keepdims=True))
    min_log_prob = (low - top - lse.astype(np.float32)).astype(np.float32)
    scale = ((top - low) / np.float32(65535)).astype(np.float32)
    inv = np.where(scale > 0, np.float32(1) / np.where(scale > 0, scale, 1), 0)
    q = np.where(logits > low, np.rint(inv * (logits - low)), 0).astype(np.uint16)
    out = np.zeros((logits.shape[0], row_width(logits.shape[1])), np.uint16)
    out[:, :4] = np.concatenate([scale, min_log_prob], -1).view(np.uint16)
    out[:, 4:4 + logits.shape[1]] = q
    return out


class BaseFile:
    """A base file's header, tokens and per-chunk reference log-probabilities (memory-mapped)."""

    def __init__(self, path: Path):
        head = np.fromfile(path, np.uint8, 20)
        if head[:8].tobytes() != b"_logits_":
            raise ValueError(f"{path} is not a llama-perplexity logits file")
        self.path = path
        self.n_ctx, self.vocab, self.chunks = (int(v) for v in head[8:].view(np.int32))
        self.tokens = np.fromfile(path, np.int32, self.chunks * self.n_ctx, offset=20)
        offset = 20 + 4 * self.tokens.size
        scored = self.n_ctx - 1 - self.n_ctx // 2
        self.rows = np.memmap(path, np.uint16, "r", offset,
                              (self.chunks, scored, row_width(self.vocab)))

    def log_probs(self, chunk: int) -> np.ndarray:
        """float64 [scored, vocab] reference log-probabilities, decoded as llama.cpp does."""
        rows = np.asarray(self.rows[chunk])
        head = np.ascontiguousarray(rows[:, :4]).view(np.float32).astype(np.float64)
        return head[:, :1] * rows[:, 4:4 + self.vocab] + head[:, 1:2]


def write_base(path: Path, tokens: np.ndarray, chunk_rows: Iterator[np.ndarray], vocab: int):
    tmp = path.with_suffix(".part")
    with open(tmp, "wb") as f:
        f.write(b"_logits_")
        f.write(np.array([N_CTX, vocab, tokens.shape[0]], np.int32).tobytes())
        f.write(tokens.astype(np.int32).tobytes())
        f.writelines(encode_rows(rows).tobytes() for rows in chunk_rows)
    tmp.rename(path)


# ---- scoring --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    """Per-token values of one path: KL, whether the argmaxes agree, NLL of the path and of the
    reference."""

    kl: np.ndarray
    same_top: np.ndarray
    nll: np.ndarray
    nll_base: np.ndarray

    @property
    def ppl_base(self) -> float:
        return float(np.exp(self.nll_base.mean()))

    def cells(self) -> list[str]:
        """mean KL +- its standard error, p99 KL, top-1, PPL, dPPL +- its standard error (the
        uncertainties as llama-perplexity computes them)."""
        n = len(self.kl)
        ppl, base = float(np.exp(self.nll.mean())), self.ppl_base
        se, se_base = (float(np.std(v) / np.sqrt(n - 1)) for v in (self.nll, self.nll_base))
        cov = float(np.mean(self.nll * self.nll_base) - self.nll.mean() * self.nll_base.mean())
        diff_se = np.sqrt(max(0.0, (ppl * se) ** 2 + (base * se_base) ** 2
                              - 2 * ppl * base * cov / (n - 1)))
        return [f"{self.kl.mean():.6f} ± {np.std(self.kl) / np.sqrt(n - 1):.6f}",
                f"{np.percentile(self.kl, 99):.5f}", f"{100 * self.same_top.mean():.2f} %",
                f"{ppl:.4f}", f"{ppl - base:+.4f} ± {diff_se:.4f}"]


def score_chunk(base_log_probs: np.ndarray, logits: np.ndarray, targets: np.ndarray
                ) -> tuple[np.ndarray, ...]:
    """llama-perplexity's per-token statistics of one chunk: KL, same argmax, the path's NLL and
    the reference's NLL."""
    z = logits.astype(np.float64)
    log_q = z - z.max(-1, keepdims=True)
    log_q -= np.log(np.exp(log_q).sum(-1, keepdims=True))
    kept = base_log_probs > -MARGIN
    kl = (np.where(kept, np.exp(base_log_probs), 0.0) * (base_log_probs - log_q)).sum(-1)
    same = logits.argmax(-1) == base_log_probs.argmax(-1)
    rows = np.arange(len(targets))
    return kl, same, -log_q[rows, targets], -base_log_probs[rows, targets]


def score(base: BaseFile, chunks: int, logits_of: Callable[[np.ndarray], np.ndarray]) -> Stats:
    """Stats of a path whose logits_of(chunk tokens) gives float32 [SCORED, vocab] logits of
    positions FIRST .. N_CTX - 2."""
    parts = []
    for c in range(chunks):
        tokens = base.tokens[c * N_CTX:(c + 1) * N_CTX]
        parts.append(score_chunk(base.log_probs(c), logits_of(tokens), tokens[FIRST + 1:]))
    return Stats(*(np.concatenate(values) for values in zip(*parts)))


# ---- the fp32 reference ---------------------------------------------------------------------------


def reference_base(args, source, config, tokens: np.ndarray) -> Path:
    """The base file of the HF fp32 reference for these tokens, computed once per (model,
    tokens) and kept in the work dir."""
    key = hashlib.sha256(Path(source.gguf_path).name.encode() + tokens.tobytes()).hexdigest()
    path = Path(args.workdir) / f"reference-{key[:16]}.logits"
    if path.exists():
        print(f"fp32 reference: cached {path}", flush=True)
        return path
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastllm.loader import iterate_weights

    torch.set_num_threads(args.threads)
    c = config
    hf_config = LlamaConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
        max_position_embeddings=c.max_position_embeddings, rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta, rope_scaling=c.rope_scaling,
        tie_word_embeddings=c.tie_word_embeddings, attn_implementation="sdpa")
    model = LlamaForCausalLM(hf_config).float().eval()
    missing, unexpected = model.load_state_dict(
        dict(iterate_weights(source, "gguf", torch.float32)), strict=False)
    tied = c.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    if unexpected or set(missing) - ({"lm_head.weight"} if tied else set()):
        raise RuntimeError(f"reference weights: missing {missing}, unexpected {unexpected}")
    chunks = tokens.reshape(-1, N_CTX)
    print(f"fp32 reference: HF transformers float32, {len(chunks)} chunks ...", flush=True)
    t0 = time.perf_counter()

    def rows():
        for chunk in chunks:
            with torch.no_grad():
                logits = model(torch.from_numpy(chunk.astype(np.int64))[None],
                               logits_to_keep=N_CTX - FIRST).logits[0, :SCORED]
            yield logits.float().numpy()

    path.parent.mkdir(parents=True, exist_ok=True)
    write_base(path, chunks, rows(), c.vocab_size)
    print(f"  {time.perf_counter() - t0:.0f} s -> {path}", flush=True)
    return path


# ---- fastllm paths --------------------------------------------------------------------------------


@contextlib.contextmanager
def environment(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


FORMER = {"FASTLLM_CPU_Q7_LM_HEAD": "1", "FASTLLM_CPU_LM_HEAD_REFINE": "0"}


@dataclasses.dataclass
class Variant:
    name: str
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    kv_dtype: str = "float16"
    float_layers: tuple[str, ...] = ()  # layer linears switched to F32 (no activation rounding)
    float_head: bool = False  # the output projection as F32 rows of its (env's) layout's values


def ablation_variants() -> list[Variant]:
    """The former default with one source of divergence off at a time, then the choices behind
    the new default."""
    from fastllm.models.fidelity import LAYER_LINEARS

    unrefined = {"FASTLLM_CPU_Q7_LM_HEAD": "0", "FASTLLM_CPU_LM_HEAD_REFINE": "0"}
    eight_bit = {"FASTLLM_CPU_Q7_LM_HEAD": "0"}
    seven_bit = {"FASTLLM_CPU_Q7_LM_HEAD": "1"}
    rows = [
        Variant("former default: Q7_0x8 head, int8 activations, fp16 KV", FORMER),
        Variant("  8-bit head (Q8_0x8: the file's values, int8 activations)", unrefined),
        Variant("  float head (the file's values, float activations)", unrefined,
                float_head=True),
        Variant("  fp32 KV cache", FORMER, kv_dtype="float32"),
    ]
    rows += [Variant(f"  float activations into {name}", FORMER, float_layers=(name,))
             for name in LAYER_LINEARS]
    rows += [
        Variant("  float activations into every layer linear", FORMER,
                float_layers=LAYER_LINEARS),
        Variant("  all off (F32 everywhere, fp32 KV): fastllm's arithmetic only", unrefined,
                kv_dtype="float32", float_layers=LAYER_LINEARS, float_head=True),
        Variant("8-bit head, 8 logits refined", {**eight_bit, "FASTLLM_CPU_LM_HEAD_REFINE": "8"}),
        Variant("8-bit head, 32 refined (the default with VNNI)", eight_bit),
        Variant("8-bit head, 128 refined", {**eight_bit, "FASTLLM_CPU_LM_HEAD_REFINE": "128"}),
        Variant("7-bit head, 32 refined from the Q8_0 table",
                {**seven_bit, "FASTLLM_CPU_LM_HEAD_REFINE": "32"}),
        Variant("7-bit head, 128 refined from the Q8_0 table (the default without VNNI)",
                seven_bit),
        Variant("8-bit head, 32 refined, fp32 KV cache", eight_bit, kv_dtype="float32"),
    ]
    return rows


def load_model(variant: Variant, config, source):
    from fastllm.models.cpu_model import load_cpu_model

    with environment(**variant.env):
        model = load_cpu_model(config, source, "float32", variant.kv_dtype)
    if model is None:
        raise RuntimeError("the native CPU decoder does not run this model")
    return model


def describe(model, kv_dtype: str) -> str:
    """The output projection and KV cache of a loaded CpuModel, for the table."""
    from fastllm.kernels import quant_gemm_cpu_isa
    from fastllm.models.native_cpu import Q7_0X8

    head = "Q7_0x8" if model.lm_head[1] == Q7_0X8 else "Q8_0x8"
    refined = "no refinement"
    if model.lm_head_refine:
        source = " from the Q8_0 table" if model.refine_rows is not None else ""
        refined = f"{model.lm_head_refine} logits refined{source}"
    return (f"{head} head, {refined}, {'fp16' if kv_dtype == 'float16' else 'fp32'} KV; "
            f"{quant_gemm_cpu_isa()}")


def fastllm_logits_of(variant: Variant, config, source, model=None
                      ) -> Callable[[np.ndarray], np.ndarray]:
    from fastllm.models import fidelity

    if model is None:
        model = load_model(variant, config, source)
    if variant.float_layers or variant.float_head:
        model = fidelity.float_linears(model, variant.float_layers, lm_head=variant.float_head)
    rows = slice(FIRST, N_CTX - 1)
    return lambda tokens: fidelity.sequence_logits(model, tokens, variant.kv_dtype, rows)


# ---- llama.cpp --------------------------------------------------------------------------------------


def llama_f32_file(args, quantize: Path) -> Path:
    path = Path(args.workdir) / (Path(args.model).stem + ".F32.gguf")
    if not path.exists():
        print(f"llama.cpp: {quantize.name} --allow-requantize {args.model} -> F32", flush=True)
        tmp = path.with_suffix(".part.gguf")
        subprocess.run([str(quantize), "--allow-requantize", args.model, str(tmp), "F32"],
                       check=True, capture_output=True)
        tmp.rename(path)
    return path


_NUMBER = r"(-?[\d.]+)"
_LLAMA_FIELDS = {
    "ppl": rf"Mean PPL\(Q\)\s*:\s*{_NUMBER}",
    "ppl_base": rf"Mean PPL\(base\)\s*:\s*{_NUMBER}",
    "dppl": rf"Mean PPL\(Q\)-PPL\(base\)\s*:\s*{_NUMBER}",
    "dppl_se": rf"Mean PPL\(Q\)-PPL\(base\)\s*:\s*-?[\d.]+\s*±\s*{_NUMBER}",
    "kl": rf"Mean\s+KLD:\s*{_NUMBER}",
    "kl_se": rf"Mean\s+KLD:\s*[\d.]+\s*±\s*{_NUMBER}",
    "kl99": rf"99\.0%\s+KLD:\s*{_NUMBER}",
    "top": rf"Same top p:\s*{_NUMBER}",
}


def llama_perplexity(args, model: Path, base: Path, extra: list[str]) -> dict[str, float]:
    cmd = [args.llama_perplexity, "-m", str(model), "--kl-divergence-base", str(base),
           "--kl-divergence", "-c", str(N_CTX), "-b", str(N_CTX), "-t", str(args.threads),
           *extra]
    print(f"llama.cpp: {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, check=False, capture_output=True, text=True)
    log = out.stdout + out.stderr
    found = {k: re.search(p, log) for k, p in _LLAMA_FIELDS.items()}
    if out.returncode != 0 or not all(found.values()):
        raise RuntimeError(f"llama-perplexity failed ({out.returncode}):\n{log[-3000:]}")
    print(f"  {time.perf_counter() - t0:.0f} s", flush=True)
    return {k: float(m.group(1)) for k, m in found.items()}


def llama_cells(r: dict[str, float]) -> list[str]:
    return [f"{r['kl']:.6f} ± {r['kl_se']:.6f}", f"{r['kl99']:.5f}", f"{r['top']:.2f} %",
            f"{r['ppl']:.4f}", f"{r['dppl']:+.4f} ± {r['dppl_se']:.4f}"]


# ---- greedy continuations -------------------------------------------------------------------------

GREEDY_PROMPT, GREEDY_TOKENS = 64, 48


def greedy_prompts(tokens: np.ndarray, n: int) -> list[list[int]]:
    step = (len(tokens) - GREEDY_PROMPT) // n
    return [tokens[i * step:i * step + GREEDY_PROMPT].tolist() for i in range(n)]


def fastllm_greedy(prompts: list[list[int]], env: dict[str, str], **llm_args) -> list[list[int]]:
    from fastllm import LLM, SamplingParams

    with environment(**env):
        llm = LLM(max_model_len=1024, **llm_args)
    params = SamplingParams(temperature=0.0, max_tokens=GREEDY_TOKENS, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    del llm
    return [list(o.outputs[0].token_ids) for o in outs]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def llama_server_greedy(args, prompts: list[list[int]]) -> list[list[int]]:
    port = free_port()
    cmd = [args.llama_server, "-m", args.model, "-t", str(args.threads), "-np", "4", "-c",
           str(4 * 1024), "--host", "127.0.0.1", "--port", str(port)]
    print(f"llama.cpp: {' '.join(cmd)}", flush=True)
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return _greedy_requests(f"http://127.0.0.1:{port}", proc, prompts)
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)


def _greedy_requests(base: str, proc: subprocess.Popen, prompts: list[list[int]]
                     ) -> list[list[int]]:
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as r:
                if r.status == 200:
                    break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("llama-server did not start") from None
            time.sleep(0.2)
    outs = []
    for prompt in prompts:
        body = json.dumps({"prompt": prompt, "n_predict": GREEDY_TOKENS, "temperature": 0.0,
                           "top_k": 1, "ignore_eos": True, "cache_prompt": False,
                           "return_tokens": True}).encode()
        req = urllib.request.Request(f"{base}/completion", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=300) as r:
            outs.append(json.loads(r.read())["tokens"])
    return outs


def agreement(ours: list[list[int]], reference: list[list[int]]) -> str:
    prefix = [next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), min(len(x), len(y)))
              for x, y in zip(ours, reference)]
    full = sum(p == GREEDY_TOKENS for p in prefix)
    return f"{np.mean(prefix):.1f} ({full}/{len(prefix)})"


# ---- main -------------------------------------------------------------------------------------------


def table(title: str, rows: list[tuple[str, list[str]]], extra: str | None = None) -> None:
    heads = ["path", "mean KL", "p99 KL", "top-1", "PPL", "dPPL"] + ([extra] if extra else [])
    print(f"\n{title}\n| " + " | ".join(heads) + " |\n" + "|---" * len(heads) + "|")
    for name, cells in rows:
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    ap.add_argument("--llama-perplexity", default=None,
                    help="llama.cpp's llama-perplexity (llama-quantize beside it makes the F32 "
                         "file)")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server (greedy)")
    ap.add_argument("--chunks", type=int, default=48, help="chunks of 512 tokens (>= 40: 20k)")
    ap.add_argument("--ablation", action="store_true", help="switch sources off one at a time")
    ap.add_argument("--ablation-chunks", type=int, default=0,
                    help="chunks for the ablation rows (default: --chunks)")
    ap.add_argument("--greedy", type=int, default=64, help="greedy passages (0: skip)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", default=os.path.expanduser("~/.cache/fastllm-bench/fidelity"),
                    help="where the reference logits and llama.cpp's F32 file are kept")
    args = ap.parse_args()

    from fastllm.config import EngineArgs, ModelConfig
    from fastllm.loader import default_gguf_path, load_config, resolve_model
    from fastllm.tokenizer import load_tokenizer

    args.model = args.model or default_gguf_path()
    source = resolve_model(args.model)
    config = ModelConfig.from_dict(load_config(source), EngineArgs())
    text = doc_text()
    all_tokens = np.array(load_tokenizer(source).encode(text, add_special_tokens=False), np.int32)
    if len(all_tokens) < args.chunks * N_CTX:
        raise SystemExit(f"the text has {len(all_tokens)} tokens, fewer than {args.chunks} x "
                         f"{N_CTX}")
    tokens = all_tokens[:args.chunks * N_CTX]
    print(f"text: Python {sys.version.split()[0]} standard library docstrings, "
          f"{len(text)} characters (sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]}), "
          f"{len(all_tokens)} tokens; {args.chunks} chunks of {N_CTX} = {len(tokens)} tokens, "
          f"{args.chunks * SCORED} scored", flush=True)

    base = BaseFile(reference_base(args, source, config, tokens))
    rows: list[tuple[str, list[str]]] = []
    reference_ppl = None
    for name, variant in (("fastllm default", Variant("default")),
                          ("fastllm former default", Variant("former", FORMER))):
        t0 = time.perf_counter()
        model = load_model(variant, config, source)
        name = f"{name} ({describe(model, variant.kv_dtype)})"
        stats = score(base, args.chunks, fastllm_logits_of(variant, config, source, model))
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        rows.append((name, stats.cells()))
        reference_ppl = stats.ppl_base
    llama_q4_row = None
    if args.llama_perplexity:
        llama_q4_row = "llama.cpp (llama-perplexity defaults: f16 KV)"
        rows.append((llama_q4_row, llama_cells(llama_perplexity(args, Path(args.model),
                                                                base.path, []))))
        quantize = Path(args.llama_perplexity).with_name("llama-quantize")
        if quantize.exists():
            f32 = llama_f32_file(args, quantize)
            rows.append(("llama.cpp F32 of the same weights (f32 KV)", llama_cells(
                llama_perplexity(args, f32, base.path, ["-ctk", "f32", "-ctv", "f32"]))))
        else:
            print(f"llama.cpp: no {quantize}: its F32 row is skipped", flush=True)

    greedy: dict[str, str] = {}
    if args.greedy:
        prompts = greedy_prompts(all_tokens, args.greedy)
        t0 = time.perf_counter()
        reference = fastllm_greedy(prompts, {}, quantized_weights="dequantize")
        greedy[rows[0][0]] = agreement(fastllm_greedy(prompts, {}), reference)
        greedy[rows[1][0]] = agreement(fastllm_greedy(prompts, FORMER), reference)
        if args.llama_server and llama_q4_row:
            greedy[llama_q4_row] = agreement(llama_server_greedy(args, prompts), reference)
        print(f"greedy continuations: {time.perf_counter() - t0:.0f} s", flush=True)
    if greedy:
        rows = [(name, cells + [greedy.get(name, "-")]) for name, cells in rows]

    ablation: list[tuple[str, list[str]]] = []
    chunks = args.ablation_chunks or args.chunks
    if args.ablation:
        for variant in ablation_variants():
            t0 = time.perf_counter()
            stats = score(base, chunks, fastllm_logits_of(variant, config, source))
            print(f"{variant.name.strip()}: {time.perf_counter() - t0:.0f} s", flush=True)
            ablation.append((variant.name, stats.cells()))

    table(f"Fidelity against the fp32 reference ({Path(args.model).name}; {args.chunks * SCORED} "
          f"tokens scored; reference PPL {reference_ppl:.4f})", rows,
          f"greedy tokens agreeing of {GREEDY_TOKENS} (all {GREEDY_TOKENS})" if greedy else None)
    if ablation:
        table(f"Ablation ({chunks * SCORED} tokens scored): the former default with one source "
              "off at a time, then the new default's choices", ablation)


if __name__ == "__main__":
    main()
