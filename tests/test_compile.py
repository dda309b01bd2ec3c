"""The compiled decode step (`generate_tokens(compile=True)`) gives the eager tokens, and logits within 1e-5.

torch.compile on the CPU generates C++ and needs a compiler; without one the test is skipped. Compiling
takes about a minute on a loaded 2-CPU machine, so one small model and one manipulation only: random,
whose decode step carries the most (the cached re-pass of `recache_newest_as_noise`), with prompts of
different lengths (left padding) and a shrinking batch (a stop token ends one sequence early).
"""

import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from minillm.config import ModelConfig
from minillm.generate import generate_tokens
from minillm.manipulation import Manipulation
from minillm.model import Transformer

pytestmark = pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                                reason="torch.compile on the CPU needs a C++ compiler (none on PATH)")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9]]


@pytest.fixture(scope="module")
def model():
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=60, hidden_size=32, intermediate_size=64,
                         num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=128)
    torch.manual_seed(0)
    model = Transformer(config).eval().requires_grad_(False)
    for p in model.parameters():
        p.normal_(0, 0.3)
    return model


def test_compiled_decode_equals_eager(model):
    manipulation = Manipulation("random", 1, seed=3)
    eager = generate_tokens(model, PROMPTS, 10, manipulation=manipulation, return_logits=True)
    stop = eager.tokens[1][3]  # the second sequence stops after 4 tokens: the batch shrinks
    eager = generate_tokens(model, PROMPTS, 10, manipulation=manipulation, return_logits=True, eos_ids=[stop])
    captured = counters["stats"]["calls_captured"]
    compiled = generate_tokens(model, PROMPTS, 10, manipulation=manipulation, return_logits=True, eos_ids=[stop],
                               compile=True)
    assert compiled.tokens == eager.tokens
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=0, atol=1e-5, equal_nan=True)
    assert counters["stats"]["calls_captured"] > captured  # the compiled forward did run
    assert model.compiled_forward() is model.compiled_forward()  # compiled once, then kept
