"""The four manipulations (docs/manipulations.md), checked on their own terms and against an independent reference.

Notation: L layers, H[j] the residual stream entering decoder layer j (H[0] the
embeddings), "previous tokens" every real position of a sequence except its last,
k the first layer whose view of previous tokens is altered (k = L: no manipulation).

The reference (`reference_manipulation`) is docs/manipulations.md's table written a second time, as
forward hooks on `transformers`' Llama/Mistral: pre-hooks that rewrite what enters
a decoder layer, and for skip_attention a hook that makes the attention block add
zero, so the residual passes through and the MLP still runs. It shares no code with
minillm's model; the only thing it borrows is the noise generator
(`random_directions`), so that both sides can be fed the same random vectors.

Tiny random models run in milliseconds; the SmolLM2-135M tests load the real
converted checkpoint (fixture `smollm2_dir`) and are marked slow.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch
import transformers

from minillm.config import ModelConfig
from minillm.generate import generate_tokens, left_pad
from minillm.manipulation import KINDS, Manipulation, ManipulationError, random_directions
from minillm.model import Transformer


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


# ----------------------------------------------------------------------------- tiny random models

VOCAB = 101
TINY = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
            max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0)
TINY_CONFIGS = {
    "mha": (transformers.LlamaConfig, dict(num_hidden_layers=5, num_key_value_heads=4)),
    "gqa": (transformers.LlamaConfig, dict(num_hidden_layers=4, num_key_value_heads=2)),
    "mistral-window": (transformers.MistralConfig, dict(num_hidden_layers=4, num_key_value_heads=2, sliding_window=6)),
}
# Unmanipulated, ours and transformers agree bitwise when both use the same attention kernel (ours "sdpa" with
# their "sdpa", ours "math" with their "eager"); across kernels they differ by up to 1e-5 (measured 9.7e-6)
# on these deliberately large-weight models. With paired kernels every manipulated case below also measured
# 0.0; 1e-5 leaves room only for platform-dependent rounding.
TINY_ATOL = 1e-5
PAIRED_KERNELS = {"sdpa": "sdpa", "eager": "math"}  # transformers' attention -> ours


@functools.lru_cache(maxsize=None)
def tiny_pair(name: str, attention: str = "sdpa", seed: int = 0):
    """(ours, transformers) with the same random weights, larger than the default init so effects are visible."""
    config_class, extra = TINY_CONFIGS[name]
    hf_config = config_class(**{**TINY, **extra})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation=attention)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    hf.eval()
    ours = Transformer(ModelConfig.from_hf(hf_config.to_dict() | {"architectures": [type(hf).__name__]}))
    state = {key.removeprefix("model."): value.clone() for key, value in hf.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    ours.tie_weights()
    ours.set_attention(PAIRED_KERNELS[attention])
    return ours.eval(), hf


def token_ids(seed: int, batch: int, length: int) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def padded_batch(lengths=(11, 6, 9), seed=5):
    """A left-padded batch of random sequences (pad id 0, never drawn as a real token)."""
    g = torch.Generator().manual_seed(seed)
    sequences = [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]
    ids, mask = left_pad(sequences, pad_id=0)
    return sequences, ids, mask


def run(model, ids, mask=None, manipulation=None):
    """(logits, H) of our model, H [L+1, B, T, D] the states that actually entered each layer."""
    return model(ids, mask, manipulation=manipulation, output_hidden_states=True)


def previous_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: real positions except each sequence's last (the last column, as we pad on the left)."""
    previous = mask.bool().clone()
    previous[:, -1] = False
    return previous


def manipulation_of(kind: str, k: int, model, seed: int = 0) -> Manipulation:
    """A manipulation of this kind at layer k (swap: two arbitrary donor vectors, at positions 1 and 3)."""
    if kind == "swap":
        vectors = torch.randn(2, model.config.hidden_size, generator=torch.Generator().manual_seed(9))
        return Manipulation("swap", k, positions=(1, 3), vectors=vectors)
    return Manipulation(kind, k, seed=seed)


# ----------------------------------------------------------------------------- the independent reference

@contextlib.contextmanager
def reference_manipulation(hf, kind: str, k: int, *, seed: int = 0, positions=(), vectors=None, spare_first: int = 0,
                           window: int | None = None):
    """Apply a manipulation to a transformers model with hooks, for batches without padding.

    Previous tokens are positions spare_first .. T-2 of the current input. `vectors` [P, D] go to
    `positions` for swap. `seed` is the noise seed itself (for the paper's fresh noise: that step's).
    freeze and skip_attention act on layers k .. k+window-1 (to the top without a window). skip_attention
    sparing n >= 1 positions replaces the attention mask of those layers: every query may read only keys
    at positions < n (and, causally, <= its own).
    """
    layers = hf.model.layers
    L = len(layers)
    end = L if window is None else k + window
    n = spare_first
    handles = []
    kept = {}

    def rewrite_input(j, change):
        def hook(module, args, kwargs):
            if args:
                return (change(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": change(kwargs["hidden_states"])}
        handles.append(layers[j].register_forward_pre_hook(hook, with_kwargs=True))

    if kind == "freeze":
        def keep(h):
            kept["H[k-1]"] = h.clone()
            return h

        def stale(h):
            return torch.cat([h[:, :n], kept["H[k-1]"][:, n:-1], h[:, -1:]], dim=1)

        rewrite_input(k - 1, keep)
        for j in range(k, end):
            rewrite_input(j, stale)
    elif kind == "random" and k < L:
        def scramble(h):
            B, T, D = h.shape
            noise = random_directions(seed, torch.arange(T).expand(B, T), D)[:, n:T - 1]
            # Written as noise * (|h| / |noise|), the order our model uses: noise / |noise| * |h| differs in the
            # last bit, and SmolLM2 fed noise at k = 0 amplifies that 6e-8 to 2e-3 in its logits (measured).
            scaled = noise * (h[:, n:T - 1].float().norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True))
            return torch.cat([h[:, :n], scaled.to(h.dtype), h[:, T - 1:]], dim=1)

        rewrite_input(k, scramble)
    elif kind == "swap" and k < L:
        def place(h):
            h = h.clone()
            for p, v in zip(positions, vectors):
                h[:, p] = v
            return h

        rewrite_input(k, place)
    elif kind == "skip_attention" and n == 0:
        def attention_adds_nothing(module, args, output):
            return (torch.zeros_like(output[0]),) + tuple(output[1:])

        for j in range(k, end):
            handles.append(layers[j].self_attn.register_forward_hook(attention_adds_nothing))
    elif kind == "skip_attention":
        def read_first_only(module, args, kwargs):
            h = kwargs["hidden_states"]
            T = h.shape[1]
            query, key = torch.arange(T)[:, None], torch.arange(T)[None, :]
            allowed = (key <= query) & (key < n)
            blocked = torch.full((T, T), torch.finfo(h.dtype).min, dtype=h.dtype)
            additive = torch.where(allowed, torch.zeros((), dtype=h.dtype), blocked)  # what eager attention adds
            return args, {**kwargs, "attention_mask": additive.expand(h.shape[0], 1, T, T)}

        for j in range(k, end):
            handles.append(layers[j].self_attn.register_forward_pre_hook(read_first_only, with_kwargs=True))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def hf_state(hf, ids: torch.Tensor, j: int) -> torch.Tensor:
    """H[j] [B, T, D] of an unmanipulated transformers model (captured entering layer j)."""
    seen = {}

    def capture(module, args, kwargs):
        seen["H"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = hf.model.layers[j].register_forward_pre_hook(capture, with_kwargs=True)
    try:
        hf(ids)
    finally:
        handle.remove()
    return seen["H"]


def ks_for(kind: str, L: int) -> list[int]:
    """The bottom, the middle and the top layer (k = L-1: only the last layer's view altered)."""
    return [1 if kind == "freeze" else 0, L // 2, L - 1]


def reference_cases(L: int):
    cases = []
    for kind in KINDS:
        for k in ks_for(kind, L):
            cases.append((kind, k))
    return cases


# ----------------------------------------------------------------------------- k = L is the baseline

@pytest.mark.parametrize("kind", KINDS)
def test_k_equal_to_L_is_bitwise_no_manipulation(kind):
    model, _ = tiny_pair("mha")
    L = model.config.num_layers
    _, ids, mask = padded_batch()
    logits, H = run(model, ids, mask)
    logits_k, H_k = run(model, ids, mask, manipulation_of(kind, L, model))
    assert torch.equal(logits, logits_k)
    assert torch.equal(H, H_k)
    # and in generation, cached and faithful alike
    prompts = [[5, 17, 9, 33], [8, 42, 11, 12, 70, 4]]
    for mode in ("cached", "faithful"):
        plain = generate_tokens(model, prompts, 4, mode=mode, return_logits=True)
        at_L = generate_tokens(model, prompts, 4, mode=mode, manipulation=manipulation_of(kind, L, model),
                               return_logits=True)
        assert plain.tokens == at_L.tokens
        assert torch.equal(plain.logits, at_L.logits)


# ----------------------------------------------------------------------------- random

@pytest.mark.parametrize("k", [0, 2, 4])
def test_random_replaces_previous_tokens_with_noise_of_their_own_norm(k):
    model, _ = tiny_pair("mha")
    _, ids, mask = padded_batch()
    seed = 3
    _, H = run(model, ids, mask)
    _, H_r = run(model, ids, mask, Manipulation("random", k, seed=seed))
    previous = previous_mask(mask)

    assert torch.equal(H_r[:k], H[:k])  # layers below k see the genuine states
    assert torch.equal(H_r[k][~previous], H[k][~previous])  # the last token and the padding are untouched
    replaced, original = H_r[k][previous], H[k][previous]
    torch.testing.assert_close(replaced.norm(dim=-1), original.norm(dim=-1), rtol=1e-5, atol=0)
    cosine_to_original = torch.nn.functional.cosine_similarity(replaced, original, dim=-1)
    assert cosine_to_original.abs().max() < 0.6  # a new direction, not the old one
    # the direction is the seeded Gaussian of the token's position (counted from the sequence's first real token)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    noise = random_directions(seed, positions, model.config.hidden_size)[previous]
    cosine_to_noise = torch.nn.functional.cosine_similarity(replaced, noise, dim=-1)
    torch.testing.assert_close(cosine_to_noise, torch.ones_like(cosine_to_noise), atol=1e-6, rtol=0)
    if k + 1 < len(H):  # above k the layers process the noise normally: the states differ from the genuine ones
        assert not torch.allclose(H_r[k + 1][previous], H[k + 1][previous], atol=1e-3)


def test_random_is_reproducible_per_seed_and_differs_across_seeds():
    model, _ = tiny_pair("mha")
    _, ids, mask = padded_batch()
    a = model(ids, mask, manipulation=Manipulation("random", 1, seed=0))
    again = model(ids, mask, manipulation=Manipulation("random", 1, seed=0))
    other = model(ids, mask, manipulation=Manipulation("random", 1, seed=1))
    assert torch.equal(a, again)
    assert (a[:, -1] - other[:, -1]).abs().max() > 1e-2


@pytest.mark.parametrize("kind", KINDS)
def test_a_sequence_alone_and_in_a_left_padded_batch_get_the_same_result(kind):
    model, _ = tiny_pair("gqa")
    L = model.config.num_layers
    sequences, ids, mask = padded_batch(lengths=(7, 12, 9))
    for k in ks_for(kind, L):
        manipulation = manipulation_of(kind, k, model, seed=4)
        batched = model(ids, mask, manipulation=manipulation)
        for b, seq in enumerate(sequences):
            alone = model(torch.tensor([seq]), manipulation=manipulation)[0]
            torch.testing.assert_close(batched[b, -len(seq):], alone, atol=TINY_ATOL, rtol=0)


# ----------------------------------------------------------------------------- freeze

@pytest.mark.parametrize("k", [1, 2, 4, 5])
def test_freeze_previous_tokens_keep_H_k_minus_1_at_every_layer_from_k(k):
    model, _ = tiny_pair("mha")
    L = model.config.num_layers
    _, ids, mask = padded_batch()
    _, H = run(model, ids, mask)
    _, H_f = run(model, ids, mask, Manipulation("freeze", k))
    previous = previous_mask(mask)
    padding = ~mask.bool()

    assert torch.equal(H_f[:k], H[:k])  # below k nothing changes
    for j in range(k, L):
        assert torch.equal(H_f[j][previous], H[k - 1][previous])
        assert torch.equal(H_f[j][padding], H[j][padding])  # padding runs its own (ignored) course
    # the last token still runs every layer: its state keeps evolving above k-1
    if k < L:
        assert not torch.allclose(H_f[k][:, -1], H_f[k - 1][:, -1], atol=1e-3)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_freeze_discards_the_genuine_computation_of_previous_tokens_above_k_minus_1(k):
    """Every output the layers >= k-1 produce for previous tokens is perturbed: the last token cannot tell.

    The perturbation has teeth: without the freeze it changes the last token's logits, and
    perturbing the output of layer k-2 (that is, H[k-1] itself, which freeze keeps) does too.
    """
    model, _ = tiny_pair("mha")
    L = model.config.num_layers
    _, ids, mask = padded_batch()
    previous = previous_mask(mask)[..., None]
    noise = torch.randn(*ids.shape, model.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def perturbed(manipulation, layers):
        def add_noise(module, args, output):
            return torch.where(previous, output + 3 * noise, output)

        handles = [model.layers[j].register_forward_hook(add_noise) for j in layers]
        try:
            return model(ids, mask, manipulation=manipulation)[:, -1]
        finally:
            for handle in handles:
                handle.remove()

    freeze = Manipulation("freeze", k)
    clean = model(ids, mask, manipulation=freeze)[:, -1]
    above = range(k - 1, L)
    assert torch.equal(perturbed(freeze, above), clean)
    assert (perturbed(None, above) - model(ids, mask)[:, -1]).abs().max() > 1e-2
    if k >= 2:
        assert (perturbed(freeze, [k - 2]) - clean).abs().max() > 1e-2


# ----------------------------------------------------------------------------- skip_attention

def test_skip_attention_from_layer_0_makes_the_last_token_blind_to_previous_tokens():
    model, _ = tiny_pair("gqa")
    ids = token_ids(1, 2, 10)
    other = ids.clone()
    other[:, :-1] = token_ids(2, 2, 9)  # every previous token changed
    assert (other[:, :-1] != ids[:, :-1]).any(dim=1).all()
    skip = Manipulation("skip_attention", 0)
    logits = model(ids, manipulation=skip)[:, -1]
    assert torch.equal(model(other, manipulation=skip)[:, -1], logits)
    # not even its own position matters (RoPE acts only inside attention): the last token alone gives the same
    torch.testing.assert_close(model(ids[:, -1:], manipulation=skip)[:, -1], logits, atol=TINY_ATOL, rtol=0)
    # whereas one attending layer (k = 1) lets previous tokens in
    one = Manipulation("skip_attention", 1)
    assert (model(other, manipulation=one)[:, -1] - model(ids, manipulation=one)[:, -1]).abs().max() > 1e-2


def layers_that_attend(model, forward):
    """(the layers whose attention module ran, in order; forward()'s result)."""
    called = []
    handles = [block.self_attn.register_forward_hook(lambda m, a, o, j=j: called.append(j))
               for j, block in enumerate(model.layers)]
    try:
        result = forward()
    finally:
        for handle in handles:
            handle.remove()
    return called, result


@pytest.mark.parametrize("k", [0, 2, 3])
def test_skip_attention_layers_from_k_run_only_their_mlp_and_never_attend(k):
    model, _ = tiny_pair("gqa")
    L = model.config.num_layers
    _, ids, mask = padded_batch()
    called, (_, H) = layers_that_attend(model, lambda: run(model, ids, mask, Manipulation("skip_attention", k)))
    assert called == list(range(k))  # attention (and its K/V) only below k
    _, H_plain = run(model, ids, mask)
    assert torch.equal(H[:k + 1], H_plain[:k + 1])
    for j in range(k, L):  # the residual passes through the skipped attention; the MLP still adds its part
        block = model.layers[j]
        torch.testing.assert_close(H[j + 1], H[j] + block.mlp(block.post_attention_layernorm(H[j])),
                                   atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- swap

@pytest.mark.parametrize("k", [0, 2, 4])
def test_swapping_a_token_with_its_own_state_changes_nothing(k):
    model, _ = tiny_pair("mha")
    ids = token_ids(3, 1, 10)
    positions = (0, 4, 9)
    logits, H = run(model, ids)
    own = Manipulation("swap", k, positions=positions, vectors=H[k][0, list(positions)])
    torch.testing.assert_close(model(ids, manipulation=own), logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("k", [0, 3])
def test_swap_writes_the_donor_vectors_exactly_at_layer_k(k):
    model, _ = tiny_pair("mha")
    sequences, ids, mask = padded_batch(lengths=(11, 6, 9))
    positions = (1, 5)
    donors = run(model, token_ids(8, 1, 7))[1][k][0, [2, 6]]  # H[k] of two tokens of another prompt
    _, H = run(model, ids, mask)
    _, H_s = run(model, ids, mask, Manipulation("swap", k, positions=positions, vectors=donors))

    assert torch.equal(H_s[:k], H[:k])
    hit = torch.zeros_like(mask, dtype=torch.bool)
    for b, seq in enumerate(sequences):
        start = ids.shape[1] - len(seq)  # positions count from each sequence's first real token
        for p, donor in zip(positions, donors):
            assert torch.equal(H_s[k][b, start + p], donor)
            hit[b, start + p] = True
    assert torch.equal(H_s[k][~hit], H[k][~hit])
    # per-sequence donors [B, P, D]
    per_sequence = torch.randn(len(sequences), len(positions), model.config.hidden_size)
    _, H_b = run(model, ids, mask, Manipulation("swap", k, positions=positions, vectors=per_sequence))
    for b, seq in enumerate(sequences):
        start = ids.shape[1] - len(seq)
        for i, p in enumerate(positions):
            assert torch.equal(H_b[k][b, start + p], per_sequence[b, i])


# ----------------------------------------------------------------------------- invalid specifications

def test_invalid_manipulations_are_refused_with_a_clear_message():
    model, _ = tiny_pair("mha")
    L, D = model.config.num_layers, model.config.hidden_size
    ids = token_ids(0, 1, 6)
    vectors = torch.zeros(1, D)

    def refused(match, make, forward=True):
        with pytest.raises(ManipulationError, match=match):
            manipulation = make()
            if forward:
                model(ids, manipulation=manipulation)

    refused("unknown manipulation kind 'shuffle'", lambda: Manipulation("shuffle", 1))
    refused("k >= 1", lambda: Manipulation("freeze", 0))
    for kind in KINDS:
        refused(rf"k={L + 1} is outside", lambda: manipulation_of(kind, L + 1, model))
        refused(r"k=-1 is outside", lambda: manipulation_of(kind, -1, model))
    refused("must be an integer", lambda: Manipulation("random", 1.5))
    refused(r"swap positions \[6\] are outside sequence 0 of length 6",
            lambda: Manipulation("swap", 1, positions=(6,), vectors=vectors))
    refused(r"swap positions \[-1\] are outside",
            lambda: Manipulation("swap", 1, positions=(-1,), vectors=vectors))
    refused(f"width {D + 1}, the model's hidden size is {D}",
            lambda: Manipulation("swap", 1, positions=(2,), vectors=torch.zeros(1, D + 1)))
    refused("shape", lambda: Manipulation("swap", 1, positions=(2, 3), vectors=vectors), forward=False)
    refused("distinct", lambda: Manipulation("swap", 1, positions=(2, 2), vectors=torch.zeros(2, D)), forward=False)
    refused("needs at least one position", lambda: Manipulation("swap", 1, vectors=vectors), forward=False)
    refused("needs donor vectors", lambda: Manipulation("swap", 1, positions=(2,)), forward=False)
    refused("only apply to swap", lambda: Manipulation("freeze", 1, positions=(2,)), forward=False)
    refused("given for 3 sequences, the batch has 1",
            lambda: Manipulation("swap", 1, positions=(2,), vectors=torch.zeros(3, 1, D)))
    # a position inside one sequence of a batch but outside a shorter one names that sequence
    _, padded, mask = padded_batch(lengths=(8, 4))
    with pytest.raises(ManipulationError, match=r"\[5\] are outside sequence 1 of length 4"):
        model(padded, mask, manipulation=Manipulation("swap", 1, positions=(5,), vectors=vectors))
    # generation refuses before producing anything, in both modes
    for mode in ("cached", "faithful"):
        with pytest.raises(ManipulationError, match="k >= 1"):
            generate_tokens(model, [[4, 5, 6]], 3, mode=mode, manipulation=Manipulation("freeze", 0))


# ----------------------------------------------------------------------------- against the reference: tiny models

def test_tiny_models_match_transformers_without_manipulation():
    for name in TINY_CONFIGS:
        for attention in PAIRED_KERNELS:
            model, hf = tiny_pair(name, attention)
            ids = token_ids(11, 2, 12)
            torch.testing.assert_close(model(ids), hf(ids).logits, atol=TINY_ATOL, rtol=0)


@pytest.mark.parametrize("attention", list(PAIRED_KERNELS))
@pytest.mark.parametrize("name", list(TINY_CONFIGS))
def test_manipulations_match_the_hook_reference_on_tiny_models(name, attention):
    model, hf = tiny_pair(name, attention)
    L = model.config.num_layers
    ids = token_ids(11, 2, 12)
    donor_ids = token_ids(12, 1, 8)
    baseline, states = run(model, ids)
    for kind, k in reference_cases(L):
        options = {}
        if kind == "random":
            options = dict(seed=7)
        if kind == "swap":
            options = dict(positions=(2, 7), vectors=hf_state(hf, donor_ids, k)[0, [3, 7]])
        manipulation = Manipulation(kind, k, **options)
        ours = model(ids, manipulation=manipulation)
        with reference_manipulation(hf, kind, k, **options):
            reference = hf(ids).logits
        torch.testing.assert_close(ours, reference, atol=TINY_ATOL, rtol=0, msg=lambda m: f"{kind} k={k}: {m}")
        assert (ours[:, -1] - baseline[:, -1]).abs().max() > 1e-3, f"{kind} k={k} changed nothing: a toothless case"
        # the other routes through the same manipulation: starting at layer k from the unmanipulated states
        # below it (prefix reuse), and the efficiency mode (last position only)
        reused = model(ids, manipulation=manipulation, prompt_states=states)
        torch.testing.assert_close(reused, reference, atol=TINY_ATOL, rtol=0, msg=lambda m: f"{kind} k={k} reuse: {m}")
        # The efficiency mode multiplies matrices of other shapes, so fp32 rounds differently: on an AMD EPYC
        # (AVX-512, AVX512-BF16) freeze k=1 differs by 1.2e-5 on a logit of 1.8 (6e-6 relative); hence rtol as well.
        efficient = model(ids, manipulation=manipulation, efficient=True)
        torch.testing.assert_close(efficient[:, -1], reference[:, -1], atol=TINY_ATOL, rtol=1e-5,
                                   msg=lambda m: f"{kind} k={k} efficient: {m}")


# ----------------------------------------------------------------------------- generation: cached vs faithful, tiny

GENERATION_ATOL = {torch.float32: 1e-4, torch.float64: 1e-10}  # cached against faithful logits, 6 steps


def tiny_model_in(name: str, dtype: torch.dtype) -> Transformer:
    """The tiny model `name` (ours) in this dtype (a copy: `tiny_pair` keeps its fp32 one)."""
    model, _ = tiny_pair(name)
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


def assert_cached_equals_faithful(model: Transformer, prompts, manipulation: Manipulation, what: str):
    """6 new tokens in both modes, checked equal (tokens, and logits within GENERATION_ATOL); (cached, faithful)."""
    faithful = generate_tokens(model, prompts, 6, mode="faithful", manipulation=manipulation, return_logits=True)
    cached = generate_tokens(model, prompts, 6, mode="cached", manipulation=manipulation, return_logits=True)
    assert cached.tokens == faithful.tokens, what
    atol = GENERATION_ATOL[model.embed_tokens.weight.dtype]
    torch.testing.assert_close(cached.logits, faithful.logits, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")
    return cached, faithful


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["mha", "mistral-window"])
def test_cached_generation_equals_faithful_tiny(name, dtype):
    model = tiny_model_in(name, dtype)
    L = model.config.num_layers
    prompts = [token_ids(20, 1, n)[0].tolist() for n in (5, 9, 12)]
    for kind in KINDS:
        for k in ks_for(kind, L):
            manipulation = manipulation_of(kind, k, model, seed=2)  # (swap vectors are cast to the model's dtype)
            assert_cached_equals_faithful(model, prompts, manipulation, f"{kind} k={k}")


def test_generated_tokens_are_manipulated_once_they_are_previous_tokens():
    """Each step of a generation equals the hook reference run on everything so far (the faithful
    procedure), in both modes: a generated token is manipulated as soon as it is no longer the last one.
    For random this also shows that a token's noise is the same at every step (a function of seed and
    position), which is what lets the cache keep it.
    """
    model, hf = tiny_pair("gqa")
    L = model.config.num_layers
    prompt = token_ids(21, 1, 8)[0].tolist()
    steps = 5
    donor = hf_state(hf, token_ids(22, 1, 6), 1)[0, [2, 5]]
    for kind, k in [("random", 0), ("random", L // 2), ("freeze", 1), ("freeze", L - 1), ("skip_attention", 1),
                    ("swap", 1)]:
        options = dict(seed=2) if kind == "random" else {}
        if kind == "swap":
            options = dict(positions=(1, 4), vectors=donor)
        manipulation = Manipulation(kind, k, **options)
        for mode in ("cached", "faithful"):
            generation = generate_tokens(model, [prompt], steps, mode=mode, manipulation=manipulation,
                                         return_logits=True)
            sequence = prompt + generation.tokens[0]
            for step in range(steps):
                with reference_manipulation(hf, kind, k, **options):
                    expected = hf(torch.tensor([sequence[:len(prompt) + step]])).logits[0, -1]
                torch.testing.assert_close(generation.logits[0, step], expected, atol=TINY_ATOL, rtol=0,
                                           msg=lambda m: f"{kind} k={k} {mode} step {step}: {m}")


# ----------------------------------------------------------------------------- SmolLM2-135M

ONE_SHOT = "Q: What is the capital of Spain?\nA: Madrid\nQ: What is the capital of France?\nA:"
DONOR = "The country Italy"
SMOLLM2_ATOL = 1e-5  # ours vs transformers, both sdpa: 0.0 measured, plain and manipulated (eager vs sdpa: 7e-5)


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from minillm.checkpoint import load_model
    from minillm.tokenizer import load_tokenizer

    return load_model(smollm2_dir), load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def smollm2_hf(smollm2_dir):
    return transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, attn_implementation="sdpa").eval()


@pytest.mark.slow
def test_manipulations_match_the_hook_reference_on_smollm2(smollm2, smollm2_hf):
    model, tokenizer = smollm2
    hf = smollm2_hf
    L = model.config.num_layers
    first = tokenizer.encode(ONE_SHOT)
    second = tokenizer.encode("Water boils at one hundred degrees Celsius at sea level, which is why cooks at")
    n = min(len(first), len(second))
    ids = torch.tensor([first[:n], second[:n]])
    donor_ids = torch.tensor([tokenizer.encode(DONOR)])
    baseline = model(ids)
    measured = (baseline - hf(ids).logits).abs().max().item()
    assert measured <= SMOLLM2_ATOL, f"unmanipulated SmolLM2 differs from transformers by {measured}"
    for kind, k in reference_cases(L):
        options = {}
        if kind == "random":
            options = dict(seed=7)
        if kind == "swap":
            options = dict(positions=(7, n - 3), vectors=hf_state(hf, donor_ids, k)[0, [-1, -1]])
        ours = model(ids, manipulation=Manipulation(kind, k, **options))
        with reference_manipulation(hf, kind, k, **options):
            reference = hf(ids).logits
        torch.testing.assert_close(ours, reference, atol=SMOLLM2_ATOL, rtol=0, msg=lambda m: f"{kind} k={k}: {m}")


CACHED_PROMPTS = ("The capital of Italy is", "Q: What is the capital of Peru?\nA:", "List three colours: red,")


def cached_and_faithful(model, tokenizer, cases, steps: int = 3):
    """(kind, k, cached, faithful) for each (kind, k) on a left-padded batch of three prompts."""
    prompts = [tokenizer.encode(text) for text in CACHED_PROMPTS]
    assert len({len(p) for p in prompts}) == 3
    donors = model.residual_stream(torch.tensor([tokenizer.encode(DONOR)]))
    for kind, k in cases:
        if kind == "swap":
            manipulation = Manipulation("swap", k, positions=(2,), vectors=donors[k][0, -1:])
        else:
            manipulation = Manipulation(kind, k, seed=1)
        faithful = generate_tokens(model, prompts, steps, mode="faithful", manipulation=manipulation,
                                   return_logits=True)
        cached = generate_tokens(model, prompts, steps, mode="cached", manipulation=manipulation, return_logits=True)
        yield kind, k, cached, faithful


@pytest.mark.slow
def test_cached_generation_equals_faithful_on_smollm2(smollm2):
    """Same tokens for every kind at the bottom, middle and top layer; logits equal up to fp32 rounding.

    Not 1e-4: cached and faithful multiply matrices of different shapes, and a heavily manipulated
    SmolLM2 amplifies those last-bit differences. Measured on this batch: 3.4e-4 at freeze k=1, 3.2e-4
    at skip_attention k=15, 2e-5 to 7e-5 elsewhere (on a batch with a 26-token prompt: up to 1.1e-3);
    a sequence run alone or in a batch, faithful both times, differs as much. The float64 test below
    shows the difference is rounding, not semantics.
    """
    model, tokenizer = smollm2
    for kind, k, cached, faithful in cached_and_faithful(model, tokenizer, reference_cases(model.config.num_layers)):
        assert cached.tokens == faithful.tokens, f"{kind} k={k}"
        assert torch.equal(cached.logits[:, 0], faithful.logits[:, 0]), f"{kind} k={k}"  # the same first pass
        torch.testing.assert_close(cached.logits, faithful.logits, atol=2e-3, rtol=0,
                                   msg=lambda m: f"{kind} k={k}: {m}")


@pytest.mark.slow
def test_cached_generation_equals_faithful_on_smollm2_exactly_in_float64(smollm2_dir, smollm2):
    """In float64 cached and faithful agree to the last bit (0.0 measured for all four kinds at k = bottom,
    middle and top). Checked here at the bottom layer of each kind, where fp32 noise is amplified most."""
    from minillm.checkpoint import load_model

    model = load_model(smollm2_dir, dtype=torch.float64)
    _, tokenizer = smollm2
    bottom = [(kind, 1 if kind == "freeze" else 0) for kind in KINDS]
    for kind, k, cached, faithful in cached_and_faithful(model, tokenizer, bottom):
        assert cached.tokens == faithful.tokens, f"{kind} k={k}"
        torch.testing.assert_close(cached.logits, faithful.logits, atol=1e-9, rtol=0,
                                   msg=lambda m: f"{kind} k={k}: {m}")


def swap_answer(model, tokenizer, k: int) -> str:
    """Greedy answer to the one-shot prompt with " France" replaced, at layer k, by " Italy" from the donor prompt."""
    prompt = tokenizer.encode(ONE_SHOT)
    donor = tokenizer.encode(DONOR)
    france, italy = tokenizer.encode(" France"), tokenizer.encode(" Italy")
    assert len(france) == 1 and prompt.count(france[0]) == 1, "' France' should be one token, once in the prompt"
    assert donor[-1:] == italy
    H = model.residual_stream(torch.tensor([donor]))
    swap = Manipulation("swap", k, positions=(prompt.index(france[0]),), vectors=H[k][0, -1:])
    result = generate_tokens(model, [prompt], 2, manipulation=swap)
    return tokenizer.decode(result.tokens[0])


@pytest.mark.slow
def test_france_swapped_for_italy_is_followed_low_and_ignored_at_the_top(smollm2):
    """The paper's swap example, at both ends of the model (not a chosen middle layer).

    The prompt needs its line breaks: flattened onto one line, SmolLM2-135M answers " A"
    even unmanipulated. On our converted checkpoint the answer is " Rome" for k = 0..23
    and " Paris" for k = 24..30 (the top 6 of 30 layers).
    """
    model, tokenizer = smollm2
    L = model.config.num_layers
    assert generate_tokens(model, [tokenizer.encode(ONE_SHOT)], 1).tokens[0] == tokenizer.encode(" Paris")
    assert swap_answer(model, tokenizer, 0).strip().startswith("Rome")
    assert swap_answer(model, tokenizer, 1).strip().startswith("Rome")
    assert swap_answer(model, tokenizer, L - 1).strip().startswith("Paris")
