"""Looking inside the decoder with plain code instead of hooks: logit lens, attention, per-layer norms.

Every function starts from H, the residual stream of one forward pass
(`_, H = model(ids, output_hidden_states=True)`, H [L+1, B, T, D], H[j] entering layer j), and
recomputes from H[j] what layer j does with that layer's own modules. Nothing is recorded while
the model runs, so what you read here is exactly what is computed.

- `logit_lens`: next-token probabilities read from every H[j] through the final norm and the LM head.
- `attention_probabilities`: softmax(q k^T / sqrt(d)) per layer and head, for one query position.
- `layer_norms`: how far each layer's attention and MLP move one position's state, next to the
  norm of the state itself.

The recomputation is that of a plain layer. H of a manipulated pass works as long as every layer
still attends (random, freeze, swap): the previous tokens' entries of H are then what the layers
really saw. After skip_attention, layers >= k did not attend, whatever these functions say.

Positions index the (possibly left-padded) batch: -1 is every sequence's last token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minillm.model import Transformer, rope_inverse_frequencies, rope_tables, rotation


@torch.no_grad()
def logit_lens(model: Transformer, states: torch.Tensor, position: int = -1) -> torch.Tensor:
    """Next-token probabilities [L+1, B, V] (fp32) at `position`, read from each H[j] as if it were the last layer's
    output: softmax(lm_head(norm(H[j]))). The entry for H[L] is the model's own prediction.
    """
    position = _checked_position(position, states.shape[2])
    return model.lm_head(model.norm(states[:, :, position])).float().softmax(dim=-1)


def token_rank(probabilities: torch.Tensor, token_ids: torch.Tensor | int) -> torch.Tensor:
    """Rank of a token among probabilities [..., V] (0 = the top token), shape [...].

    token_ids: one id, or one per row, broadcast against [...] (e.g. [B] for the lens's [L+1, B, V]).
    """
    token_ids = torch.as_tensor(token_ids, device=probabilities.device).expand(probabilities.shape[:-1])
    chosen = probabilities.gather(-1, token_ids[..., None])  # [..., 1]
    return (probabilities > chosen).sum(dim=-1)


@dataclass
class LayerAttention:
    """What one layer's attention does for one query position of every sequence."""

    probabilities: torch.Tensor  # [B, heads, T] fp32: how much each head reads each key position
    output: torch.Tensor  # [B, D]: what attention adds to the residual stream there (after o_proj)


@torch.no_grad()
def layer_attention(model: Transformer, states: torch.Tensor, layer: int, position: int = -1,
                    attention_mask: torch.Tensor | None = None) -> LayerAttention:
    """Recompute layer `layer`'s attention from H[layer] for the query at `position`, as the explicit math path does.

    attention_mask [B, T]: 1 for real tokens, 0 for left padding (default: all real).
    """
    config = model.config
    if not 0 <= layer < config.num_layers:
        raise ValueError(f"layer {layer} is outside 0..{config.num_layers - 1}")
    block = model.layers[layer]
    x = block.input_layernorm(states[layer])  # [B, T, D]
    B, T, _ = x.shape
    query_position = _checked_position(position, T)
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.long, device=x.device)
    if attention_mask.shape != (B, T):
        raise ValueError(f"attention_mask has shape {list(attention_mask.shape)}, the states are for [{B}, {T}]")
    real = attention_mask.to(torch.bool)

    # RoPE positions count from each sequence's first real token, so left padding does not shift them.
    rope_positions = (real.long().cumsum(dim=1) - 1).clamp(min=0)
    cos, sin = rope_tables(rope_positions, rope_inverse_frequencies(config))
    attn = block.self_attn
    # q [B, heads, T, hd]; k, v [B, kv_heads, T, hd]
    q, k, v = attn.project(x, rotation(cos[:, None], sin[:, None], x.dtype))
    q = q[:, :, query_position]  # [B, heads, hd]
    # Grouped-query attention: key/value head h serves query heads h*g .. h*g+g-1.
    k = k.repeat_interleave(config.kv_groups, dim=1)  # [B, heads, T, hd]
    v = v.repeat_interleave(config.kv_groups, dim=1)

    scores = (q[:, :, None] @ k.transpose(-2, -1))[:, :, 0] * (1.0 / math.sqrt(config.head_dim))  # [B, heads, T]
    key_position = torch.arange(T, device=x.device)
    visible = (key_position <= query_position) & real  # causal, no padding: [B, T]
    if config.sliding_window is not None:  # Mistral: only the W most recent keys, the query's own included
        visible = visible & (key_position > query_position - config.sliding_window)
    visible = visible | (key_position == query_position)  # a padding query sees itself, as in the model
    probabilities = scores.float().masked_fill(~visible[:, None], float("-inf")).softmax(dim=-1)

    heads_out = (probabilities.to(v.dtype)[:, :, None] @ v)[:, :, 0]  # [B, heads, hd]
    output = attn.o_proj(heads_out.reshape(B, config.num_heads * config.head_dim))
    return LayerAttention(probabilities, output)


def attention_probabilities(model: Transformer, states: torch.Tensor, position: int = -1,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Attention probabilities [L, B, heads, T] (fp32) of the query at `position`, every layer and head."""
    return torch.stack([layer_attention(model, states, j, position, attention_mask).probabilities
                        for j in range(model.config.num_layers)])


@dataclass
class LayerNorms:
    """L2 norms [L, B] (fp32) at one position, per layer j."""

    residual: torch.Tensor  # |H[j]|: the state entering layer j
    attention: torch.Tensor  # |attention output of layer j|
    mlp: torch.Tensor  # |MLP output of layer j|


@torch.no_grad()
def layer_norms(model: Transformer, states: torch.Tensor, position: int = -1,
                attention_mask: torch.Tensor | None = None) -> LayerNorms:
    """How much each layer's attention and MLP move the state at `position`, next to that state's norm.

    H[j+1] = H[j] + attention + MLP at every plain layer; both outputs are recomputed from H[j].
    """
    position = _checked_position(position, states.shape[2])
    residual, attention, mlp = [], [], []
    for j, block in enumerate(model.layers):
        here = states[j][:, position]  # [B, D]
        attention_output = layer_attention(model, states, j, position, attention_mask).output
        mlp_output = block.mlp(block.post_attention_layernorm(here + attention_output))
        residual.append(here.float().norm(dim=-1))
        attention.append(attention_output.float().norm(dim=-1))
        mlp.append(mlp_output.float().norm(dim=-1))
    return LayerNorms(torch.stack(residual), torch.stack(attention), torch.stack(mlp))


def _checked_position(position: int, length: int) -> int:
    """position counted from 0 (a negative one from the end), checked against the sequence length."""
    if not -length <= position < length:
        raise ValueError(f"position {position} is outside a sequence of {length} tokens")
    return position % length
