"""POST /v1/chat/completions: the chat template, tools (auto parsing and forced calls through
guided decoding), chat logprobs, beam search and streaming."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from fastllm.entrypoints.openai.errors import APIError, error_event
from fastllm.entrypoints.openai.protocol import ChatCompletionRequest, UsageInfo, random_id
from fastllm.entrypoints.openai.serving_base import (
    Job,
    OpenAIServingBase,
    StreamEvents,
    sse,
    usage_chunk,
)
from fastllm.entrypoints.openai.tool_parsers.chat_tools import (
    ToolPlan,
    ToolRequestError,
    plan_tools,
)


class OpenAIServingChat(OpenAIServingBase):
    def __init__(self, engine, served_model_names: list[str], response_role: str,
                 enable_auto_tool_choice: bool = False, tool_call_parser: str | None = None,
                 **kwargs):
        """response_role: the role of the answer when add_generation_prompt is set;
        enable_auto_tool_choice / tool_call_parser: the server's flags of those names. The rest
        as OpenAIServingBase."""
        super().__init__(engine, served_model_names, **kwargs)
        self.response_role = response_role
        self.enable_auto_tools = bool(enable_auto_tool_choice)
        self.tool_parser_name = tool_call_parser

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
        ids = await self.engine.encode(prompt, bool(request.add_special_tokens))
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
                                           self.beam_search(ids, request, max_tokens, rid,
                                                            self.lora_for(model)))
            role = self.response_role if request.add_generation_prompt \
                else request.messages[-1].role
            completion_tokens = sum(len(b.tokens) for b in beams)
            return {"id": rid, "object": "chat.completion", "created": int(time.time()),
                    "model": model,
                    "choices": [{"index": k, "message": {
                        "role": role, "content": self.engine.decode(b.tokens),
                        "tool_calls": []}, "logprobs": None,
                        "finish_reason": self.beam_finish_reason(b)}
                        for k, b in enumerate(beams)],
                    "usage": {"prompt_tokens": len(ids), "completion_tokens": completion_tokens,
                              "total_tokens": len(ids) + completion_tokens}}
        jobs = [self.make_job(rid, 0, prompt, ids, params, bool(request.stream),
                              self.lora_for(model))]
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
        events = StreamEvents(rid, "chat.completion.chunk", created, model)

        def event(index: int, delta: dict, finish=None, logprobs=None, stop_reason=None) -> str:
            return events.event({"index": index, "delta": delta, "logprobs": logprobs,
                                 "finish_reason": finish, "stop_reason": stop_reason})

        indexes = [job.choice(child) for job in jobs for child in range(job.n)]
        for index in indexes:
            yield event(index, {"role": role, "content": ""})
            if echo:
                yield events.text(index, echo)
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
                if logprobs:
                    yield event(index, {"content": chunk.text}, logprobs=logprobs)
                elif chunk.text:
                    yield events.text(index, chunk.text)
            else:
                content, deltas = tools.feed(chunk.text)
                if chunk.finished:
                    more_content, more = tools.finish()
                    content, deltas = content + more_content, deltas + more
                if content or logprobs:
                    yield event(index, {"content": content}, logprobs=logprobs)
                for delta in deltas:
                    yield event(index, {"tool_calls": [delta]})
            if chunk.finished:
                finish = chunk.finish_reason
                if tools is not None:
                    finish = ToolPlan.finish_reason(finish, tools.calls)
                yield event(index, {}, finish, stop_reason=chunk.stop_reason)
        usage = (sse(usage_chunk(rid, "chat.completion.chunk", created, model, len(jobs[0].ids),
                                 completion_tokens)) if include_usage else "")
        yield usage + sse("[DONE]")  # one write

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
