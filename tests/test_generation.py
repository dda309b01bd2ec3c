"""Generation paths that must agree: cached vs faithful, prefix reuse vs full runs, efficiency mode vs plain.

A random tiny Llama (weights larger than the default init, so that every layer matters)
and a batch of prompts of different lengths, so left padding is always exercised.
"""

import pytest
import torch
import transformers

from minillm.config import ModelConfig
from minillm.generate import PromptStates, Sampling, generate_tokens
from minillm.manipulation import Manipulation
from minillm.model import Transformer

LAYERS, WIDTH, NEW = 4, 64, 8
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]


@pytest.fixture(scope="module")
def model():
    hf_config = transformers.LlamaConfig(vocab_size=100, hidden_size=WIDTH, intermediate_size=128,
                                         num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2)
    config = ModelConfig.from_hf({**hf_config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def manipulations():
    donor = torch.randn(2, WIDTH, generator=torch.Generator().manual_seed(7))
    # one vector per sequence, at position 2: with a cache, reuse starts at the swapped column
    donor_per_sequence = torch.randn(len(PROMPTS), 1, WIDTH, generator=torch.Generator().manual_seed(8))
    for k in (0, 1, 2, LAYERS - 1):
        yield Manipulation("random", k, seed=3)
        yield Manipulation("skip_attention", k)
        yield Manipulation("swap", k, positions=(0, 2), vectors=donor)
        yield Manipulation("swap", k, positions=(2,), vectors=donor_per_sequence)
        if k:
            yield Manipulation("freeze", k)


def label(m: Manipulation) -> str:
    return f"{m.kind}-k{m.layer}" + "".join(f"-at{p}" for p in m.positions)


def run(model, manipulation, **options):
    return generate_tokens(model, PROMPTS, NEW, manipulation=manipulation, return_logits=True, **options)


@pytest.mark.parametrize("manipulation", list(manipulations()), ids=label)
def test_cached_generation_equals_faithful_reruns(model, manipulation):
    faithful = run(model, manipulation, mode="faithful")
    cached = run(model, manipulation, mode="cached")
    assert cached.tokens == faithful.tokens
    torch.testing.assert_close(cached.logits, faithful.logits, rtol=0, atol=1e-4)
    # the comparison is not between two no-ops
    assert (faithful.logits - run(model, None, mode="cached").logits).abs().max() > 1e-3


@pytest.mark.parametrize("mode", ["cached", "faithful"])
def test_prefix_reuse_gives_bitwise_the_same_generation(model, mode):
    reused = PromptStates.compute(model, PROMPTS, NEW, mode=mode)
    for manipulation in [None, *manipulations()]:
        plain = run(model, manipulation, mode=mode)
        fast = run(model, manipulation, mode=mode, prompt_states=reused)
        assert fast.tokens == plain.tokens
        assert torch.equal(fast.logits, plain.logits), manipulation


def sweep_conditions():
    """Conditions of a sweep over one batch, as (manipulation, efficient): every kind at low and high k, the
    baseline, with and without the efficiency mode."""
    donor = torch.randn(len(PROMPTS), 1, WIDTH, generator=torch.Generator().manual_seed(8))
    return [(None, False), (Manipulation("random", 0, seed=3), False), (Manipulation("freeze", 1), True),
            (Manipulation("skip_attention", 2), True), (Manipulation("random", LAYERS - 1, seed=4), False),
            (Manipulation("freeze", LAYERS - 1), False), (Manipulation("skip_attention", 0), False),
            (Manipulation("swap", 2, positions=(2,), vectors=donor), False), (Manipulation("freeze", 2), True)]


@pytest.mark.parametrize("order", ["as listed", "reversed", "shuffled"])
def test_runs_sharing_the_prompt_states_cache_give_the_tokens_of_fresh_runs_in_any_order(model, order):
    """Each run shares the cache's layers below its k (`KVCache.fork`) and writes its decode steps into them
    past the prompt; whatever ran before, a run must give what it gives alone. Rows leave the batch as they
    stop (sequence 0 after 2 tokens, 1 after 4), so the forked caches' rows are dropped too."""
    limits = [2, 4, NEW]
    conditions = sweep_conditions()
    if order == "reversed":
        conditions = conditions[::-1]
    elif order == "shuffled":
        conditions = [conditions[i] for i in torch.randperm(len(conditions), generator=torch.Generator().manual_seed(1))]
    shared = PromptStates.compute(model, PROMPTS, NEW)

    def generate(manipulation, efficient, prompt_states):
        called_for = []
        return generate_tokens(model, PROMPTS, NEW, manipulation=manipulation, efficient=efficient,
                               return_logits=True, prompt_states=prompt_states,
                               on_token=lambda row, token: called_for.append(row),
                               stop=lambda tokens: len(tokens) >= limits[called_for[-1]])

    for manipulation, efficient in conditions:
        fresh = generate(manipulation, efficient, PromptStates.compute(model, PROMPTS, NEW))
        reused = generate(manipulation, efficient, shared)
        assert reused.tokens == fresh.tokens, manipulation
        assert torch.equal(reused.logits.nan_to_num(), fresh.logits.nan_to_num()), manipulation
        assert [len(tokens) for tokens in reused.tokens] == limits


def test_a_fork_shares_the_layers_below_k_and_copies_the_others(model):
    states = PromptStates.compute(model, PROMPTS, NEW)
    cache = states.cache
    prompt_slots = cache.length
    before = [t[:, :, :prompt_slots].clone() for t in cache.keys + cache.values]
    fork = cache.fork(2)
    assert all(fork.keys[j] is cache.keys[j] and fork.values[j] is cache.values[j] for j in range(2))
    assert all(fork.keys[j] is not cache.keys[j] for j in range(2, LAYERS))
    assert torch.equal(torch.stack(fork.keys), torch.stack(cache.keys))
    assert len(cache.fork(2, num_layers=2).keys) == 2
    # runs at every k leave the prompt's keys/values of every layer as they were
    for manipulation, efficient in sweep_conditions():
        generate_tokens(model, PROMPTS, NEW, manipulation=manipulation, efficient=efficient, prompt_states=states)
    after = [t[:, :, :prompt_slots] for t in cache.keys + cache.values]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    with pytest.raises(ValueError, match="holds 2 layers"):
        cache.fork(0, num_layers=2).fork(0, num_layers=3)


def test_prefix_reuse_refuses_prompt_states_of_another_shape(model):
    reused = PromptStates.compute(model, PROMPTS, NEW, mode="cached")
    with pytest.raises(ValueError, match="another batch or another mode"):
        generate_tokens(model, PROMPTS, NEW, mode="faithful", prompt_states=reused)
    with pytest.raises(ValueError, match="too few"):
        generate_tokens(model, PROMPTS, NEW + 5, mode="cached", prompt_states=reused)


@pytest.mark.parametrize("mode", ["cached", "faithful"])
@pytest.mark.parametrize("kind, k", [("freeze", 1), ("freeze", 2), ("freeze", LAYERS - 1),
                                     ("skip_attention", 0), ("skip_attention", 2)])
@pytest.mark.parametrize("reuse", [False, True], ids=["", "reuse"])
def test_efficiency_mode_gives_the_manipulated_models_logits(model, mode, kind, k, reuse):
    manipulation = Manipulation(kind, k)
    plain = run(model, manipulation, mode=mode)
    reused = PromptStates.compute(model, PROMPTS, NEW, mode=mode) if reuse else None
    efficient = run(model, manipulation, mode=mode, efficient=True, prompt_states=reused)
    assert efficient.tokens == plain.tokens
    torch.testing.assert_close(efficient.logits, plain.logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind, first_single", [("freeze", 1), ("skip_attention", 2)])
def test_efficiency_mode_runs_the_mlp_on_the_last_position_only_where_nobody_reads_the_rest(model, kind, first_single):
    """The saving is real. k = 2: freeze from layer k-1 (its previous tokens' outputs are overwritten by
    H[k-1]), skip_attention from layer k (no attention reads previous tokens there)."""
    seen = {}
    hooks = [block.mlp.register_forward_pre_hook(lambda module, args, j=j: seen.__setitem__(j, args[0].shape[1]))
             for j, block in enumerate(model.layers)]
    try:
        ids = torch.tensor([PROMPTS[2]])
        model(ids, manipulation=Manipulation(kind, 2), efficient=True)
    finally:
        for hook in hooks:
            hook.remove()
    assert seen == {j: len(PROMPTS[2]) if j < first_single else 1 for j in range(LAYERS)}


def test_efficiency_mode_refuses_to_return_hidden_states(model):
    with pytest.raises(ValueError, match="cannot return hidden states"):
        model(torch.tensor([PROMPTS[0]]), manipulation=Manipulation("freeze", 2), efficient=True,
              output_hidden_states=True)


def test_efficient_skip_attention_keeps_no_cache_above_k(model):
    from minillm.model import KVCache

    full = KVCache(model.config, 1, 16)
    lower = KVCache(model.config, 1, 16, num_layers=2)
    assert lower.nbytes() * LAYERS == full.nbytes() * 2
    # and generation with it works to the same tokens (shown above); a plain cache would be all layers
    result = generate_tokens(model, PROMPTS, NEW, manipulation=Manipulation("skip_attention", 2), efficient=True)
    assert result.tokens == generate_tokens(model, PROMPTS, NEW, manipulation=Manipulation("skip_attention", 2)).tokens


def test_sampling_is_seeded_and_top_k_1_is_greedy(model):
    greedy = generate_tokens(model, PROMPTS, NEW).tokens
    assert generate_tokens(model, PROMPTS, NEW, sampling=Sampling(temperature=1.0, top_k=1, seed=1)).tokens == greedy
    assert generate_tokens(model, PROMPTS, NEW, sampling=Sampling(temperature=1.0, top_p=1e-6, seed=1)).tokens == greedy
    first = generate_tokens(model, PROMPTS, NEW, sampling=Sampling(temperature=1.5, seed=1)).tokens
    assert generate_tokens(model, PROMPTS, NEW, sampling=Sampling(temperature=1.5, seed=1)).tokens == first
    others = [generate_tokens(model, PROMPTS, NEW, sampling=Sampling(temperature=1.5, seed=s)).tokens for s in (2, 3)]
    assert any(o != first for o in others)


def test_generation_stops_per_sequence(model):
    greedy = generate_tokens(model, PROMPTS, NEW).tokens
    stop_token = greedy[0][2]
    stopped = generate_tokens(model, PROMPTS, NEW, eos_ids=[stop_token]).tokens
    assert stopped[0] == greedy[0][: greedy[0].index(stop_token) + 1]
    by_callback = generate_tokens(model, PROMPTS, NEW, stop=lambda tokens: len(tokens) == 3).tokens
    assert [len(t) for t in by_callback] == [3, 3, 3] and by_callback[1] == greedy[1][:3]


@pytest.mark.parametrize("mode", ["cached", "faithful"])
@pytest.mark.parametrize("manipulation", [None, Manipulation("freeze", 2), Manipulation("random", 1, seed=3),
                                          Manipulation("swap", 1, positions=(0, 2), vectors=torch.randn(
                                              3, 2, WIDTH, generator=torch.Generator().manual_seed(9)))],
                         ids=["none", "freeze", "random", "swap-per-sequence"])
def test_finished_sequences_leave_the_batch_and_the_others_go_on_as_if_alone(model, mode, manipulation):
    limits = [1, 3, NEW]  # how many tokens each sequence generates before its stop rule fires
    called_for = []  # on_token is called just before the stop rule, with the sequence index
    batch_sizes = []
    hook = model.layers[-1].register_forward_pre_hook(lambda module, args: batch_sizes.append(args[0].shape[0]))
    try:
        batched = generate_tokens(model, PROMPTS, NEW, manipulation=manipulation, mode=mode, return_logits=True,
                                  on_token=lambda row, token: called_for.append(row),
                                  stop=lambda tokens: len(tokens) >= limits[called_for[-1]])
    finally:
        hook.remove()
    assert batch_sizes[-1] == 1  # the finished rows were really dropped
    for row, limit in enumerate(limits):
        alone_manipulation = manipulation and manipulation.for_rows(torch.tensor([row]))
        alone = generate_tokens(model, [PROMPTS[row]], limit, manipulation=alone_manipulation, mode=mode,
                                return_logits=True)
        assert batched.tokens[row] == alone.tokens[0]
        torch.testing.assert_close(batched.logits[row, :limit], alone.logits[0], rtol=0, atol=1e-4)
        assert batched.logits[row, limit:].isnan().all()


@pytest.mark.parametrize("options, message", [
    (dict(mode="lazy"), "mode must be one of"),
    (dict(sampling=None, max_new_tokens=-1), "max_new_tokens must be >= 0"),
])
def test_bad_generation_arguments(model, options, message):
    options = {"max_new_tokens": NEW, **options}
    with pytest.raises(ValueError, match=message):
        generate_tokens(model, PROMPTS, options.pop("max_new_tokens"), **options)


@pytest.mark.parametrize("field, value, message", [
    ("temperature", -1.0, "temperature"), ("top_p", 0.0, "top_p"), ("top_k", -2, "top_k")])
def test_bad_sampling_settings(field, value, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**{field: value})
