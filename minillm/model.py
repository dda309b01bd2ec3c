"""A Llama/Mistral decoder, top to bottom: norm, rotary embeddings, attention, MLP, block, model.

Parameter names follow Hugging Face's checkpoints (without their leading
`model.`), so a checkpoint loads with a plain `load_state_dict`.

Hidden-state convention: `H[j]` is the residual stream *entering* decoder layer
j, before its input norm; `H[0]` is the token embeddings and `H[L]` the output
of the last layer, before the final norm. (Hugging Face's
`output_hidden_states[L]` is *after* the final norm: see `hf_hidden_states`.)

The manipulations of "Attend First, Consolidate Later" (see manipulation.py)
happen in `Block.forward`, each as a visible line, from a per-layer `LayerEdit`
that `Transformer.forward` prepares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import ModelConfig
from minillm.manipulation import Manipulation, ManipulationError, random_directions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in at least fp32 (bf16 sums of squares lose too much; fp64 stays fp64), cast back,
        # *then* scale: the order Hugging Face uses, so half-precision results round the same way.
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(x.dtype)


# ----------------------------------------------------------------------------- rotary embeddings

def rope_inverse_frequencies(config: ModelConfig) -> torch.Tensor:
    """One rotation frequency per pair of head dimensions, fp32, with linear or llama3 rescaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling
    if scaling.rope_type == "linear":
        return inv_freq / scaling.factor
    if scaling.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, and the band between interpolated.
        wavelength = 2 * math.pi / inv_freq
        low_freq_wavelength = scaling.original_max_position_embeddings / scaling.low_freq_factor
        high_freq_wavelength = scaling.original_max_position_embeddings / scaling.high_freq_factor
        smooth = (scaling.original_max_position_embeddings / wavelength - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor)
        interpolated = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        scaled = torch.where(wavelength > low_freq_wavelength, inv_freq / scaling.factor, inv_freq)
        in_band = (wavelength >= high_freq_wavelength) & (wavelength <= low_freq_wavelength)
        return torch.where(in_band, interpolated, scaled)
    return inv_freq


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [B, T, head_dim] for integer positions [B, T], always computed in fp32."""
    angles = positions.float()[..., None] * inv_freq.to(positions.device)  # [B, T, head_dim/2]
    angles = torch.cat([angles, angles], dim=-1)  # rotate-half layout: both halves share frequencies
    return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat([-second, first], dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys [B, heads, T, head_dim]; the fp32 tables are cast only here, at use."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values for every layer, filled left to right as tokens arrive.

    Slots are shared by the batch; `key_valid` marks which slots hold real tokens
    (left padding does not), and `next_position` is each sequence's next RoPE position.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", num_layers: int | None = None):
        # num_layers < L: a cache for the lowest layers only (skip_attention from that layer on needs no more)
        layers = config.num_layers if num_layers is None else num_layers
        shape = (layers, batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.key_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled so far
        self.max_length = max_length

    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes

    def clone(self) -> "KVCache":
        copy = object.__new__(KVCache)
        copy.__dict__.update({name: value.clone() if torch.is_tensor(value) else value
                              for name, value in self.__dict__.items()})
        return copy

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these sequences of the batch (in this order): generation drops finished ones."""
        self.keys, self.values = self.keys[:, rows], self.values[:, rows]
        self.key_valid, self.next_position = self.key_valid[rows], self.next_position[rows]

    def rewind(self, slot: int = 0) -> None:
        """Forget the tokens from `slot` on, but keep their stored keys/values, so that a pass over the
        same tokens with `start_layer=k` reuses those of the layers below k (prefix reuse in sweeps)."""
        self.length = slot
        self.key_valid[:, slot:] = False
        self.next_position = self.key_valid.sum(dim=1)


# ----------------------------------------------------------------------------- attention and MLP

class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, config.num_heads * config.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.num_kv_heads * config.head_dim, bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.implementation = "sdpa"  # or "math": the explicit softmax(QK^T/sqrt(d))V below

    def keys_values(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
        """Rotated keys and values [B, kv_heads, T, head_dim] of normed inputs x [B, T, D]."""
        B, T, _ = x.shape
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rope(k, *rope), v

    def forward(self, x, rope, mask, cache: KVCache | None = None, layer: int = 0, slot: int = 0,
                last_query_only: bool = False):
        """With a cache, x's keys/values go to slots slot..slot+T-1 and attention reads slots 0..slot+T-1.
        last_query_only: every position supplies keys/values, but only the last one asks (output [B, 1, D])."""
        k, v = self.keys_values(x, rope)
        B, T, _ = x.shape
        if last_query_only:
            x, rope, mask = x[:, -1:], tuple(table[:, -1:] for table in rope), mask[:, :, -1:]
        q = self.q_proj(x).view(B, x.shape[1], self.num_heads, self.head_dim).transpose(1, 2)  # [B, heads, Tq, hd]
        q = apply_rope(q, *rope)
        if cache is not None:
            cache.keys[layer, :, :, slot:slot + T] = k
            cache.values[layer, :, :, slot:slot + T] = v
            k, v = cache.keys[layer, :, :, :slot + T], cache.values[layer, :, :, :slot + T]
        # GQA: key/value head j serves query heads j*g .. j*g+g-1
        groups = self.num_heads // self.num_kv_heads
        Tq = x.shape[1]
        if Tq == 1:
            # One query per sequence (every decoding step): the g query heads of key/value head j take
            # the place of query positions, so the cached keys/values are read as they are, not copied
            # g times. The mask [B, 1, 1, T_keys] is the same for all of them.
            q = q.view(B, self.num_kv_heads, groups, self.head_dim)
        else:
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        if self.implementation == "math":
            out = math_attention(q, k, v, mask)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        out = out.reshape(B, self.num_heads, Tq, self.head_dim)  # [B, heads, Tq, hd]
        out = out.transpose(1, 2).reshape(B, Tq, self.num_heads * self.head_dim)
        return self.o_proj(out)


def math_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v, with the softmax in fp32. mask: bool, True = may attend."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    scores = scores.float().masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1).to(v.dtype) @ v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- block

@dataclass
class LayerEdit:
    """What one layer does to its input this forward pass (all None/False: a plain layer)."""

    previous: torch.Tensor | None = None  # [B, T, 1] bool: the previous tokens among this pass's positions
    random: torch.Tensor | None = None  # [B, T, D] Gaussian directions for previous tokens
    frozen: torch.Tensor | None = None  # [B, T, D] H[k-1], which previous tokens keep
    swap_at: torch.Tensor | None = None  # [B, T, 1] bool: positions receiving a donor vector
    swap_vectors: torch.Tensor | None = None  # [B, T, D] the donor vectors, in place
    skip_attention: bool = False
    # Efficiency mode for freeze, from layer k-1 up: previous tokens' outputs are overwritten by H[k-1]
    # at the next layer anyway, so they only need keys/values; the last token alone gets attention and MLP.
    last_token_only: bool = False


NO_EDIT = LayerEdit()


def norm_matched(directions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The directions [..., D] rescaled to the L2 norms of x [..., D] (computed in fp32), in x's dtype."""
    scale = x.float().norm(dim=-1, keepdim=True) / directions.norm(dim=-1, keepdim=True)
    return (directions * scale).to(x.dtype)


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def manipulate(self, x: torch.Tensor, edit: LayerEdit) -> torch.Tensor:
        """What enters this layer: the incoming states x, with previous tokens manipulated as `edit` says."""
        if edit.random is not None:  # random: a Gaussian direction with the token's own norm
            x = torch.where(edit.previous, norm_matched(edit.random, x), x)
        if edit.frozen is not None:  # freeze: previous tokens keep their H[k-1]
            x = torch.where(edit.previous, edit.frozen, x)
        if edit.swap_at is not None:  # swap: donor vectors at the given positions
            x = torch.where(edit.swap_at, edit.swap_vectors, x)
        return x

    def forward(self, x, rope, mask, cache: KVCache | None, layer: int, slot: int = 0, edit: LayerEdit = NO_EDIT):
        """x: this layer's input after `manipulate`."""
        if edit.last_token_only:
            # efficiency mode: the previous tokens' outputs are never read, they keep their input
            attended = x[:, -1:] + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer, slot,
                                                  last_query_only=True)
            self._cache_newest_as_frozen(edit, rope, cache, layer, slot + x.shape[1] - 1)
            return torch.cat([x[:, :-1], attended + self.mlp(self.post_attention_layernorm(attended))], dim=1)
        if not edit.skip_attention:  # skip_attention: no input norm, no attention; the MLP still runs
            x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, layer, slot)
            self._cache_newest_as_frozen(edit, rope, cache, layer, slot + x.shape[1] - 1)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _cache_newest_as_frozen(self, edit: LayerEdit, rope, cache: KVCache | None, layer: int, newest_slot: int):
        """Freeze with a cache: the newest token attended with its genuine keys/values, but from the next step
        on it is a previous token, whose state here is its frozen H[k-1]. Cache what later tokens must see."""
        if edit.frozen is None or cache is None:
            return
        newest = self.input_layernorm(edit.frozen[:, -1:])
        k, v = self.self_attn.keys_values(newest, tuple(table[:, -1:] for table in rope))
        cache.keys[layer, :, :, newest_slot] = k[:, :, 0]
        cache.values[layer, :, :, newest_slot] = v[:, :, 0]


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Checkpoints with tied embeddings have no lm_head weight: the output layer reuses the embedding."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def set_attention(self, implementation: str) -> None:
        """"sdpa" (torch's fused kernel) or "math" (the explicit formula in `math_attention`)."""
        if implementation not in ("sdpa", "math"):
            raise ValueError(f"attention implementation must be 'sdpa' or 'math', got {implementation!r}")
        for block in self.layers:
            block.self_attn.implementation = implementation

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, manipulation: Manipulation | None = None,
                output_hidden_states: bool = False, last_logits_only: bool = False,
                start_layer: int = 0, states_below: torch.Tensor | None = None, efficient: bool = False):
        """Logits [B, T, V] for input_ids [B, T] (left-padded where attention_mask is 0).

        With a cache, input_ids are the new tokens only and attention_mask covers them only.
        With output_hidden_states, returns (logits, H) where H [L+1, B, T, D] holds the states
        that actually entered each layer (after any manipulation) and H[L] the last layer's output.

        Prefix reuse: manipulations never change what happens below layer k, so a pass with
        start_layer <= k can skip those layers, taking H[start_layer] (and, for freeze, H[k-1])
        from `states_below`, the unmanipulated H of the same tokens (with a cache, the
        unmanipulated keys/values of those layers must already be in it: see KVCache.rewind).

        efficient: compute previous tokens only as far as anyone reads them, for the same last-position
        logits, which are all it returns. freeze: from layer k-1 up, previous tokens get keys/values
        only (no attention, no MLP). skip_attention: from layer k up, no token reads another, so only
        the last one goes on (and a cache needs layers below k only).
        """
        B, T = input_ids.shape
        L = self.config.num_layers
        if efficient and output_hidden_states:
            raise ValueError("efficient computes the last position only; it cannot return hidden states")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(torch.bool)
        if not attention_mask[:, -1].all():
            raise ValueError("attention_mask: every sequence must end with a real token (pad on the left)")
        k = L if manipulation is None else manipulation.layer
        if start_layer and (states_below is None or start_layer > k):
            raise ValueError(f"start_layer={start_layer} needs states_below and must not exceed the manipulated layer {k}")
        slot = 0 if cache is None else cache.length
        positions, mask = self._positions_and_mask(attention_mask, cache)
        rope = rope_tables(positions, rope_inverse_frequencies(self.config))
        edits = self._edits(manipulation, attention_mask, positions, efficient)

        x = self.embed_tokens(input_ids) if start_layer == 0 else states_below[start_layer]
        states = list(states_below[:start_layer]) if output_hidden_states and start_layer else []
        freezing = manipulation is not None and manipulation.kind == "freeze" and k < L
        skipping_efficiently = efficient and manipulation is not None and manipulation.kind == "skip_attention"
        frozen = states_below[k - 1] if start_layer and freezing else None
        newest_at_k = None
        for j in range(start_layer, L):
            block = self.layers[j]
            if freezing and j == k - 1:
                frozen = x  # H[k-1]: what previous tokens keep from layer k on
            if j == k:
                newest_at_k = x[:, -1:]
                if skipping_efficiently:
                    x = x[:, -1:]  # the previous tokens' states above k would never be read
            edit = edits(j, frozen)
            x = block.manipulate(x, edit)  # H[j]
            if output_hidden_states:
                states.append(x)
            x = block(x, rope, mask, cache, j, slot, edit)
        states.append(x)  # H[L]
        if cache is not None and manipulation is not None and manipulation.kind == "random" and k < L:
            # From the next step on, the newest token is a previous token: its state entering layer k
            # becomes noise and everything above is computed from that. Redo its cached keys/values
            # in layers >= k that way now, so that cached generation equals the faithful rerun.
            newest = norm_matched(edits(k, None).random[:, -1:], newest_at_k)
            rope_newest = tuple(table[:, -1:] for table in rope)
            for j in range(k, L):
                newest = self.layers[j](newest, rope_newest, mask[:, :, -1:], cache, j, slot + T - 1)
        if cache is not None:
            cache.length += T
            cache.next_position += attention_mask.sum(dim=1)

        if last_logits_only or efficient:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        if output_hidden_states:
            return logits, torch.stack(states)
        return logits

    def residual_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """H [L+1, B, T, D] of unmanipulated prompts: e.g. the donor states for a swap."""
        return self(input_ids, attention_mask, output_hidden_states=True)[1]

    # ------------------------------------------------------------------ bookkeeping

    def _positions_and_mask(self, attention_mask: torch.Tensor, cache: KVCache | None):
        """RoPE positions [B, T] and the boolean attention mask [B, 1, T, T_keys]."""
        B, T = attention_mask.shape
        device = attention_mask.device
        # Left padding shifts positions: each sequence's first real token gets position 0.
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        start = 0
        key_valid = attention_mask
        if cache is not None:
            start = cache.length
            if start + T > cache.max_length:
                raise ValueError(f"KV cache holds {cache.max_length} tokens; this pass needs {start + T}")
            positions = positions + cache.next_position[:, None]
            cache.key_valid[:, start:start + T] = attention_mask
            key_valid = cache.key_valid[:, :start + T]
        query_slot = torch.arange(start, start + T, device=device)[:, None]
        key_slot = torch.arange(start + T, device=device)[None, :]
        allowed = key_slot <= query_slot  # causal
        if self.config.sliding_window is not None:
            allowed = allowed & (key_slot > query_slot - self.config.sliding_window)
        allowed = allowed[None] & key_valid[:, None, :]
        # A padding query would see no key at all (softmax of nothing = NaN): let it see itself.
        allowed = allowed | (key_slot == query_slot)[None]
        return positions, allowed[:, None]

    def _edits(self, manipulation: Manipulation | None, attention_mask, positions, efficient: bool):
        """A function layer -> LayerEdit for this pass (NO_EDIT everywhere without a manipulation)."""
        L = self.config.num_layers
        if manipulation is None:
            return lambda j, frozen: NO_EDIT
        lengths = (positions[:, -1] + 1).tolist()
        manipulation.check(L, self.config.hidden_size, lengths)
        if manipulation.layer == L:  # k = L: no layer's view is altered
            return lambda j, frozen: NO_EDIT
        k = manipulation.layer
        # Previous tokens: real positions except each sequence's last (the last column, as we pad on the left).
        previous = attention_mask.clone()
        previous[:, -1] = False
        previous = previous[..., None]

        if manipulation.kind == "skip_attention":
            skip = LayerEdit(skip_attention=True)
            return lambda j, frozen: skip if j >= k else NO_EDIT
        if manipulation.kind == "freeze":
            first = k - 1 if efficient else k  # layer k-1's outputs for previous tokens are overwritten too
            return lambda j, frozen: (LayerEdit(previous=previous, frozen=frozen, last_token_only=efficient)
                                      if j >= first else NO_EDIT)
        if manipulation.kind == "random":
            noise = random_directions(manipulation.seed, positions, self.config.hidden_size).to(positions.device)
            edit = LayerEdit(previous=previous, random=noise)
            return lambda j, frozen: edit if j == k else NO_EDIT
        # swap: place each donor vector at its position in every sequence
        B, T = attention_mask.shape
        wanted = torch.tensor(manipulation.positions, device=positions.device)
        hits = (positions[..., None] == wanted) & attention_mask[..., None]  # [B, T, P]
        vectors = manipulation.vectors.to(device=positions.device, dtype=self.embed_tokens.weight.dtype)
        if vectors.dim() == 2:
            vectors = vectors.expand(B, *vectors.shape)
        swap_at = hits.any(dim=-1, keepdim=True)
        which = hits.to(torch.uint8).argmax(dim=-1)  # [B, T]: index of the donor vector for each position
        swap_vectors = torch.gather(vectors, 1, which[..., None].expand(-1, -1, vectors.shape[-1]))
        edit = LayerEdit(swap_at=swap_at, swap_vectors=swap_vectors)
        return lambda j, frozen: edit if j == k else NO_EDIT


def hf_hidden_states(model: Transformer, states: torch.Tensor) -> torch.Tensor:
    """Our H [L+1, ...] in Hugging Face's `output_hidden_states` convention (final norm on the last entry)."""
    return torch.cat([states[:-1], model.norm(states[-1])[None]])
