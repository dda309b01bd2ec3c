"""The real embedded model: our loader and decoder against transformers.LlamaForCausalLM on the same folder."""

import pytest
import torch
import transformers

from minillm.checkpoint import load_model
from minillm.generate import generate_tokens, left_pad
from minillm.tokenizer import load_tokenizer

PROMPTS = [
    "The capital of France is",
    "Q: What is the capital of Spain?\nA: Madrid\nQ: What is the capital of Italy?\nA:",
    "def fibonacci(n):\n    ",
    "In 1969, the first humans walked on the Moon. The mission was called",
]


@pytest.fixture(scope="module")
def models(smollm2_dir):
    hf = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return load_model(smollm2_dir), hf, load_tokenizer(smollm2_dir)


def test_logits_match_transformers_on_several_prompts(models):
    ours, hf, tokenizer = models
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = torch.tensor([tokenizer.encode(prompt)])
            assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4, prompt


def test_left_padded_batch_matches_transformers_per_sequence(models):
    ours, hf, tokenizer = models
    sequences = [tokenizer.encode(p) for p in PROMPTS]
    ids, mask = left_pad(sequences, tokenizer.pad_id)
    with torch.no_grad():
        batched = ours(ids, mask)
        for row, seq in enumerate(sequences):
            expected = hf(torch.tensor([seq])).logits[0]
            assert (batched[row, -len(seq):] - expected).abs().max().item() <= 1e-3


@pytest.mark.slow
def test_greedy_continuations_are_identical_to_transformers_generate(models):
    ours, hf, tokenizer = models
    sequences = [tokenizer.encode(p) for p in PROMPTS]
    ours_tokens = generate_tokens(ours, sequences, 12).tokens  # batched, cached
    with torch.no_grad():
        for seq, got in zip(sequences, ours_tokens):
            expected = hf.generate(torch.tensor([seq]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                   pad_token_id=tokenizer.pad_id, eos_token_id=None)[0, len(seq):].tolist()
            assert got == expected
