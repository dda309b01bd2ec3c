"""Runs decoded together (`generate_packed`): each run gets what it would get decoding alone.

The reference is `generate_tokens` of each manipulation on its own, from the same prompt states: the cached
decode step that `tests/test_manipulations.py` checks against the faithful rerun of the paper's procedure.
"""

from __future__ import annotations

import pytest
import torch

from minillm.errors import ManipulationError
from minillm.generate import PromptStates, generate_packed, generate_tokens
from minillm.manipulation import KIND_FACTS, KindFacts, Manipulation
from minillm.model import KVCache
from minillm.packed import PackedRuns, in_packs

from tiny_checkpoint import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

NEW_TOKENS = 10


def prompts_of(lengths, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 60, (n,), generator=generator).tolist() for n in lengths]


def each_alone_and_packed(model, prompts, manipulations, eos_ids=()):
    """(generate_tokens of each manipulation on its own, generate_packed of them all), logits included."""
    def states():
        return PromptStates.compute(model, prompts, NEW_TOKENS)

    alone = [generate_tokens(model, prompts, NEW_TOKENS, manipulation=manipulation, prompt_states=states(),
                             eos_ids=eos_ids, return_logits=True, efficient=True) for manipulation in manipulations]
    packed = generate_packed(model, prompts, NEW_TOKENS, manipulations, states(), eos_ids=eos_ids,
                             return_logits=True, efficient=True)
    return alone, packed


def assert_same_runs(alone, packed):
    assert len(packed) == len(alone)
    for one, together in zip(alone, packed, strict=True):
        assert together.tokens == one.tokens
        steps = one.logits.shape[1]  # the packed batch runs on while any of its runs does
        torch.testing.assert_close(together.logits[:, :steps], one.logits, rtol=0, atol=1e-5, equal_nan=True)
        assert together.logits[:, steps:].isnan().all()


MANIPULATIONS = {  # for the 3-layer tiny model: the lowest and the top k, k = L, and the baseline
    "random": [Manipulation("random", 0), Manipulation("random", 1, seed=3), Manipulation("random", 2),
               Manipulation("random", 3), None],
    "freeze": [Manipulation("freeze", 1), Manipulation("freeze", 2), Manipulation("freeze", 3), None],
    "skip_attention": [Manipulation("skip_attention", 0), Manipulation("skip_attention", 1),
                       Manipulation("skip_attention", 2), None],
    "swap": [Manipulation("swap", 0, positions=(1,), vectors=torch.randn(1, 32, generator=torch.Generator().manual_seed(0))),
             Manipulation("swap", 2, positions=(0, 3), vectors=torch.randn(2, 32)), None],
}


@pytest.mark.parametrize("sliding_window", [None, 6])
@pytest.mark.parametrize("kind", list(MANIPULATIONS))
def test_packed_runs_equal_each_run_decoded_alone(kind, sliding_window):
    model = tiny_model(sliding_window)
    prompts = prompts_of((7, 11, 9, 5))
    alone, packed = each_alone_and_packed(model, prompts, MANIPULATIONS[kind])
    assert_same_runs(alone, packed)
    baseline = alone[-1].logits
    manipulated = [one for one, m in zip(alone, MANIPULATIONS[kind]) if m is not None and m.layer < 3]
    # Not a vacuous comparison: from the first decode step on, every manipulation changes the logits.
    assert all((one.logits[:, 1:] - baseline[:, 1:]).abs().max() > 0.1 for one in manipulated)


def test_a_pack_whose_rows_all_skip_attention_from_some_layer_on_equals_each_run_alone():
    model = tiny_model()
    manipulations = [Manipulation("skip_attention", 1), Manipulation("skip_attention", 0)]  # as a sweep packs them
    assert_same_runs(*each_alone_and_packed(model, prompts_of((7, 11, 9)), manipulations))


def test_rows_that_stop_early_leave_the_packed_batch_and_the_others_are_unchanged():
    model = tiny_model()
    prompts = prompts_of((7, 11, 9, 5, 8, 6))
    manipulations = [Manipulation("random", 0), Manipulation("random", 2), None]
    first_tokens = generate_tokens(model, prompts, NEW_TOKENS).tokens
    eos = {tokens[2] for tokens in first_tokens[:3]}  # some sequences stop after a few tokens
    alone, packed = each_alone_and_packed(model, prompts, manipulations, eos_ids=sorted(eos))
    lengths = {len(tokens) for run in alone for tokens in run.tokens}
    assert len(lengths) > 2 and min(lengths) < NEW_TOKENS // 2  # rows left the batch at different steps
    assert_same_runs(alone, packed)


def test_packed_runs_in_bfloat16_stay_as_close_to_alone_as_a_batch_allows():
    model = tiny_model().to(torch.bfloat16)
    prompts = prompts_of((7, 11, 9))
    alone, packed = each_alone_and_packed(model, prompts, MANIPULATIONS["freeze"])
    for one, together in zip(alone, packed, strict=True):
        steps = one.logits.shape[1]
        torch.testing.assert_close(together.logits[:, :steps], one.logits, rtol=0.02, atol=0.05, equal_nan=True)


@pytest.mark.parametrize("manipulations, message", [
    ([Manipulation("random", 0), Manipulation("freeze", 1)], "must share one kind of manipulation, got freeze, random"),
    ([Manipulation("freeze", 1, spare_first=1), None], "cannot be packed with other runs"),
    ([Manipulation("skip_attention", 0, window=1)], "cannot be packed with other runs"),
    ([Manipulation("random", 4)], "random layer k=4 is outside 0..3"),
])
def test_runs_that_cannot_be_packed_are_refused_by_name(manipulations, message):
    model = tiny_model()
    prompts = prompts_of((5, 6))
    with pytest.raises(ManipulationError, match=message):
        generate_packed(model, prompts, 3, manipulations, PromptStates.compute(model, prompts, 3))


def test_packs_hold_consecutive_runs_of_one_kind_within_the_token_budget(monkeypatch):
    kinds = ["baseline", "random", "random", "random", "random", "random", "freeze", "zero", "zero"]
    prompts = [[5, 6, 7], [5, 6, 7, 8]]  # a run's cache: 2 rows x (4 + 1) = 10 slots
    packs = in_packs(kinds, lambda kind: kind, prompts, max_new_tokens=1, pack_tokens=25)
    assert packs == [["baseline"], ["random", "random"], ["random", "random"], ["random"], ["freeze"], ["zero"],
                     ["zero"]]  # 2 runs of 10 slots fit in 25; a kind without a packed decode step goes alone
    assert in_packs(kinds, lambda kind: kind, prompts, max_new_tokens=1, pack_tokens=1)[1:3] == [["random"], ["random"]]
    monkeypatch.setitem(KIND_FACTS, "zero", KindFacts())
    with pytest.raises(ManipulationError, match="zero has no packed decode step"):
        PackedRuns.of([Manipulation("zero", 0), Manipulation("zero", 1)], 2, 3)


def test_concatenated_caches_hold_each_cache_in_its_rows_and_zeros_where_one_held_no_layer():
    config = tiny_model().config
    full, lower = KVCache(config, 2, 9), KVCache(config, 1, 9, num_layers=1)  # lower: efficient skip_attention at k=1
    for cache in (full, lower):
        cache.append(torch.tensor([[False, True, True]] * cache.key_valid.shape[0]))
        for tensor in cache.keys + cache.values:
            tensor.normal_()
    expected_keys, expected_valid = [t.clone() for t in full.keys] + [lower.keys[0].clone()], full.key_valid.clone()
    packed = KVCache.concatenate([full, lower], config, torch.float32, "cpu")
    assert (packed.num_layers, packed.length, packed.max_length) == (3, 3, 9)
    for j in range(3):
        assert torch.equal(packed.keys[j][:2], expected_keys[j])
    assert torch.equal(packed.keys[0][2:], expected_keys[3]) and not packed.keys[1][2:].any()
    assert torch.equal(packed.key_valid[:2], expected_valid) and packed.next_position.tolist() == [2, 2, 2]
    assert full.keys == [] and lower.values == []  # their layers moved into the packed cache: not held twice
