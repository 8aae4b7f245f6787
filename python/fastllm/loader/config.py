"""`load_config`: one HF-style configuration dictionary for any `ModelSource`.

The result always carries these keys (HF `config.json` names), whatever the source:
architectures, model_type, hidden_size, intermediate_size, num_hidden_layers,
num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, rope_theta, rope_scaling,
max_position_embeddings, vocab_size, tie_word_embeddings, bos_token_id, eos_token_id (int or
list), torch_dtype. Other keys of a `config.json` pass through unchanged.

transformers 5 writes `rope_parameters` instead of `rope_theta`/`rope_scaling` and `dtype`
instead of `torch_dtype`; both spellings are accepted and the classic keys are filled in.
"""

from __future__ import annotations

import json
import os
from typing import Any

from fastllm.models.registry import ARCHITECTURES

from .gguf_file import open_gguf
from .gguf_mapping import gguf_config
from .source import ModelSource


def load_config(source: ModelSource) -> dict[str, Any]:
    """HF-style config dict for `source`; ValueError naming the file if it is missing/invalid."""
    if source.gguf_path is not None:
        return gguf_config(open_gguf(source.gguf_path))
    path = os.path.join(source.model_dir, "config.json")
    config = read_json(path)
    if not isinstance(config, dict):
        raise ValueError(f"config file {path} does not hold a JSON object")  # noqa: TRY004
    return normalize_hf_config(config)


def read_json(path: str) -> Any:
    """Parsed JSON of `path`; ValueError naming it when missing or malformed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ValueError(f"missing file {path}") from None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read JSON file {path}: {exc}") from exc


def normalize_hf_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill the guaranteed keys of a `config.json` dict with HF's defaults (a new dict). Keys a
    registered architecture spells its own way (GPT-2's `n_embd`, OPT's `ffn_dim`: the
    registry's `config_aliases`) are copied to the common names first."""
    out = dict(config)
    archs = out.get("architectures") or [None]
    spec = ARCHITECTURES.get(archs[0]) if isinstance(archs, list) and archs else None
    if spec is not None:
        for theirs, ours in spec.config_aliases.items():
            if out.get(theirs) is not None and out.get(ours) is None:
                out[ours] = out[theirs]
    missing = [
        k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads") if k not in out
    ]
    if missing:
        raise ValueError(f"config.json lacks required keys {missing}")
    heads = int(out["num_attention_heads"])
    out.setdefault("architectures", None)
    out.setdefault("model_type", None)
    out.setdefault("intermediate_size", 4 * int(out["hidden_size"]))
    if out.get("num_key_value_heads") is None:
        out["num_key_value_heads"] = heads
    if out.get("head_dim") is None:
        out["head_dim"] = int(out["hidden_size"]) // heads
    out.setdefault("rms_norm_eps", 1e-6)
    rope_parameters = out.get("rope_parameters") or {}
    if out.get("rope_theta") is None:
        out["rope_theta"] = float(rope_parameters.get("rope_theta", 10000.0))
    if "rope_scaling" not in out:
        kind = rope_parameters.get("rope_type", "default")
        scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        out["rope_scaling"] = scaling if kind != "default" else None
    out.setdefault("max_position_embeddings", 2048)
    out.setdefault("vocab_size", None)
    out.setdefault("tie_word_embeddings", False)
    out.setdefault("bos_token_id", None)
    out.setdefault("eos_token_id", None)
    if out.get("torch_dtype") is None:
        out["torch_dtype"] = out.get("dtype") or "float32"
    return out
