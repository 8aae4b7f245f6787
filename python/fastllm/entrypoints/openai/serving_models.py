"""GET /v1/models, /health, /version and POST /tokenize, /detokenize."""

from __future__ import annotations

from fastllm.entrypoints.openai.errors import APIError
from fastllm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    LoadLoRAAdapterRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    UnloadLoRAAdapterRequest,
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
        base = [ModelCard(id=n, root=self.model_root or n, max_model_len=self.max_model_len)
                for n in self.served_model_names]
        # LoRA adapters are models of their own, whose parent is the base model.
        adapters = [ModelCard(id=name, root=lora.lora_path, parent=self.served_model_names[0],
                              max_model_len=self.max_model_len)
                    for name, lora in self.engine.lora_adapters().items()]
        return ModelList(data=base + adapters)

    def load_lora_adapter(self, request: LoadLoRAAdapterRequest) -> str:
        """POST /v1/load_lora_adapter: 400 naming the reason when the adapter cannot be loaded
        (nothing is loaded then)."""
        if not self.engine.lora_enabled:
            raise APIError("this server serves no LoRA adapters (start it with --enable-lora)")
        if request.lora_name in self.served_model_names:
            raise APIError(f"`{request.lora_name}` is the base model's name",
                           param="lora_name")
        try:
            self.engine.serve_lora(request.lora_name, request.lora_path)
        except ValueError as e:
            raise APIError(str(e), param="lora_path") from e
        return f"Success: LoRA adapter '{request.lora_name}' added successfully."

    def unload_lora_adapter(self, request: UnloadLoRAAdapterRequest) -> str:
        """POST /v1/unload_lora_adapter: 404 for an unknown name, 400 while requests use it."""
        try:
            self.engine.unserve_lora(request.lora_name)
        except KeyError:
            raise APIError(f"The LoRA adapter `{request.lora_name}` is not loaded.", status=404,
                           param="lora_name") from None
        except ValueError as e:
            raise APIError(str(e), param="lora_name") from e
        return f"Success: LoRA adapter '{request.lora_name}' removed successfully."

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
