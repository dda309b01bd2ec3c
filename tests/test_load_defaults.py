"""Defaults for big models: dtype "auto", the missing-device error, and the batch that fits a memory budget."""

import json

import pytest
import torch
import transformers

import minillm
from minillm.api import auto_dtype
from minillm.config import ModelConfig
from minillm.errors import UsageError
from minillm.memory import auto_batch_size, bytes_per_sequence


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    """A tiny checkpoint whose config.json says torch_dtype bfloat16 (the embedded tokenizer files are not
    needed: auto_dtype reads config.json only)."""
    folder = tmp_path_factory.mktemp("bf16")
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2))
    hf.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("dtype", None)
    config["torch_dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_auto_dtype_is_the_checkpoints_on_a_gpu_and_float32_on_the_cpu(bf16_checkpoint, tmp_path):
    assert auto_dtype(bf16_checkpoint, torch.device("cuda")) == torch.bfloat16
    assert auto_dtype(bf16_checkpoint, torch.device("cpu")) == torch.float32
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "float16"}))  # transformers 5's key
    assert auto_dtype(tmp_path, torch.device("cuda")) == torch.float16
    (tmp_path / "config.json").write_text(json.dumps({}))
    assert auto_dtype(tmp_path, torch.device("cuda")) == torch.float32


def test_load_defaults_to_float32_on_the_cpu_without_gradients():
    model, _ = minillm.load("smollm2-135m")
    assert model.embed_tokens.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_load_refuses_a_missing_device_in_one_line():
    with pytest.raises(UsageError, match=r"^device 'cuda': no cuda device is available on this machine") as error:
        minillm.load("smollm2-135m", device="cuda")
    assert "\n" not in str(error.value)


def llama_7b() -> ModelConfig:
    return ModelConfig(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5,
                       rope_theta=10000.0)


def test_bytes_per_sequence_counts_the_kv_cache_states_activations_and_logits():
    config = llama_7b()
    got = bytes_per_sequence(config, torch.bfloat16, 292, 20)
    kv_cache = 2 * 32 * 32 * 128 * 312 * 2  # keys and values, 32 layers, 4096 wide, 312 positions, bf16
    states = 33 * 292 * 4096 * 2 + kv_cache  # H, and the shared cache beside a run's copy (all layers at k = 0)
    layer = 292 * (3 * 11008 * 2 + (3 * 4096 + 4096 + 2 * 4096) * 2 + 2 * 4096 * 4 + 312 * 2)
    logits = 32000 * (2 + 4)
    assert got == kv_cache + states + layer + logits
    assert bytes_per_sequence(config, torch.bfloat16, 292, 20, prompt_states=False) == got - states
    assert bytes_per_sequence(config, torch.float32, 292, 20, prompt_states=False) > got - states  # wider


def test_auto_batch_size_is_the_largest_that_fits():
    config = llama_7b()
    each = bytes_per_sequence(config, torch.bfloat16, 292, 20)
    assert auto_batch_size(config, torch.bfloat16, 292, 20, budget=10 * each, headroom=0) == 10
    assert auto_batch_size(config, torch.bfloat16, 292, 20, budget=11 * each - 1, headroom=0) == 10
    assert auto_batch_size(config, torch.bfloat16, 292, 20, budget=10 * each, headroom=0.5) == 5
    assert auto_batch_size(config, torch.bfloat16, 292, 20, budget=0) == 1  # never 0: one sequence is tried
    assert auto_batch_size(config, torch.bfloat16, 1, 0, budget=10**15) == 1024  # capped
    # without the shared prompt states (plain generation) more sequences fit
    assert auto_batch_size(config, torch.bfloat16, 292, 20, budget=10 * each, headroom=0, prompt_states=False) > 10
    with pytest.raises(ValueError, match="longest_prompt"):
        auto_batch_size(config, torch.bfloat16, 0, 20, budget=10**9)
