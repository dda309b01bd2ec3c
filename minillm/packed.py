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
noise), and kinds not in the table, are not packed: their runs decode on their own (`in_packs` leaves them
alone, and `PackedRuns.of` refuses them).
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch

from minillm.errors import ManipulationError
from minillm.manipulation import KIND_FACTS, Manipulation, random_directions
from minillm.model import KVCache, Transformer, norm_matched

# The kinds whose cached decode step `PackedRuns.decode_step` does per row (the table above). Kinds whose decode
# steps are plain passes (`KindFacts.plain_decode`: swap) pack with any of them.
PACKED_KINDS = ("random", "freeze", "skip_attention")
# The default bound of a pack: its runs' KV caches hold this many token slots in all (rows x positions), which
# is 1.5 GiB for SmolLM2-135M in fp32 and 16 GiB for a 7B model in bf16.
PACK_TOKENS = 32768

Run = TypeVar("Run")


def in_packs(runs: Sequence[Run], kind_of: Callable[[Run], str], prompts: Sequence[Sequence[int]],
             max_new_tokens: int, pack_tokens: int) -> list[list[Run]]:
    """The runs over these prompts in order, consecutive runs of one kind together, as many as keep their caches
    within pack_tokens token slots (a run's cache: rows x (longest prompt + max_new_tokens) slots); one run at
    least, and runs of a kind that cannot be packed (or of no kind: the baseline) alone."""
    cache_slots = len(prompts) * (max(map(len, prompts)) + max_new_tokens)
    packs = []
    for kind, group in itertools.groupby(runs, key=kind_of):
        group = list(group)
        size = max(1, pack_tokens // cache_slots) if kind in PACKED_KINDS or plain_decode(kind) else 1
        packs += [group[start:start + size] for start in range(0, len(group), size)]
    return packs


@dataclass(frozen=True)
class PackedRuns:
    """The manipulation of every row of a packed batch: one kind (or none), each row from its own layer k.

    Rows are in order of k, so at any layer j the rows manipulated there (k <= j) come first, and a step
    touches them as one slice of the batch, the cache included: no row is computed for nothing."""

    kind: str | None  # one of PACKED_KINDS, or None: every row decodes plainly
    row_k: tuple[int, ...]  # each row's k, ascending (L: the row is not manipulated in a decode step)
    seeds: torch.Tensor  # [B] long: random's seed of each row
    distinct_seeds: tuple[int, ...]  # the values in seeds (kept on the host: no read-back per step)

    def __post_init__(self):
        if list(self.row_k) != sorted(self.row_k):
            raise ValueError("PackedRuns: rows must come in order of their layer k")

    @classmethod
    def of(cls, manipulations: Sequence[Manipulation | None], rows_each: int, num_layers: int,
           device: torch.device | str = "cpu") -> PackedRuns:
        """The rows of these runs, one after another, `rows_each` rows per run (runs in order of their k)."""
        kinds = set()
        for manipulation in manipulations:
            if manipulation is None:
                continue
            if manipulation.spare_first or manipulation.window is not None or manipulation.fresh_noise_each_step:
                raise ManipulationError(f"{manipulation.kind} with spare_first, a window or fresh noise cannot be "
                                        "packed with other runs: generate it on its own")
            if manipulation.kind in PACKED_KINDS:
                kinds.add(manipulation.kind)
            elif not plain_decode(manipulation.kind):
                raise ManipulationError(f"{manipulation.kind} has no packed decode step (minillm/packed.py): "
                                        "generate it on its own")
        if len(kinds) > 1:
            raise ManipulationError(f"runs packed in one batch must share one kind of manipulation, got "
                                    f"{', '.join(sorted(kinds))}")
        kind = kinds.pop() if kinds else None
        seeds = [m.seed if m is not None else 0 for m in manipulations]
        return cls(kind, tuple(k for k in decode_layers(manipulations, num_layers) for _ in range(rows_each)),
                   torch.tensor(seeds, device=device).repeat_interleave(rows_each), tuple(sorted(set(seeds))))

    def for_rows(self, rows: torch.Tensor) -> PackedRuns:
        """The same runs for these rows of the batch only, in the same order (generation drops finished rows)."""
        kept = rows.tolist()  # once per drop, not per step
        return PackedRuns(self.kind, tuple(self.row_k[i] for i in kept), self.seeds[rows.to(self.seeds.device)],
                          self.distinct_seeds)

    def at_step(self, step: int) -> PackedRuns:
        return self  # the noise of a position never changes (no fresh noise in a pack)

    def rows_from(self, layer: int) -> int:
        """How many rows are manipulated at this layer (k <= layer): the first ones."""
        return bisect.bisect_right(self.row_k, layer)

    def noise(self, positions: torch.Tensor, width: int, position_limit: int) -> torch.Tensor:
        """random: each row's Gaussian direction [B, 1, width] for its newest position (positions [B, 1], all
        below position_limit)."""
        noise = None
        for seed in self.distinct_seeds:
            drawn = random_directions(seed, positions, width, position_limit)
            noise = drawn if noise is None else torch.where((self.seeds == seed)[:, None, None], drawn, noise)
        return noise

    def decode_step(self, model: Transformer, cache: KVCache, token: torch.Tensor) -> torch.Tensor:
        """Append token [B] to every row; return the next logits [B, V] (fp32). Each row gets exactly what its
        own run's cached decode step would give it (up to the rounding of another batch)."""
        x = model.embed_tokens(token[:, None])  # H[0] [B, 1, D]
        newest = torch.ones_like(token, dtype=torch.bool)[:, None]  # [B, 1]: one real token per row
        positions, mask = model.positions_and_mask(newest, cache)
        rope = model.rotary(positions, x.dtype)
        cache.append(newest)
        noise = self.noise(positions, model.config.hidden_size, cache.max_length) if self.kind == "random" else None
        frozen = repassed = x[:0]
        for j, layer in enumerate(model.layers):
            n = self.rows_from(j)  # rows [0, n) are manipulated at this layer
            if self.kind == "skip_attention":  # rows from their k on: no input norm, no attention; the MLP runs
                attended, later = x, slice(n, None)
                if n < len(self.row_k):  # (when every row skips here, no attention runs)
                    attended = torch.cat([x[:n], x[later] + layer.self_attn(
                        layer.input_layernorm(x[later]), *rows_of(rope, mask, later), cache.layer(j, later))])
                out = attended + layer.mlp(layer.post_attention_layernorm(attended))
            else:
                out = layer(x, rope, mask, cache.layer(j))
            manipulated = slice(0, n)
            if self.kind == "random" and n:
                # The newest token's cached keys/values from its row's k up are those of its noise, carried
                # through the layers (`Transformer.recache_newest_as_noise`): rows reaching k here join.
                joining = slice(repassed.shape[0], n)
                repassed = torch.cat([repassed, norm_matched(noise[joining], x[joining])])
                repassed = layer(repassed, *rows_of(rope, mask, manipulated), cache.layer(j, manipulated))
            if self.kind == "freeze":
                # From its row's k up, the newest token's cached keys/values are those of its H[k-1]
                # (`Block._cache_newest_as_frozen`); rows not yet at k keep H[j] for now.
                if n:
                    _, keys, values = layer.self_attn.project(layer.input_layernorm(frozen[:n]),
                                                              rows_of(rope, mask, manipulated)[0], with_queries=False)
                    cache.layer(j, manipulated).update(keys, values)
                frozen = torch.cat([frozen[:n], x[n:]])
            x = out
        return model.lm_head(model.norm(x))[:, -1].float()


def decode_layers(manipulations: Sequence[Manipulation | None], num_layers: int) -> list[int]:
    """The k of each run's decode steps: its layer, or L for the baseline and swap (their steps are plain)."""
    return [num_layers if m is None or plain_decode(m.kind) else m.layer for m in manipulations]


def plain_decode(kind: str) -> bool:
    return kind in KIND_FACTS and KIND_FACTS[kind].plain_decode


def rows_of(rope: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor | None, rows: slice):
    """The rotation tables and the attention mask of a range of the batch's rows."""
    return tuple(table[rows] for table in rope), None if mask is None else mask[rows]
