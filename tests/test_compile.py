"""The compiled decode step (`generate_tokens(compile=True)`) gives the eager tokens, and logits within 1e-5,
in every kind; all the steps of a generation run one graph, compiled for fixed shapes.

torch.compile on the CPU generates C++ and needs a compiler; without one the tests are skipped. Compiling
takes seconds per kind on a tiny model. Each (manipulation, batch size, cache length) compiles its own
graph. The prompts have different lengths (left padding), and a stop token ends one sequence early (the
compiled step keeps its row: its shapes do not change).
"""

import os
import shutil

import pytest
import torch
from torch._dynamo.utils import counters

from minillm.generate import STATIC_LENGTH_MULTIPLE, PromptStates, generate_tokens, new_cache
from minillm.manipulation import Manipulation

from tiny_checkpoint import tiny_model

pytestmark = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                reason="torch.compile on the CPU needs a C++ compiler ($CXX, or g++; none on PATH)")

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5], [1, 2, 3, 4, 5, 6, 7, 8, 9]]
NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(autouse=True)
def fresh_compile_cache():
    """torch compiles one function at most `recompile_limit` (8) times, and every model shares `layer_stack`'s
    code: each test starts without the graphs of the others."""
    torch._dynamo.reset()


def graphs_compiled() -> int:
    return counters["stats"]["unique_graphs"]


CASES = {
    "baseline": (None, False),
    "random": (Manipulation("random", 1, seed=3), False),
    "freeze": (Manipulation("freeze", 1), False),
    "swap": (Manipulation("swap", 1, positions=(0, 2), vectors=torch.randn(2, 32)), False),
    "skip_attention": (Manipulation("skip_attention", 1), False),
    "skip_attention sparing 2, window 1": (Manipulation("skip_attention", 1, spare_first=2, window=1), False),
    "freeze, efficient": (Manipulation("freeze", 2), True),
    "skip_attention, efficient": (Manipulation("skip_attention", 1), True),
}


@pytest.mark.parametrize("case", CASES)
def test_compiled_decode_equals_eager(model, case):
    manipulation, efficient = CASES[case]
    def run(**options):
        return generate_tokens(model, PROMPTS, NEW_TOKENS, manipulation=manipulation, return_logits=True,
                               efficient=efficient, **options)

    stop = run().tokens[1][3]  # the second sequence stops after 4 tokens
    eager = run(eos_ids=[stop])
    before = graphs_compiled()
    compiled = run(eos_ids=[stop], compile=True)
    assert compiled.tokens == eager.tokens
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=0, atol=1e-5, equal_nan=True)
    assert graphs_compiled() == before + 1  # one graph for all 9 decode steps


def test_the_compiled_step_has_fixed_shapes_on_a_sliding_window_model():
    """Prompts of other lengths reuse the graph when their cache rounds to the same length; the window
    (6 slots) cuts in after a few steps, which the static mask must apply."""
    model = tiny_model(sliding_window=6)
    manipulation = Manipulation("random", 1, seed=3)
    before = graphs_compiled()
    for prompts in (PROMPTS, [p[::-1] + [4] for p in PROMPTS]):
        eager = generate_tokens(model, prompts, NEW_TOKENS, manipulation=manipulation, return_logits=True)
        compiled = generate_tokens(model, prompts, NEW_TOKENS, manipulation=manipulation, return_logits=True,
                                   compile=True)
        assert compiled.tokens == eager.tokens
        torch.testing.assert_close(compiled.logits, eager.logits, rtol=0, atol=1e-5)
    assert graphs_compiled() == before + 1
    assert max(map(len, PROMPTS)) + 1 + NEW_TOKENS <= STATIC_LENGTH_MULTIPLE  # both calls: one cache length


@pytest.mark.parametrize("refused", ["faithful mode", "prompt states"])
def test_compile_needs_the_cached_mode_without_prompt_states(model, refused):
    options = ({"mode": "faithful"} if refused == "faithful mode"
               else {"prompt_states": PromptStates.compute(model, PROMPTS, NEW_TOKENS)})
    with pytest.raises(ValueError, match="compile"):
        generate_tokens(model, PROMPTS, NEW_TOKENS, compile=True, **options)


def test_the_compiled_layers_refuse_a_cache_that_grows(model):
    ids = torch.tensor([PROMPTS[0]])
    with pytest.raises(ValueError, match="static cache"):
        model(ids, cache=new_cache(model, 1, 16), compiled=True)
