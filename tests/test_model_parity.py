"""Our decoder against transformers on random tiny models, loaded through our real loader.

Each model is written by transformers' own `save_pretrained` (single file, sharded,
or legacy .bin) and read back by `minillm.checkpoint.load_model`, so these tests
cover config parsing, weight naming and loading as well as the numerics.
"""

import pytest
import torch
import transformers

from minillm.checkpoint import load_model
from minillm.generate import generate_tokens, left_pad
from minillm.model import KVCache, hf_hidden_states

VOCAB = 120
SMALL = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             max_position_embeddings=512, rms_norm_eps=1e-5)

CONFIGS = {
    "llama-mha": (transformers.LlamaConfig, dict(num_key_value_heads=4)),
    "llama-gqa": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
    # Yi-6B's shape of things: large rope theta, 4 kv heads
    "yi-like": (transformers.LlamaConfig, dict(num_attention_heads=8, num_key_value_heads=4, rope_theta=5e6)),
    "llama3-rope": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32})),
    "linear-rope": (transformers.LlamaConfig, dict(num_key_value_heads=2, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "tied": (transformers.LlamaConfig, dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "head-dim": (transformers.LlamaConfig, dict(num_key_value_heads=2, head_dim=32)),
    "mistral-window": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=7)),
}


def make_hf(name, seed=0, attention="sdpa", **overrides):
    config_class, extra = CONFIGS[name]
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**{**SMALL, **extra, **overrides}),
                                                          attn_implementation=attention)
    with torch.no_grad():  # larger than the default init so that differences are not hidden in tiny logits
        for p in model.parameters():
            p.normal_(0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return model.eval()


def save(model, folder, variant):
    if variant == "single":
        model.save_pretrained(folder)
    elif variant == "sharded":
        model.save_pretrained(folder, max_shard_size="40KB")
        assert (folder / "model.safetensors.index.json").is_file()
    else:  # transformers 5 no longer writes .bin: write the legacy file as older versions did
        model.save_pretrained(folder)
        (folder / "model.safetensors").unlink()
        torch.save(model.state_dict(), folder / "pytorch_model.bin")
    return folder


def token_batch(seed=1, batch=2, length=40):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("attention", ["sdpa", "math"])
def test_fp32_logits_match_transformers(tmp_path, name, attention):
    """Our SDPA path against HF's SDPA, our explicit math path against HF's eager one."""
    hf = make_hf(name, attention="eager" if attention == "math" else "sdpa")
    ours = load_model(save(hf, tmp_path, "single"))
    ours.set_attention(attention)
    ids = token_batch()
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", ["sharded", "bin"])
def test_sharded_and_bin_checkpoints_match_transformers(tmp_path, variant):
    hf = make_hf("llama-gqa")
    ours = load_model(save(hf, tmp_path, variant))
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, rtol=0, atol=1e-5)


def test_hidden_states_follow_our_convention_and_the_hf_helper(tmp_path):
    hf = make_hf("llama-gqa")
    ours = load_model(save(hf, tmp_path, "single"))
    ids = token_batch(batch=1)
    with torch.no_grad():
        expected = torch.stack(hf(ids, output_hidden_states=True).hidden_states)
        _, states = ours(ids, output_hidden_states=True)
    assert states.shape == (SMALL["num_hidden_layers"] + 1, 1, 40, SMALL["hidden_size"])
    # H[0..L-1] are the inputs of the layers, identical to HF's; only the last entry differs (HF applies the final norm)
    torch.testing.assert_close(states[:-1], expected[:-1], rtol=0, atol=1e-5)
    assert not torch.allclose(states[-1], expected[-1], atol=1e-3)
    torch.testing.assert_close(hf_hidden_states(ours, states), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_as_close_to_fp32_as_transformers_is(tmp_path, name, dtype):
    """Half-precision logits cannot match exactly; ours must stay within 1.5x of HF's own error (plus a floor)."""
    hf = make_hf(name)
    folder = save(hf, tmp_path, "single")
    ours = load_model(folder, dtype=dtype)
    assert all(p.dtype == dtype for p in ours.parameters())
    hf_half = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    ids = token_batch()
    with torch.no_grad():
        reference = hf(ids).logits
        hf_error = (hf_half(ids).logits.float() - reference).abs().max().item()
        our_error = (ours(ids).float() - reference).abs().max().item()
    assert our_error <= 1.5 * hf_error + 0.02, (our_error, hf_error)


def test_sliding_window_changes_logits_and_is_exactly_w_keys(tmp_path):
    """Negative control: windows of W-1 and W+1 give different logits, so the W match above is not luck."""
    window = CONFIGS["mistral-window"][1]["sliding_window"]
    ids = token_batch(length=30)
    logits = {}
    for w in (window - 1, window, window + 1):
        folder = tmp_path / f"w{w}"
        ours = load_model(save(make_hf("mistral-window", sliding_window=w), folder, "single"))
        with torch.no_grad():
            logits[w] = ours(ids)
    # positions before the window fills are unaffected; after that each window size differs
    torch.testing.assert_close(logits[window - 1][:, : window - 1], logits[window][:, : window - 1])
    assert (logits[window - 1][:, window:] - logits[window][:, window:]).abs().max() > 1e-3
    assert (logits[window + 1][:, window + 1:] - logits[window][:, window + 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("attention", ["sdpa", "math"])
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_kv_cache_decoding_equals_full_recomputation(tmp_path, name, attention):
    # single-query steps pack the query heads of each key/value head (no repeat_interleave): same logits
    ours = load_model(save(make_hf(name), tmp_path, "single"))
    ours.set_attention(attention)
    ids = token_batch(batch=2, length=24)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache(ours.config, batch_size=2, max_length=24)
        prefill = ours(ids[:, :10], cache=cache)
        steps = [ours(ids[:, t:t + 1], cache=cache) for t in range(10, 24)]
    incremental = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(incremental, full, rtol=0, atol=1e-4)


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-window"])
def test_left_padded_batch_gives_each_sequence_its_own_logits(tmp_path, name):
    ours = load_model(save(make_hf(name), tmp_path, "single"))
    sequences = [token_batch(seed=s, batch=1, length=n)[0].tolist() for s, n in ((1, 25), (2, 9), (3, 17))]
    ids, mask = left_pad(sequences, pad_id=0)
    with torch.no_grad():
        batched = ours(ids, mask)
        for row, seq in enumerate(sequences):
            alone = ours(torch.tensor([seq]))
            torch.testing.assert_close(batched[row, -len(seq):], alone[0], rtol=0, atol=1e-5)


def test_greedy_generation_matches_transformers_generate(tmp_path):
    hf = make_hf("llama-gqa")
    ours = load_model(save(hf, tmp_path, "single"))
    prompt = token_batch(batch=1, length=12)
    with torch.no_grad():
        expected = hf.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20,
                               pad_token_id=0, eos_token_id=None)[0, 12:].tolist()
    for mode in ("cached", "faithful"):
        assert generate_tokens(ours, [prompt[0].tolist()], 20, mode=mode).tokens[0] == expected
