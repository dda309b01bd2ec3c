"""Batched autoregressive generation: greedy or sampled, with or without the KV cache.

Two modes for a manipulated model (docs/manipulations.md, "Generation: faithful and
cached"); both give the same tokens:

- "faithful": the paper's procedure: every step reruns the whole sequence, so a
  generated token is manipulated as soon as it is no longer the last one.
- "cached": prefill the prompt once, then feed one token per step against the
  KV cache. When a token stops being the last one, the model rewrites its cached
  keys/values as a previous token's (freeze: from its H[k-1]; random: from its
  noise at layer k, recomputed through layers >= k), so cached equals faithful for
  every kind. Random vectors depend only on (seed, position), so the noise a token
  gets is the same at every step; the paper's code redraws it at each step.

Sweeps can also share the prompts' unmanipulated pass (`PromptStates`): layers below
k are the same for every manipulation at k, so each manipulated run starts at layer k.
A generation is three steps: `start` (a fresh pass over the prompts, or one from shared
prompt states), `decode_step` (one token more), and `drop_finished` (rows that are done
leave the batch). `generate_packed` starts several runs of one manipulation at different
k and decodes them together in one batch (`minillm.packed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from minillm.errors import ManipulationError
from minillm.inputs import check_generation, check_sampling
from minillm.manipulation import Manipulation
from minillm.model import KVCache, Transformer
from minillm.packed import PackedRuns, decode_layers

MODES = ("cached", "faithful")
# A static cache's length is rounded up to a multiple of this, so that prompts of similar lengths share one
# compiled decode step (each new length compiles anew).
STATIC_LENGTH_MULTIPLE = 64


@dataclass
class Sampling:
    """temperature 0 = greedy; otherwise softmax(logits / temperature) restricted by top_k / top_p."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        check_sampling(self)


@dataclass
class PromptStates:
    """The unmanipulated pass over a batch of prompts, shared by manipulated runs that start at their layer k."""

    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T]
    states: torch.Tensor  # H [L+1, B, T, D]
    cache: KVCache | None  # keys/values of all layers after the prompt (cached mode)
    # Each run forks the cache and shares its layers below k (`KVCache.fork`), writing into them past the
    # prompt: the runs that share these states must run one after another, not interleaved.

    @classmethod
    @torch.no_grad()
    def compute(cls, model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int = 0,
                mode: str = "cached") -> PromptStates:
        """Run the prompts once without manipulation, keeping every layer's states (and the KV cache)."""
        device = model.embed_tokens.weight.device
        input_ids, attention_mask = left_pad(prompts, pad_id, device)
        cache = new_cache(model, input_ids.shape[0], input_ids.shape[1] + max_new_tokens) if mode == "cached" else None
        _, states = model(input_ids, attention_mask, cache=cache, output_hidden_states=True, last_logits_only=True,
                          checked=True)  # left_pad made the mask
        return cls(input_ids, attention_mask, states, cache)


def new_cache(model: Transformer, batch_size: int, length: int, num_layers: int | None = None,
              static: bool = False) -> KVCache:
    weight = model.embed_tokens.weight
    return KVCache(model.config, batch_size, length, dtype=weight.dtype, device=weight.device, num_layers=num_layers,
                   static=static)



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
                    stop: Callable[[list[int]], bool] | None = None, prompt_states: PromptStates | None = None,
                    on_token: Callable[[int, int], None] | None = None,
                    return_logits: bool = False, efficient: bool = False, compile: bool = False) -> Generation:
    """Continue each prompt (a list of token ids) by up to max_new_tokens.

    A sequence stops at an eos id or when `stop(its new tokens)` says so; the others go on.
    `on_token(sequence_index, token)` is called as tokens are chosen (for streaming).
    `prompt_states`: the `PromptStates` of these same prompts; the first pass then starts at the
    manipulated layer (and, with a cache, at the first column the manipulation changes).
    `efficient`: real savings where the manipulation allows them, same tokens: freeze computes previous
    tokens only as far as anyone reads them; skip_attention runs only the last position from layer k up
    and keeps no KV cache there.
    `compile`: cached mode only. The decode steps run `model.compiled_layer_stack()` (torch.compile; the
    first call compiles, which takes a while) over a static cache (`KVCache(static=True)`), and the batch keeps
    its finished rows, so that every step has the same shapes. The same tokens; logits within rounding. On the
    CPU each compiled graph keeps a packed copy of the weights in memory (see `Transformer.compiled_layer_stack`).
    """
    check_generation(model.config, prompts, max_new_tokens, sampling=sampling, pad_id=pad_id, eos_ids=eos_ids,
                     manipulation=manipulation)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if mode == "cached" and manipulation is not None and manipulation.faithful_only(model.config.num_layers):
        raise ManipulationError(manipulation.faithful_only(model.config.num_layers))
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if compile and (mode != "cached" or prompt_states is not None):
        raise ValueError("compile: the compiled decode step needs mode='cached' and no prompt_states")
    if manipulation is not None:  # validated once here, so that no pass reads the lengths back from the device
        manipulation.check(model.config.num_layers, model.config.hidden_size, [len(p) for p in prompts])
    sampling = sampling or Sampling()
    if max_new_tokens == 0:
        left_pad(prompts, pad_id)  # the prompts are still checked
        B = len(prompts)
        return Generation([[] for _ in range(B)], torch.empty(B, 0, model.config.vocab_size) if return_logits else None)
    batch, logits = start(model, prompts, max_new_tokens, pad_id=pad_id, manipulation=manipulation, mode=mode,
                          prompt_states=prompt_states, efficient=efficient, static=compile)
    return decode(model, batch, logits, max_new_tokens, sampling=sampling, eos_ids=eos_ids, stop=stop,
                  on_token=on_token, return_logits=return_logits, efficient=efficient, compile=compile)


def decode(model: Transformer, batch: Batch, logits: torch.Tensor, max_new_tokens: int, *, sampling: Sampling,
           eos_ids: Sequence[int] = (), stop: Callable[[list[int]], bool] | None = None,
           on_token: Callable[[int, int], None] | None = None, return_logits: bool = False,
           efficient: bool = False, compile: bool = False) -> Generation:
    """Choose tokens from the first pass's logits [B, V] and decode step by step until every sequence of the
    batch has stopped (see `generate_tokens` for the arguments)."""
    generator = torch.Generator().manual_seed(sampling.seed)
    B = len(batch.rows)
    new_tokens: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    eos = set(eos_ids)
    step_logits = []
    for step in range(max_new_tokens):
        token = choose_next(logits, sampling, generator)
        if return_logits:  # [B, V]; NaN for sequences that have already stopped
            live = [i for i, row in enumerate(batch.rows) if not done[row]]
            every_sequence = logits.new_full((B, logits.shape[-1]), float("nan"))
            every_sequence[[batch.rows[i] for i in live]] = logits[live]
            step_logits.append(every_sequence)
        for row, t in zip(batch.rows, token.tolist(), strict=True):
            if done[row]:  # finished, but still in the batch (rows leave it a quarter at a time)
                continue
            new_tokens[row].append(t)
            if on_token is not None:
                on_token(row, t)
            done[row] = t in eos or (stop is not None and stop(new_tokens[row]))
        if all(done) or step == max_new_tokens - 1:
            break
        if not compile:  # a compiled step keeps its shapes: finished rows stay, computed for nothing
            token = drop_finished(batch, token, done)
        if batch.manipulation is not None:  # the paper's random draws fresh noise at every step
            batch.manipulation = batch.manipulation.at_step(step + 1)
        logits = decode_step(model, batch, token, efficient, compile)
    logits = torch.stack(step_logits, dim=1) if return_logits else None
    return Generation(new_tokens, logits)


@torch.no_grad()
def generate_packed(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                    manipulations: Sequence[Manipulation | None], prompt_states: PromptStates, *,
                    eos_ids: Sequence[int] = (), pad_id: int = 0, stop: Callable[[list[int]], bool] | None = None,
                    return_logits: bool = False, efficient: bool = False) -> list[Generation]:
    """Greedy cached generation of the same prompts under several manipulations of one kind (each at its own
    layer k, or None), one `Generation` per manipulation: the same tokens as a `generate_tokens` call for each.

    Each run's first pass starts from the shared `prompt_states` on its own, as in `generate_tokens`; then all
    runs decode together in one batch (`minillm.packed`), which costs little more per step than one run's.
    Memory: every run's KV cache at once (moved into one packed cache, never held twice).
    """
    config = model.config
    for manipulation in manipulations or [None]:
        check_generation(config, prompts, max_new_tokens, pad_id=pad_id, eos_ids=eos_ids, manipulation=manipulation)
        if manipulation is not None:
            manipulation.check(config.num_layers, config.hidden_size, [len(p) for p in prompts])
    weight = model.embed_tokens.weight
    # Runs in order of k, as a packed batch needs (`PackedRuns`); their generations go back in the given order.
    order = sorted(range(len(manipulations)), key=decode_layers(manipulations, config.num_layers).__getitem__)
    packed = PackedRuns.of([manipulations[i] for i in order], len(prompts), config.num_layers, weight.device)
    if max_new_tokens == 0 or not manipulations:
        left_pad(prompts, pad_id)  # the prompts are still checked
        no_logits = torch.empty(len(prompts), 0, config.vocab_size) if return_logits else None
        return [Generation([[] for _ in prompts], no_logits) for _ in manipulations]
    runs = [start(model, prompts, max_new_tokens, pad_id=pad_id, manipulation=manipulations[i], mode="cached",
                  prompt_states=prompt_states, efficient=efficient) for i in order]
    batches, first_logits = zip(*runs, strict=True)
    cache = KVCache.concatenate([batch.cache for batch in batches], config, weight.dtype, weight.device)
    batch = Batch(list(range(len(runs) * len(prompts))), packed, cache, torch.cat([b.input_ids for b in batches]),
                  torch.cat([b.attention_mask for b in batches]))
    generation = decode(model, batch, torch.cat(first_logits), max_new_tokens, sampling=Sampling(), eos_ids=eos_ids,
                        stop=stop, return_logits=return_logits)
    B = len(prompts)
    generations = [None] * len(manipulations)
    for position, run in enumerate(order):
        rows = slice(position * B, (position + 1) * B)
        generations[run] = Generation(generation.tokens[rows], None if generation.logits is None else generation.logits[rows])
    return generations


@dataclass
class Batch:
    """The sequences still being generated, and what the next model call needs to know about them."""

    rows: list[int]  # which sequence each row of the batch is (finished ones are dropped)
    manipulation: Manipulation | PackedRuns | None
    cache: KVCache | None  # cached mode
    input_ids: torch.Tensor  # [B, T] every token so far: faithful mode reruns them all at each step
    attention_mask: torch.Tensor  # [B, T]


def start(model: Transformer, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int,
          manipulation: Manipulation | None, mode: str, prompt_states: PromptStates | None,
          efficient: bool, static: bool = False) -> tuple[Batch, torch.Tensor]:
    """The first pass: fresh over the prompts, or from shared prompt states. Returns the batch and the
    last-position logits [B, V] (fp32). static: a fresh pass makes a static cache (`KVCache(static=True)`)."""
    L = model.config.num_layers
    if prompt_states is None:
        input_ids, attention_mask = left_pad(prompts, pad_id, model.embed_tokens.weight.device)
        padded = len({len(p) for p in prompts}) > 1  # without padding the model can use plain causal attention
        cache = None
        if mode == "cached":
            layers = None if manipulation is None else manipulation.cache_layers(L, efficient)
            length = input_ids.shape[1] + max_new_tokens
            if static:
                length = -(-length // STATIC_LENGTH_MULTIPLE) * STATIC_LENGTH_MULTIPLE
            cache = new_cache(model, len(prompts), length, layers, static)
        logits = model(input_ids, attention_mask if padded else None, cache=cache, manipulation=manipulation,
                       last_logits_only=True, efficient=efficient, checked=True)
        return Batch(list(range(len(prompts))), manipulation, cache, input_ids, attention_mask), logits[:, -1].float()

    input_ids, attention_mask = prompt_states.input_ids, prompt_states.attention_mask
    if (prompt_states.cache is None) != (mode == "faithful") or input_ids.shape[0] != len(prompts):
        raise ValueError("prompt_states: they were computed for another batch or another mode")
    cache, column = None, 0
    if mode == "cached":
        # The pass below writes layers >= k only: the layers below k are shared with the prompt states, not copied.
        k = L if manipulation is None else manipulation.layer
        layers = None if manipulation is None else manipulation.cache_layers(L, efficient)
        cache = prompt_states.cache.fork(k, layers)
        if cache.max_length < input_ids.shape[1] + max_new_tokens:
            raise ValueError(f"prompt_states: their cache holds {cache.max_length} tokens, too few for "
                             f"{max_new_tokens} new tokens")
        if manipulation is not None:
            column = manipulation.first_changed_column(attention_mask)
        cache.rewind(column)
    # The pass starts at layer k (k = L without a manipulation: only the head runs).
    logits = model(input_ids[:, column:], attention_mask[:, column:], cache=cache, manipulation=manipulation,
                   last_logits_only=True, efficient=efficient, prompt_states=prompt_states.states[:, :, column:],
                   checked=True)
    return Batch(list(range(len(prompts))), manipulation, cache, input_ids, attention_mask), logits[:, -1].float()


def decode_step(model: Transformer, batch: Batch, token: torch.Tensor, efficient: bool = False,
                compile: bool = False) -> torch.Tensor:
    """Append token [B] to every sequence of the batch; return the next last-position logits [B, V] (fp32)."""
    if isinstance(batch.manipulation, PackedRuns):  # several runs' rows, each from its own k
        return batch.manipulation.decode_step(model, batch.cache, token)
    if batch.cache is None:  # faithful: rerun everything, the new token appended
        batch.input_ids = torch.cat([batch.input_ids, token[:, None]], dim=1)
        batch.attention_mask = torch.cat([batch.attention_mask, torch.ones_like(token)[:, None]], dim=1)
        step_input, step_mask = batch.input_ids, batch.attention_mask
    else:  # one new token per sequence: no padding among them (the cache knows the earlier ones')
        step_input, step_mask = token[:, None], None
    if compile:  # a new step: CUDA graphs may overwrite the previous step's outputs, which nothing reads again
        torch.compiler.cudagraph_mark_step_begin()
    logits = model(step_input, step_mask, cache=batch.cache, manipulation=batch.manipulation, last_logits_only=True,
                   efficient=efficient, checked=True, compiled=compile)
    return logits[:, -1].float()


def drop_finished(batch: Batch, token: torch.Tensor, done: list[bool]) -> torch.Tensor:
    """Once a quarter of the rows has finished, stop computing them (each drop copies the cache, so not one
    at a time). No row reads another, so only the rounding of a smaller batch can differ. Returns the
    tokens of the rows kept."""
    keep = [i for i, row in enumerate(batch.rows) if not done[row]]
    if len(keep) > 0.75 * len(batch.rows):
        return token
    index = torch.tensor(keep, device=token.device)
    batch.rows = [batch.rows[i] for i in keep]
    batch.input_ids, batch.attention_mask = batch.input_ids[index], batch.attention_mask[index]
    if batch.cache is not None:
        batch.cache.keep_rows(index)
    if batch.manipulation is not None:
        batch.manipulation = batch.manipulation.for_rows(index)
    return token[index]


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
