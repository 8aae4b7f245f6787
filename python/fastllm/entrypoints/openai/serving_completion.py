"""POST /v1/completions: one engine request per prompt (n / best_of children fan out in the
engine), echo, completion logprobs, beam search and streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastllm.entrypoints.openai.errors import APIError, error_event
from fastllm.entrypoints.openai.protocol import CompletionRequest, UsageInfo, random_id
from fastllm.entrypoints.openai.serving_base import (
    Job,
    OpenAIServingBase,
    StreamEvents,
    sse,
    usage_chunk,
)


class OpenAIServingCompletion(OpenAIServingBase):
    async def completions(self, request: CompletionRequest, raw_request):
        model = self.model_name(request.model)
        self.check_fields(request)
        prompts = await self.completion_prompts(request)
        # OpenAI's completions default on purpose (chat's is "up to the context length").
        requested = 16 if request.max_tokens is None else request.max_tokens
        jobs: list[Job] = []
        base_id = request.request_id or random_id("cmpl")
        if request.use_beam_search:
            choices = []
            usage = UsageInfo()
            for i, (text, ids) in enumerate(prompts):
                max_tokens = self.check_length(ids, requested)
                beams = await self.run_guarded(
                    raw_request, self.beam_search(ids, request, max_tokens, f"{base_id}-{i}",
                                                  self.lora_for(model)))
                usage.prompt_tokens += len(ids)
                for k, beam in enumerate(beams):
                    choices.append({"index": i * (request.n or 1) + k,
                                    "text": self.engine.decode(beam.tokens),
                                    "logprobs": None,
                                    "finish_reason": self.beam_finish_reason(beam)})
                    usage.completion_tokens += len(beam.tokens)
            usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
            return {"id": base_id, "object": "text_completion", "created": int(time.time()),
                    "model": model, "choices": choices, "usage": usage.model_dump()}
        for i, (text, ids) in enumerate(prompts):
            max_tokens = self.check_length(ids, requested)
            params = request.to_sampling_params(max_tokens, request.logprobs)
            if request.echo and request.logprobs is not None:
                # The echoed prompt carries its own logprobs.
                params.prompt_logprobs = max(params.prompt_logprobs or 0, request.logprobs)
            jobs.append(self.make_job(base_id, i, text, ids, params, bool(request.stream),
                                      self.lora_for(model)))
        if jobs:
            await self.prepare_guided(jobs[0].params)
        created = int(time.time())
        as_ids = bool(request.return_tokens_as_token_ids)

        def echo_text(text: str | None, ids: list[int]) -> str:
            if not request.echo:
                return ""
            return text if text is not None else self.engine.decode(ids)

        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return self.stream_completions(jobs, base_id, created, model, echo_text, as_ids,
                                           request.logprobs is not None, include_usage)

        choices = []
        usage = UsageInfo()
        cached = 0
        counted_prompts = set()
        for index, job, res in await self.run_jobs(raw_request, jobs):
            prefix = echo_text(job.text, job.ids)
            last = res["last"]
            logprobs = None
            if request.logprobs is not None:
                logprobs = self.completion_logprobs(res["tokens"], res["logprobs"], len(prefix),
                                                    as_ids)
                if prefix and res["prompt_logprobs"] is not None:
                    logprobs = self.merge_echo_logprobs(job.ids, res["prompt_logprobs"],
                                                        logprobs, request.logprobs, as_ids)
            choices.append({
                "index": index,
                "text": prefix + res["text"],
                "logprobs": logprobs,
                "finish_reason": last.finish_reason,
                "stop_reason": last.stop_reason,
                "prompt_logprobs": (self.prompt_logprobs_json(res["prompt_logprobs"])
                                    if request.prompt_logprobs is not None else None),
            })
            if job.prompt_index not in counted_prompts:
                counted_prompts.add(job.prompt_index)
                usage.prompt_tokens += len(job.ids)
                cached += last.num_cached_tokens
            usage.completion_tokens += len(res["tokens"])
        usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
        usage.prompt_tokens_details = {"cached_tokens": cached}
        return {"id": base_id, "object": "text_completion", "created": created, "model": model,
                "choices": choices, "usage": usage.model_dump(exclude_none=True)}

    async def stream_completions(self, jobs: list[Job], base_id, created, model, echo_text,
                                 as_ids, want_logprobs, include_usage) -> AsyncIterator[str]:
        events = StreamEvents(base_id, "text_completion", created, model)
        offsets: dict[int, int] = {}
        for job in jobs:
            prefix = echo_text(job.text, job.ids)
            for child in range(job.n):
                index = job.choice(child)
                offsets[index] = len(prefix)
                if prefix:
                    yield events.text(index, prefix)
        prompt_tokens = sum(len(job.ids) for job in jobs)
        completion_tokens = 0
        async for index, chunk in self.merged_streams(jobs):
            if isinstance(chunk, Exception):
                yield error_event(chunk)
                return
            completion_tokens += len(chunk.token_ids)
            logprobs = None
            if want_logprobs and chunk.logprobs:
                logprobs = self.completion_logprobs(chunk.token_ids, chunk.logprobs,
                                                    offsets[index], as_ids)
            offsets[index] += len(chunk.text)
            if logprobs is None and chunk.finish_reason is None and chunk.stop_reason is None:
                yield events.text(index, chunk.text)
            else:
                yield events.event({"index": index, "text": chunk.text, "logprobs": logprobs,
                                    "finish_reason": chunk.finish_reason,
                                    "stop_reason": chunk.stop_reason})
        # The closing events go out in one write.
        usage = (sse(usage_chunk(base_id, "text_completion", created, model, prompt_tokens,
                                 completion_tokens)) if include_usage else "")
        yield usage + sse("[DONE]")

    # ---- prompts and logprobs ----------------------------------------------------------------

    async def completion_prompts(self, request: CompletionRequest) -> list[tuple[str | None,
                                                                           list[int]]]:
        p = request.prompt
        if isinstance(p, str):
            items: list = [p]
        elif isinstance(p, list) and p and all(isinstance(x, int) for x in p):
            items = [p]
        elif isinstance(p, list) and p:
            items = list(p)
        else:
            raise APIError("prompt must not be empty", param="prompt")
        out = []
        for item in items:
            if isinstance(item, str):
                ids = await self.engine.encode(item, bool(request.add_special_tokens))
                out.append((item, ids))
            else:
                ids = [int(t) for t in item]
                if any(t < 0 or t >= self.vocab_size for t in ids):
                    raise APIError("prompt token ids must be within the vocabulary",
                                   param="prompt")
                out.append((None, ids))
        if request.truncate_prompt_tokens is not None:
            k = request.truncate_prompt_tokens
            out = [(None if len(ids) > k else text, ids[-k:]) for text, ids in out]
        return out

    def completion_logprobs(self, tokens: list[int], logprobs: list, offset: int,
                            as_ids: bool) -> dict:
        texts = [self.token_text(t, as_ids) for t in tokens]
        text_offset = []
        pos = offset
        for t in texts:
            text_offset.append(pos)
            pos += len(t)
        top = []
        for entry in logprobs:
            top.append({self.token_text(tid, as_ids): lp.logprob for tid, lp in entry.items()})
        return {
            "tokens": texts,
            "token_logprobs": [entry[t].logprob for t, entry in zip(tokens, logprobs)],
            "top_logprobs": top,
            "text_offset": text_offset,
        }

    def merge_echo_logprobs(self, prompt_ids: list[int], prompt_entries: list, generated: dict,
                            top_n: int, as_ids: bool) -> dict:
        """Completion logprobs of an echoed prompt followed by the generated tokens."""
        texts = [self.token_text(t, as_ids) for t in prompt_ids]
        offsets, pos = [], 0
        for t in texts:
            offsets.append(pos)
            pos += len(t)
        token_lps: list = [None]
        tops: list = [None]
        for tok, entry in zip(prompt_ids[1:], prompt_entries[1:]):
            token_lps.append(entry[tok].logprob)
            ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[: max(top_n, 1)]
            tops.append({self.token_text(tid, as_ids): lp.logprob for tid, lp in ranked})
        return {
            "tokens": texts + generated["tokens"],
            "token_logprobs": token_lps + generated["token_logprobs"],
            "top_logprobs": tops + generated["top_logprobs"],
            "text_offset": offsets + generated["text_offset"],
        }
