"""The four manipulations of "Attend First, Consolidate Later" as plain data, with each kind's facts.

A `Manipulation` says *what* to do to previous tokens and *from which layer*;
`model.py` does it, as visible lines of the decoder block (`Block.manipulate`).
Notation (docs/manipulations.md defines it exactly): `H[j]` is the residual
stream entering decoder layer j; "previous tokens" are all real (non-padding)
positions of a sequence except its last one; `layer` is k, the first decoder
layer whose view of previous tokens is altered, and k = L (the number of
layers) means no manipulation at all.

    random          at the input of layer k only, each previous token's H[k] becomes a
                    Gaussian direction scaled to that token's own L2 norm
    freeze          previous tokens keep H[k-1]: at every layer j >= k their H[j] is
                    overwritten with it (their stream stops evolving)
    swap            at the input of layer k only, the given positions get the given vectors
    skip_attention  layers j >= k skip input-norm + attention for all positions

Variants beyond the paper (docs/manipulations.md, "Variants"): `spare_first=n` leaves each
sequence's first n positions alone (position 0 is the attention sink of a model without BOS);
`window=w` acts on layers k .. k+w-1 only; `fresh_noise_each_step=True` is the paper's released
random (fresh noise at every generation step, faithful mode only).

What the rest of the code needs to know about a kind is in `KIND_FACTS`, and
nowhere else: outside this file and the visible lines of `Block.manipulate` (and
of the packed decode step, `minillm.packed.PackedRuns.decode_step`), no code
compares kind names.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace

import torch

from minillm.errors import ManipulationError


@dataclass(frozen=True)
class KindFacts:
    """What callers need to know about one kind of manipulation."""

    lowest_layer: int = 0  # the smallest valid k (freeze keeps H[k-1], so its k starts at 1)
    seeded: bool = False  # the seed chooses the manipulation (random: which noise)
    donor: bool = False  # needs positions and donor vectors (swap); changes nothing before its first position
    # With efficient=True a KV cache is needed for layers below k only (skip_attention: from k up no
    # token reads another; not so with a window that ends below the top, or spared positions).
    cache_below_k_only: bool = False
    spares: bool = False  # accepts spare_first (swap names its positions itself)
    windowed: bool = False  # accepts a window of layers (random and swap act at layer k only)
    plain_decode: bool = False  # its cached decode steps are plain passes (swap acts on prompt positions only)


KIND_FACTS = {
    "random": KindFacts(seeded=True, spares=True),
    "freeze": KindFacts(lowest_layer=1, spares=True, windowed=True),
    "swap": KindFacts(donor=True, plain_decode=True),
    "skip_attention": KindFacts(cache_below_k_only=True, spares=True, windowed=True),
}

KINDS = tuple(KIND_FACTS)  # ("random", "freeze", "swap", "skip_attention")


def check_layers(kind: str, layer: int, window: int | None, num_layers: int) -> None:
    """Raise unless `kind` can act from layer k = `layer` (for `window` layers, or to the top) of a model with
    num_layers layers: checkable from the config alone, before any weight is loaded."""
    lowest = KIND_FACTS[kind].lowest_layer
    if not lowest <= layer <= num_layers:
        why = f" ({kind} keeps H[k-1], so k >= 1)" if layer < lowest else ""
        raise ManipulationError(f"{kind} layer k={layer} is outside {lowest}..{num_layers} for a "
                                f"{num_layers}-layer model{why}")
    if window is not None and layer + window > num_layers:
        raise ManipulationError(f"{kind} window of {window} layers from k={layer} goes past the top layer "
                                f"{num_layers - 1} of a {num_layers}-layer model")


# Noise is drawn in blocks of positions, each block from its own seeded generator, so the
# vector a position gets depends only on (seed, position): not on the batch, the padding or
# the sequence length.
_NOISE_BLOCK = 64


@dataclass(frozen=True)
class Manipulation:
    kind: str
    layer: int
    seed: int = 0  # random: which noise
    positions: tuple[int, ...] = ()  # swap: positions counted from each sequence's first real token
    vectors: torch.Tensor | None = field(default=None, repr=False)  # swap: [P, D] or [B, P, D]
    description: str = ""  # free text kept with results, e.g. which donor the swap vectors came from
    spare_first: int = 0  # random, freeze, skip_attention: each sequence's first n real positions are spared
    window: int | None = None  # freeze, skip_attention: layers k .. k+window-1 only (None: k to the top)
    fresh_noise_each_step: bool = False  # random: the paper's released code, new noise at every step (faithful)
    step: int = 0  # fresh_noise_each_step: the generation step whose noise this is (generation sets it)

    def __post_init__(self):
        if self.kind not in KIND_FACTS:
            raise ManipulationError(f"unknown manipulation kind {self.kind!r}; choose one of {', '.join(KIND_FACTS)}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise ManipulationError(f"manipulation layer must be an integer, got {self.layer!r}")
        object.__setattr__(self, "positions", tuple(int(p) for p in self.positions))
        if self.facts.donor:
            if not self.positions:
                raise ManipulationError("swap needs at least one position")
            if len(set(self.positions)) != len(self.positions):
                raise ManipulationError(f"swap positions must be distinct, got {list(self.positions)}")
            if self.vectors is None:
                raise ManipulationError("swap needs donor vectors, one per position")
            if not isinstance(self.vectors, torch.Tensor):
                raise ManipulationError(f"swap vectors must be a torch.Tensor, got a {type(self.vectors).__name__}")
            if self.vectors.dim() not in (2, 3) or self.vectors.shape[-2] != len(self.positions):
                raise ManipulationError(
                    f"swap vectors must have shape [{len(self.positions)}, D] or "
                    f"[batch, {len(self.positions)}, D] for {len(self.positions)} positions, "
                    f"got {list(self.vectors.shape)}")
        elif self.positions or self.vectors is not None:
            raise ManipulationError(f"positions/vectors only apply to swap, not {self.kind}")
        if not _is_count(self.spare_first, 0):
            raise ManipulationError(f"spare_first must be an integer >= 0, got {self.spare_first!r}")
        if self.spare_first and not self.facts.spares:
            raise ManipulationError(f"spare_first does not apply to {self.kind}: it names its positions itself")
        if self.window is not None and not _is_count(self.window, 1):
            raise ManipulationError(f"window must be an integer >= 1 (a number of layers), got {self.window!r}")
        if self.window is not None and not self.facts.windowed:
            raise ManipulationError(f"window does not apply to {self.kind}: it acts at layer k only")
        if self.fresh_noise_each_step and self.kind != "random":
            raise ManipulationError(f"fresh_noise_each_step applies to random only, not {self.kind}")

    @property
    def facts(self) -> KindFacts:
        return KIND_FACTS[self.kind]

    def check(self, num_layers: int, hidden_size: int, lengths: list[int]) -> None:
        """Raise if this manipulation cannot apply to a model of this size and sequences of these lengths."""
        check_layers(self.kind, self.layer, self.window, num_layers)
        short = [(b, length) for b, length in enumerate(lengths) if length <= self.spare_first]
        if self.spare_first and short:
            b, length = short[0]
            raise ManipulationError(f"spare_first={self.spare_first} spares every token of sequence {b} "
                                    f"(length {length}): a sequence needs more tokens than it spares")
        if not self.facts.donor:
            return
        if self.vectors.shape[-1] != hidden_size:
            raise ManipulationError(f"swap vectors have width {self.vectors.shape[-1]}, the model's hidden size is {hidden_size}")
        if self.vectors.dim() == 3 and self.vectors.shape[0] != len(lengths):
            raise ManipulationError(f"swap vectors are given for {self.vectors.shape[0]} sequences, the batch has {len(lengths)}")
        for b, length in enumerate(lengths):
            bad = [p for p in self.positions if not 0 <= p < length]
            if bad:
                raise ManipulationError(f"swap positions {bad} are outside sequence {b} of length {length}")

    def first_changed_column(self, attention_mask: torch.Tensor) -> int:
        """The first column of a left-padded batch [B, T] that this manipulation changes. Attention is causal,
        so every column before it has the same states at every layer as without the manipulation (and its
        cached keys/values stay valid). Donor kinds start at their first position; the others at column 0."""
        if not self.facts.donor:
            return 0
        padding = attention_mask.shape[1] - attention_mask.sum(dim=1)
        return min(int(padding.min()) + min(self.positions), attention_mask.shape[1] - 1)

    def end_layer(self, num_layers: int) -> int:
        """One past the last layer this manipulation acts on (L unless a window ends below the top)."""
        return num_layers if self.window is None else self.layer + self.window

    def cache_layers(self, num_layers: int, efficient: bool) -> int:
        """How many layers (from the bottom) a KV cache must hold for this manipulation."""
        below_k_only = self.facts.cache_below_k_only and self.end_layer(num_layers) == num_layers
        return self.layer if efficient and below_k_only and not self.spare_first else num_layers

    def faithful_only(self, num_layers: int) -> str:
        """Why cached generation cannot do this manipulation ("" when it can)."""
        if self.fresh_noise_each_step:
            return ("random with fresh_noise_each_step (the paper's variant) redraws every previous token's "
                    "noise at each step, which a KV cache cannot keep: use mode='faithful'")
        if self.kind == "freeze" and self.end_layer(num_layers) < num_layers:
            return ("freeze with a window that ends below the top layer is faithful-mode only (a token's states "
                    "above the window change once it is a previous token): use mode='faithful'")
        return ""

    @property
    def noise_seed(self) -> int:
        """The seed of random's noise: the seed itself, or with fresh_noise_each_step one per (seed, step), from
        a stream (offset 2**40) that no plain seed below 2**40 reaches."""
        if not self.fresh_noise_each_step:
            return self.seed
        return 2**40 + self.seed * 2**20 + self.step

    def at_step(self, step: int) -> Manipulation:
        """The manipulation for generation step `step` (0 = the pass over the prompt); only fresh noise changes."""
        return replace(self, step=step) if self.fresh_noise_each_step else self

    def for_rows(self, rows: torch.Tensor) -> "Manipulation":
        """The same manipulation for these sequences of the batch only (per-sequence swap vectors selected)."""
        if self.vectors is None or self.vectors.dim() == 2:
            return self
        return replace(self, vectors=self.vectors[rows.to(self.vectors.device)])

    def to_dict(self) -> dict:
        """A JSON-ready record (swap vectors are summarised by shape; `description` says where they came from)."""
        record = {"kind": self.kind, "layer": self.layer}
        if self.facts.seeded:
            record["seed"] = self.seed
        if self.facts.donor:
            record["positions"] = list(self.positions)
            record["vectors_shape"] = list(self.vectors.shape)
        if self.spare_first:
            record["spare_first"] = self.spare_first
        if self.window is not None:
            record["window"] = self.window
        if self.fresh_noise_each_step:
            record["fresh_noise_each_step"] = True
            record["variant"] = "the paper's random: fresh noise at every generation step"
        if self.description:
            record["description"] = self.description
        return record


def _is_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def random_directions(seed: int, positions: torch.Tensor, width: int, position_limit: int | None = None) -> torch.Tensor:
    """Gaussian vectors [*positions.shape, width] (fp32, on positions' device), a fixed function of
    (seed, position).

    position_limit: every position is below it, a bound the caller knows on the host (a generation's cache
    length, say). The noise of positions 0 .. limit-1 is then kept on positions' device, per (seed, width),
    made on the CPU block by block as always, and grown when a later call needs more; each call only indexes
    it there, without reading positions back to the host. Without it (or past `_MAX_TABLE_ROWS`), the blocks
    that positions need are found on the host."""
    if position_limit is not None and position_limit <= _MAX_TABLE_ROWS:
        return _noise_table(seed, width, -(-position_limit // _NOISE_BLOCK), positions.device)[positions]
    flat = positions.reshape(-1).cpu()
    blocks = int(flat.max()) // _NOISE_BLOCK + 1
    return _noise_table(seed, width, blocks, torch.device("cpu"))[flat].reshape(*positions.shape, width).to(
        positions.device)


# The tables held on devices: (seed, width, device) -> [blocks * _NOISE_BLOCK, width], as many blocks as a
# call has needed so far. A few only (a sweep uses one seed; 8192 positions of width 4096 are 128 MiB).
_MAX_TABLE_ROWS = 8192
_NOISE_TABLES: OrderedDict = OrderedDict()
_KEPT_TABLES = 4


def _noise_table(seed: int, width: int, blocks: int, device: torch.device) -> torch.Tensor:
    """The noise of at least positions 0 .. blocks * _NOISE_BLOCK - 1 on this device."""
    key = (seed, width, device)
    table = _NOISE_TABLES.get(key)
    have = 0 if table is None else table.shape[0] // _NOISE_BLOCK
    if have < blocks:
        more = torch.cat([
            torch.randn(_NOISE_BLOCK, width, generator=torch.Generator().manual_seed(seed * 1_000_003 + block))
            for block in range(have, blocks)]).to(device)
        _NOISE_TABLES[key] = more if table is None else torch.cat([table, more])
        if len(_NOISE_TABLES) > _KEPT_TABLES:
            _NOISE_TABLES.popitem(last=False)
    _NOISE_TABLES.move_to_end(key)
    return _NOISE_TABLES[key]
