"""The variants beyond the paper (docs/manipulations.md, "Variants"): sparing the first n positions, layer
windows, and the paper's own random (fresh noise at every generation step).

Each variant gets the invariants of the original kinds: against the hook reference on `transformers`
(`reference_manipulation` in test_manipulations.py, which takes `spare_first` and `window`), cached
generation equal to faithful generation (tokens in fp32, logits to 1e-10 in fp64), prefix reuse bitwise
equal to a full run, the efficiency mode equal to the plain one, and a sequence alone equal to the same
sequence in a left-padded batch.
"""

from __future__ import annotations

import pytest
import torch
from test_manipulations import (  # noqa: F401 (smollm2, smollm2_hf: fixtures)
    GENERATION_ATOL,
    ONE_SHOT,
    PAIRED_KERNELS,
    SMOLLM2_ATOL,
    TINY_ATOL,
    assert_cached_equals_faithful,
    layers_that_attend,
    padded_batch,
    reference_manipulation,
    run,
    smollm2,
    smollm2_hf,
    tiny_model_in,
    tiny_pair,
    token_ids,
)

from minillm.generate import PromptStates, generate_tokens
from minillm.manipulation import Manipulation, ManipulationError


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def variants(L: int, cached_only: bool = False) -> list[Manipulation]:
    """Every variant at a low, a middle and a high layer (freeze windows below the top are faithful-only)."""
    cases = []
    for n in (1, 2):
        cases += [Manipulation("random", k, seed=5, spare_first=n) for k in (0, L // 2)]
        cases += [Manipulation("freeze", k, spare_first=n) for k in (1, L // 2)]
        cases += [Manipulation("skip_attention", k, spare_first=n) for k in (0, L // 2, L - 1)]
    cases += [Manipulation("skip_attention", k, window=w) for k, w in [(0, 1), (1, 2), (L - 2, 1), (L - 2, 2)]]
    cases += [Manipulation("skip_attention", 1, window=2, spare_first=1)]
    cases += [Manipulation("freeze", L - 2, window=2), Manipulation("freeze", 2, window=L - 2, spare_first=1)]
    if not cached_only:
        cases += [Manipulation("freeze", k, window=w) for k, w in [(1, 1), (1, 2), (2, 1)]]
        cases += [Manipulation("freeze", 1, window=2, spare_first=1)]
    return cases


def label(m: Manipulation) -> str:
    return f"{m.kind}-k{m.layer}" + (f"-spare{m.spare_first}" if m.spare_first else "") + (
        f"-w{m.window}" if m.window else "")


def options(m: Manipulation) -> dict:
    """The reference's arguments for this manipulation."""
    return {"seed": m.noise_seed, "spare_first": m.spare_first, "window": m.window}


def about(what: str):
    """An assert_close message naming the case."""
    return lambda error: f"{what}: {error}"


def original(m: Manipulation) -> Manipulation:
    """The paper's kind at the same k (no spare, no window)."""
    return Manipulation(m.kind, m.layer, seed=m.seed)


# ----------------------------------------------------------------------------- against the hook reference

@pytest.mark.parametrize("attention", list(PAIRED_KERNELS))
@pytest.mark.parametrize("name", ["mha", "gqa", "mistral-window"])
def test_variants_match_the_hook_reference_on_tiny_models(name, attention):
    model, hf = tiny_pair(name, attention)
    L = model.config.num_layers
    ids = token_ids(11, 2, 12 if name != "mistral-window" else 6)  # skip_attention sparing: within the window
    baseline, states = run(model, ids)
    for m in variants(L):
        ours = model(ids, manipulation=m)
        with reference_manipulation(hf, m.kind, m.layer, **options(m)):
            reference = hf(ids).logits
        torch.testing.assert_close(ours, reference, atol=TINY_ATOL, rtol=0, msg=about(label(m)))
        # not toothless: the variant changes the logits, and differently from the paper's kind at the same k
        assert (ours[:, -1] - baseline[:, -1]).abs().max() > 1e-3, f"{label(m)} changed nothing"
        if m.spare_first or m.end_layer(L) < L:  # (a window up to the top is the original kind, see below)
            assert (ours[:, -1] - model(ids, manipulation=original(m))[:, -1]).abs().max() > 1e-4, \
                f"{label(m)} is the original kind"
        reused = model(ids, manipulation=m, prompt_states=states)
        torch.testing.assert_close(reused, reference, atol=TINY_ATOL, rtol=0, msg=about(f"{label(m)} reuse"))
        efficient = model(ids, manipulation=m, efficient=True)
        torch.testing.assert_close(efficient[:, -1], reference[:, -1], atol=TINY_ATOL, rtol=1e-5,
                                   msg=about(f"{label(m)} efficient"))


def test_a_window_to_the_top_is_the_paper_s_manipulation_bitwise():
    model, _ = tiny_pair("mha")
    L = model.config.num_layers
    _, ids, mask = padded_batch()
    for kind, k in [("freeze", 1), ("freeze", 3), ("skip_attention", 0), ("skip_attention", 3)]:
        logits, H = run(model, ids, mask, Manipulation(kind, k))
        logits_w, H_w = run(model, ids, mask, Manipulation(kind, k, window=L - k))
        assert torch.equal(logits, logits_w) and torch.equal(H, H_w), f"{kind} k={k}"


@pytest.mark.parametrize("kind, k", [("random", 0), ("random", 3), ("freeze", 1), ("freeze", 3),
                                     ("skip_attention", 0), ("skip_attention", 3)])
@pytest.mark.parametrize("n", [1, 3])
def test_spared_positions_are_the_plain_model_s_at_every_layer(kind, k, n):
    """The first n real positions of each sequence (left-padded batch) are bitwise untouched at every layer,
    and the first position after them is manipulated."""
    model, _ = tiny_pair("mha")
    sequences, ids, mask = padded_batch(lengths=(11, 6, 9))
    _, H = run(model, ids, mask)
    _, H_s = run(model, ids, mask, Manipulation(kind, k, spare_first=n))
    for b, seq in enumerate(sequences):
        start = ids.shape[1] - len(seq)
        assert torch.equal(H_s[:, b, start:start + n], H[:, b, start:start + n]), f"sequence {b}"
        first_manipulated = H_s[k + 1:, b, start + n] - H[k + 1:, b, start + n]
        assert first_manipulated.abs().max() > 1e-3, f"sequence {b}: position {n} was spared too"


def test_freeze_window_previous_tokens_keep_H_k_minus_1_inside_the_window_and_evolve_above_it():
    model, _ = tiny_pair("mha")
    _, ids, mask = padded_batch()
    previous = mask.bool().clone()
    previous[:, -1] = False
    k, w = 1, 2
    _, H = run(model, ids, mask)
    _, H_w = run(model, ids, mask, Manipulation("freeze", k, window=w))
    assert torch.equal(H_w[:k], H[:k])
    for j in range(k, k + w):
        assert torch.equal(H_w[j][previous], H[k - 1][previous])
    # above the window they evolve again, from the stale state: not H[k-1], not their genuine state
    assert not torch.allclose(H_w[k + w][previous], H[k - 1][previous], atol=1e-3)
    assert not torch.allclose(H_w[k + w][previous], H[k + w][previous], atol=1e-3)


def test_skip_attention_window_skips_attention_in_the_window_only():
    model, _ = tiny_pair("gqa")
    L = model.config.num_layers
    _, ids, mask = padded_batch()
    called, _ = layers_that_attend(model, lambda: model(ids, mask, manipulation=Manipulation("skip_attention", 1,
                                                                                          window=2)))
    assert called == [0] + list(range(3, L))


@pytest.mark.parametrize("name", ["gqa", "mistral-window"])
def test_variants_alone_and_in_a_left_padded_batch_agree(name):
    model, _ = tiny_pair(name)
    L = model.config.num_layers
    lengths = (5, 6, 4) if name == "mistral-window" else (7, 12, 9)  # within the window for sparing skips
    sequences, ids, mask = padded_batch(lengths=lengths)
    for m in variants(L):
        batched = model(ids, mask, manipulation=m)
        for b, seq in enumerate(sequences):
            alone = model(torch.tensor([seq]), manipulation=m)[0]
            torch.testing.assert_close(batched[b, -len(seq):], alone, atol=TINY_ATOL, rtol=0,
                                       msg=about(f"{label(m)} sequence {b}"))


# ----------------------------------------------------------------------------- generation

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_cached_generation_equals_faithful_for_the_variants(name, dtype):
    model = tiny_model_in(name, dtype)
    prompts = [token_ids(20, 1, n)[0].tolist() for n in (3, 9, 12)]
    plain = generate_tokens(model, prompts, 6, return_logits=True)
    for m in variants(model.config.num_layers, cached_only=True):
        cached, faithful = assert_cached_equals_faithful(model, prompts, m, label(m))
        assert (faithful.logits - plain.logits).abs().max() > 1e-3, f"{label(m)} changed nothing"
        efficient = generate_tokens(model, prompts, 6, manipulation=m, return_logits=True, efficient=True)
        assert efficient.tokens == cached.tokens, label(m)
        torch.testing.assert_close(efficient.logits, cached.logits, atol=10 * GENERATION_ATOL[dtype], rtol=0,
                                   msg=about(f"{label(m)} efficient"))


@pytest.mark.parametrize("mode", ["cached", "faithful"])
def test_prefix_reuse_gives_bitwise_the_same_generation_for_the_variants(mode):
    model, _ = tiny_pair("gqa")
    L = model.config.num_layers
    prompts = [token_ids(30, 1, n)[0].tolist() for n in (4, 10, 7)]
    reused = PromptStates.compute(model, prompts, 5, mode=mode)
    for m in variants(L, cached_only=mode == "cached"):
        plain = generate_tokens(model, prompts, 5, mode=mode, manipulation=m, return_logits=True)
        fast = generate_tokens(model, prompts, 5, mode=mode, manipulation=m, return_logits=True, prompt_states=reused)
        assert fast.tokens == plain.tokens, label(m)
        assert torch.equal(fast.logits, plain.logits), label(m)


def test_each_generation_step_equals_the_reference_on_everything_so_far():
    """Faithful (and, where allowed, cached) generation: at every step the reference run on the sequence so far,
    so generated tokens are manipulated as soon as they are previous tokens; and the paper's random uses
    step t's noise at step t."""
    model, hf = tiny_pair("gqa")
    L = model.config.num_layers
    prompt = token_ids(21, 1, 8)[0].tolist()
    steps = 5
    cases = [Manipulation("random", 1, seed=2, spare_first=1), Manipulation("freeze", 2, spare_first=2),
             Manipulation("skip_attention", 1, spare_first=1), Manipulation("skip_attention", 1, window=1),
             Manipulation("freeze", 1, window=2), Manipulation("random", 0, seed=2, fresh_noise_each_step=True),
             Manipulation("random", L // 2, seed=2, spare_first=1, fresh_noise_each_step=True)]
    for m in cases:
        modes = ["faithful"] if m.faithful_only(L) else ["cached", "faithful"]
        for mode in modes:
            generation = generate_tokens(model, [prompt], steps, mode=mode, manipulation=m, return_logits=True)
            sequence = prompt + generation.tokens[0]
            for step in range(steps):
                with reference_manipulation(hf, m.kind, m.layer, **options(m.at_step(step))):
                    expected = hf(torch.tensor([sequence[:len(prompt) + step]])).logits[0, -1]
                torch.testing.assert_close(generation.logits[0, step], expected, atol=TINY_ATOL, rtol=0,
                                           msg=about(f"{label(m)} {mode} step {step}"))


# ----------------------------------------------------------------------------- the paper's random

def test_the_paper_s_random_draws_new_seeded_noise_at_every_step():
    model, _ = tiny_pair("mha")
    prompts = [token_ids(40, 1, n)[0].tolist() for n in (6, 9)]
    fresh = Manipulation("random", 1, seed=3, fresh_noise_each_step=True)
    ours = Manipulation("random", 1, seed=3)
    a = generate_tokens(model, prompts, 6, mode="faithful", manipulation=fresh, return_logits=True)
    again = generate_tokens(model, prompts, 6, mode="faithful", manipulation=fresh, return_logits=True)
    assert torch.equal(a.logits, again.logits)  # seeded: not the global RNG
    torch.manual_seed(123)  # the global RNG does not matter
    assert torch.equal(generate_tokens(model, prompts, 6, mode="faithful", manipulation=fresh,
                                       return_logits=True).logits, a.logits)
    fixed = generate_tokens(model, prompts, 6, mode="faithful", manipulation=ours, return_logits=True)
    # the first pass has one noise draw either way, but later steps differ from the fixed noise
    assert (a.logits[:, 1:] - fixed.logits[:, 1:]).abs().max() > 1e-3
    other_seed = generate_tokens(model, prompts, 6, mode="faithful", return_logits=True,
                                 manipulation=Manipulation("random", 1, seed=4, fresh_noise_each_step=True))
    assert (other_seed.logits - a.logits).abs().max() > 1e-3
    seeds = {Manipulation("random", 0, seed=s, fresh_noise_each_step=True).at_step(t).noise_seed
             for s in range(4) for t in range(50)}
    assert len(seeds) == 200 and min(seeds) >= 2**40  # one stream per (seed, step), apart from plain seeds
    assert Manipulation("random", 0, seed=3).at_step(7) == Manipulation("random", 0, seed=3)
    assert fresh.to_dict()["fresh_noise_each_step"] is True and "paper" in fresh.to_dict()["variant"]


# ----------------------------------------------------------------------------- refusals

def test_variants_refuse_what_they_cannot_mean():
    model, _ = tiny_pair("mha")
    L, D = model.config.num_layers, model.config.hidden_size
    ids = token_ids(0, 1, 6)

    def refused(match, make, forward=True):
        with pytest.raises(ManipulationError, match=match):
            manipulation = make()
            if forward:
                model(ids, manipulation=manipulation)

    refused("spare_first does not apply to swap",
            lambda: Manipulation("swap", 1, positions=(2,), vectors=torch.zeros(1, D), spare_first=1), forward=False)
    refused("spare_first must be an integer >= 0", lambda: Manipulation("freeze", 1, spare_first=-1), forward=False)
    refused("spare_first must be an integer >= 0", lambda: Manipulation("freeze", 1, spare_first=True), forward=False)
    refused("window does not apply to random: it acts at layer k only",
            lambda: Manipulation("random", 1, window=2), forward=False)
    refused("window must be an integer >= 1", lambda: Manipulation("freeze", 1, window=0), forward=False)
    refused(f"window of 2 layers from k={L - 1} goes past the top layer {L - 1}",
            lambda: Manipulation("skip_attention", L - 1, window=2))
    refused("fresh_noise_each_step applies to random only",
            lambda: Manipulation("freeze", 1, fresh_noise_each_step=True), forward=False)
    refused(r"spare_first=6 spares every token of sequence 0 \(length 6\)",
            lambda: Manipulation("random", 1, spare_first=6))
    # faithful-only variants are refused in cached mode, before any compute
    for m in (Manipulation("random", 1, fresh_noise_each_step=True), Manipulation("freeze", 1, window=1)):
        with pytest.raises(ManipulationError, match="use mode='faithful'"):
            generate_tokens(model, [[4, 5, 6]], 3, mode="cached", manipulation=m)
    # sparing under skip_attention needs the spared positions inside a sliding window
    mistral, _ = tiny_pair("mistral-window")
    with pytest.raises(ManipulationError, match="at most 6 tokens on this sliding-window model"):
        mistral(token_ids(0, 1, 7), manipulation=Manipulation("skip_attention", 1, spare_first=1))


def test_the_efficient_cache_keeps_the_layers_a_variant_reads():
    L = 30
    assert Manipulation("skip_attention", 20).cache_layers(L, efficient=True) == 20
    assert Manipulation("skip_attention", 20, window=L - 20).cache_layers(L, efficient=True) == 20
    # above a window the layers attend again, and spared positions are read from k up: every layer's cache
    assert Manipulation("skip_attention", 20, window=3).cache_layers(L, efficient=True) == L
    assert Manipulation("skip_attention", 20, spare_first=1).cache_layers(L, efficient=True) == L


# ----------------------------------------------------------------------------- SmolLM2-135M

@pytest.mark.slow
def test_sink_variants_match_the_hook_reference_on_smollm2(smollm2, smollm2_hf):  # noqa: F811 (fixtures)
    """On the real model, where position 0 is the attention sink: each spare_first=1 variant and a skip_attention
    window equal the reference, and sparing the sink changes the logits (it is not a no-op there)."""
    model, tokenizer = smollm2
    ids = torch.tensor([tokenizer.encode(ONE_SHOT)])
    for m in [Manipulation("random", 24, seed=7, spare_first=1), Manipulation("freeze", 20, spare_first=1),
              Manipulation("skip_attention", 24, spare_first=1), Manipulation("skip_attention", 10, window=3)]:
        ours = model(ids, manipulation=m)
        with reference_manipulation(smollm2_hf, m.kind, m.layer, **options(m)):
            reference = smollm2_hf(ids).logits
        torch.testing.assert_close(ours, reference, atol=SMOLLM2_ATOL, rtol=0, msg=about(label(m)))
        if m.spare_first:
            assert (ours[:, -1] - model(ids, manipulation=original(m))[:, -1]).abs().max() > 1e-2, label(m)
