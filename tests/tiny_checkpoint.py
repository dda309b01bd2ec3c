"""Tiny random Llama checkpoints in Hugging Face's layout, for tests.

`write_checkpoint`: 2 layers and a word-level tokenizer, with tools to damage it (the hostile-input tests).
`write_tiny_checkpoint`: 4 layers and a byte-level tokenizer, so any text encodes (the harness tests: a
sweep over a few examples takes a second or two). Both are ordinary checkpoint folders that the CLI loads
by path like any other model.
`tiny_model`: a 3-layer random model in memory, with grouped-query heads and, if asked, a sliding window.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from minillm.config import ModelConfig
from minillm.model import Transformer

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
    "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 64,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2,
    "tie_word_embeddings": False,
}
SPECIAL = ["<unk>", "<s>", "</s>"]
WORDS = ["hello", "world", "the", "capital", "of", "france", "is", "paris"]


def tiny_model(sliding_window: int | None = None, num_kv_heads: int = 2) -> Transformer:
    """3 layers, 4 query heads, weights drawn from N(0, 0.3) after seed 0; Mistral when sliding_window is set."""
    config = ModelConfig(architecture="MistralForCausalLM" if sliding_window else "LlamaForCausalLM",
                         vocab_size=60, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4,
                         num_kv_heads=num_kv_heads, head_dim=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                         max_position_embeddings=300, sliding_window=sliding_window)
    torch.manual_seed(0)
    model = Transformer(config).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.3)
    return model


def hf_state(config: dict = CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the model `config` describes, under Hugging Face's names."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(config))
    for parameter in model.parameters():
        torch.nn.init.normal_(parameter, std=0.2)
    return {("" if name == "lm_head.weight" else "model.") + name: tensor.detach().clone().contiguous()
            for name, tensor in model.state_dict().items()}


def word_tokenizer(vocab_size: int) -> Tokenizer:
    """A word-level tokenizer whose ids run from 0 to vocab_size - 1: the special tokens, words, fillers."""
    names = SPECIAL + WORDS + [f"w{i}" for i in range(vocab_size - len(SPECIAL) - len(WORDS))]
    tokenizer = Tokenizer(models.WordLevel({name: i for i, name in enumerate(names)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def write_checkpoint(folder: Path, config: dict = CONFIG, state: dict | None = None,
                     tokenizer_vocab: int | None = None) -> Path:
    """Write the tiny checkpoint into `folder` (created) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(hf_state(config) if state is None else state, folder / "model.safetensors")
    word_tokenizer(tokenizer_vocab or config["vocab_size"]).save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return folder


def assert_one_line_error(code: int, err: str, *fragments: str) -> str:
    """Exit status 2 and exactly one `minillm: error:` line on stderr that contains every fragment."""
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("minillm: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    assert "Traceback" not in err and "weights_only" not in err
    return lines[0]


# --- damaging a safetensors file -----------------------------------------------------------------

def read_safetensors(path: Path) -> tuple[dict, bytes]:
    """(header, data bytes) of a safetensors file."""
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + length]), raw[8 + length:]


def write_safetensors(path: Path, header, data: bytes, header_length: int | None = None) -> None:
    """Write a header (any JSON value) and data, with the true header length unless one is given."""
    text = json.dumps(header).encode()
    length = len(text) if header_length is None else header_length
    path.write_bytes(length.to_bytes(8, "little") + text + data)


def change_header(path: Path, change) -> None:
    """Apply `change(header)` (which edits the dict in place or returns a new value) to a safetensors header."""
    header, data = read_safetensors(path)
    changed = change(header)
    write_safetensors(path, header if changed is None else changed, data)


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
              "max_position_embeddings": 4096, "eos_token_id": byte_vocab["<eos>"]}
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
