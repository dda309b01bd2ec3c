"""Every speed path of the model equals the plain path it replaces (fp32, tiny random models).

- plain causal attention (no mask at all, `is_causal`) against the additive mask of an all-ones attention mask;
- the rolled RoPE rotation against the textbook rotate-half formula;
- a static cache, read whole with its empty slots masked, against the cache that grows by the pass;
- the noise tables kept on the device against the host path, and against the definition of the noise;
- the RoPE frequencies stay an fp32 buffer when the model is cast, and loading turns gradients off.
"""

import pytest
import torch
import transformers

from minillm.checkpoint import load_model
from minillm.generate import new_cache
from minillm.manipulation import Manipulation, random_directions
from minillm.model import rope_inverse_frequencies, rope_tables, rotate, rotation

from tiny_checkpoint import tiny_model

NOISE_BLOCK = 64  # the noise's definition: block b of seed s is drawn from a generator seeded s * 1_000_003 + b



@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("window,length", [(None, 20), (6, 5), (6, 20)])
def test_causal_attention_without_a_mask_equals_the_masked_path(attention, window, length):
    model = tiny_model(sliding_window=window)
    model.set_attention(attention)
    ids = torch.randint(1, 60, (2, length), generator=torch.Generator().manual_seed(1))
    plain = model(ids, torch.ones_like(ids))  # an explicit mask: the additive-mask path
    _, mask = model.positions_and_mask(torch.ones_like(ids, dtype=torch.bool), None, no_padding=True)
    assert (mask is None) == (window is None or length <= window)  # a window that cuts in needs the mask
    torch.testing.assert_close(model(ids), plain, rtol=0, atol=1e-5)


def test_a_cached_pass_without_padding_equals_the_masked_one():
    model = tiny_model()
    ids = torch.randint(1, 60, (2, 9), generator=torch.Generator().manual_seed(2))
    results = []
    for mask in (None, torch.ones_like(ids)):
        cache = new_cache(model, 2, 12)
        first = model(ids[:, :7], mask if mask is None else mask[:, :7], cache=cache)
        rest = model(ids[:, 7:], mask if mask is None else mask[:, 7:], cache=cache)
        results.append(torch.cat([first, rest], dim=1))
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("kind", ["random", "freeze", "skip_attention"])
def test_a_static_cache_equals_the_growing_one(kind, window):
    """A static cache (what a compiled decode step needs) reads every slot, the empty ones masked."""
    model = tiny_model(sliding_window=window)
    manipulation = Manipulation(kind, 1, spare_first=1 if kind == "skip_attention" and window is None else 0)
    ids = torch.randint(1, 60, (2, 14), generator=torch.Generator().manual_seed(3))
    prompt_mask = torch.ones(2, 8, dtype=torch.long)
    prompt_mask[0, :3] = 0  # left padding
    results = []
    for static in (False, True):
        cache = new_cache(model, 2, 20, static=static)
        logits = [model(ids[:, :8], prompt_mask, cache=cache, manipulation=manipulation)]
        logits += [model(ids[:, t:t + 1], cache=cache, manipulation=manipulation) for t in range(8, 14)]
        results.append(torch.cat(logits, dim=1))
        _, mask = model.positions_and_mask(torch.ones(2, 1, dtype=torch.bool), cache)
        assert mask.shape[-1] == (20 if static else 15)  # static: the next step reads every slot
    torch.testing.assert_close(results[1], results[0], rtol=0, atol=1e-5)


def test_rolled_rotation_is_the_rotate_half_formula():
    x = torch.randn(2, 4, 5, 8)
    positions = torch.arange(5).expand(2, 5)
    cos, sin = rope_tables(positions, rope_inverse_frequencies(tiny_model().config))
    first, second = x.chunk(2, dim=-1)
    textbook = x * cos[:, None] + torch.cat([-second, first], dim=-1) * sin[:, None]
    assert torch.equal(rotate(x, rotation(cos[:, None], sin[:, None], x.dtype)), textbook)


def test_noise_tables_on_the_device_equal_the_host_path_and_the_definition():
    positions = torch.tensor([[0, 3, 63, 64, 65], [130, 129, 2, 1, 0]])
    on_device = random_directions(7, positions, 16, position_limit=300)
    on_host = random_directions(7, positions, 16)
    assert torch.equal(on_device, on_host)
    def block(b):
        return torch.randn(NOISE_BLOCK, 16, generator=torch.Generator().manual_seed(7 * 1_000_003 + b))

    assert torch.equal(on_device[1, 0], block(2)[130 - 2 * NOISE_BLOCK])
    assert torch.equal(on_device[0, 3], block(1)[0])
    assert not torch.equal(random_directions(8, positions, 16, position_limit=300), on_device)


def test_a_noise_table_grown_by_later_calls_equals_one_made_at_once():
    """A table holds the blocks that calls have needed so far (a generation's bound, known on the host), and
    grows when a longer one comes: the values stay a function of (seed, position) only."""
    seed, width = 424242, 16  # a seed no other test uses: its table starts empty

    def by_definition(positions):
        rows = [torch.randn(NOISE_BLOCK, width, generator=torch.Generator().manual_seed(
            seed * 1_000_003 + p // NOISE_BLOCK))[p % NOISE_BLOCK] for p in positions.flatten().tolist()]
        return torch.stack(rows).reshape(*positions.shape, width)

    short = torch.tensor([[0, 5, 63]])
    assert torch.equal(random_directions(seed, short, width, position_limit=64), by_definition(short))  # 1 block
    long = torch.tensor([[0, 5, 63, 64], [200, 511, 1, 130]])
    assert torch.equal(random_directions(seed, long, width, position_limit=512), by_definition(long))  # 8 blocks


def test_rope_frequencies_stay_fp32_when_the_model_is_cast():
    model = tiny_model()
    exact = model.rotary.inv_freq.clone()
    model.to(torch.bfloat16)
    assert model.rotary.inv_freq.dtype == torch.float32 and torch.equal(model.rotary.inv_freq, exact)
    assert "rotary.inv_freq" not in model.state_dict()


def test_loading_gives_fp32_frequencies_and_no_gradients(tmp_path):
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, dtype=torch.bfloat16)
    assert not any(p.requires_grad for p in model.parameters())
    assert model.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(model.rotary.inv_freq, rope_inverse_frequencies(model.config))
