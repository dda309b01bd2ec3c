"""A Llama/Mistral decoder, top to bottom: norm, rotary embeddings, attention, MLP, block, model.

Parameter names follow Hugging Face's checkpoints (without their leading
`model.`), except that q/k/v and gate/up are each one stacked matrix (one matmul);
state dicts still use the checkpoints' names (see `stacked_projections`), so a
checkpoint loads with a plain `load_state_dict`.

Hidden-state convention: `H[j]` is the residual stream *entering* decoder layer
j, before its input norm; `H[0]` is the token embeddings and `H[L]` the output
of the last layer, before the final norm. (Hugging Face's
`output_hidden_states[L]` is *after* the final norm: see `hf_hidden_states`.)

The manipulations of "Attend First, Consolidate Later" (see manipulation.py and
docs/manipulations.md) happen in `Block.manipulate`, each as a visible line, from
a per-layer `LayerEdit` that `Transformer.layer_edits` prepares before the layer
loop (`Transformer.layer_stack`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from minillm.config import ModelConfig
from minillm.errors import ManipulationError
from minillm.manipulation import Manipulation, random_directions


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x / sqrt(mean(x^2) + eps) * weight, over the last dimension.

        Normalised in at least fp32 (bf16 sums of squares lose too much; fp64 stays fp64), cast back, *then*
        scaled: the order Hugging Face uses, so half-precision results round the same way. torch's rms_norm
        runs exactly the textbook ops on the CPU (same numbers), and one fused kernel on a GPU."""
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        return self.weight * F.rms_norm(wide, (wide.shape[-1],), eps=self.eps).to(x.dtype)


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


def rotation(cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What `rotate` needs, made once per pass: cos and the signed sin [-sin, +sin] (by half), in `dtype`.

    The rotate-half form of RoPE is x * cos + rotate_half(x) * sin, with rotate_half(x) = [-x2, x1] for
    the halves x1, x2 of x. Moving the minus sign into the table, rotate_half(x) * sin equals
    [x2, x1] * [-sin, sin], and [x2, x1] is x rolled by half its width: one op instead of three.
    (The products are the same numbers: (-a) * b == a * (-b) exactly.)"""
    half = sin.shape[-1] // 2
    signed_sin = torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)
    return cos.to(dtype), signed_sin.to(dtype)


def rotate(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate queries or keys [B, heads, T, head_dim] with `rotation`'s tables [B, 1, T, head_dim]."""
    cos, signed_sin = rope
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class RotaryEmbedding(nn.Module):
    """The rotation tables of a pass. The inverse frequencies are a buffer, so they live on the model's
    device (no copy from the host per pass); never saved, and kept in fp32 when the model is cast."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.register_buffer("inv_freq", rope_inverse_frequencies(config), persistent=False)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype) casts floating buffers; the tables are computed in fp32 (as Hugging Face does).
        inv_freq = self.inv_freq
        super()._apply(fn, recurse)
        self.inv_freq = inv_freq.to(self.inv_freq.device)
        return self

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """`rotation` tables [B, 1, T, head_dim] in `dtype` for positions [B, T]."""
        cos, sin = rope_tables(positions, self.inv_freq)
        return rotation(cos[:, None], sin[:, None], dtype)


# ----------------------------------------------------------------------------- KV cache

class KVCache:
    """Preallocated keys and values for every layer, filled left to right as tokens arrive.

    Slots are shared by the batch; `key_valid` marks which slots hold real tokens
    (left padding does not), and `next_position` is each sequence's next RoPE position.
    Each layer has its own keys and values tensors [B, kv_heads, max_length, head_dim], so
    that a run starting at layer k from shared prompt states can share the layers below k
    with them and copy only the others (`fork`). All writes go through the methods below;
    each attention layer writes through its own `LayerCache` view (`layer(j)`).

    static=True: a pass's shapes do not change as the cache fills, which a compiled decode step needs
    (`Transformer.compiled_layer_stack`). Attention reads all max_length slots, the empty ones masked, and
    the layers write at the pass's slots given as a tensor (`slots`), not as Python numbers.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", num_layers: int | None = None,
                 static: bool = False):
        # num_layers < L: a cache for the lowest layers only (skip_attention from that layer on needs no more)
        self.num_layers = config.num_layers if num_layers is None else num_layers
        shape = (batch_size, config.num_kv_heads, max_length, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(self.num_layers)]
        self.key_valid = torch.zeros(batch_size, max_length, dtype=torch.bool, device=device)
        self.next_position = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.length = 0  # slots filled so far, the current pass's tokens included
        self.max_length = max_length
        self.static = static
        self.slots = torch.zeros(0, dtype=torch.long, device=device)  # static: the current pass's slots
        # A compiled step's CUDA graphs write into them in place, at addresses fixed when recorded. Not on the CPU,
        # where no graph is recorded and the compiler would freeze such tensors as constants of its graph.
        if static and torch.device(device).type == "cuda":
            for tensor in self.keys + self.values:
                torch._dynamo.mark_static_address(tensor)

    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.keys + self.values)

    def fork(self, first_copied: int, num_layers: int | None = None) -> KVCache:
        """A cache for a run that goes on from this cache's tokens and may rewrite them in layers >= first_copied
        only: prefix reuse, where a manipulation at layer k starts its pass at layer k (`rewind`, then the
        pass). Those layers are copied; the ones below are shared with this cache, not copied, which saves
        their memory (on a GPU, the cache no longer exists twice) and the copy.
        num_layers: keep only the lowest layers (efficient skip_attention needs none from layer k up).

        Sharing is safe because the run writes the shared layers only in slots from this cache's `length` on
        (its new tokens' slots), which this cache does not count as filled, and every run stores a slot
        before it reads it. So the runs forked from one cache must run one after another, not interleaved.
        """
        num_layers = self.num_layers if num_layers is None else num_layers
        if num_layers > self.num_layers:
            raise ValueError(f"fork: this cache holds {self.num_layers} layers, not {num_layers}")
        copy = object.__new__(KVCache)
        copy.num_layers, copy.length, copy.max_length = num_layers, self.length, self.max_length
        copy.static, copy.slots = self.static, self.slots
        copy.keys = [t if j < first_copied else t.clone() for j, t in enumerate(self.keys[:num_layers])]
        copy.values = [t if j < first_copied else t.clone() for j, t in enumerate(self.values[:num_layers])]
        copy.key_valid, copy.next_position = self.key_valid.clone(), self.next_position.clone()
        return copy

    def append(self, attention_mask: torch.Tensor) -> None:
        """Give the next T slots to a pass's tokens (attention_mask [B, T], bool). Their keys/values are
        stored by the layers as the pass runs (`LayerCache.update`)."""
        start, end = self.length, self.length + attention_mask.shape[1]
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} tokens; this pass needs {end}")
        self.key_valid[:, start:end] = attention_mask
        self.next_position += attention_mask.sum(dim=1)
        self.length = end
        if self.static:
            self.slots = torch.arange(start, end, device=self.key_valid.device)

    def store(self, layer: int, keys: torch.Tensor, values: torch.Tensor,
              rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write keys/values [B, kv_heads, t, head_dim] of the current pass's last t tokens into this layer's
        slots; return all of the layer's keys/values so far [B, kv_heads, length, head_dim] (static: all
        max_length slots). rows: a range of the batch's sequences, which keys and values hold (all when None)."""
        layer_keys, layer_values = self.keys[layer], self.values[layer]
        if rows is not None:  # views: the writes below go into this cache
            layer_keys, layer_values = layer_keys[rows], layer_values[rows]
        if self.static:
            slots = self.slots[self.slots.shape[0] - keys.shape[2]:]
            layer_keys.index_copy_(2, slots, keys)
            layer_values.index_copy_(2, slots, values)
            return layer_keys, layer_values
        start = self.length - keys.shape[2]
        layer_keys[:, :, start:self.length] = keys
        layer_values[:, :, start:self.length] = values
        return layer_keys[:, :, :self.length], layer_values[:, :, :self.length]

    @classmethod
    def concatenate(cls, caches: Sequence[KVCache], config: ModelConfig, dtype: torch.dtype,
                    device: torch.device | str) -> KVCache:
        """One cache holding these caches' sequences, one after another along the batch: runs decoded together
        (`minillm.packed`). It takes their layers, layer by layer, and leaves them empty: the caches and the
        copy never exist twice in full. Layers that a cache does not hold (efficient skip_attention from its k
        up) are zeros in its rows, which never read them."""
        first = caches[0]
        if any(c.length != first.length or c.max_length != first.max_length or c.static for c in caches):
            raise ValueError("concatenate: the caches must hold the same slots, and none may be static")

        def take(cache: KVCache, tensors: list, j: int) -> torch.Tensor:
            if j >= cache.num_layers:
                shape = (cache.key_valid.shape[0], config.num_kv_heads, cache.max_length, config.head_dim)
                return torch.zeros(shape, dtype=dtype, device=device)
            tensor, tensors[j] = tensors[j], None  # released as soon as it is copied (unless shared: `fork`)
            return tensor

        packed = object.__new__(cls)
        packed.num_layers, packed.length, packed.max_length = config.num_layers, first.length, first.max_length
        packed.static, packed.slots = False, first.slots
        packed.keys = [torch.cat([take(c, c.keys, j) for c in caches]) for j in range(config.num_layers)]
        packed.values = [torch.cat([take(c, c.values, j) for c in caches]) for j in range(config.num_layers)]
        packed.key_valid = torch.cat([c.key_valid for c in caches])
        packed.next_position = torch.cat([c.next_position for c in caches])
        for cache in caches:
            cache.keys, cache.values, cache.num_layers = [], [], 0
        return packed

    def layer(self, layer: int, rows: slice | None = None) -> LayerCache | None:
        """Layer `layer`'s view of the cache (None above the layers this cache holds); of a range of the batch's
        sequences only, with rows (packed runs: `minillm.packed`)."""
        return LayerCache(self, layer, rows) if layer < self.num_layers else None

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Keep only these sequences of the batch (in this order): generation drops finished ones. Every layer
        is indexed into a new tensor, so layers shared with another cache (`fork`) are left as they are."""
        self.keys, self.values = [t[rows] for t in self.keys], [t[rows] for t in self.values]
        self.key_valid, self.next_position = self.key_valid[rows], self.next_position[rows]

    def rewind(self, slot: int = 0) -> None:
        """Forget the tokens from `slot` on, but keep their stored keys/values, so that a pass over the
        same tokens that starts at layer k (prefix reuse) reuses those of the layers below k."""
        self.length = slot
        self.key_valid[:, slot:] = False
        self.next_position = self.key_valid.sum(dim=1)


@dataclass(frozen=True)
class LayerCache:
    """One attention layer's view of a `KVCache`: the layer index stays here, not in every call."""

    cache: KVCache
    layer: int
    rows: slice | None = None  # a range of the batch's sequences (None: all)

    def update(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the newest tokens' keys/values; return every key/value this layer holds (see `KVCache.store`)."""
        return self.cache.store(self.layer, keys, values, self.rows)


# ----------------------------------------------------------------------------- attention and MLP

class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        # The query, key and value projections of one input, stacked in one matrix (rows: q, k, v): one matmul
        # instead of three. Checkpoints keep them apart, as q_proj, k_proj and v_proj: see `stacked_projections`.
        self.qkv_proj = nn.Linear(config.hidden_size, (config.num_heads + 2 * config.num_kv_heads) * config.head_dim,
                                  bias=False)
        self.o_proj = nn.Linear(config.num_heads * config.head_dim, config.hidden_size, bias=False)
        self.implementation = "sdpa"  # or "math": the explicit softmax(QK^T/sqrt(d))V below

    def project(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], with_queries: bool = True):
        """Rotated queries [B, heads, T, hd], rotated keys and values [B, kv_heads, T, hd] of normed inputs x [B, T, D].
        with_queries=False: keys and values only (the k and v rows of the matrix), queries empty [B, 0, T, hd]."""
        B, T, _ = x.shape
        H = self.num_heads if with_queries else 0
        weight = self.qkv_proj.weight[(self.num_heads - H) * self.head_dim:]  # without queries: skip the q rows
        qkv = F.linear(x, weight).view(B, T, H + 2 * self.num_kv_heads, self.head_dim).transpose(1, 2)
        rotated = rotate(qkv[:, :H + self.num_kv_heads], rope)  # queries and keys turn alike: one rotation for both
        return rotated[:, :H], rotated[:, H:], qkv[:, H + self.num_kv_heads:]

    def forward(self, x, rope, mask, cache: LayerCache | None = None, last_query_only: bool = False):
        """With a cache, x's keys/values fill this pass's slots and attention reads every slot so far.
        mask: additive [B, 1, Tq, T_keys] (0 or -inf), or None for plain causal attention (see
        `Transformer.positions_and_mask`).
        last_query_only: every position supplies keys/values, but only the last one asks (output [B, 1, D])."""
        queries, keys, values = self.project(x, rope, with_queries=not last_query_only)
        if last_query_only:
            queries = self.project(x[:, -1:], last_position(rope))[0]
            mask = last_query(mask)
        B, _, Tq, _ = queries.shape
        if cache is not None:
            keys, values = cache.update(keys, values)
        if self.implementation == "math":
            out = math_attention(queries, keys, values, mask)
        elif Tq == 1:
            # One query per sequence (every decoding step): the g query heads of key/value head j take
            # the place of query positions, so the cached keys/values are read as they are, not copied
            # g times, by any of torch's attention kernels. The mask [B, 1, 1, T_keys] is the same for all.
            groups = self.num_heads // self.num_kv_heads
            out = F.scaled_dot_product_attention(queries.reshape(B, self.num_kv_heads, groups, self.head_dim),
                                                 keys, values, attn_mask=mask)
        else:
            # enable_gqa: key/value head j serves query heads j*g .. j*g+g-1, without copying it g times
            out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask,
                                                 is_causal=mask is None, enable_gqa=True)
        out = out.reshape(B, self.num_heads, Tq, self.head_dim)  # [B, heads, Tq, hd]
        out = out.transpose(1, 2).reshape(B, Tq, self.num_heads * self.head_dim)
        return self.o_proj(out)


def last_position(rope: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation tables [B, 1, T, head_dim] of the last position only."""
    return tuple(table[:, :, -1:] for table in rope)


def last_query(mask: torch.Tensor | None) -> torch.Tensor | None:
    """The attention mask [B, 1, Tq, T_keys] of the last query only (None, plain causal, stays None:
    the last query may read every key)."""
    return None if mask is None else mask[:, :, -1:]


def math_attention(q, k, v, mask):
    """softmax(q k^T / sqrt(d) + mask) v, with the softmax in fp32. mask: additive, or None for causal.
    Grouped-query heads: key/value head j serves query heads j*g .. j*g+g-1."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1]))
    if mask is None:  # causal, the queries being the last Tq of the keys
        Tq, Tk = scores.shape[-2:]
        mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq).logical_not()
        mask = torch.zeros(Tq, Tk, device=q.device).masked_fill(mask, float("-inf"))
    return (scores.float() + mask).softmax(dim=-1).to(v.dtype) @ v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)). The gate and up projections are stacked in one matrix (one matmul);
    checkpoints keep them apart, as gate_proj and up_proj: see `stacked_projections`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# ----------------------------------------------------------------------------- block

@dataclass(frozen=True)
class LayerEdit:
    """What one layer does to its input this forward pass (all None/False: a plain layer)."""

    previous: torch.Tensor | None = None  # [B, T, 1] bool: the previous tokens among this pass's positions
    random: torch.Tensor | None = None  # [B, T, D] Gaussian directions for previous tokens
    freeze: bool = False  # previous tokens keep H[k-1] (the forward pass hands it to the block as `frozen`)
    swap_at: torch.Tensor | None = None  # [B, T, 1] bool: positions receiving a donor vector
    swap_vectors: torch.Tensor | None = None  # [B, T, D] the donor vectors, in place
    skip_attention: bool = False
    # skip_attention sparing the first n positions: attention reads the keys at positions 0 .. n-1 only
    read_first_only: int = 0
    # Efficiency mode for freeze, from layer k-1 up: previous tokens' outputs are overwritten by H[k-1]
    # at the next layer anyway, so they only need keys/values; the last token alone gets attention and MLP.
    last_token_only: bool = False
    # Efficiency mode for skip_attention, at layer k: from here up no token reads another, so only the
    # last one goes on.
    drop_previous: bool = False


NO_EDIT = LayerEdit()


def norm_matched(directions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The directions [..., D] rescaled to the L2 norms of x [..., D] (computed in fp32), in x's dtype."""
    scale = x.float().norm(dim=-1, keepdim=True) / directions.norm(dim=-1, keepdim=True)
    return (directions * scale).to(x.dtype)


def first_positions_only(mask: torch.Tensor | None, n: int, x: torch.Tensor) -> torch.Tensor:
    """The additive attention mask [B, 1, T, T_keys] of a pass over x [B, T, D], restricted to the keys that
    hold positions 0 .. n-1 of each sequence (skip_attention sparing the first n positions). A mask of None
    (plain causal attention over x's tokens) is made explicit first. The pass's last query is a real token
    that sees every real key (no sliding window cuts it off: `_skip_attention_edits` checks), so counting
    the keys open in its row gives each key's position."""
    if mask is None:
        T = x.shape[1]
        mask = torch.full((T, T), float("-inf"), dtype=x.dtype, device=x.device).triu(1)[None, None]
    real_keys = (mask[:, :, -1:] == 0).cumsum(dim=-1)  # [B, 1, 1, T_keys]: real keys up to each slot
    return mask.masked_fill(real_keys > n, float("-inf"))


class Block(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def manipulate(self, x: torch.Tensor, edit: LayerEdit, frozen: torch.Tensor | None = None) -> torch.Tensor:
        """What enters this layer: the incoming states x, with previous tokens manipulated as `edit` says.
        frozen: H[k-1], which freeze's previous tokens keep."""
        if edit.random is not None:  # random: a Gaussian direction with the token's own norm
            x = torch.where(edit.previous, norm_matched(edit.random, x), x)
        if edit.freeze:  # freeze: previous tokens keep their H[k-1]
            x = torch.where(edit.previous, frozen, x)
        if edit.swap_at is not None:  # swap: donor vectors at the given positions
            x = torch.where(edit.swap_at, edit.swap_vectors, x)
        return x

    def forward(self, x, rope, mask, cache: LayerCache | None = None, edit: LayerEdit = NO_EDIT,
                frozen: torch.Tensor | None = None):
        """x: this layer's input after `manipulate`; frozen: H[k-1] under freeze."""
        if edit.drop_previous:
            x = x[:, -1:]
        if edit.last_token_only:
            # efficiency mode: the previous tokens' outputs are never read, they keep their input
            attended = x[:, -1:] + self.self_attn(self.input_layernorm(x), rope, mask, cache, last_query_only=True)
            self._cache_newest_as_frozen(edit, frozen, rope, cache)
            return torch.cat([x[:, :-1], attended + self.mlp(self.post_attention_layernorm(attended))], dim=1)
        if edit.read_first_only:  # skip_attention sparing the first n positions: only those can be read
            mask = first_positions_only(mask, edit.read_first_only, x)
        if not edit.skip_attention:  # skip_attention: no input norm, no attention; the MLP still runs
            x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
            self._cache_newest_as_frozen(edit, frozen, rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))

    def _cache_newest_as_frozen(self, edit: LayerEdit, frozen, rope, cache: LayerCache | None):
        """Freeze with a cache: the newest token attended with its genuine keys/values, but from the next step
        on it is a previous token, whose state here is its frozen H[k-1]. Cache what later tokens must see."""
        if not edit.freeze or cache is None:
            return
        newest = self.input_layernorm(frozen[:, -1:])
        _, keys, values = self.self_attn.project(newest, last_position(rope), with_queries=False)
        cache.update(keys, values)


# ----------------------------------------------------------------------------- model

class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.tie_weights()
        self._compiled_layer_stack = None  # see `compiled_layer_stack`
        # State dicts name weights as checkpoints do, both ways: see `stacked_projections`.
        self.register_state_dict_post_hook(
            lambda module, state, prefix, metadata: split_stacked_projections(state, module.config, prefix))
        self.register_load_state_dict_pre_hook(
            lambda module, state, prefix, *rest: stack_projections(state, module.config, prefix))

    def tie_weights(self) -> None:
        """Checkpoints with tied embeddings have no lm_head weight: the output layer reuses the embedding."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def compiled_layer_stack(self):
        """`layer_stack` compiled by torch.compile for fixed shapes, in one graph; made on first use, then kept.
        With a static cache (`KVCache(static=True)`), every decode step of a generation has the same shapes,
        so they all run one compiled graph (`generate_tokens(compile=True)`). On a GPU the graph is also
        captured as a CUDA graph (mode "reduce-overhead"): the step is replayed whole, not launched op by op.

        On the CPU the weights are frozen into the graph (inductor's `freezing`, under torch.no_grad()): its
        matmuls read copies of the weights packed ahead of time in oneDNN's or MKL's blocked layout, which a
        few rows at a time (decoding) multiply much faster than plain `mm` does (docs/BENCHMARKS.md, section 12).
        The costs: every graph (each manipulation, batch size and cache length compiles one) holds its own packed
        copy of the weights, and a graph is blind to later changes of the weights, so a change made in place
        after the first compiled call is refused."""
        if self._compiled_layer_stack is None:
            if self.embed_tokens.weight.is_cuda:
                self._compiled_layer_stack = torch.compile(self.layer_stack, dynamic=False, fullgraph=True,
                                                           mode="reduce-overhead")
            else:
                compiled = torch.compile(self.layer_stack, dynamic=False, fullgraph=True)
                # A parameter replaced by another (not changed in place) is seen by torch, which compiles anew.
                weights = list(self.parameters())
                self._compiled_layer_stack = partial(run_frozen, compiled, weights, weights_version(weights))
        return self._compiled_layer_stack

    def set_attention(self, implementation: str) -> None:
        """"sdpa" (torch's fused kernel) or "math" (the explicit formula in `math_attention`)."""
        if implementation not in ("sdpa", "math"):
            raise ValueError(f"attention implementation must be 'sdpa' or 'math', got {implementation!r}")
        for block in self.layers:
            block.self_attn.implementation = implementation

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                cache: KVCache | None = None, manipulation: Manipulation | None = None,
                output_hidden_states: bool = False, last_logits_only: bool = False, *,
                prompt_states: torch.Tensor | None = None, efficient: bool = False, checked: bool = False,
                compiled: bool = False):
        """Logits [B, T, V] for input_ids [B, T] (left-padded where attention_mask is 0).

        With a cache, input_ids are the new tokens only and attention_mask covers them only.
        With output_hidden_states, returns (logits, H) where H [L+1, B, T, D] holds the states
        that actually entered each layer (after any manipulation) and H[L] the last layer's output.
        prompt_states: start at layer k from these tokens' unmanipulated H (see `start_from`).
        efficient: the same last-position logits, computing less (see `layer_edits`).
        checked: the caller has validated attention_mask and manipulation for these sequences (generation
        does, once per call), so the checks that read values back from the device are skipped.
        compiled: the layers and the head run as `compiled_layer_stack` (the decode steps of a static cache).
        """
        if compiled and (cache is None or not cache.static):
            raise ValueError("compiled: the compiled layers need a static cache (KVCache(static=True)), "
                             "whose shapes do not change from one step to the next")
        L = self.config.num_layers
        no_padding = attention_mask is None
        attention_mask = checked_attention_mask(input_ids, attention_mask, efficient and output_hidden_states, checked)
        positions, mask = self.positions_and_mask(attention_mask, cache, no_padding)
        rope = self.rotary(positions, self.embed_tokens.weight.dtype)
        # Every position is below this bound, known on the host, so random's noise needs no read-back: the pass's
        # length, or the cache's (one noise table for a whole generation; a pass that overflows it fails in append).
        T = attention_mask.shape[1]
        position_limit = T if cache is None else max(cache.max_length, cache.length + T)
        edits = self.layer_edits(manipulation, attention_mask, positions, position_limit, efficient, checked)
        if cache is not None:
            cache.append(attention_mask)
        k = L if manipulation is None else manipulation.layer
        first, x, frozen = self.start_from(input_ids, k, prompt_states)
        hidden = self.states_below(first, x, prompt_states) if output_hidden_states else None
        layer_stack = self.compiled_layer_stack() if compiled else self.layer_stack
        logits = layer_stack(x, rope, mask, cache, edits, first, k, frozen, hidden, last_logits_only or efficient)
        return (logits, hidden) if output_hidden_states else logits

    def layer_stack(self, x, rope, mask, cache: KVCache | None, edits: list[LayerEdit], first: int, k: int,
                    frozen, hidden, last_only: bool):
        """The logits after layers first .. L-1 and the head, from x = H[first] (in `forward`'s terms; k: the
        manipulated layer). Fills hidden [L+1, B, T, D] from H[first] on, when given. Everything that changes
        from one decode step to the next comes in as a tensor, never as a Python number, so that one
        compiled graph serves every step (`compiled_layer_stack`)."""
        L = self.config.num_layers
        caches = [None if cache is None else cache.layer(j) for j in range(L)]
        for j in range(first, L):
            if j == k - 1:
                frozen = x  # H[k-1]: under freeze, what previous tokens keep from layer k on
            if j == k:
                newest_at_k = x[:, -1:]  # where the cached random re-pass starts (see `recache_newest_as_noise`)
            x = self.layers[j].manipulate(x, edits[j], frozen)  # H[j]
            if hidden is not None:
                hidden[j] = x
            x = self.layers[j](x, rope, mask, caches[j], edits[j], frozen)
        if hidden is not None:
            hidden[L] = x
        if cache is not None and k < L and edits[k].random is not None:
            self.recache_newest_as_noise(newest_at_k, edits[k], rope, mask, caches, k)
        return self.lm_head(self.norm(x[:, -1:] if last_only else x))

    def residual_stream(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """H [L+1, B, T, D] of unmanipulated prompts: e.g. the donor states for a swap."""
        return self(input_ids, attention_mask, output_hidden_states=True)[1]

    # ------------------------------------------------------------------ the named steps of `forward`

    def start_from(self, input_ids, k: int, prompt_states: torch.Tensor | None):
        """Where the layer loop starts: (first layer, its input, freeze's H[k-1] if known).

        Without prompt_states: layer 0, from the token embeddings.
        Prefix reuse, with prompt_states (the unmanipulated H [L+1, B, T, D] of these same tokens): layer k,
        from H[k]. Invariant: a manipulation at layer k changes nothing below k, so H[0..k] (and freeze's
        H[k-1]) are those of the plain model. With a cache, the layers below k must already hold these
        tokens' unmanipulated keys/values (see `KVCache.rewind`).
        """
        if prompt_states is None:
            return 0, self.embed_tokens(input_ids), None
        frozen = prompt_states[k - 1] if k > 0 else None
        return k, prompt_states[k], frozen

    def states_below(self, first: int, x: torch.Tensor, prompt_states: torch.Tensor | None) -> torch.Tensor:
        """H [L+1, B, T, D], allocated once for the pass to fill layer by layer (so it never exists twice),
        with H[0 .. first-1] already in place (prefix reuse: the prompt states')."""
        hidden = x.new_empty(self.config.num_layers + 1, *x.shape)
        if first > 0:
            hidden[:first] = prompt_states[:first]
        return hidden

    def recache_newest_as_noise(self, newest_at_k, edit: LayerEdit, rope, mask, caches, k: int) -> None:
        """The cached random re-pass: from the next step on, the newest token is a previous token, whose state
        entering layer k is noise, with everything above computed from that. Redo its cached keys/values in
        layers k..L-1 that way now. Invariant: cached generation equals the faithful rerun, because the noise
        depends on (seed, position) only, so the rerun would draw the same vector for this token."""
        newest = norm_matched(edit.random[:, -1:], newest_at_k)
        rope_newest, mask_newest = last_position(rope), last_query(mask)
        for j in range(k, self.config.num_layers):
            newest = self.layers[j](newest, rope_newest, mask_newest, caches[j])

    def positions_and_mask(self, attention_mask: torch.Tensor, cache: KVCache | None, no_padding: bool = False):
        """RoPE positions [B, T] and the additive attention mask [B, 1, T, T_keys] (0 where a query may attend,
        -inf elsewhere, in the model's dtype) for the pass's tokens, which take the cache's next slots.
        The mask is None when attention is plain causal attention: no padding (no_padding: the caller gave
        no attention_mask), nothing cached before this pass, no sliding window cutting in; torch's kernels
        then skip the mask altogether. A static cache has T_keys = its max_length, the empty slots masked.
        Pure: the cache is read, never written."""
        B, T = attention_mask.shape
        device = attention_mask.device
        start = 0 if cache is None else cache.length
        static = cache is not None and cache.static
        window = self.config.sliding_window
        if no_padding and start == 0 and not static:
            positions = torch.arange(T, device=device).expand(B, T)
            if window is None or T <= window:
                return positions, None
        # Left padding shifts positions: each sequence's first real token gets position 0.
        positions = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
        key_valid = attention_mask
        if cache is not None:
            positions = positions + cache.next_position[:, None]
            key_valid = torch.cat([cache.key_valid[:, :start], attention_mask], dim=1)
            if static:  # every slot is read: those after this pass's tokens are empty
                key_valid = F.pad(key_valid, (0, cache.max_length - start - T))
        query_slot = torch.arange(start, start + T, device=device)[:, None]
        key_slot = torch.arange(key_valid.shape[1], device=device)[None, :]
        allowed = key_slot <= query_slot  # causal
        if window is not None:
            allowed = allowed & (key_slot > query_slot - window)
        allowed = allowed[None] & key_valid[:, None, :]
        # A padding query would see no key at all (softmax of nothing = NaN): let it see itself.
        allowed = allowed | (key_slot == query_slot)[None]
        blocked = torch.zeros(allowed.shape, dtype=self.embed_tokens.weight.dtype, device=device)
        return positions, blocked.masked_fill_(~allowed, float("-inf"))[:, None]

    def layer_edits(self, manipulation: Manipulation | None, attention_mask, positions, position_limit: int,
                    efficient: bool = False, checked: bool = False) -> list[LayerEdit]:
        """One LayerEdit per layer for this pass (NO_EDIT where the layer's input is left alone).

        position_limit: every position is below it (known on the host: random's noise needs no read-back).

        efficient: compute previous tokens only as far as anyone reads them. Invariant: the same
        last-position logits, which are all an efficient pass returns. freeze: from layer k-1 up,
        previous tokens get keys/values only (no attention, no MLP). skip_attention: from layer k up,
        no token reads another, so only the last one goes on (and a cache needs layers below k only:
        `Manipulation.cache_layers`). Other kinds: no change.
        """
        L = self.config.num_layers
        if manipulation is None:
            return [NO_EDIT] * L
        if not checked:  # (the lengths are read from the device)
            manipulation.check(L, self.config.hidden_size, (positions[:, -1] + 1).tolist())
        if manipulation.layer == L:  # k = L: no layer's view is altered
            return [NO_EDIT] * L
        # Previous tokens: real positions except each sequence's last (the last column, as we pad on the left).
        previous = attention_mask.clone()
        previous[:, -1] = False
        previous &= positions >= manipulation.spare_first  # spared positions (the attention sink) are not previous
        build = self.edit_builders()[manipulation.kind]
        return build(manipulation, previous[..., None], attention_mask, positions, position_limit, efficient)

    def edit_builders(self) -> dict:
        """Kind -> the method that builds its LayerEdits, each called as
        build(manipulation, previous [B, T, 1], attention_mask, positions, position_limit, efficient)
        -> list[LayerEdit]."""
        return {"random": self._random_edits, "freeze": self._freeze_edits, "swap": self._swap_edits,
                "skip_attention": self._skip_attention_edits}

    def _random_edits(self, manipulation, previous, attention_mask, positions, position_limit, efficient):
        noise = random_directions(manipulation.noise_seed, positions, self.config.hidden_size, position_limit)
        return self._at_layer(manipulation.layer, LayerEdit(previous=previous, random=noise))

    def _freeze_edits(self, manipulation, previous, attention_mask, positions, position_limit, efficient):
        """Layers k .. end-1 (end = L, or k + window). A window's last layer runs previous tokens in full: from
        its output they evolve again. Spared positions keep evolving, so the efficiency mode cannot skip them."""
        L, end = self.config.num_layers, manipulation.end_layer(self.config.num_layers)
        # (With one token, a decoding step, there are no previous tokens in the pass to save work on.)
        efficient = efficient and not manipulation.spare_first and previous.shape[1] > 1
        first = manipulation.layer - 1 if efficient else manipulation.layer  # layer k-1's outputs are overwritten too
        edit = LayerEdit(previous=previous, freeze=True, last_token_only=efficient)
        flows_on = replace(edit, last_token_only=False) if end < L else edit
        return [edit if first <= j < end - 1 else flows_on if j == end - 1 else NO_EDIT for j in range(L)]

    def _swap_edits(self, manipulation, previous, attention_mask, positions, position_limit, efficient):
        """Each donor vector placed at its position in every sequence."""
        B, T = attention_mask.shape
        wanted = torch.tensor(manipulation.positions, device=positions.device)
        hits = (positions[..., None] == wanted) & attention_mask[..., None]  # [B, T, P]
        vectors = manipulation.vectors.to(device=positions.device, dtype=self.embed_tokens.weight.dtype)
        if vectors.dim() == 2:
            vectors = vectors.expand(B, *vectors.shape)
        swap_at = hits.any(dim=-1, keepdim=True)
        which = hits.to(torch.uint8).argmax(dim=-1)  # [B, T]: index of the donor vector for each position
        swap_vectors = torch.gather(vectors, 1, which[..., None].expand(-1, -1, vectors.shape[-1]))
        return self._at_layer(manipulation.layer, LayerEdit(swap_at=swap_at, swap_vectors=swap_vectors))

    def _skip_attention_edits(self, manipulation, previous, attention_mask, positions, position_limit, efficient):
        """Layers k .. end-1 (end = L, or k + window) skip attention; sparing n positions, they attend only to
        those. The efficiency mode drops previous tokens when no layer above k reads them."""
        L, k, n = self.config.num_layers, manipulation.layer, manipulation.spare_first
        end = manipulation.end_layer(L)
        window = self.config.sliding_window
        if n and window is not None and int(positions[:, -1].max()) >= window:
            raise ManipulationError(f"skip_attention with spare_first needs sequences of at most {window} tokens "
                                    f"on this sliding-window model (beyond its window the spared positions are unseen)")
        skip = LayerEdit(read_first_only=n) if n else LayerEdit(skip_attention=True)
        at_k = replace(skip, drop_previous=efficient and not n and end == L)
        return [NO_EDIT] * k + [at_k] + [skip] * (end - k - 1) + [NO_EDIT] * (L - end)

    def _at_layer(self, k: int, edit: LayerEdit) -> list[LayerEdit]:
        return [edit if j == k else NO_EDIT for j in range(self.config.num_layers)]


def weights_version(weights: list[torch.Tensor]) -> int:
    """Grows with every in-place change of any of these tensors (torch counts them, tensor by tensor)."""
    return sum(w._version for w in weights)


def run_frozen(compiled, weights: list[torch.Tensor], version: int, *args):
    """One call of the CPU's compiled layers, with frozen weights (see `Transformer.compiled_layer_stack`)."""
    if weights_version(weights) != version:
        raise RuntimeError("the model's weights changed in place after its compiled decode step was built, "
                           "and that step keeps its own packed copy of them: load the model again to compile "
                           "with the new weights")
    with torch._inductor.config.patch(freezing=True):  # read while tracing, so on every call (recompiles)
        return compiled(*args)


def checked_attention_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                           efficient_with_hidden_states: bool = False, checked: bool = False) -> torch.Tensor:
    """The attention mask as bool (all ones when None), after the checks every pass needs (the value check,
    which reads from the device, only for a mask given and not already `checked`)."""
    if efficient_with_hidden_states:
        raise ValueError("efficient computes the last position only; it cannot return hidden states")
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    attention_mask = attention_mask.to(torch.bool)
    if not checked and not attention_mask[:, -1].all():
        raise ValueError("attention_mask: every sequence must end with a real token (pad on the left)")
    return attention_mask


# ----------------------------------------------------------------------------- checkpoint names

def stacked_projections(config: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """Each layer's stacked matrices (names relative to the layer), with the checkpoint tensors they stack in
    order: their names, as Hugging Face checkpoints have them, and their rows.

    State dicts use the checkpoints' names both ways (`Transformer` registers the two functions below as
    hooks): `load_state_dict` takes a checkpoint's tensors, and `state_dict()` gives what a checkpoint holds."""
    q, kv, ffn = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim, config.intermediate_size
    return {"self_attn.qkv_proj.weight": (("self_attn.q_proj.weight", q), ("self_attn.k_proj.weight", kv),
                                          ("self_attn.v_proj.weight", kv)),
            "mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", ffn), ("mlp.up_proj.weight", ffn))}


def stack_projections(state: dict, config: ModelConfig, prefix: str = "") -> None:
    """Checkpoint names -> this model's, in place: each layer's parts give way to their stacked matrix. Each part
    leaves `state` as it is stacked, so whoever holds `state` holds one matrix twice at most, for a moment."""
    for j in range(config.num_layers):
        layer = f"{prefix}layers.{j}."
        for stacked, parts in stacked_projections(config).items():
            names = [layer + part for part, _ in parts]
            if all(name in state for name in names):
                state[layer + stacked] = torch.cat([state.pop(name) for name in names])


def split_stacked_projections(state: dict, config: ModelConfig, prefix: str = "") -> None:
    """This model's names -> the checkpoint's, in place, keeping the order: each stacked matrix becomes its parts,
    as views of it (no copy)."""
    splits = {f"{prefix}layers.{j}.{stacked}": [(f"{prefix}layers.{j}.{part}", rows) for part, rows in parts]
              for j in range(config.num_layers) for stacked, parts in stacked_projections(config).items()}
    items = list(state.items())
    state.clear()
    for name, tensor in items:
        if name in splits:
            pieces = tensor.split([rows for _, rows in splits[name]])
            state.update((part, piece) for (part, _), piece in zip(splits[name], pieces, strict=True))
        else:
            state[name] = tensor


def hf_hidden_states(model: Transformer, states: torch.Tensor) -> torch.Tensor:
    """Our H [L+1, ...] in Hugging Face's `output_hidden_states` convention (final norm on the last entry)."""
    return torch.cat([states[:-1], model.norm(states[-1])[None]])
