"""The offline API: ``LLM(model=...).generate(prompts, params)`` and ``.chat(messages)``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from fastllm.config import EngineArgs
from fastllm.engine.beam_search import BeamSearchParams
from fastllm.engine.llm_engine import LLMEngine, PromptType
from fastllm.lora.request import LoRARequest
from fastllm.outputs import RequestOutput
from fastllm.sampling_params import SamplingParams

Conversation = list[dict[str, Any]]


@dataclass
class BeamSequence:
    tokens: list[int]
    text: str
    cum_logprob: float
    score: float


@dataclass
class BeamSearchOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]


class LLM:
    """Offline batch generation. With no ``model`` it loads the default SmolLM2-135M-Instruct.

    Every keyword is an engine argument (see :class:`fastllm.config.EngineArgs`), e.g.
    ``LLM(model="/models/llama", max_model_len=4096, enable_prefix_caching=False)``.
    """

    def __init__(self, model: str | None = None, **kwargs: Any):
        self.engine_args = EngineArgs.from_kwargs(model=model, **kwargs)
        self.llm_engine = LLMEngine(self.engine_args)

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    def shutdown(self) -> None:
        """Stops the model's worker processes, if it has any (tensor/pipeline parallelism);
        they also end with this process."""
        self.llm_engine.shutdown()

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        prompt_token_ids: list[list[int]] | None = None,
        priority: list[int] | None = None,
        lora_request: LoRARequest | Sequence[LoRARequest | None] | None = None,
    ) -> list[RequestOutput]:
        """Generates for every prompt (strings, token id lists or prompt dicts) and returns the
        outputs in the prompts' order. lora_request: one adapter for every prompt, or one (or
        None) per prompt (needs LLM(enable_lora=True))."""
        if prompt_token_ids is not None:
            if prompts is not None:
                raise ValueError("pass prompts or prompt_token_ids, not both")
            prompts = [{"prompt_token_ids": ids} for ids in prompt_token_ids]
        if prompts is None:
            raise ValueError("no prompts given")
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and all(isinstance(t, int) for t in prompts)
        ):
            prompts = [prompts]
        prompts = list(prompts)
        params = self._params_per_prompt(sampling_params, len(prompts))
        if priority is not None:
            if len(priority) != len(prompts):
                raise ValueError("priority needs one value per prompt")
            for p, prio in zip(params, priority):
                p.priority = prio
        if lora_request is None or isinstance(lora_request, LoRARequest):
            loras = [lora_request] * len(prompts)
        else:
            loras = list(lora_request)
            if len(loras) != len(prompts):
                raise ValueError(f"{len(loras)} LoRA requests for {len(prompts)} prompts")
        return self._run(prompts, params, use_tqdm, loras)

    def chat(
        self,
        messages: Conversation | list[Conversation],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        chat_template: str | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        tools: list[dict] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> list[RequestOutput]:
        """Applies the chat template to one conversation (a list of messages) or several, and
        generates a reply for each."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        tokenizer = self.llm_engine.tokenizer
        prompts = []
        for conv in conversations:
            text = tokenizer.apply_chat_template(
                conv, add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message, tools=tools,
                chat_template=chat_template, **(chat_template_kwargs or {}))
            # The template already carries any BOS token.
            prompts.append({"prompt": text,
                            "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)})
        params = self._params_per_prompt(sampling_params, len(prompts))
        return self._run(prompts, params, use_tqdm)

    def beam_search(self, prompts: Sequence[PromptType], params: BeamSearchParams,
                    use_tqdm: bool = True) -> list[BeamSearchOutput]:
        """Beam search for each prompt; returns the beam_width best sequences of each, best
        first (score = cumulative logprob / length ** length_penalty)."""
        engine = self.llm_engine
        tokenizer = engine.tokenizer
        results = []
        for prompt in tqdm(list(prompts), desc="Beam search", disable=not use_tqdm):
            text, ids = engine.encode_prompt(prompt)
            beams = engine.beam_search(ids, params)
            results.append(BeamSearchOutput(prompt=text, prompt_token_ids=ids, sequences=[
                BeamSequence(tokens=b.tokens, text=tokenizer.decode(b.tokens),
                             cum_logprob=b.cum_logprob,
                             score=b.score(params.length_penalty)) for b in beams]))
        return results

    # ---- internals ---------------------------------------------------------------------------

    @staticmethod
    def _params_per_prompt(sampling_params, n: int) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams() for _ in range(n)]
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * n
        params = list(sampling_params)
        if len(params) != n:
            raise ValueError(f"{len(params)} sampling params for {n} prompts")
        return params

    def _run(self, prompts: list, params: list[SamplingParams], use_tqdm: bool,
             loras: list | None = None) -> list[RequestOutput]:
        engine = self.llm_engine
        ids = []
        for prompt, p, lora in zip(prompts, params, loras or [None] * len(prompts)):
            ids.append(engine.add_request(prompt, p, lora_request=lora))
        results: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="Processed prompts", unit="req", disable=not use_tqdm,
                   dynamic_ncols=True)
        start = time.perf_counter()
        generated = 0
        try:
            while engine.has_unfinished_requests():
                for out in engine.step():
                    results[out.request_id] = out
                    generated += len(out.outputs[0].token_ids)
                    bar.update(1)
                    elapsed = max(time.perf_counter() - start, 1e-9)
                    bar.set_postfix_str(f"output {generated / elapsed:.1f} tok/s")
        except BaseException:
            for rid in ids:
                if rid not in results:
                    engine.abort_request(rid)
            raise
        finally:
            bar.close()
        return [results[rid] for rid in ids]
