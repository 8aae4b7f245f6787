"""Completions, chat completions, tokenize and detokenize on top of AsyncLLM."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastllm.engine.async_llm import AsyncLLM, StreamChunk
from fastllm.engine.beam_search import (
    Beam,
    BeamSearchParams,
    run_beam_search_async,
    top_logprobs_of,
)
from fastllm.engine.errors import RequestFailedError
from fastllm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
    UsageInfo,
    random_id,
)
from fastllm.entrypoints.openai.tool_parsers.chat_tools import (
    ToolPlan,
    ToolRequestError,
    plan_tools,
)
from fastllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error answered with an OpenAI error body."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 err_type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.err_type = err_type or ("BadRequestError" if status == 400 else
                                     "NotFoundError" if status == 404 else
                                     "AuthenticationError" if status == 401 else
                                     "InternalServerError")


@dataclass
class Job:
    """One engine request serving one prompt: its n choices (or best_of candidates, of which the
    engine front end keeps the n best) are the request's children, told apart by chunk.index."""

    prompt_index: int
    request_id: str
    text: str | None
    ids: list[int]
    params: SamplingParams
    n: int  # choices per prompt

    def choice(self, child: int) -> int:
        """The choice index in the response of the request's child."""
        return self.prompt_index * self.n + child


def error_body(message: str, status: int, err_type: str, param: str | None = None) -> dict:
    """The OpenAI error body; every error the server sends is built here."""
    return {"error": {"message": message, "type": err_type, "param": param, "code": status}}


def as_api_error(error: Exception) -> APIError:
    """The client-facing form of an exception raised while serving a request: a bad value is a
    400, a request the engine failed a 500."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, RequestFailedError):
        return APIError(str(error), status=500)
    if isinstance(error, ValueError):
        return APIError(str(error))
    return APIError(f"internal error: {type(error).__name__}: {error}", status=500)


def error_event(error: Exception) -> str:
    """A stream's error: an SSE `error` event with the OpenAI error body, then [DONE]."""
    e = as_api_error(error)
    body = json.dumps(error_body(e.message, e.status, e.err_type, e.param), ensure_ascii=False)
    return f"event: error\ndata: {body}\n\n" + sse("[DONE]")


def usage_chunk(request_id: str, kind: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The last streamed chunk when stream_options.include_usage is set."""
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def sse(payload: Any) -> str:
    body = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {body}\n\n"


class OpenAIServing:
    def __init__(self, engine: AsyncLLM, served_model_names: list[str], response_role: str,
                 chat_template: str | None, max_log_len: int | None,
                 log_requests: bool):
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.served_model_names = served_model_names
        self.response_role = response_role
        self.chat_template = chat_template
        self.max_model_len = engine.core.max_model_len
        self.eos_token_ids = list(engine.core.engine_config.eos_token_ids)
        self.max_logprobs = engine.args.max_logprobs
        self.max_log_len = max_log_len
        self.log_requests = log_requests
        self.enable_auto_tools = False
        self.tool_parser_name: str | None = None

    def configure_tools(self, enable_auto_tool_choice: bool, tool_call_parser: str | None
                        ) -> None:
        """--enable-auto-tool-choice and --tool-call-parser."""
        self.enable_auto_tools = bool(enable_auto_tool_choice)
        self.tool_parser_name = tool_call_parser

    async def prepare_guided(self, params: SamplingParams) -> None:
        """Compiles the request's grammar before anything is sent, so a bad schema, regex,
        grammar or backend is a 400."""
        try:
            await self.engine.prepare_guided(params)
        except ValueError as e:
            raise APIError(str(e), param="guided_decoding") from e

    # ---- shared checks -----------------------------------------------------------------------

    def model_name(self, requested: str | None) -> str:
        if requested is None or requested in self.served_model_names:
            return self.served_model_names[0] if requested is None else requested
        raise APIError(f"The model `{requested}` does not exist; this server serves "
                       f"{', '.join(self.served_model_names)}.", status=404, param="model")

    def check_fields(self, request: SamplingFields) -> None:
        bad = request.unsupported()
        if bad:
            raise APIError(f"parameter(s) not supported yet: {', '.join(bad)}", param=bad[0])
        unknown = request.unknown_fields()
        if unknown:
            logger.warning("ignoring unknown request field(s): %s", ", ".join(unknown))

    def check_length(self, prompt_ids: list[int], max_tokens: int | None) -> int:
        n = len(prompt_ids)
        if n == 0:
            raise APIError("the prompt is empty", param="prompt")
        if n >= self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} "
                           f"tokens, but the prompt has {n} tokens.", param="prompt")
        if max_tokens is None:
            return self.max_model_len - n
        if max_tokens < 1:
            raise APIError(f"max_tokens must be at least 1, got {max_tokens}", param="max_tokens")
        if n + max_tokens > self.max_model_len:
            raise APIError(f"This model's maximum context length is {self.max_model_len} "
                           f"tokens. However, you requested {n + max_tokens} tokens ({n} in the "
                           f"prompt, {max_tokens} for the completion).", param="max_tokens")
        return max_tokens

    def token_text(self, token_id: int, as_ids: bool) -> str:
        if as_ids or getattr(self, "return_tokens_as_token_ids", False):
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def log(self, request_id: str, prompt_ids: list[int]) -> None:
        if not self.log_requests:
            return
        shown = prompt_ids if self.max_log_len is None else prompt_ids[: self.max_log_len]
        logger.info("request %s: %d prompt tokens %s", request_id, len(prompt_ids), shown)

    @staticmethod
    async def until_disconnected(raw_request) -> None:
        while True:
            message = await raw_request.receive()
            if message["type"] == "http.disconnect":
                return

    async def run_guarded(self, raw_request, coro):
        """Runs a non-streaming generation; a client that disconnects cancels it (and so aborts
        its requests)."""
        task = asyncio.ensure_future(coro)
        watcher = asyncio.ensure_future(self.until_disconnected(raw_request))
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            watcher.cancel()
            try:
                return task.result()
            except (RequestFailedError, ValueError) as e:
                raise as_api_error(e) from e
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        raise APIError("client disconnected", status=499)

    async def collect(self, gen: AsyncIterator[StreamChunk]) -> dict:
        """One child's whole result (the request's child 0 when it has several)."""
        return (await self.collect_children(gen))[0]

    async def collect_children(self, gen: AsyncIterator[StreamChunk]) -> dict[int, dict]:
        """Every child's result, by child index. The prompt's logprobs come with child 0; every
        child's result carries them."""
        acc: dict[int, dict] = {}
        async for chunk in gen:
            res = acc.setdefault(chunk.index, {"tokens": [], "logprobs": [], "last": None,
                                               "prompt_logprobs": None})
            res["tokens"].extend(chunk.token_ids)
            if chunk.logprobs:
                res["logprobs"].extend(chunk.logprobs)
            if chunk.prompt_logprobs is not None:
                res["prompt_logprobs"] = (res["prompt_logprobs"] or []) + chunk.prompt_logprobs
            res["last"] = chunk
        assert acc
        prompt_logprobs = acc.get(0, {}).get("prompt_logprobs")
        for res in acc.values():
            res["text"] = res["last"].full_text
            res["prompt_logprobs"] = prompt_logprobs
        return acc

    def make_job(self, base_id: str, prompt_index: int, text: str | None, ids: list[int],
                 params, stream: bool) -> Job:
        """One engine request per prompt; the engine fans it out into n (or best_of)
        children."""
        try:
            params.validate(self.max_logprobs, self.engine.core.model_config.vocab_size)
        except ValueError as e:
            raise APIError(str(e)) from e
        if stream and params.num_samples > params.n:
            raise APIError("best_of > n cannot be streamed", param="best_of")
        return Job(prompt_index, f"{base_id}-{prompt_index}", text, ids, params, params.n)

    def job_stream(self, job: Job) -> AsyncIterator[StreamChunk]:
        self.log(job.request_id, job.ids)
        return self.engine.generate(job.ids, job.params, job.request_id, job.text)

    async def run_jobs(self, raw_request, jobs: list[Job]) -> list[tuple[int, Job, dict]]:
        """Runs every job to the end; returns (choice index, job, child result), in choice
        order (best_of's ranking is done by the engine front end)."""
        async def run_all():
            return await asyncio.gather(*(self.collect_children(self.job_stream(job))
                                          for job in jobs))

        try:
            results = await self.run_guarded(raw_request, run_all())
        except ValueError as e:
            raise APIError(str(e)) from e
        chosen = []
        for job, children in zip(jobs, results):
            for child in sorted(children):
                chosen.append((job.choice(child), job, children[child]))
        return chosen

    # ---- completions -------------------------------------------------------------------------

    async def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenizes on a worker thread: a very long prompt must not stall the event loop, which
        delivers every other stream's output."""
        return await asyncio.to_thread(self.tokenizer.encode, text,
                                       add_special_tokens=add_special_tokens)

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
                ids = await self.encode(item, bool(request.add_special_tokens))
                out.append((item, ids))
            else:
                ids = [int(t) for t in item]
                if any(t < 0 or t >= self.engine.core.model_config.vocab_size for t in ids):
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

    def prompt_logprobs_json(self, entries: list | None) -> list | None:
        """The extra `prompt_logprobs` field: per prompt position, token id -> logprob, rank and
        text (None at position 0)."""
        if entries is None:
            return None
        return [None if e is None else
                {str(tid): {"logprob": max(lp.logprob, -9999.0), "rank": lp.rank,
                            "decoded_token": lp.decoded_token} for tid, lp in e.items()}
                for e in entries]

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

    async def beam_search(self, ids: list[int], request: SamplingFields, max_tokens: int,
                          request_id: str) -> list[Beam]:
        """use_beam_search: the n best of best_of (or n) beams, best first."""
        if request.stream:
            raise APIError("beam search cannot be streamed", param="stream")
        width = request.best_of or request.n or 1
        if 2 * width > self.max_logprobs:
            raise APIError(f"beam width {width} needs {2 * width} logprobs per step, above the "
                           f"server's --max-logprobs {self.max_logprobs}", param="best_of")
        early = request.early_stopping
        params = BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                                  ignore_eos=bool(request.ignore_eos),
                                  length_penalty=request.length_penalty or 1.0,
                                  early_stopping=early if early is not None else False)
        counter = iter(range(1 << 62))

        async def expand(seqs: list[list[int]], k: int) -> list[dict[int, float]]:
            step = SamplingParams(max_tokens=1, temperature=0.0, logprobs=k, ignore_eos=True)
            gens = [self.collect(self.engine.generate(seq, step, f"{request_id}-b{next(counter)}"))
                    for seq in seqs]
            results = await asyncio.gather(*gens)
            return [top_logprobs_of(r["logprobs"][0], k) for r in results]

        try:
            params.validate()
            beams = await run_beam_search_async(ids, params, set(self.eos_token_ids), expand)
        except ValueError as e:
            raise APIError(str(e)) from e
        return beams[: request.n or 1]

    def beam_finish_reason(self, beam: Beam) -> str:
        return "stop" if beam.tokens and beam.tokens[-1] in self.eos_token_ids else "length"

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
                    raw_request, self.beam_search(ids, request, max_tokens, f"{base_id}-{i}"))
                usage.prompt_tokens += len(ids)
                for k, beam in enumerate(beams):
                    choices.append({"index": i * (request.n or 1) + k,
                                    "text": self.tokenizer.decode(beam.tokens),
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
            jobs.append(self.make_job(base_id, i, text, ids, params, bool(request.stream)))
        if jobs:
            await self.prepare_guided(jobs[0].params)
        created = int(time.time())
        as_ids = bool(request.return_tokens_as_token_ids)

        def echo_text(text: str | None, ids: list[int]) -> str:
            if not request.echo:
                return ""
            return text if text is not None else self.tokenizer.decode(ids)

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
        offsets: dict[int, int] = {}
        for job in jobs:
            prefix = echo_text(job.text, job.ids)
            for child in range(job.n):
                index = job.choice(child)
                offsets[index] = len(prefix)
                if prefix:
                    yield sse({"id": base_id, "object": "text_completion", "created": created,
                               "model": model, "choices": [{"index": index, "text": prefix,
                                                            "logprobs": None,
                                                            "finish_reason": None}]})
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
            yield sse({"id": base_id, "object": "text_completion", "created": created,
                       "model": model,
                       "choices": [{"index": index, "text": chunk.text, "logprobs": logprobs,
                                    "finish_reason": chunk.finish_reason,
                                    "stop_reason": chunk.stop_reason}]})
        # The closing events go out in one write.
        usage = (sse(usage_chunk(base_id, "text_completion", created, model, prompt_tokens,
                                 completion_tokens)) if include_usage else "")
        yield usage + sse("[DONE]")

    async def merged_streams(self, jobs: list[Job]
                             ) -> AsyncIterator[tuple[int, StreamChunk | Exception]]:
        """Runs every job and yields (choice index, chunk) as chunks arrive; an error ends that
        job's stream. Closing the iteration early cancels (and so aborts) the rest."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(job: Job):
            try:
                async for chunk in self.job_stream(job):
                    await queue.put((job.choice(chunk.index), chunk))
                await queue.put((job.choice(0), done))
            except Exception as e:  # noqa: BLE001 - forwarded to the client as an error event
                await queue.put((job.choice(0), e))

        tasks = [asyncio.ensure_future(pump(job)) for job in jobs]
        try:
            remaining = len(jobs)
            while remaining:
                index, chunk = await queue.get()
                if chunk is done:
                    remaining -= 1
                    continue
                if isinstance(chunk, Exception):
                    remaining -= 1
                yield index, chunk
        finally:
            for t in tasks:
                t.cancel()

    # ---- chat --------------------------------------------------------------------------------

    def render_chat(self, messages, add_generation_prompt, continue_final_message,
                    chat_template, chat_template_kwargs, documents=None,
                    tool_plan: ToolPlan | None = None) -> str:
        conversation = [m.model_dump(exclude_none=True) for m in messages]
        for m in conversation:
            content = m.get("content")
            if isinstance(content, list):
                texts = []
                for part in content:
                    if part.get("type") != "text":
                        raise APIError(f"message content of type {part.get('type')!r} is not "
                                       f"supported (text only)", param="messages")
                    texts.append(part.get("text", ""))
                m["content"] = "\n".join(texts)
        if add_generation_prompt and continue_final_message:
            raise APIError("add_generation_prompt and continue_final_message cannot both be "
                           "true", param="continue_final_message")
        template = chat_template or self.chat_template
        tool_plan = tool_plan or ToolPlan("none", [])
        conversation = tool_plan.prepare_conversation(
            conversation, template or self.tokenizer.chat_template)
        kwargs = dict(chat_template_kwargs or {})
        # `documents` may come as a request field or inside chat_template_kwargs.
        documents = kwargs.pop("documents", documents)
        try:
            return self.tokenizer.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, documents=documents,
                chat_template=template, tools=tool_plan.template_tools(), **kwargs)
        except TypeError as e:
            raise APIError(f"chat template error: bad chat_template_kwargs: {e}",
                           param="chat_template_kwargs") from e
        except ValueError as e:
            raise APIError(f"chat template error: {e}", param="messages") from e

    def chat_logprobs(self, tokens: list[int], logprobs: list, top_n: int, as_ids: bool) -> dict:
        content = []
        for tok, entry in zip(tokens, logprobs):
            text = self.token_text(tok, as_ids)
            top = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:top_n]
            content.append({
                "token": text,
                "logprob": max(entry[tok].logprob, -9999.0),
                "bytes": list(text.encode("utf-8")),
                "top_logprobs": [
                    {"token": self.token_text(tid, as_ids), "logprob": max(lp.logprob, -9999.0),
                     "bytes": list(self.token_text(tid, as_ids).encode("utf-8"))}
                    for tid, lp in top
                ],
            })
        return {"content": content}

    async def chat(self, request: ChatCompletionRequest, raw_request):
        model = self.model_name(request.model)
        self.check_fields(request)
        if not request.messages:
            raise APIError("messages must not be empty", param="messages")
        top_n = request.top_logprobs or 0
        if request.top_logprobs is not None and not request.logprobs:
            raise APIError("top_logprobs needs logprobs=true", param="top_logprobs")
        try:
            tool_plan = plan_tools(request.tools, request.tool_choice,
                                   request.parallel_tool_calls, self.enable_auto_tools,
                                   self.tool_parser_name)
        except ToolRequestError as e:
            raise APIError(str(e), param=e.param) from e
        prompt = self.render_chat(request.messages, request.add_generation_prompt,
                                  request.continue_final_message, request.chat_template,
                                  request.chat_template_kwargs, request.documents, tool_plan)
        ids = await self.encode(prompt, bool(request.add_special_tokens))
        if request.truncate_prompt_tokens is not None:
            ids = ids[-request.truncate_prompt_tokens:]
        requested = request.max_completion_tokens or request.max_tokens
        max_tokens = self.check_length(ids, requested)
        params = request.to_sampling_params(max_tokens, top_n if request.logprobs else None)
        forced = tool_plan.guided(request.guided_decoding_backend)
        if forced is not None:
            if params.guided_decoding is not None:
                raise APIError("a named or required tool_choice cannot be combined with "
                               "guided decoding or response_format", param="tool_choice")
            params.guided_decoding = forced
        if tool_plan.mode == "auto" and tool_plan.parser.keep_special_tokens:
            params.skip_special_tokens = False
        rid = request.request_id or random_id("chatcmpl")
        if request.use_beam_search:
            beams = await self.run_guarded(raw_request,
                                           self.beam_search(ids, request, max_tokens, rid))
            role = self.response_role if request.add_generation_prompt \
                else request.messages[-1].role
            completion_tokens = sum(len(b.tokens) for b in beams)
            return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": k, "message": {
                        "role": role, "content": self.tokenizer.decode(b.tokens),
                        "tool_calls": []}, "logprobs": None,
                        "finish_reason": self.beam_finish_reason(b)}
                        for k, b in enumerate(beams)],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                              "total_tokens": len(ids) + completion_tokens}}
        jobs = [self.make_job(rid, 0, prompt, ids, params, bool(request.stream))]
        await self.prepare_guided(params)
        tools_on = tool_plan.mode != "none"
        created = int(time.time())
        role = self.response_role if request.add_generation_prompt else request.messages[-1].role
        echo = ""
        last_msg = request.messages[-1]
        if request.echo and last_msg.role == role and isinstance(last_msg.content, str):
            echo = last_msg.content
        as_ids = bool(request.return_tokens_as_token_ids)
        if request.stream:
            include_usage = bool(request.stream_options and request.stream_options.include_usage)
            return self.stream_chat(jobs, rid, created, model, role, echo,
                                    bool(request.logprobs), top_n, as_ids, include_usage,
                                    tool_plan if tools_on else None)
        choices = []
        completion_tokens = 0
        cached = 0
        for index, _, res in await self.run_jobs(raw_request, jobs):
            last = res["last"]
            cached = last.num_cached_tokens
            completion_tokens += len(res["tokens"])
            content, calls = (tool_plan.parse(res["text"]) if tools_on
                              else (echo + res["text"], []))
            choices.append({
                "index": index,
                "message": {"role": role, "content": content,
                            "tool_calls": [c.to_dict() for c in calls]},
                "logprobs": (self.chat_logprobs(res["tokens"], res["logprobs"], top_n, as_ids)
                             if request.logprobs else None),
                "finish_reason": ToolPlan.finish_reason(last.finish_reason, calls),
                "stop_reason": last.stop_reason,
                "prompt_logprobs": (self.prompt_logprobs_json(res["prompt_logprobs"])
                                    if request.prompt_logprobs is not None else None),
            })
        usage = UsageInfo(prompt_tokens=len(ids), completion_tokens=completion_tokens,
                          total_tokens=len(ids) + completion_tokens,
                          prompt_tokens_details={"cached_tokens": cached})
        return {"id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": choices, "usage": usage.model_dump(exclude_none=True)}

    async def stream_chat(self, jobs: list[Job], rid, created, model, role, echo, want_logprobs,
                          top_n, as_ids, include_usage, tool_plan: ToolPlan | None = None
                          ) -> AsyncIterator[str]:
        def chunk_body(index: int, delta: dict, finish=None, logprobs=None,
                       stop_reason=None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": model,
                    "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish, "stop_reason": stop_reason}]}

        indexes = [job.choice(child) for job in jobs for child in range(job.n)]
        for index in indexes:
            yield sse(chunk_body(index, {"role": role, "content": ""}))
            if echo:
                yield sse(chunk_body(index, {"content": echo}))
        completion_tokens = 0
        tool_streams = {index: tool_plan.stream() for index in indexes} if tool_plan else {}
        async for index, chunk in self.merged_streams(jobs):
            if isinstance(chunk, Exception):
                yield error_event(chunk)
                return
            completion_tokens += len(chunk.token_ids)
            logprobs = (self.chat_logprobs(chunk.token_ids, chunk.logprobs, top_n, as_ids)
                        if want_logprobs and chunk.logprobs else None)
            tools = tool_streams.get(index)
            if tools is None:
                if chunk.text or logprobs:
                    yield sse(chunk_body(index, {"content": chunk.text}, logprobs=logprobs))
            else:
                content, deltas = tools.feed(chunk.text)
                if chunk.finished:
                    more_content, more = tools.finish()
                    content, deltas = content + more_content, deltas + more
                if content or logprobs:
                    yield sse(chunk_body(index, {"content": content}, logprobs=logprobs))
                for delta in deltas:
                    yield sse(chunk_body(index, {"tool_calls": [delta]}))
            if chunk.finished:
                finish = chunk.finish_reason
                if tools is not None:
                    finish = ToolPlan.finish_reason(finish, tools.calls)
                yield sse(chunk_body(index, {}, finish, stop_reason=chunk.stop_reason))
        usage = (sse(usage_chunk(rid, "chat.completion.chunk", created, model, len(jobs[0].ids),
                                 completion_tokens)) if include_usage else "")
        yield usage + sse("[DONE]")  # one write

    # ---- tokenize / detokenize ---------------------------------------------------------------

    async def tokenize(self, request: TokenizeRequest) -> dict:
        self.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError("give exactly one of prompt or messages", param="prompt")
        if request.messages is not None:
            text = self.render_chat(request.messages, request.add_generation_prompt,
                                    request.continue_final_message, request.chat_template,
                                    request.chat_template_kwargs)
            ids = await self.encode(text, False)
        else:
            ids = await self.encode(request.prompt, bool(request.add_special_tokens))
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def detokenize(self, request: DetokenizeRequest) -> dict:
        self.model_name(request.model)
        vocab = self.engine.core.model_config.vocab_size
        if any(t < 0 or t >= vocab for t in request.tokens):
            raise APIError("token ids must be within the vocabulary", param="tokens")
        return {"prompt": self.tokenizer.decode(request.tokens)}

