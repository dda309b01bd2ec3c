"""Runs of one manipulation at different layers k, decoded together in one batch.

A layer sweep runs each manipulation at many k over the same prompts. The runs' first passes over the
prompts differ and stay apart (each starts at its own k from shared prompt states). After that, every decode
step feeds one token per sequence, and such a step costs little more for 64 rows than for 4: the weights are
read once either way. So the runs' rows are packed into one batch (their caches side by side), and each row
carries its own k as data (`PackedRuns`). What a cached decode step does beyond a plain pass, row by row from
the row's k (see `Transformer.forward` and docs/manipulations.md, "Generation: faithful and cached"):

    random          after the plain pass, the newest token is re-passed from layer k as noise, and its
                    keys/values in layers k .. L-1 are rewritten (`Transformer.recache_newest_as_noise`)
    freeze          at layers j >= k, the newest token's cached keys/values become those of its H[k-1]
                    (`Block._cache_newest_as_frozen`)
    skip_attention  layers j >= k skip the input norm and attention; the MLP still runs
    swap, none      a plain pass (swap changes only prompt positions)

Rows with k = L (the baseline, swap) are plain in every kind's pack. Variants (spare_first, window, fresh
noise) are not packed: their runs decode on their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minillm.errors import ManipulationError
from minillm.manipulation import Manipulation, random_directions
from minillm.model import KVCache, Transformer, norm_matched

# What a cached decode step does beyond a plain pass, per kind (the table above); swap does nothing more.
PACKED_KINDS = ("random", "freeze", "skip_attention")


@dataclass(frozen=True)
class PackedRuns:
    """The manipulation of every row of a packed batch: one kind (or none), each row from its own layer k."""

    kind: str | None  # one of PACKED_KINDS, or None: every row decodes plainly
    layers: torch.Tensor  # [B] long: each row's k (L: the row is not manipulated in a decode step)
    seeds: torch.Tensor  # [B] long: random's seed of each row
    distinct_seeds: tuple[int, ...]  # the values in seeds (kept on the host: no read-back per step)
    lowest: int  # the smallest k of any row: layers below it are plain for every row

    @classmethod
    def of(cls, manipulations: Sequence[Manipulation | None], rows_each: int, num_layers: int,
           device: torch.device | str = "cpu") -> PackedRuns:
        """The rows of these runs, one after another, `rows_each` rows per run."""
        kinds = set()
        for manipulation in manipulations:
            if manipulation is None:
                continue
            if manipulation.spare_first or manipulation.window is not None or manipulation.fresh_noise_each_step:
                raise ManipulationError(f"{manipulation.kind} with spare_first, a window or fresh noise cannot be "
                                        "packed with other runs: generate it on its own")
            if manipulation.kind in PACKED_KINDS:
                kinds.add(manipulation.kind)
        if len(kinds) > 1:
            raise ManipulationError(f"runs packed in one batch must share one kind of manipulation, got "
                                    f"{', '.join(sorted(kinds))}")
        kind = kinds.pop() if kinds else None
        # swap's decode steps are plain: its rows count as k = L
        layers = [m.layer if m is not None and m.kind == kind else num_layers for m in manipulations]
        seeds = [m.seed if m is not None else 0 for m in manipulations]
        per_row = lambda values: torch.tensor(values, device=device).repeat_interleave(rows_each)  # noqa: E731
        return cls(kind, per_row(layers), per_row(seeds), tuple(sorted(set(seeds))), min(layers))

    def for_rows(self, rows: torch.Tensor) -> PackedRuns:
        """The same runs for these rows of the batch only (generation drops finished rows)."""
        rows = rows.to(self.layers.device)
        return PackedRuns(self.kind, self.layers[rows], self.seeds[rows], self.distinct_seeds, self.lowest)

    def at_step(self, step: int) -> PackedRuns:
        return self  # the noise of a position never changes (no fresh noise in a pack)

    def noise(self, positions: torch.Tensor, model: Transformer) -> torch.Tensor:
        """random: each row's Gaussian direction [B, 1, D] for its newest position (positions [B, 1])."""
        config = model.config
        noise = None
        for seed in self.distinct_seeds:
            drawn = random_directions(seed, positions, config.hidden_size, config.max_position_embeddings)
            noise = drawn if noise is None else torch.where((self.seeds == seed)[:, None, None], drawn, noise)
        return noise

    def decode_step(self, model: Transformer, cache: KVCache, token: torch.Tensor) -> torch.Tensor:
        """Append token [B] to every row; return the next logits [B, V] (fp32). Each row gets exactly what its
        own run's cached decode step would give it (up to the rounding of a bigger batch)."""
        x = model.embed_tokens(token[:, None])  # H[0] [B, 1, D]
        newest = torch.ones_like(token, dtype=torch.bool)[:, None]  # [B, 1]: one real token per row
        positions, mask = model.positions_and_mask(newest, cache)
        rope = model.rotary(positions, x.dtype)
        cache.append(newest)
        k = self.layers[:, None, None]  # [B, 1, 1]
        noise = self.noise(positions, model) if self.kind == "random" else None
        frozen = repassed = x
        for j, layer in enumerate(model.layers):
            layer_cache = cache.layer(j)
            if self.kind == "skip_attention":  # rows from their k on: no attention, the MLP still runs
                attended = torch.where(k <= j, x, x + layer.self_attn(layer.input_layernorm(x), rope, mask,
                                                                      layer_cache))
                out = attended + layer.mlp(layer.post_attention_layernorm(attended))
            else:
                out = layer(x, rope, mask, layer_cache)
            if self.kind == "random" and j >= self.lowest:
                # The re-pass of the newest token as noise from its row's k; rows below their k go through the
                # layer as the plain pass did (the same keys/values written again).
                repassed = torch.where(k == j, norm_matched(noise, x), torch.where(k < j, repassed, x))
                repassed = layer(repassed, rope, mask, layer_cache)
            if self.kind == "freeze":
                frozen = torch.where(k == j + 1, x, frozen)  # H[k-1]: what the newest token keeps from layer k on
                if j >= self.lowest:
                    cache_as_frozen(layer, layer_cache, frozen, rope, k <= j)
            x = out
        return model.lm_head(model.norm(x))[:, -1].float()


def cache_as_frozen(layer, layer_cache, frozen: torch.Tensor, rope, rows: torch.Tensor) -> None:
    """freeze: in these rows [B, 1, 1] (bool), the newest token's keys/values at this layer become those of its
    frozen state [B, 1, D]; the other rows keep what the plain pass stored."""
    _, keys, values = layer.self_attn.project(layer.input_layernorm(frozen), rope, with_queries=False)
    stored_keys, stored_values = layer_cache.cache.newest(layer_cache.layer)
    rows = rows[:, :, :, None]  # [B, 1, 1, 1] against [B, kv_heads, 1, head_dim]
    layer_cache.update(torch.where(rows, keys, stored_keys), torch.where(rows, values, stored_values))
