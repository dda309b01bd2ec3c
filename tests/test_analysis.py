"""minillm.analysis against transformers and against a hand-written reference, on random tiny models.

transformers supplies the independent numbers: its hidden states for the logit lens, its eager
attention's `output_attentions` for the attention probabilities, and the outputs of its attention
and MLP blocks (read with forward hooks, in this test only) for the per-layer norms. The hand-written
reference recomputes one layer a second time from the raw weights, in float64, head by head, with its
own RMSNorm, RoPE (angle by angle), mask and softmax, sharing no code with the model.
"""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from minillm.analysis import (
    attention_probabilities,
    layer_attention,
    layer_norms,
    logit_lens,
    token_rank,
)
from minillm.config import ModelConfig
from minillm.generate import left_pad
from minillm.manipulation import Manipulation
from minillm.model import Transformer

VOCAB = 97
TINY = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 3,
        "num_attention_heads": 4, "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}
CONFIGS = {
    "llama-mha": (transformers.LlamaConfig, {"num_key_value_heads": 4}),
    "llama-gqa": (transformers.LlamaConfig, {"num_key_value_heads": 2}),
    "mistral-window": (transformers.MistralConfig, {"num_key_value_heads": 2, "sliding_window": 7}),
}
ATOL = 1e-5  # fp32 against fp32: only the order of summation differs
NORM_TOL = {"rtol": 2e-6, "atol": ATOL}  # norms reach ~30 on these large-weight models: fp32 rounding is relative


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def tiny_pair(name: str, seed: int = 0):
    """(ours, transformers' eager model) with the same random weights, large enough that attention is not uniform."""
    config_class, extra = CONFIGS[name]
    hf_config = config_class(**{**TINY, **extra})
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(hf_config, attn_implementation="eager")
    for p in hf.parameters():
        p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    ours = Transformer(ModelConfig.from_hf(hf_config.to_dict() | {"architectures": [type(hf).__name__]}))
    ours.load_state_dict({key.removeprefix("model."): value for key, value in hf.state_dict().items()})
    ours.tie_weights()
    return ours.eval(), hf.eval()


def token_ids(seed: int, batch: int = 2, length: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_run(hf, ids, mask=None):
    """transformers' forward with hidden states, attentions and each block's attention and MLP outputs."""
    outputs = {"attention": [], "mlp": []}
    handles = [layer.self_attn.register_forward_hook(lambda m, args, out: outputs["attention"].append(out[0]))
               for layer in hf.model.layers]
    handles += [layer.mlp.register_forward_hook(lambda m, args, out: outputs["mlp"].append(out))
                for layer in hf.model.layers]
    # positions as ours count them: from each sequence's first real token (left padding)
    positions = None if mask is None else (mask.cumsum(dim=1) - 1).clamp(min=0)
    try:
        result = hf(ids, attention_mask=mask, position_ids=positions, output_hidden_states=True,
                    output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    return result, torch.stack(outputs["attention"]), torch.stack(outputs["mlp"])  # [L, B, T, D] each


# ----------------------------------------------------------------------------- the hand-written reference

def reference_layer(hf, window: int | None, states: torch.Tensor, layer: int, position: int, real: torch.Tensor):
    """One layer recomputed from the raw weights in float64, for the query at `position` of every sequence.

    window: the sliding window (None: none). states: H[layer] [B, T, D]; real: [B, T] bool (False = left
    padding). Returns the attention probabilities
    [B, heads, T], the attention output [B, D] and the MLP output [B, D].
    """
    config = hf.config
    block = hf.model.layers[layer]
    weight = {name: p.double() for name, p in block.named_parameters()}
    heads, kv_heads, hd = config.num_attention_heads, config.num_key_value_heads, config.hidden_size // config.num_attention_heads

    def rms_norm(x, scale):
        return scale * x / torch.sqrt((x * x).mean() + config.rms_norm_eps)

    def rotate(vector, pos):  # RoPE, rotate-half layout: dimension i turns with dimension i + hd/2
        out = vector.clone()
        for i in range(hd // 2):
            angle = pos / TINY["rope_theta"] ** (2 * i / hd)
            a, b = vector[i], vector[i + hd // 2]
            out[i], out[i + hd // 2] = a * math.cos(angle) - b * math.sin(angle), b * math.cos(angle) + a * math.sin(angle)
        return out

    B, T, D = states.shape
    probabilities = torch.zeros(B, heads, T, dtype=torch.float64)
    attention_out = torch.zeros(B, D, dtype=torch.float64)
    mlp_out = torch.zeros(B, D, dtype=torch.float64)
    for b in range(B):
        rope_pos = [int(real[b, :t + 1].sum()) - 1 for t in range(T)]
        x = [rms_norm(states[b, t].double(), weight["input_layernorm.weight"]) for t in range(T)]
        mixed = torch.zeros(heads * hd, dtype=torch.float64)
        for h in range(heads):
            g = h // (heads // kv_heads)  # the key/value head this query head reads
            wq = weight["self_attn.q_proj.weight"][h * hd:(h + 1) * hd]
            wk = weight["self_attn.k_proj.weight"][g * hd:(g + 1) * hd]
            wv = weight["self_attn.v_proj.weight"][g * hd:(g + 1) * hd]
            q = rotate(wq @ x[position], rope_pos[position])
            keys = [t for t in range(position + 1) if real[b, t] and (window is None or t > position - window)]
            scores = {t: float(q @ rotate(wk @ x[t], rope_pos[t])) / math.sqrt(hd) for t in keys}
            top = max(scores.values())
            total = sum(math.exp(s - top) for s in scores.values())
            for t in keys:
                probabilities[b, h, t] = math.exp(scores[t] - top) / total
                mixed[h * hd:(h + 1) * hd] += probabilities[b, h, t] * (wv @ x[t])
        attention_out[b] = weight["self_attn.o_proj.weight"] @ mixed
        n = rms_norm(states[b, position].double() + attention_out[b], weight["post_attention_layernorm.weight"])
        gate = weight["mlp.gate_proj.weight"] @ n
        mlp_out[b] = weight["mlp.down_proj.weight"] @ (gate * torch.sigmoid(gate) * (weight["mlp.up_proj.weight"] @ n))
    return probabilities, attention_out, mlp_out


# ----------------------------------------------------------------------------- logit lens

@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_logit_lens_matches_transformers_hidden_states_through_its_norm_and_head(name):
    ours, hf = tiny_pair(name)
    ids = token_ids(1)
    _, states = ours(ids, output_hidden_states=True)
    hf_states = hf(ids, output_hidden_states=True).hidden_states  # [L] is after the final norm
    L = ours.config.num_layers
    for position in (-1, 5):
        lens = logit_lens(ours, states, position)
        assert lens.shape == (L + 1, 2, VOCAB)
        expected = [hf.lm_head(hf.model.norm(hf_states[j][:, position])) for j in range(L)]
        expected.append(hf.lm_head(hf_states[L][:, position]))
        torch.testing.assert_close(lens, torch.stack(expected).softmax(dim=-1), rtol=0, atol=ATOL)
    # the top layer's reading is the model's own prediction
    torch.testing.assert_close(logit_lens(ours, states)[L], ours(ids)[:, -1].softmax(dim=-1), rtol=0, atol=ATOL)


def test_token_rank_counts_the_tokens_ranked_above():
    probabilities = torch.rand(4, 3, 50, generator=torch.Generator().manual_seed(0))
    tokens = torch.tensor([7, 0, 49])
    ranks = token_rank(probabilities, tokens)
    assert ranks.shape == (4, 3)
    for layer in range(4):
        for row, token in enumerate(tokens.tolist()):
            order = probabilities[layer, row].argsort(descending=True).tolist()
            assert ranks[layer, row] == order.index(token)
    top = probabilities.argmax(dim=-1)
    assert (token_rank(probabilities, top) == 0).all()
    assert (token_rank(probabilities[:, 0], 7) == ranks[:, 0]).all()  # one id for every row


# ----------------------------------------------------------------------------- attention probabilities

@pytest.mark.parametrize("name", list(CONFIGS))
def test_attention_probabilities_match_transformers_output_attentions(name):
    ours, hf = tiny_pair(name)
    ids = token_ids(2)
    _, states = ours(ids, output_hidden_states=True)
    expected = torch.stack(hf(ids, output_attentions=True).attentions)  # [L, B, heads, T, T]
    T = ids.shape[1]
    got = torch.stack([attention_probabilities(ours, states, position) for position in range(T)], dim=3)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, rtol=0, atol=ATOL)
    assert (got[..., -1, :] - got[..., -1, :].mean(dim=-1, keepdim=True)).abs().max() > 0.05  # not uniform


def test_sliding_window_reads_only_the_last_w_keys():
    ours, hf = tiny_pair("mistral-window")
    window = hf.config.sliding_window
    _, states = ours(token_ids(3), output_hidden_states=True)
    probabilities = attention_probabilities(ours, states, position=15)  # [L, B, heads, T]
    assert (probabilities[..., : 15 - window + 1] == 0).all()
    assert (probabilities[..., 15 - window + 1: 16] > 0).all()
    assert (probabilities[..., 16:] == 0).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_left_padded_batch_matches_transformers_and_each_sequence_alone(name):
    ours, hf = tiny_pair(name)
    sequences = [token_ids(s, batch=1, length=n)[0].tolist() for s, n in ((4, 18), (5, 7), (6, 12))]
    ids, mask = left_pad(sequences, pad_id=0)
    _, states = ours(ids, mask, output_hidden_states=True)
    hf_result, hf_attention, hf_mlp = hf_run(hf, ids, mask)
    probabilities = attention_probabilities(ours, states, -1, mask)
    torch.testing.assert_close(probabilities, torch.stack(hf_result.attentions)[..., -1, :], rtol=0, atol=ATOL)
    norms = layer_norms(ours, states, -1, mask)
    torch.testing.assert_close(norms.attention, hf_attention[:, :, -1].norm(dim=-1), **NORM_TOL)
    torch.testing.assert_close(norms.mlp, hf_mlp[:, :, -1].norm(dim=-1), **NORM_TOL)
    for row, sequence in enumerate(sequences):
        _, alone = ours(torch.tensor([sequence]), output_hidden_states=True)
        single = attention_probabilities(ours, alone)
        torch.testing.assert_close(probabilities[:, row, :, -len(sequence):], single[:, 0], rtol=0, atol=ATOL)
        assert (probabilities[:, row, :, : -len(sequence)] == 0).all()  # padding is never read
        alone_norms = layer_norms(ours, alone)
        torch.testing.assert_close(norms.attention[:, row], alone_norms.attention[:, 0], **NORM_TOL)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_one_layer_matches_the_hand_written_reference(name):
    ours, hf = tiny_pair(name)
    sequences = [token_ids(7, batch=1, length=16)[0].tolist(), token_ids(8, batch=1, length=11)[0].tolist()]
    ids, mask = left_pad(sequences, pad_id=0)
    _, states = ours(ids, mask, output_hidden_states=True)
    for layer, position in ((0, 15), (2, 15), (1, 9)):
        got = layer_attention(ours, states, layer, position, mask)
        probabilities, attention_out, mlp_out = reference_layer(hf, CONFIGS[name][1].get("sliding_window"), states[layer], layer, position,
                                                                    mask.bool())
        torch.testing.assert_close(got.probabilities.double(), probabilities, rtol=0, atol=ATOL)
        torch.testing.assert_close(got.output.double(), attention_out, rtol=0, atol=ATOL)
        if position == 15:  # the last position: layer_norms reads the same layer
            norms = layer_norms(ours, states, position, mask)
            torch.testing.assert_close(norms.attention[layer].double(), attention_out.norm(dim=-1), **NORM_TOL)
            torch.testing.assert_close(norms.mlp[layer].double(), mlp_out.norm(dim=-1), **NORM_TOL)


# ----------------------------------------------------------------------------- per-layer norms

@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_layer_norms_match_transformers_block_outputs(name):
    ours, hf = tiny_pair(name)
    ids = token_ids(9)
    _, states = ours(ids, output_hidden_states=True)
    _, hf_attention, hf_mlp = hf_run(hf, ids)
    for position in (-1, 4):
        norms = layer_norms(ours, states, position)
        torch.testing.assert_close(norms.residual, states[:-1, :, position].norm(dim=-1), rtol=0, atol=0)
        torch.testing.assert_close(norms.attention, hf_attention[:, :, position].norm(dim=-1), **NORM_TOL)
        torch.testing.assert_close(norms.mlp, hf_mlp[:, :, position].norm(dim=-1), **NORM_TOL)


@pytest.mark.parametrize("kind, k", [(None, 3), ("freeze", 1), ("random", 1), ("freeze", 2)])
def test_attention_and_mlp_outputs_add_up_to_the_next_state(kind, k):
    """H[j+1] - H[j] = attention + MLP at the last position, also when previous tokens are manipulated."""
    ours, _ = tiny_pair("llama-gqa")
    ids = token_ids(10)
    manipulation = None if kind is None else Manipulation(kind, k)
    _, states = ours(ids, manipulation=manipulation, output_hidden_states=True)
    for j, block in enumerate(ours.layers):
        attention_output = layer_attention(ours, states, j).output
        mlp_output = block.mlp(block.post_attention_layernorm(states[j][:, -1] + attention_output))
        torch.testing.assert_close(states[j + 1][:, -1] - states[j][:, -1], attention_output + mlp_output,
                                   **NORM_TOL)
    norms = layer_norms(ours, states)
    step = (states[1:, :, -1] - states[:-1, :, -1]).norm(dim=-1)
    assert (step <= norms.attention + norms.mlp + ATOL).all()  # the triangle inequality, as a cross-check


def test_bad_positions_and_layers_are_refused():
    ours, _ = tiny_pair("llama-gqa")
    _, states = ours(token_ids(11, length=6), output_hidden_states=True)
    with pytest.raises(ValueError, match="position 6 is outside a sequence of 6 tokens"):
        logit_lens(ours, states, 6)
    with pytest.raises(ValueError, match="position -7"):
        attention_probabilities(ours, states, -7)
    with pytest.raises(ValueError, match="layer 3 is outside 0..2"):
        layer_attention(ours, states, 3)
    with pytest.raises(ValueError, match="position 9"):
        layer_norms(ours, states, 9)
    with pytest.raises(ValueError, match="attention_mask has shape"):
        layer_norms(ours, states, -1, torch.ones(2, 5))
