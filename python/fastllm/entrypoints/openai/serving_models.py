"""GET /v1/models, /health, /version and POST /tokenize, /detokenize."""

from __future__ import annotations

from fastllm.entrypoints.openai.errors import APIError
from fastllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from fastllm.entrypoints.openai.serving_base import OpenAIServingBase
from fastllm.version import __version__


class OpenAIServingModels(OpenAIServingBase):
    def __init__(self, engine, served_model_names: list[str], model_root: str | None = None,
                 **kwargs):
        """model_root: the model as the server was given it (the cards' `root`; None: each
        served name)."""
        super().__init__(engine, served_model_names, **kwargs)
        self.model_root = model_root

    def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=n, root=self.model_root or n,
                                         max_model_len=self.max_model_len)
                               for n in self.served_model_names])

    def health(self) -> None:
        """Raises a 503 APIError while the engine does not run."""
        if not self.engine.is_healthy:
            raise APIError("the engine is not running", status=503,
                           err_type="ServiceUnavailableError")

    @staticmethod
    def version() -> dict:
        return {"version": __version__}

    async def tokenize(self, request: TokenizeRequest) -> dict:
        self.model_name(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError("give exactly one of prompt or messages", param="prompt")
        if request.messages is not None:
            text = self.render_chat(request.messages, request.add_generation_prompt,
                                    request.continue_final_message, request.chat_template,
                                    request.chat_template_kwargs)
            ids = await self.engine.encode(text, False)
        else:
            ids = await self.engine.encode(request.prompt, bool(request.add_special_tokens))
        return {"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len}

    def detokenize(self, request: DetokenizeRequest) -> dict:
        self.model_name(request.model)
        vocab = self.vocab_size
        if any(t < 0 or t >= vocab for t in request.tokens):
            raise APIError("token ids must be within the vocabulary", param="tokens")
        return {"prompt": self.engine.decode(request.tokens)}
