"""Layers over weights kept in their GGUF block encoding (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K), or as
FP8 checkpoints store them.

``QuantLinear`` replaces ``nn.Linear``: its weight is a uint8 buffer ``[out_features,
bytes_per_row]`` of whole ggml blocks, read by the ``fastllm::quant_linear`` kernel. Blocks never
straddle rows, so fused projections (Q/K/V, gate/up) are the raw rows of their parts stacked.
``QuantEmbedding`` looks token rows up in the same encoding and dequantizes only those rows.
``Fp8Linear`` holds e4m3 codes ``[out_features, in_features]`` and one scale per row (CUDA's
layout for FP8 checkpoints, ``loader.hf_quant.keeps_fp8_rows``), read by ``fastllm::fp8_linear``;
fused projections stack their parts' rows and scales.
"""

from __future__ import annotations

from fastllm import kernels, ops
from fastllm.models.native_cpu import prepare_cpu_linear
from fastllm.torch_extra import torch

nn = torch.nn

_quant_linear_eager = ops.eager(ops.quant_linear)
_fp8_linear = ops.model_op(ops.fp8_linear)


def quant_row_bytes(quant_type: str, in_features: int) -> int:
    """Bytes of one row of ``in_features`` values in ``quant_type``."""
    values, nbytes = ops.quant_block_info(ops.GGML_QUANT_TYPES[quant_type])
    if in_features % values:
        raise ValueError(f"{quant_type}: {in_features} values are not whole blocks of {values}")
    return in_features // values * nbytes


class QuantLinear(nn.Module):
    """``y = x @ W.T (+ bias)`` for float32 ``x``, with ``W`` in a GGUF block encoding."""

    def __init__(self, in_features: int, out_features: int, quant_type: str, bias: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.quant_type = quant_type
        self.type_id = ops.GGML_QUANT_TYPES[quant_type]
        row_bytes = quant_row_bytes(quant_type, in_features)
        self.register_buffer("qweight", torch.empty((out_features, row_bytes), dtype=torch.uint8,
                                                    device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.bias = None
        # Output projections on the CPU (eager): outputs per row recomputed without activation
        # rounding (kernels.refine_top_logits) from refine_rows ((uint8 rows, type id); None:
        # qweight); set by the loader.
        self.refine_top = 0
        self.refine_rows: tuple[torch.Tensor, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype != torch.float32:
            x = x.float()
        if torch.compiler.is_compiling():
            y = ops.quant_linear(x, self.qweight, self.type_id, self.out_features, self.bias)
        elif x.device.type == "cpu":
            # Numpy views cross into the kernel far cheaper than DLPack (see fastllm.ops), and the
            # weight's view is made once.
            y = torch.empty((*x.shape[:-1], self.out_features), dtype=torch.float32)
            qweight, bias = self._numpy_weights()
            kernels.quant_gemm(y.numpy(), x.numpy(), qweight, self.type_id, bias, True, 0)
            if self.refine_top:
                rows, rows_type = ((self.refine_rows[0].numpy(), self.refine_rows[1])
                                   if self.refine_rows else (qweight, self.type_id))
                kernels.refine_top_logits(y.numpy(), x.numpy(), rows, rows_type, bias,
                                          self.refine_top)
        else:
            y = _quant_linear_eager(x, self.qweight, self.type_id, self.out_features, self.bias)
        return y if dtype == torch.float32 else y.to(dtype)

    def repack_for_cpu(self, output: bool = False) -> None:
        """Rewrites a CPU Q4_0/Q4_1 weight in place into the 8-row interleaved layout that the CPU
        GEMM reads fastest and computes batch-invariantly (``native_cpu.prepare_cpu_linear``, as
        the torch-free path does; same bytes). ``output`` (the output projection): Q8_0 rows are
        replaced by a Q8_0x8 copy (or a 7-bit Q7_0x8 one), as on the torch-free path. Other
        types, devices, or a second call leave it as it is."""
        if self.qweight.device.type == "cpu":
            weight, self.type_id = prepare_cpu_linear(self.qweight.numpy(), self.type_id, output)
            if weight.shape != self.qweight.shape:
                self.qweight = torch.from_numpy(weight)

    def _numpy_weights(self):
        cached = self.__dict__.get("_numpy_cache")
        if cached is None or cached[0] is not self.qweight or cached[1] is not self.bias:
            bias = None if self.bias is None else self.bias.detach().numpy()
            cached = (self.qweight, self.bias, self.qweight.numpy(), bias)
            self.__dict__["_numpy_cache"] = cached
        return cached[2], cached[3]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"quant_type={self.quant_type}, bias={self.bias is not None}")


class Fp8Linear(nn.Module):
    """``y = scale * (x @ e4m3(W).T) (+ bias)``: ``qweight`` uint8 e4m3fn codes ``[out_features,
    in_features]``, ``weight_scale`` float32 ``[out_features]``, a float32 bias. The kernel takes
    float32 activations; other dtypes convert around it (as for ``QuantLinear``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 device: torch.device | str | None = None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("qweight", torch.empty((out_features, in_features),
                                                    dtype=torch.uint8, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32,
                                                         device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False)
        else:
            self.bias = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        y = _fp8_linear(x.float(), self.qweight, self.weight_scale, self.bias)
        return y if dtype == torch.float32 else y.to(dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"fp8_e4m3 rows, bias={self.bias is not None}")


# Byte layout of the 32-value encodings: (bytes per block, offset of the quants, has min).
_EMBED_LAYOUTS = {"Q8_0": (34, 2, False), "Q4_0": (18, 2, False), "Q4_1": (20, 4, True)}


class QuantEmbedding(nn.Module):
    """Token embedding over Q8_0/Q4_0/Q4_1 rows; only the looked-up rows are dequantized (the
    same float32 arithmetic as the GGUF loader, so values equal the dequantized table's)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, quant_type: str,
                 device: torch.device | str | None = None):
        super().__init__()
        if quant_type not in _EMBED_LAYOUTS or embedding_dim % 32:
            raise ValueError(f"QuantEmbedding cannot read {quant_type} rows of {embedding_dim}")
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        self.quant_type = quant_type
        # The ggml type id, or the CPU layout's when the table is shared with a repacked lm_head.
        self.type_id = ops.GGML_QUANT_TYPES[quant_type]
        row_bytes = quant_row_bytes(quant_type, embedding_dim)
        self.register_buffer("qweight", torch.empty((num_embeddings, row_bytes),
                                                    dtype=torch.uint8, device=device))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.device.type == "cpu" and not torch.compiler.is_compiling():
            ids = input_ids.reshape(-1).to(torch.int32).numpy()
            out = torch.empty((len(ids), self.embedding_dim), dtype=torch.float32)
            kernels.embed_quant_rows(out.numpy(), self.qweight.numpy(), self.type_id, ids)
            return out.view(*input_ids.shape, self.embedding_dim)
        block_bytes, quant_offset, has_min = _EMBED_LAYOUTS[self.quant_type]
        rows = self.qweight[input_ids.reshape(-1)]
        blocks = rows.view(rows.shape[0], -1, block_bytes)
        d = blocks[..., 0:2].contiguous().view(torch.float16).float()
        raw = blocks[..., quant_offset:].contiguous()
        if self.quant_type == "Q8_0":
            q = raw.view(torch.int8).float()
        else:
            q = torch.cat([raw & 0x0F, raw >> 4], dim=-1).float()
        if self.quant_type == "Q4_0":
            q = q - 8.0
        values = q * d
        if has_min:
            values = values + blocks[..., 2:4].contiguous().view(torch.float16).float()
        return values.view(*input_ids.shape, self.embedding_dim)
