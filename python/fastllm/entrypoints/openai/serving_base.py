"""What the OpenAI endpoints share: request checks, the disconnect guard, running a prompt's
engine request to the end or as a stream, SSE framing, logprob JSON, beam search and chat
rendering. Each endpoint's handler derives from OpenAIServingBase (serving_completion,
serving_chat, serving_models); all of them talk to the engine through AsyncLLM's public API."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from json.encoder import encode_basestring
from typing import Any

from fastllm.engine.async_llm import AsyncLLM, StreamChunk
from fastllm.engine.beam_search import (
    Beam,
    BeamSearchParams,
)
from fastllm.engine.errors import RequestFailedError
from fastllm.entrypoints.openai.errors import APIError, as_api_error
from fastllm.entrypoints.openai.protocol import SamplingFields
from fastllm.entrypoints.openai.tool_parsers.chat_tools import ToolPlan
from fastllm.sampling_params import SamplingParams

logger = logging.getLogger("fastllm.entrypoints.openai.serving")


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
    chunks: AsyncIterator[StreamChunk]  # the engine's stream, not started until consumed

    def choice(self, child: int) -> int:
        """The choice index in the response of the request's child."""
        return self.prompt_index * self.n + child


def usage_chunk(request_id: str, kind: str, created: int, model: str, prompt_tokens: int,
                completion_tokens: int) -> dict:
    """The last streamed chunk when stream_options.include_usage is set."""
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": [],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


# Compact JSON, non-ASCII characters as they are (encode_basestring is its string encoder).
_to_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def sse(payload: Any) -> str:
    body = payload if isinstance(payload, str) else _to_json(payload)
    return f"data: {body}\n\n"


class StreamEvents:
    """The SSE events of one streamed response. Every chunk repeats the response's id, object,
    created and model: those are encoded once. Most chunks carry one choice's text and nothing
    else; text() writes those around the encoded text alone (a server writes one per token,
    between decode steps that push the weights through the caches, so less code and fewer
    objects per token is time), the same JSON as event() gives for that choice."""

    def __init__(self, response_id: str, kind: str, created: int, model: str):
        self._head = (f'data: {{"id":{encode_basestring(response_id)},"object":'
                      f'{encode_basestring(kind)},"created":{int(created)},"model":'
                      f'{encode_basestring(model)},"choices":[')
        # The text's key, and what follows it, in a completion's or a chat delta's choice.
        self._text_key, self._text_tail = (
            ('"delta":{"content":', '},"logprobs":null,"finish_reason":null,"stop_reason":null}')
            if kind == "chat.completion.chunk" else
            ('"text":', ',"logprobs":null,"finish_reason":null,"stop_reason":null}'))

    def event(self, choice: dict) -> str:
        return f"{self._head}{_to_json(choice)}]}}\n\n"

    def text(self, index: int, text: str) -> str:
        return (f'{self._head}{{"index":{index},{self._text_key}{encode_basestring(text)}'
                f'{self._text_tail}]}}\n\n')


class OpenAIServingBase:
    def __init__(self, engine: AsyncLLM, served_model_names: list[str],
                 chat_template: str | None = None, max_log_len: int | None = None,
                 log_requests: bool = False, return_tokens_as_token_ids: bool = False):
        """chat_template: the server's --chat-template (None: the model's own);
        return_tokens_as_token_ids: the server's default of the request field of that name."""
        self.engine = engine
        info = engine.model_info
        self.served_model_names = served_model_names
        self.chat_template = chat_template
        self.max_model_len = info.max_model_len
        self.vocab_size = info.vocab_size
        self.eos_token_ids = list(info.eos_token_ids)
        self.max_logprobs = info.max_logprobs
        self.max_log_len = max_log_len
        self.log_requests = log_requests
        self.return_tokens_as_token_ids = return_tokens_as_token_ids

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
        adapters = self.engine.lora_adapters()
        if requested in adapters:
            return requested
        names = ", ".join([*self.served_model_names, *adapters])
        raise APIError(f"The model `{requested}` does not exist; this server serves "
                       f"{names}.", status=404, param="model")

    def lora_for(self, model: str | None):
        """The LoRARequest of a served adapter name, None for the base model."""
        return None if model is None else self.engine.lora_adapters().get(model)

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
        if as_ids or self.return_tokens_as_token_ids:
            return f"token_id:{token_id}"
        return self.engine.decode([token_id], skip_special_tokens=False)

    def log(self, request_id: str, prompt_ids: list[int]) -> None:
        if not self.log_requests:
            return
        shown = prompt_ids if self.max_log_len is None else prompt_ids[: self.max_log_len]
        logger.info("request %s: %d prompt tokens %s", request_id, len(prompt_ids), shown)

    # ---- running requests --------------------------------------------------------------------

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
                 params, stream: bool, lora_request=None) -> Job:
        """One engine request per prompt; the engine fans it out into n (or best_of)
        children."""
        request_id = f"{base_id}-{prompt_index}"
        try:
            # The engine checks the parameters when the stream is created, before any response.
            chunks = self.engine.generate(ids, params, request_id, text,
                                          lora_request=lora_request)
        except ValueError as e:
            raise APIError(str(e)) from e
        if stream and params.num_samples > params.n:
            raise APIError("best_of > n cannot be streamed", param="best_of")
        return Job(prompt_index, request_id, text, ids, params, params.n, chunks)

    def job_stream(self, job: Job) -> AsyncIterator[StreamChunk]:
        self.log(job.request_id, job.ids)
        return job.chunks

    async def run_jobs(self, raw_request, jobs: list[Job]) -> list[tuple[int, Job, dict]]:
        """Runs every job to the end; returns (choice index, job, child result), in choice
        order (best_of's ranking is done by the engine front end)."""
        async def run_all():
            return await asyncio.gather(*(self.collect_children(self.job_stream(job))
                                          for job in jobs))

        # run_guarded answers a ValueError or a failed request with its APIError.
        results = await self.run_guarded(raw_request, run_all())
        chosen = []
        for job, children in zip(jobs, results):
            for child in sorted(children):
                chosen.append((job.choice(child), job, children[child]))
        return chosen

    async def merged_streams(self, jobs: list[Job]
                             ) -> AsyncIterator[tuple[int, StreamChunk | Exception]]:
        """Runs every job and yields (choice index, chunk) as chunks arrive; an error ends that
        job's stream. Closing the iteration early cancels (and so aborts) the rest."""
        if len(jobs) == 1:  # the usual request: its one stream, without a queue in between
            job = jobs[0]
            chunks = self.job_stream(job)
            try:
                async for chunk in chunks:
                    yield job.choice(chunk.index), chunk
            except Exception as e:  # noqa: BLE001 - forwarded to the client as an error event
                yield job.choice(0), e
            finally:
                await chunks.aclose()  # closed early: aborts the request now, as cancel does
            return
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

    # ---- shared by several endpoints ---------------------------------------------------------

    def prompt_logprobs_json(self, entries: list | None) -> list | None:
        """The extra `prompt_logprobs` field: per prompt position, token id -> logprob, rank and
        text (None at position 0)."""
        if entries is None:
            return None
        return [None if e is None else
                {str(tid): {"logprob": max(lp.logprob, -9999.0), "rank": lp.rank,
                            "decoded_token": lp.decoded_token} for tid, lp in e.items()}
                for e in entries]

    async def beam_search(self, ids: list[int], request: SamplingFields, max_tokens: int,
                          request_id: str, lora_request=None) -> list[Beam]:
        """use_beam_search: the n best of best_of (or n) beams, best first."""
        if request.stream:
            raise APIError("beam search cannot be streamed", param="stream")
        width = request.best_of or request.n or 1
        early = request.early_stopping
        params = BeamSearchParams(beam_width=width, max_tokens=max_tokens,
                                  ignore_eos=bool(request.ignore_eos),
                                  length_penalty=request.length_penalty or 1.0,
                                  early_stopping=early if early is not None else False)
        try:
            beams = await self.engine.beam_search(ids, params, request_id, lora_request)
        except ValueError as e:
            raise APIError(str(e), param="best_of") from e
        return beams[: request.n or 1]

    def beam_finish_reason(self, beam: Beam) -> str:
        return "stop" if beam.tokens and beam.tokens[-1] in self.eos_token_ids else "length"

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
            conversation, template or self.engine.model_info.chat_template)
        kwargs = dict(chat_template_kwargs or {})
        # `documents` may come as a request field or inside chat_template_kwargs.
        documents = kwargs.pop("documents", documents)
        try:
            return self.engine.apply_chat_template(
                conversation, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, documents=documents,
                chat_template=template, tools=tool_plan.template_tools(), **kwargs)
        except TypeError as e:
            raise APIError(f"chat template error: bad chat_template_kwargs: {e}",
                           param="chat_template_kwargs") from e
        except ValueError as e:
            raise APIError(f"chat template error: {e}", param="messages") from e
