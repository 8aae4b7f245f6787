"""Build a model whose linear layers keep the GGUF file's block encoding (the CPU fast path),
or an HF quantized checkpoint's weights converted to those encodings (``loader.hf_quant``).

    if args.use_quantized_weights(source, device.type):
        model = load_quantized_model(cls, model_config, source, device, dtype)

Every ``nn.Linear`` whose checkpoint parts are in encodings ``quant_linear`` reads becomes a
``QuantLinear`` holding their raw rows stacked (Q/K/V, gate/up; parts of different encodings are
converted to Q8_0 first); a tied output projection reads
the token embedding's rows, which ``QuantEmbedding`` also looks tokens up in (one copy of the
table). On CUDA (``hf_quant.keeps_fp8_rows``) an FP8 checkpoint's linears with per-row scales
become ``Fp8Linear`` layers over the stored e4m3 codes instead. Everything else (norms, biases,
float or unsupported tensors) is dequantized and loaded by the model's own ``load_weights``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import numpy as np

from fastllm.config import ModelConfig
from fastllm.kernels import GGML_QUANT_TYPES, quant_rows_supported
from fastllm.loader import ModelSource, RawGGUFTensor, dequantize_raw
from fastllm.loader.hf_quant import (
    ConversionStats,
    Fp8Rows,
    float_rows,
    keeps_fp8_rows,
    open_quantized_tensors,
)
from fastllm.loader.tensor_cast import cast_weight
from fastllm.models.native_cpu import Q8_0X8, convert_rows, lm_head_refine_count
from fastllm.models.quant_linear import Fp8Linear, QuantEmbedding, QuantLinear
from fastllm.torch_extra import torch

nn = torch.nn

logger = logging.getLogger(__name__)

QUANTIZED_WEIGHTS_MODES = ("auto", "dequantize")


def configure_cpu_threads() -> None:
    """With the GEMMs in fastllm's kernel pool (FASTLLM_CPU_THREADS, default all cores), torch
    only runs small glue ops (embedding rows, gathers): one intra-op thread keeps its OpenMP
    workers from spinning against the pool on the same cores. FASTLLM_TORCH_THREADS overrides."""
    wanted = int(os.environ.get("FASTLLM_TORCH_THREADS", "1"))
    if wanted > 0 and torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)


def _raw_tensor(raw: RawGGUFTensor, dtype: torch.dtype) -> torch.Tensor:
    return cast_weight(torch.from_numpy(dequantize_raw(raw)), dtype)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


def _linear_parts(model: nn.Module, name: str) -> list[str]:
    """Checkpoint names (HF) of the weights a (possibly fused) linear layer is built from."""
    fused = name.rpartition(".")[2]
    parts = sorted(((idx, part) for part, (target, idx) in getattr(model, "_stacked", {}).items()
                    if target == fused))
    prefix = name.rpartition(".")[0]
    if not parts:
        return [f"{name}.weight"]
    return [f"{prefix}.{part}.weight" for _, part in parts]


def _quantize_linears(model: nn.Module, raw: dict[str, RawGGUFTensor], device: torch.device,
                      release: Callable[[str], None]) -> tuple[int, set[str]]:
    consumed: set[str] = set()
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        parts = [raw.get(p) for p in _linear_parts(model, name)]
        if any(p is None for p in parts):
            continue
        types = {p.ggml_type for p in parts}
        if not all(quant_rows_supported(t, module.in_features) for t in types):
            continue
        # Parts of different types (a Q4_K_M file's Q4_K queries and Q6_K values) go as Q8_0.
        quant_type = next(iter(types)) if len(types) == 1 else "Q8_0"
        rows = [p.data if p.ggml_type == quant_type else
                convert_rows(p.data, GGML_QUANT_TYPES[p.ggml_type], GGML_QUANT_TYPES[quant_type])
                for p in parts]
        quant = QuantLinear(module.in_features, module.out_features, quant_type,
                            bias=module.bias is not None, device=device)
        shape = (sum(r.shape[0] for r in rows), quant.qweight.shape[1])
        if shape != tuple(quant.qweight.shape) or any(r.shape[1] != shape[1] for r in rows):
            raise ValueError(f"{name}: GGUF rows {[p.data.shape for p in parts]} do not match "
                             f"{tuple(quant.qweight.shape)}")
        # Straight from the file's pages into the layer (no intermediate copy).
        np.concatenate(rows, axis=0, out=quant.qweight.numpy())
        for p in parts:
            release(p.gguf_name)
        _set_module(model, name, quant)
        consumed.update(p.name for p in parts)
        count += 1
    return count, consumed


def _fp8_linears(model: nn.Module, fp8: dict[str, Fp8Rows], raw: dict[str, RawGGUFTensor],
                 device: torch.device) -> tuple[int, set[str]]:
    """Each linear whose parts are all FP8 rows becomes an Fp8Linear over them (rows and scales
    stacked in the fused layer's order). FP8 parts that no such layer takes (a fused layer
    mixing encodings) join ``raw`` as Q8_0 rows, the CPU's layout, for the block layers."""
    consumed: set[str] = set()
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name == "lm_head":
            continue
        parts = [fp8.get(p) for p in _linear_parts(model, name)]
        if any(p is None for p in parts):
            continue
        if sum(p.codes.shape[0] for p in parts) != module.out_features or \
                any(p.codes.shape[1] != module.in_features for p in parts):
            raise ValueError(f"{name}: FP8 rows {[p.codes.shape for p in parts]} do not match "
                             f"[{module.out_features}, {module.in_features}]")
        layer = Fp8Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=device)
        np.concatenate([p.codes for p in parts], axis=0, out=layer.qweight.numpy())
        np.concatenate([p.scale for p in parts], out=layer.weight_scale.numpy())
        _set_module(model, name, layer)
        consumed.update(f"{p.name}.weight" for p in parts)
        count += 1
    stats = ConversionStats()
    for name, rows in fp8.items():
        if name not in consumed:
            raw[name] = float_rows(name, rows.dequantize(), stats)
    return count, consumed


def _quantize_experts(model: nn.Module, raw: dict[str, RawGGUFTensor], device: torch.device,
                      release: Callable[[str], None]) -> set[str]:
    """Each sparse MLP (models.moe.SparseMoe) whose experts are in encodings the grouped kernel
    reads becomes a QuantSparseMoe over their rows (CPU only: the kernel is the CPU's)."""
    consumed: set[str] = set()
    if device.type != "cpu":
        return consumed
    from fastllm.models.moe import QuantSparseMoe, SparseMoe
    from fastllm.models.moe_weights import find_moe_parts, stack_moe_rows

    for name, module in list(model.named_modules()):
        if not isinstance(module, SparseMoe):
            continue
        s = model.moe
        hidden = model.config.hidden_size
        parts = find_moe_parts(raw, name, s.num_experts, s.intermediate, hidden)
        rows = None if parts is None else stack_moe_rows(parts, hidden, s.intermediate)
        if rows is None:
            continue
        _set_module(model, name, QuantSparseMoe(
            s, torch.from_numpy(rows.router), rows.router_type, torch.from_numpy(rows.gate_up),
            rows.gate_up_type, torch.from_numpy(rows.down), rows.down_type))
        for gguf_name in parts.gguf_names:
            release(gguf_name)
        consumed |= parts.names
    return consumed


def _quantize_output(model: nn.Module, config: ModelConfig, raw: dict[str, RawGGUFTensor],
                     device: torch.device, release: Callable[[str], None]) -> set[str]:
    """A quantized output projection (and, when tied, the embedding over the same rows)."""
    embed = raw.get(_embedding_name(model))
    head = raw.get("lm_head.weight")
    hidden, vocab = config.hidden_size, config.vocab_size
    consumed: set[str] = set()
    source = embed if config.tie_word_embeddings or head is None else head
    if source is None or not quant_rows_supported(source.ggml_type, hidden):
        return consumed
    lm_head = QuantLinear(hidden, vocab, source.ggml_type, device=device)
    np.copyto(lm_head.qweight.numpy(), source.data.reshape(lm_head.qweight.shape))
    release(source.gguf_name)
    model.set_quantized_lm_head(lm_head)
    consumed.add(source.name)
    if source is embed:
        try:
            embedding = QuantEmbedding(vocab, hidden, embed.ggml_type, device="meta")
        except ValueError:
            consumed.discard(embed.name)  # the embedding still needs its float table
        else:
            embedding.qweight = lm_head.qweight  # one copy of the table serves both
            model.set_input_embeddings(embedding)
    if head is not None and source is not head:
        consumed.add(head.name)  # tied: the embedding's rows serve as the output projection
    return consumed


def _embedding_name(model: nn.Module) -> str:
    """The checkpoint name of the model's token table (``model.embed_tokens.weight`` for the
    Llama family, ``transformer.wte.weight`` for GPT-2)."""
    table = model.get_input_embeddings()
    return next(name for name, module in model.named_modules() if module is table) + ".weight"


def _materialize(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Gives every parameter and buffer still on the meta device (uninitialized) storage."""
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                dt = dtype if param.is_floating_point() else param.dtype
                setattr(module, name, nn.Parameter(torch.empty(param.shape, dtype=dt,
                                                               device=device),
                                                   requires_grad=False))
        for name, buf in list(module.named_buffers(recurse=False)):
            if buf.is_meta:
                dt = dtype if buf.is_floating_point() else buf.dtype
                module._buffers[name] = torch.empty(buf.shape, dtype=dt, device=device)


def _repack_for_cpu(model: nn.Module) -> None:
    """Every CPU QuantLinear in its fastest layout; a tied embedding follows its table (to the
    output projection's Q8_0x8 copy, which holds the same values) unless the output projection's
    copy changed them (Q7_0x8). The output projection refines its leading logits as the
    torch-free path does (native_cpu.lm_head_refine_count), from the tied table beside a 7-bit
    copy."""
    head = getattr(model, "quant_lm_head", None)
    embed = model.get_input_embeddings()
    shares_table = isinstance(embed, QuantEmbedding) and isinstance(head, QuantLinear) and \
        embed.qweight is head.qweight
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.repack_for_cpu(output=module is head)
        elif hasattr(module, "repack_for_cpu"):  # models.moe.QuantSparseMoe
            module.repack_for_cpu()
    if isinstance(head, QuantLinear):
        head.refine_top = lm_head_refine_count(head.type_id)
    if shares_table and (embed.qweight is head.qweight or head.type_id == Q8_0X8):
        embed.qweight, embed.type_id = head.qweight, head.type_id
    elif shares_table:  # a 7-bit copy: the table keeps the model's values for the refinement
        head.refine_rows = (embed.qweight, embed.type_id)


@torch.no_grad()
def load_quantized_model(cls: type, config: ModelConfig, source: ModelSource,
                         device: torch.device, dtype: torch.dtype,
                         layout_device: str | None = None) -> nn.Module:
    """The model of ``cls`` with GGUF-encoded linear layers (see the module docstring). Built on
    the CPU; on another device (an HF quantized checkpoint on a GPU) moved there afterwards.
    ``layout_device`` (default: ``device``'s type) is the device type whose weight layouts are
    built, so a test can build CUDA's layers on the CPU and run them with the CPU kernels."""
    target = device
    device = torch.device("cpu")
    layout = layout_device or target.type
    configure_cpu_threads()
    # Built on the meta device: the float weights the quantized layers replace are never
    # allocated; what remains (norms, biases, unsupported tensors) gets storage below.
    with torch.device("meta"):
        model = cls(config)
    # A float output projection becomes Q8_0 only for the CPU's integer kernels.
    raw, pages, fp8 = open_quantized_tensors(source, quantize_output=layout == "cpu",
                                             keep_fp8=keeps_fp8_rows(layout))
    fp8_count, fp8_names = _fp8_linears(model, fp8, raw, device)
    del fp8
    # Each tensor's file pages leave the resident set once copied, so loading never holds the
    # file and the model in memory together.
    expert_names = _quantize_experts(model, raw, device, pages.release_pages)
    count, consumed = _quantize_linears(model, raw, device, pages.release_pages)
    count += fp8_count
    consumed |= expert_names | fp8_names
    consumed |= _quantize_output(model, config, raw, device, pages.release_pages)
    _materialize(model, device, dtype)
    model.init_buffers(device)
    rest = ((name, _raw_tensor(t, dtype)) for name, t in raw.items() if name not in consumed)
    model.load_weights(rest)
    del raw, rest
    pages.release_pages()
    if layout == "cpu":
        _repack_for_cpu(model)
    if target.type != "cpu":
        model = model.to(target)
        model.init_buffers(target)
    kinds = sorted({m.quant_type for m in model.modules() if isinstance(m, QuantLinear)} |
                   ({"FP8 rows"} if fp8_count else set()))
    method = "GGUF" if source.is_gguf else source.quant.method
    if expert_names:
        logger.info("kept %s quantization for the experts of %d sparse layers", method,
                    sum(1 for m in model.modules() if hasattr(m, "gate_up_type")))
    logger.info("kept %s quantization for %d linear layers (%s)%s", method, count,
                ", ".join(kinds),
                " and the output projection" if "lm_head" in str(consumed) or
                "embed_tokens" in str(consumed) else "")
    return model
