"""A fifth manipulation, added the way docs/code-layout.md says, and checked against an independent reference.

"zero": from layer k up, previous tokens' states are zero vectors (at every layer j >= k, H[j][p] <- 0).
Their keys and values become zero too (the input norm and the projections map 0 to 0), so from layer k
up attention still spends weight on previous tokens but reads nothing from them.

In the library the four places would be edited directly; a test cannot edit the library, so each place is
filled in here from outside, marked (1) to (4) as in the doc:
(1) its facts in `minillm.manipulation.KIND_FACTS`;
(2) a field on `LayerEdit` that says what a layer does;
(3) a builder in `Transformer.edit_builders` that says which layers do it;
(4) its visible line in `Block.manipulate`.
The reference is hooks on `transformers`' Llama, sharing no code with minillm's model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import transformers

from minillm.config import ModelConfig
from minillm.generate import generate_tokens
from minillm.manipulation import KIND_FACTS, KindFacts, Manipulation
from minillm.model import NO_EDIT, Block, LayerEdit, Transformer


@dataclass(frozen=True)
class ZeroingEdit(LayerEdit):  # (2)
    zero: bool = False  # previous tokens' states are zero vectors


class ZeroingBlock(Block):
    def manipulate(self, x, edit, frozen=None):
        x = super().manipulate(x, edit, frozen)
        if getattr(edit, "zero", False):  # (4) zero: previous tokens' states are zero vectors
            x = torch.where(edit.previous, 0.0, x)
        return x


class ZeroingTransformer(Transformer):
    def edit_builders(self):  # (3)
        return super().edit_builders() | {"zero": self._zero_edits}

    def _zero_edits(self, manipulation, previous, attention_mask, positions, position_limit, efficient):
        edit = ZeroingEdit(previous=previous, zero=True)
        return [edit if j >= manipulation.layer else NO_EDIT for j in range(self.config.num_layers)]


@pytest.fixture(autouse=True)
def zero_kind(monkeypatch):
    monkeypatch.setitem(KIND_FACTS, "zero", KindFacts())  # (1) any k in 0..L, no seed, no donor, a full cache


@pytest.fixture(scope="module")
def models():
    """(ours with the fifth manipulation, transformers) with the same random weights."""
    hf_config = transformers.LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager").eval()
    with torch.no_grad():
        for parameter in hf.parameters():
            parameter.normal_(0, 0.2) if parameter.dim() > 1 else parameter.uniform_(0.5, 1.5)
    ours = ZeroingTransformer(ModelConfig.from_hf(hf_config.to_dict() | {"architectures": ["LlamaForCausalLM"]}))
    for block in ours.layers:
        block.__class__ = ZeroingBlock
    ours.load_state_dict({key.removeprefix("model."): value for key, value in hf.state_dict().items()})
    ours.set_attention("math")  # the kernel paired with transformers' "eager"
    return ours.eval(), hf


def reference_logits(hf, ids: torch.Tensor, k: int) -> torch.Tensor:
    """transformers' logits with pre-hooks that zero previous tokens' states entering every layer j >= k."""
    def zero_previous(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        hidden = torch.cat([torch.zeros_like(hidden[:, :-1]), hidden[:, -1:]], dim=1)
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    layers = hf.model.layers
    handles = [layers[j].register_forward_pre_hook(zero_previous, with_kwargs=True) for j in range(k, len(layers))]
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("k", [0, 2, 3])
def test_zero_matches_the_hook_reference(models, k):
    ours, hf = models
    ids = torch.randint(3, 101, (2, 9), generator=torch.Generator().manual_seed(k))
    with torch.no_grad():
        zeroed = ours(ids, manipulation=Manipulation("zero", k))
        plain = ours(ids)
    torch.testing.assert_close(zeroed, reference_logits(hf, ids, k), atol=1e-5, rtol=0)
    assert (zeroed[:, -1] - plain[:, -1]).abs().max() > 1e-2  # the manipulation does something


def test_zero_generates_faithfully_and_shows_why_cached_mode_needs_more(models):
    """Faithful generation reruns full passes, so it works as soon as the forward pass does: each step equals
    the reference on everything so far. Cached generation also needs the newest token's keys/values rewritten
    once it becomes a previous token (what freeze and random do), which this example does not add."""
    ours, hf = models
    prompt, zero = [5, 17, 42, 8, 99, 23], Manipulation("zero", 1)
    faithful = generate_tokens(ours, [prompt], 4, manipulation=zero, mode="faithful", return_logits=True)
    sequence = list(prompt)
    for step, token in enumerate(faithful.tokens[0]):
        expected = reference_logits(hf, torch.tensor([sequence]), 1)[0, -1]
        torch.testing.assert_close(faithful.logits[0, step], expected, atol=1e-5, rtol=0)
        sequence.append(token)
    cached = generate_tokens(ours, [prompt], 4, manipulation=zero, mode="cached", return_logits=True)
    assert (cached.logits[0, 1:] - faithful.logits[0, 1:]).abs().max() > 1e-3
