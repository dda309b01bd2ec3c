"""Batched autoregressive generation: greedy or sampled, with or without the KV cache.

Two modes for a manipulated model (DESIGN §4); both give the same tokens:

- "faithful": the paper's procedure: every step reruns the whole sequence, so a
  generated token is manipulated as soon as it is no longer the last one.
- "cached": prefill the prompt once, then feed one token per step against the
  KV cache. When a token stops being the last one, the model rewrites its cached
  keys/values as a previous token's (freeze: from its H[k-1]; random: from its
  noise at layer k, recomputed through layers >= k), so cached equals faithful for
  every kind. Random vectors depend only on (seed, position), so the noise a token
  gets is the same at every step; the paper's code redraws it at each step.

Sweeps can also reuse an unmanipulated prefill (`Prefill`): layers below k are the
same for every manipulation at k, so each manipulated run starts at layer k.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from minillm.inputs import check_generation
from minillm.manipulation import Manipulation
from minillm.model import KVCache, Transformer

MODES = ("cached", "faithful")


@dataclass
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) restricted by top_k / top_p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")


@dataclass
class Prefill:
    """The unmanipulated pass over a batch of prompts, kept to start manipulated runs at their layer k."""

    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T]
    states: torch.Tensor  # H [L+1, B, T, D]
    cache: KVCache | None  # keys/values of all layers after the prompt (cached mode)


@torch.no_grad()
def prefill(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int = 0,
            mode: str = "cached") -> Prefill:
    """Run the prompts once without manipulation, keeping every layer's states (and the KV cache)."""
    device = model.embed_tokens.weight.device
    input_ids, attention_mask = left_pad(prompts, pad_id, device)
    cache = _new_cache(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens) if mode == "cached" else None
    _, states = model(input_ids, attention_mask, cache=cache, output_hidden_states=True, last_logits_only=True)
    return Prefill(input_ids, attention_mask, states, cache)


def _new_cache(model: Transformer, batch_size: int, length: int, num_layers: int | None = None) -> KVCache:
    weight = model.embed_tokens.weight
    return KVCache(model.config, batch_size, length, dtype=weight.dtype, device=weight.device, num_layers=num_layers)


@dataclass
class Generation:
    tokens: list[list[int]]  # new tokens of each sequence, up to and including its stop token
    logits: torch.Tensor | None = None  # [B, steps, V] fp32, when asked for; NaN after a sequence stopped


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, T_max], each sequence right-aligned."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("every prompt needs at least one token")
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, width - len(seq):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate_tokens(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *,
                    eos_ids: Sequence[int] = (), pad_id: int = 0, sampling: Sampling | None = None,
                    manipulation: Manipulation | None = None, mode: str = "cached",
                    stop: Callable[[list[int]], bool] | None = None, reuse: Prefill | None = None,
                    on_token: Callable[[int, int], None] | None = None,
                    return_logits: bool = False, efficient: bool = False) -> Generation:
    """Continue each prompt (a list of token ids) by up to max_new_tokens.

    A sequence stops at an eos id or when `stop(its new tokens)` says so; the others go on.
    `on_token(sequence_index, token)` is called as tokens are chosen (for streaming).
    `reuse`: the `prefill` of these same prompts; the first pass then starts at the manipulated layer
    (and, for a swap with a cache, at the first swapped position).
    `efficient`: real savings where the manipulation allows them, same tokens: freeze computes previous
    tokens only as far as anyone reads them; skip_attention runs only the last position from layer k up
    and keeps no KV cache there.
    A sequence that has stopped leaves the batch (once a quarter of the rows have), so the others go on
    without computing it (no row reads another, so only the rounding of a smaller batch can differ).
    """
    check_generation(model.config, prompts, max_new_tokens, sampling=sampling, pad_id=pad_id, eos_ids=eos_ids,
                     manipulation=manipulation)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    sampling = sampling or Sampling()
    generator = torch.Generator().manual_seed(sampling.seed)
    device = model.embed_tokens.weight.device
    B = len(prompts)
    if reuse is None:
        input_ids, attention_mask = left_pad(prompts, pad_id, device)
        cache_layers = None
        if efficient and manipulation is not None and manipulation.kind == "skip_attention":
            cache_layers = manipulation.layer
        cache = _new_cache(model, B, input_ids.shape[1] + max_new_tokens, cache_layers) if mode == "cached" else None
        column, first_pass = 0, {}
    else:
        if (reuse.cache is None) != (mode == "faithful") or reuse.input_ids.shape[0] != B:
            raise ValueError("reuse: the prefill was made for another batch or another mode")
        input_ids, attention_mask = reuse.input_ids, reuse.attention_mask
        cache, column = None, 0
        if mode == "cached":
            cache = reuse.cache.clone()
            if cache.max_length < input_ids.shape[1] + max_new_tokens:
                raise ValueError(f"reuse: the prefill's cache holds {cache.max_length} tokens, too few for "
                                 f"{max_new_tokens} new tokens")
            if manipulation is not None and manipulation.kind == "swap":
                column = first_swapped_column(manipulation, attention_mask)
            cache.rewind(column)
        k = model.config.num_layers if manipulation is None else manipulation.layer
        first_pass = {"start_layer": k, "states_below": reuse.states[:, :, column:]}

    new_tokens: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    rows = list(range(B))  # which sequence each row of the batch is; finished ones are dropped
    eos = set(eos_ids)
    step_logits = []
    step_input, step_mask = input_ids[:, column:], attention_mask[:, column:]
    for _ in range(max_new_tokens):
        logits = model(step_input, step_mask, cache=cache, manipulation=manipulation, last_logits_only=True,
                       efficient=efficient, **first_pass)
        first_pass = {}
        logits = logits[:, -1].float()
        token = choose_next(logits, sampling, generator)
        if return_logits:  # [B, V]; NaN for sequences that have already stopped
            live = [i for i, row in enumerate(rows) if not done[row]]
            every_sequence = logits.new_full((B, logits.shape[-1]), float("nan"))
            every_sequence[[rows[i] for i in live]] = logits[live]
            step_logits.append(every_sequence)
        for row, t in zip(rows, token.tolist()):
            if done[row]:
                continue
            new_tokens[row].append(t)
            if on_token is not None:
                on_token(row, t)
            done[row] = t in eos or (stop is not None and stop(new_tokens[row]))
        if all(done):
            break
        keep = [i for i, row in enumerate(rows) if not done[row]]
        if len(keep) <= 0.75 * len(rows):
            # A quarter of the rows has finished: stop computing them (each drop copies the cache, so
            # not one at a time).
            index = torch.tensor(keep, device=device)
            rows = [rows[i] for i in keep]
            token, input_ids, attention_mask = token[index], input_ids[index], attention_mask[index]
            if cache is not None:
                cache.keep_rows(index)
            if manipulation is not None:
                manipulation = manipulation.for_rows(index)
        if cache is None:  # faithful: rerun everything, the new token appended
            input_ids = torch.cat([input_ids, token[:, None]], dim=1)
            attention_mask = torch.cat([attention_mask, torch.ones_like(token)[:, None]], dim=1)
            step_input, step_mask = input_ids, attention_mask
        else:
            step_input, step_mask = token[:, None], torch.ones_like(token)[:, None]
    logits = torch.stack(step_logits, dim=1) if return_logits else None
    return Generation(new_tokens, logits)


def first_swapped_column(swap: Manipulation, attention_mask: torch.Tensor) -> int:
    """The first column of a left-padded batch that a swap changes. Attention is causal, so every column
    before it has the same states at every layer as without the swap: its cached keys/values stay valid."""
    padding = attention_mask.shape[1] - attention_mask.sum(dim=1)
    return min(int(padding.min()) + min(swap.positions), attention_mask.shape[1] - 1)


def choose_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> torch.Tensor:
    """Next token [B] from last-position logits [B, V] (fp32)."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = logits.topk(min(sampling.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if sampling.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already cover top_p
        drop = probs.cumsum(dim=-1) - probs >= sampling.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(logits.device)
