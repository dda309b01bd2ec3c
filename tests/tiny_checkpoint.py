"""A tiny random Llama checkpoint for harness tests: 4 layers of width 32 and a byte-level tokenizer.

Saved as an ordinary checkpoint folder, so the CLI loads it by path like any other model; a sweep over
a few examples then takes a second or two.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from minillm.config import ModelConfig
from minillm.model import Transformer


def write_tiny_checkpoint(folder: Path, num_layers: int = 4) -> Path:
    """A random Llama (seeded) and a byte-level tokenizer (256 bytes + an EOS) in `folder`."""
    byte_vocab = {symbol: index for index, symbol in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    byte_vocab["<eos>"] = len(byte_vocab)
    tokenizer = Tokenizer(models.BPE(vocab=byte_vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<eos>", "add_bos_token": False}))
    config = {"architectures": ["LlamaForCausalLM"], "vocab_size": len(byte_vocab), "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": num_layers, "num_attention_heads": 4,
              "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
              "max_position_embeddings": 512, "eos_token_id": byte_vocab["<eos>"]}
    (folder / "config.json").write_text(json.dumps(config))
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(config))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3) if parameter.dim() > 1 else parameter.uniform_(0.5, 1.5)
    weights = {("" if name == "lm_head.weight" else "model.") + name: tensor.contiguous()
               for name, tensor in model.state_dict().items()}
    save_file(weights, str(folder / "model.safetensors"))
    return folder
