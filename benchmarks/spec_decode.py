"""Speculative decoding benchmark: fastllm with and without n-gram speculation (and a draft
model when given), llama.cpp's llama-server plain and with `--spec-type ngram-simple`, on the
same GGUF, one server at a time in the same run.

    python benchmarks/spec_decode.py [--llama-server PATH] [--draft-model DRAFT.gguf]
                                     [--k 5] [--max-tokens 192] [--clients 1 4] [--repeats 1]

Two prompt sets (benchmarks/spec_prompts.py): `lookup`, chat requests whose answer repeats a
passage of the prompt (fix a typo in code, rename, copy-edit, quote), and `story`, free story
writing. Greedy, max_tokens fixed, EOS honoured (--ignore-eos to run every request to
max_tokens), streaming chat completions. At each concurrency the set's prompts are sent with
that many clients in flight; `--repeats` runs each (set, concurrency) again, and the median
tok/s is reported. Printed per (set, concurrency): aggregate output tok/s (tokens / wall time,
prefill included), the median per-stream decode tok/s (first token left out), TTFT p50,
fastllm's acceptance figures from /metrics (difference across the measurement: acceptance rate
and mean accepted length = tokens a sequence gains per verify step), llama-server's from its
/metrics, and the same-run ratios: fastllm spec / fastllm, fastllm spec / llama-server spec,
llama-server spec / llama-server. Greedy speculation must reproduce the non-speculative text
exactly: every fastllm spec output is compared with the non-speculative one of the same prompt
and concurrency, and differences are printed (with, as a control, whether fastllm's own
outputs at 1 and N clients agree). llama-server runs one server per concurrency with as many
slots (-np). Asserts nothing; never run by CI (`--dry-run` prints the plan as JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field

import httpx

from serve import (
    StreamClient,
    drive,
    fastllm_command,
    fastllm_env,
    free_port,
    llama_server_command,
    percentile,
    resolve_model,
    run_async,
    running_server,
    stream_request,
)
from spec_prompts import SETS

MODEL_NAME = "bench"
WARMUP = ("Repeat this line twice: alpha beta gamma delta epsilon zeta eta theta iota kappa "
          "lambda mu")


# ---- /metrics -----------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> {metric name: value}, summed over label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return out


@dataclass
class SpecCounts:
    """Cumulative speculation counters of a server. `steps` counts verify steps (a sequence's
    step that carried drafts); None when the server's gauges do not determine it."""

    drafts: float = 0.0
    accepted: float = 0.0
    steps: float | None = 0.0
    draft_s: float | None = None
    verify_s: float | None = None

    def __sub__(self, before: SpecCounts) -> SpecCounts:
        def sub(a, b):
            return None if a is None or b is None else a - b
        return SpecCounts(self.drafts - before.drafts, self.accepted - before.accepted,
                          sub(self.steps, before.steps), sub(self.draft_s, before.draft_s),
                          sub(self.verify_s, before.verify_s))

    def __add__(self, other: SpecCounts) -> SpecCounts:
        def add(a, b):
            return None if a is None or b is None else a + b
        return SpecCounts(self.drafts + other.drafts, self.accepted + other.accepted,
                          add(self.steps, other.steps), add(self.draft_s, other.draft_s),
                          add(self.verify_s, other.verify_s))

    def __str__(self) -> str:
        steps = "?" if self.steps is None else f"{self.steps:.0f}"
        return (f"{self.drafts:.0f} drafts, {self.accepted:.0f} accepted in {steps} verify "
                f"steps (acceptance {fmt(self.acceptance * 100, '.0f')} %, mean accepted "
                f"length {fmt(self.mean_accepted_length, '.2f')})")

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafts if self.drafts else float("nan")

    @property
    def mean_accepted_length(self) -> float:
        if not self.steps:
            return float("nan")
        return (self.accepted + self.steps) / self.steps


def fastllm_spec_counts(metrics: dict[str, float]) -> SpecCounts:
    """fastllm exports drafts, accepted drafts and the running mean accepted length
    (accepted + steps) / steps but not the step count: it follows as accepted / (mean - 1),
    exactly up to rounding (the gauge is a double). With nothing accepted yet the mean is 1 for
    any number of steps, so the count is unknown unless nothing was drafted either."""
    p = "fastllm:spec_decode_"
    drafts = metrics.get(p + "num_draft_tokens", 0.0)
    accepted = metrics.get(p + "num_accepted_tokens", 0.0)
    mean = metrics.get(p + "mean_accepted_length", 0.0)
    if drafts == 0:
        steps: float | None = 0.0
    elif accepted > 0 and mean > 1.0:
        steps = float(round(accepted / (mean - 1.0)))
    else:
        steps = None
    return SpecCounts(drafts, accepted, steps, metrics.get(p + "draft_time_seconds"),
                      metrics.get(p + "verify_time_seconds"))


def llama_spec_counts(metrics: dict[str, float]) -> SpecCounts:
    """llama-server (--metrics) counts drafts (one per verify step), draft tokens and
    accepted tokens."""
    p = "llamacpp:spec_decode_"
    return SpecCounts(metrics.get(p + "num_draft_tokens_total", 0.0),
                      metrics.get(p + "num_accepted_tokens_total", 0.0),
                      metrics.get(p + "num_drafts_total", 0.0))


# ---- configurations -----------------------------------------------------------------------


@dataclass
class Config:
    name: str
    engine: str  # "fastllm" | "llama-server"
    spec: str  # "none" | "ngram" | "draft"
    flags: list[str] = field(default_factory=list)


def fastllm_spec_config(args, method: str) -> dict:
    cfg: dict = {"method": method, "num_speculative_tokens": args.k,
                 "adaptive": not args.no_adaptive}
    if method == "ngram":
        cfg.update(prompt_lookup_min=args.ngram_min, prompt_lookup_max=args.ngram_max)
    else:
        cfg["model"] = args.draft_model
    if args.disable_by_batch_size:
        cfg["disable_by_batch_size"] = args.disable_by_batch_size
    return cfg


def configs(args) -> list[Config]:
    """The configurations to measure, peers after the fastllm one they are compared with."""
    out = [Config("fastllm", "fastllm", "none"),
           Config("fastllm-ngram", "fastllm", "ngram",
                  ["--speculative-config", json.dumps(fastllm_spec_config(args, "ngram"))])]
    if args.draft_model:
        out.append(Config("fastllm-draft", "fastllm", "draft",
                          ["--speculative-config",
                           json.dumps(fastllm_spec_config(args, "draft_model"))]))
    if args.llama_server:
        # ngram-simple matches exactly size_n tokens and drafts at most size_m; it drafts
        # nothing when fewer than size_n tokens follow the match, so size_n <= size_m.
        n = args.llama_ngram_n or min(args.ngram_max, args.k)
        m = args.llama_ngram_m or args.k
        out.append(Config("llama-server", "llama-server", "none", ["--metrics"]))
        out.append(Config("llama-server-ngram", "llama-server", "ngram",
                          ["--metrics", "--spec-type", "ngram-simple",
                           "--spec-ngram-simple-size-n", str(n),
                           "--spec-ngram-simple-size-m", str(m),
                           "--spec-draft-n-max", str(args.k)]))
        if args.draft_model:
            out.append(Config("llama-server-draft", "llama-server", "draft",
                              ["--metrics", "--spec-type", "draft-simple",
                               "--spec-draft-model", args.draft_model,
                               "--spec-draft-n-max", str(args.k)]))
    return out


def command(args, cfg: Config, port: int, clients: int) -> list[str]:
    extra = cfg.flags + (args.fastllm_args.split() if cfg.engine == "fastllm"
                         else args.llama_args.split())
    if cfg.engine == "fastllm":
        return fastllm_command(args.model, port, MODEL_NAME, args.ctx_per_slot, extra)
    return llama_server_command(args.llama_server, args.model, port, MODEL_NAME, args.threads,
                                clients, args.ctx_per_slot, extra)


# ---- measurement --------------------------------------------------------------------------


@dataclass
class Measure:
    """One (configuration, set, concurrency): every repeat pooled except tok/s (median)."""

    tok_s: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0
    prompt_tokens: list[int] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    decode_tok_s: list[float] = field(default_factory=list)
    # prompt index -> the texts it produced (more than one: not deterministic across repeats)
    texts: dict[int, list[str]] = field(default_factory=dict)
    spec: SpecCounts | None = None
    error: str | None = None

    @property
    def median_tok_s(self) -> float:
        return statistics.median(self.tok_s) if self.tok_s else float("nan")


async def measure_once(base: str, prompts: list[str], clients: int, args, m: Measure) -> None:
    url = f"{base}/v1/chat/completions"
    tokens = 0

    async def handle(client: StreamClient, i: int) -> None:
        nonlocal tokens
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": prompts[i]}],
                "max_tokens": args.max_tokens, "temperature": 0.0}
        if args.ignore_eos:
            body["ignore_eos"] = True
        out = await stream_request(client, url, body)
        tokens += out.tokens
        m.requests += 1
        if out.prompt_tokens:
            m.prompt_tokens.append(out.prompt_tokens)
        if out.ttft is not None:
            m.ttft.append(out.ttft)
        if not math.isnan(out.decode_tok_s):
            m.decode_tok_s.append(out.decode_tok_s)
        m.texts.setdefault(i, []).append(out.text)

    seconds = await drive(clients, list(range(len(prompts))), handle)
    m.tokens += tokens
    m.tok_s.append(tokens / seconds if seconds else 0.0)


def spec_counts(engine: str, base: str) -> SpecCounts:
    text = httpx.get(f"{base}/metrics", timeout=30.0).text
    metrics = parse_metrics(text)
    return fastllm_spec_counts(metrics) if engine == "fastllm" else llama_spec_counts(metrics)


def run_server(args, cfg: Config, levels: list[int], results: dict) -> None:
    """One server of `cfg` measures every set at the concurrencies `levels`; fills
    results[(cfg.name, set, clients)]."""
    port = free_port()
    cmd = command(args, cfg, port, max(levels))
    env = fastllm_env(args.threads) if cfg.engine == "fastllm" else None
    try:
        with running_server(cfg.name, cmd, port, args.ready_timeout, env) as server:
            if cfg.engine == "fastllm" and cfg.spec != "none":
                with open(server.log_path) as log:  # the startup line that names the method
                    said = [ln.strip() for ln in log if "speculative decoding:" in ln]
                print("  " + (said[-1] if said else "(no 'speculative decoding:' line in log)"))
            warm = Measure()
            run_async(measure_once(server.base, [WARMUP], 1,
                                     argparse.Namespace(max_tokens=16, ignore_eos=False), warm))
            for set_name in args.sets:
                prompts = SETS[set_name][:args.prompts or None]
                for clients in levels:
                    m = results.setdefault((cfg.name, set_name, clients), Measure())
                    before = spec_counts(cfg.engine, server.base) if cfg.spec != "none" else None
                    for _ in range(args.repeats):
                        run_async(measure_once(server.base, prompts, clients, args, m))
                    if before is not None:
                        m.spec = spec_counts(cfg.engine, server.base) - before
                    print(f"  {set_name:<6} {clients:>2} clients: {m.median_tok_s:7.1f} tok/s"
                          + (f", {m.spec}" if m.spec else ""), flush=True)
    except (RuntimeError, OSError, httpx.HTTPError, ValueError) as e:  # reported, not fatal
        error = f"{type(e).__name__}: {e}"
        print(f"  failed: {error}", flush=True)
        for set_name in args.sets:
            for clients in levels:
                results.setdefault((cfg.name, set_name, clients), Measure()).error = error


# ---- report -------------------------------------------------------------------------------


def first_difference(a: str, b: str) -> int:
    """Index of the first character where a and b differ (len of the shorter when one is a
    prefix of the other); -1 when equal."""
    if a == b:
        return -1
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare_texts(a: Measure, b: Measure) -> tuple[int, int, list[str]]:
    """(identical prompts, compared prompts, descriptions of the differences)."""
    same, total, notes = 0, 0, []
    for i in sorted(set(a.texts) & set(b.texts)):
        total += 1
        ta, tb = a.texts[i], b.texts[i]
        if len(set(ta)) == 1 and set(ta) == set(tb):
            same += 1
            continue
        if len(set(ta)) > 1 or len(set(tb)) > 1:
            notes.append(f"prompt {i}: not deterministic across repeats "
                         f"({len(set(ta))} and {len(set(tb))} distinct texts)")
            continue
        x, y = ta[0], tb[0]
        d = first_difference(x, y)
        notes.append(f"prompt {i}: differ at char {d} of {len(x)}/{len(y)}: "
                     f"{x[max(0, d - 30):d + 30]!r} vs {y[max(0, d - 30):d + 30]!r}")
    return same, total, notes


def fmt(x: float, spec: str = ".1f") -> str:
    return "-" if math.isnan(x) else format(x, spec)


def ratio(get: dict, a: str, b: str) -> str | None:
    ma, mb = get.get(a), get.get(b)
    if not ma or not mb or ma.error or mb.error or not ma.tok_s or not mb.tok_s:
        return None
    return f"{a} / {b} {ma.median_tok_s / mb.median_tok_s:.2f}x"


def report(args, cfgs: list[Config], results: dict) -> None:
    names = [c.name for c in cfgs]
    by_name = {c.name: c for c in cfgs}
    summary: list[str] = []
    for set_name in args.sets:
        for clients in args.clients:
            get = {n: results.get((n, set_name, clients)) for n in names}
            ref = get["fastllm"]
            prompt_toks = ref.prompt_tokens if ref and ref.prompt_tokens else []
            gen = ref.tokens / ref.requests if ref and ref.requests else float("nan")
            print(f"\n### {set_name}, {clients} client{'s' if clients > 1 else ''}: "
                  f"{len(SETS[set_name][:args.prompts or None])} prompts x {args.repeats} "
                  f"repeat(s), max_tokens {args.max_tokens}; fastllm: mean prompt "
                  f"{fmt(statistics.mean(prompt_toks) if prompt_toks else float('nan'), '.0f')}"
                  f" tokens, mean output {fmt(gen, '.0f')} tokens")
            print("| config | tok/s | stream decode tok/s p50 | TTFT p50 ms | mean accepted "
                  "length | acceptance | draft s / verify s |")
            print("|---|---|---|---|---|---|---|")
            for n in names:
                m = get[n]
                if m is None or m.error or not m.tok_s:
                    print(f"| {n} | failed: {m.error if m else 'not run'} |||||")
                    continue
                s = m.spec
                times = ("-" if s is None or s.draft_s is None
                         else f"{s.draft_s:.3f} / {s.verify_s:.2f}")
                print(f"| {n} | {m.median_tok_s:.1f} | "
                      f"{fmt(percentile(m.decode_tok_s, 50))} | "
                      f"{fmt(percentile(m.ttft, 50) * 1e3, '.0f')} | "
                      f"{fmt(s.mean_accepted_length, '.2f') if s else '-'} | "
                      f"{fmt(s.acceptance * 100, '.0f') + ' %' if s and s.drafts else '-'} | "
                      f"{times} |")

            pairs = [(c.name, "fastllm") for c in cfgs if c.engine == "fastllm" and c.spec != "none"]
            pairs += [(f"fastllm-{c.spec}", c.name) for c in cfgs
                      if c.engine == "llama-server" and c.spec != "none"
                      and f"fastllm-{c.spec}" in by_name]
            pairs += [(c.name, "llama-server") for c in cfgs
                      if c.engine == "llama-server" and c.spec != "none"]
            pairs += [("fastllm", "llama-server")] if "llama-server" in by_name else []
            ratios = [r for r in (ratio(get, a, b) for a, b in pairs) if r]
            if ratios:
                print("ratios (tok/s): " + "; ".join(ratios))
                summary.append(f"{set_name:<6} {clients:>2} cl: " + "; ".join(ratios))

            # Greedy speculation is exact: each spec output must equal the plain one.
            for c in cfgs:
                if c.spec == "none":
                    continue
                plain = "fastllm" if c.engine == "fastllm" else "llama-server"
                a, b = get.get(c.name), get.get(plain)
                if not a or not b or a.error or b.error:
                    continue
                same, total, notes = compare_texts(a, b)
                verdict = "identical" if same == total else "DIFFERENT"
                tag = "" if c.engine == "fastllm" else " (informational)"
                print(f"outputs {c.name} vs {plain}: {same}/{total} {verdict}{tag}")
                for note in notes[:args.show_differences]:
                    print(f"  {note}")
            if clients != args.clients[0]:
                lo = results.get(("fastllm", set_name, args.clients[0]))
                if lo and ref and not lo.error and not ref.error:
                    same, total, _ = compare_texts(lo, ref)
                    print(f"control: fastllm (no spec) at {args.clients[0]} vs {clients} "
                          f"clients: {same}/{total} identical")
    if summary:
        print("\nsummary:\n" + "\n".join(summary))


# ---- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 2)[2])
    ap.add_argument("--model", default=None, help="GGUF file (default: the embedded SmolLM2)")
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server")
    ap.add_argument("--draft-model", default=None,
                    help="draft GGUF sharing the model's tokenizer (both engines' draft mode)")
    ap.add_argument("--k", type=int, default=5, help="draft tokens per step at most")
    ap.add_argument("--ngram-max", type=int, default=4, help="fastllm n-gram lookup: longest n")
    ap.add_argument("--ngram-min", type=int, default=1, help="fastllm n-gram lookup: shortest n")
    ap.add_argument("--no-adaptive", action="store_true",
                    help="fastllm: always k drafts (no adaptive draft length)")
    ap.add_argument("--disable-by-batch-size", type=int, default=0,
                    help="fastllm: no drafts in steps of this many sequences or more")
    ap.add_argument("--llama-ngram-n", type=int, default=0,
                    help="llama-server ngram-simple lookup length (default: min(ngram-max, k))")
    ap.add_argument("--llama-ngram-m", type=int, default=0,
                    help="llama-server ngram-simple draft length (default: k)")
    ap.add_argument("--max-tokens", type=int, default=192)
    ap.add_argument("--ignore-eos", action="store_true",
                    help="generate max_tokens every time (default: stop at EOS)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS))
    ap.add_argument("--prompts", type=int, default=0,
                    help="first N prompts of each set (default: all 8)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for every server")
    ap.add_argument("--ctx-per-slot", type=int, default=1024,
                    help="fastllm --max-model-len; llama-server context per slot")
    ap.add_argument("--ready-timeout", type=float, default=300.0)
    ap.add_argument("--fastllm-args", default="", help="extra flags for every fastllm-serve")
    ap.add_argument("--llama-args", default="", help="extra flags for every llama-server")
    ap.add_argument("--show-differences", type=int, default=3,
                    help="output differences printed per comparison")
    ap.add_argument("--dry-run", action="store_true",
                    help="print the configurations and commands as JSON; start nothing")
    args = ap.parse_args(argv)
    if args.k < 1 or args.repeats < 1 or args.max_tokens < 1 or min(args.clients) < 1:
        ap.error("--k, --repeats, --max-tokens and --clients must be positive")
    if (args.llama_ngram_n or min(args.ngram_max, args.k)) > (args.llama_ngram_m or args.k):
        ap.error("llama-server's ngram-simple drafts nothing unless its n <= its m "
                 "(--llama-ngram-n, --llama-ngram-m, default m = --k)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    resolve_model(args)
    cfgs = configs(args)
    if args.dry_run:
        plan = [{"name": c.name, "engine": c.engine, "spec": c.spec,
                 "commands": {str(n): command(args, c, 8000, n)
                              for n in (args.clients if c.engine == "llama-server"
                                        else [max(args.clients)])}} for c in cfgs]
        json.dump({"configs": plan, "sets": {s: len(SETS[s]) for s in args.sets}},
                  sys.stdout, indent=1)
        print()
        return
    results: dict = {}
    for cfg in cfgs:
        if cfg.engine == "fastllm":
            run_server(args, cfg, args.clients, results)
        else:
            # One server per concurrency with as many slots, as llama.cpp is deployed for it.
            for clients in args.clients:
                run_server(args, cfg, [clients], results)
    report(args, cfgs, results)


if __name__ == "__main__":
    main()
