"""Prometheus metrics of the server, in a registry of its own (several apps may share a process
in tests)."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL_BATCH = 256  # inter-token gaps gathered before they go into their histogram


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        self.model_name = model_name
        r = self.registry
        self.running = Gauge("fastllm:num_requests_running", "Requests running on the engine",
                             labels, registry=r)
        self.waiting = Gauge("fastllm:num_requests_waiting", "Requests waiting to run", labels,
                             registry=r)
        self.kv_usage = Gauge("fastllm:kv_cache_usage_perc", "Fraction of KV blocks in use",
                              labels, registry=r)
        self.prefix_queries = Gauge("fastllm:prefix_cache_queries",
                                    "Prompt tokens looked up in the prefix cache", labels,
                                    registry=r)
        self.prefix_hits = Gauge("fastllm:prefix_cache_hits",
                                 "Prompt tokens found in the prefix cache", labels, registry=r)
        self.prefix_hit_rate = Gauge("fastllm:prefix_cache_hit_rate",
                                     "Prefix cache hits / queries", labels, registry=r)
        self.preemptions = Gauge("fastllm:num_preemptions", "Requests preempted so far", labels,
                                 registry=r)
        self.prompt_tokens_computed = Gauge(
            "fastllm:prompt_tokens_computed",
            "Prompt tokens the engine ran through the model (cache hits and forks excluded)",
            labels, registry=r)
        self.prompt_tokens = Counter("fastllm:prompt_tokens", "Prompt tokens received", labels,
                                     registry=r)
        self.generation_tokens = Counter("fastllm:generation_tokens", "Tokens generated", labels,
                                         registry=r)
        self.requests_finished = Counter("fastllm:request_success", "Finished requests",
                                         labels + ["finished_reason"], registry=r)
        self.requests_failed = Counter("fastllm:request_errors",
                                       "Requests the engine failed (answered with an error)",
                                       labels, registry=r)
        # Speculative decoding (zero while it is off).
        self.spec_draft_tokens = Gauge("fastllm:spec_decode_num_draft_tokens",
                                       "Draft tokens the target verified", labels, registry=r)
        self.spec_accepted_tokens = Gauge("fastllm:spec_decode_num_accepted_tokens",
                                          "Draft tokens the target accepted", labels, registry=r)
        self.spec_acceptance_rate = Gauge("fastllm:spec_decode_draft_acceptance_rate",
                                          "Accepted / verified draft tokens", labels, registry=r)
        self.spec_mean_accepted = Gauge(
            "fastllm:spec_decode_mean_accepted_length",
            "Tokens a sequence gains per verify step (accepted drafts + the target's own)", labels,
            registry=r)
        self.spec_draft_seconds = Gauge("fastllm:spec_decode_draft_time_seconds",
                                        "Seconds spent proposing drafts", labels, registry=r)
        self.spec_verify_seconds = Gauge("fastllm:spec_decode_verify_time_seconds",
                                         "Seconds spent in steps that verified drafts", labels,
                                         registry=r)
        # Data parallelism: the requests each engine replica was given.
        self.routed = Counter("fastllm:data_parallel_requests",
                              "Requests routed to each engine replica", labels + ["replica"],
                              registry=r)
        self.ttft = Histogram("fastllm:time_to_first_token_seconds", "Time to first token",
                              labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("fastllm:inter_token_latency_seconds", "Time between tokens",
                             labels, buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("fastllm:e2e_request_latency_seconds", "Request latency", labels,
                             buckets=_LATENCY_BUCKETS, registry=r)

        # The per-token series, looked up once (labels() takes a lock and builds a key each call).
        self._generation = self.generation_tokens.labels(model_name)
        self._ttft = self.ttft.labels(model_name)
        self._itl = self.itl.labels(model_name)
        # Tokens and inter-token gaps not yet in those series: folded in when a scrape renders
        # them, or when _ITL_BATCH gaps have gathered. A server observes one gap per token
        # between decode steps that push the weights through the caches, where each series'
        # locks and bucket search cost far more than an append.
        self._pending_tokens = 0
        self._pending_gaps: list[float] = []

    # ---- hooks called by AsyncLLM ------------------------------------------------------------

    def on_prompt(self, num_tokens: int) -> None:
        self.prompt_tokens.labels(self.model_name).inc(num_tokens)

    def on_routed(self, replica: int) -> None:
        self.routed.labels(self.model_name, str(replica)).inc()

    def on_tokens(self, stream, now: float, count: int) -> None:
        self._pending_tokens += count
        if stream.first_token_at is None:
            self._ttft.observe(now - stream.arrival)
        elif stream.last_token_at is not None:
            self._pending_gaps.append((now - stream.last_token_at) / count)
            if len(self._pending_gaps) >= _ITL_BATCH:
                self.flush()

    def flush(self) -> None:
        """Folds the pending token count and inter-token gaps into their series."""
        if self._pending_tokens:
            self._generation.inc(self._pending_tokens)
            self._pending_tokens = 0
        for gap in self._pending_gaps:
            self._itl.observe(gap)
        self._pending_gaps.clear()

    def on_request_finished(self, reason, stream, num_tokens: int) -> None:
        if reason == "error":
            self.requests_failed.labels(self.model_name).inc()
        else:
            self.requests_finished.labels(self.model_name, reason or "abort").inc()
        self.e2e.labels(self.model_name).observe(time.monotonic() - stream.arrival)

    # ---- exposition --------------------------------------------------------------------------

    def refresh(self, stats) -> None:
        self.flush()
        m = self.model_name
        self.running.labels(m).set(stats.num_running)
        self.waiting.labels(m).set(stats.num_waiting)
        self.kv_usage.labels(m).set(stats.kv_usage)
        self.prefix_queries.labels(m).set(stats.prefix_queries)
        self.prefix_hits.labels(m).set(stats.prefix_hits)
        rate = stats.prefix_hits / stats.prefix_queries if stats.prefix_queries else 0.0
        self.prefix_hit_rate.labels(m).set(rate)
        self.preemptions.labels(m).set(stats.num_preemptions)
        self.prompt_tokens_computed.labels(m).set(stats.num_prompt_tokens_computed)
        drafts, accepted, verifies = (stats.spec_draft_tokens, stats.spec_accepted_tokens,
                                      stats.spec_verify_steps)
        self.spec_draft_tokens.labels(m).set(drafts)
        self.spec_accepted_tokens.labels(m).set(accepted)
        self.spec_acceptance_rate.labels(m).set(accepted / drafts if drafts else 0.0)
        self.spec_mean_accepted.labels(m).set((accepted + verifies) / verifies if verifies else 0.0)
        self.spec_draft_seconds.labels(m).set(stats.spec_draft_seconds)
        self.spec_verify_seconds.labels(m).set(stats.spec_verify_seconds)

    def render(self, stats) -> bytes:
        self.refresh(stats)
        return generate_latest(self.registry)
