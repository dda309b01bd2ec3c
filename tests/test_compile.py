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


@pytest.mark.skipif(not (torch.backends.mkldnn.is_available() and torch.backends.mkl.is_available()),
                    reason="inductor packs fp32 weights with MKL and oneDNN")
def test_on_the_cpu_the_compiled_matmuls_read_packed_weights():
    """The weights are frozen into the graph: no plain `mm` on a weight is left in its code (oneDNN's or MKL's
    linear on a packed copy instead), and the logits stay within 1e-5 of eager's."""
    from torch._inductor.utils import run_and_get_code

    model = tiny_model()
    eager = generate_tokens(model, PROMPTS, NEW_TOKENS, return_logits=True)
    compiled, code = run_and_get_code(generate_tokens, model, PROMPTS, NEW_TOKENS, return_logits=True, compile=True)
    code = "\n".join(code)
    assert "extern_kernels.mm(" not in code and "extern_kernels.addmm(" not in code
    assert "_frozen_param" in code
    assert compiled.tokens == eager.tokens
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=0, atol=1e-5)


def test_weights_changed_after_compiling_are_refused():
    """The CPU's compiled step keeps its own copy of the weights: a change made in place afterwards would go
    unseen, so the next compiled call refuses to run; a model loaded anew compiles with its own weights."""
    model = tiny_model()
    generate_tokens(model, PROMPTS, 2, compile=True)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.weight.mul_(2)
    with pytest.raises(RuntimeError, match="weights changed in place .* load the model again"):
        generate_tokens(model, PROMPTS, 2, compile=True)

    other = tiny_model()  # same shapes, other weights: its own graph, not the first model's frozen one
    with torch.no_grad():
        other.layers[1].mlp.down_proj.weight.mul_(2)
    eager = generate_tokens(other, PROMPTS, NEW_TOKENS, return_logits=True)
    compiled = generate_tokens(other, PROMPTS, NEW_TOKENS, return_logits=True, compile=True)
    torch.testing.assert_close(compiled.logits, eager.logits, rtol=0, atol=1e-5)
