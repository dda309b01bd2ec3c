"""No host round-trips inside a decode step's forward, and one per step in the generation loop.

On a GPU, reading a value back to the host (`.item()`, `.tolist()`, `.cpu()`, `if tensor:`, an op whose
output size depends on values) makes the host wait until the device has caught up, so it cannot queue
the next kernels. On the CPU these calls cost nothing, but they are the same calls: this test counts
them on a tiny model, at the two levels where they show (the counter lives here rather than in the
library because only tests and benchmarks need it; `benchmarks/bench_ops.py` has a fuller one that
also counts ops):

- Python calls, with a TorchFunctionMode (on the CPU `.tolist()` and `.cpu()` dispatch no ATen op);
- ATen ops, with a TorchDispatchMode: `_local_scalar_dense` (behind `.item()` and `bool()`), and the
  ops with a data-dependent output size (nonzero, unique, indexing with a boolean mask).

Agreed budget: 0 in the forward of a decode step, for every kind, and in a packed decode step (`minillm.packed`);
1 per step of `generate_tokens` (the
chosen tokens, read once for the stop checks and the caller's `on_token`).
"""

from collections import Counter

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from minillm.config import ModelConfig
from minillm.generate import PromptStates, generate_tokens, new_cache, start
from minillm.manipulation import KINDS, Manipulation
from minillm.model import KVCache, Transformer
from minillm.packed import PACKED_KINDS, PackedRuns

HOST_READS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 5]]  # different lengths: left padding is exercised
LAYERS, K = 4, 2


class PythonReads(TorchFunctionMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in HOST_READS:
            self.counts[f".{func.__name__}()"] += 1
        return func(*args, **(kwargs or {}))


class DeviceReads(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts["_local_scalar_dense"] += 1
        elif torch.Tag.dynamic_output_shape in func.tags and not (
                func is torch.ops.aten.index.Tensor
                and not any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])):
            self.counts[f"data-dependent {func.__name__}"] += 1
        return func(*args, **(kwargs or {}))


def host_reads(call) -> Counter:
    counts = Counter()
    with PythonReads(counts), DeviceReads(counts):
        call()
    return counts


# A short context, and Mistral-7B's layout: 32768 positions (random's noise must not need the host there
# either: its table is sized by what a generation needs, which the host knows) and a sliding window, here
# short enough to cut in.
@pytest.fixture(scope="module", params=[(128, None), (32768, 4)], ids=["context 128", "context 32768, window 4"])
def model(request):
    context, window = request.param
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=50, hidden_size=32, intermediate_size=64,
                         num_layers=LAYERS, num_heads=4, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-5,
                         rope_theta=10000.0, max_position_embeddings=context, sliding_window=window)
    torch.manual_seed(0)
    return Transformer(config).eval().requires_grad_(False)


def manipulation_of(kind: str) -> Manipulation | None:
    if kind == "baseline":
        return None
    if kind == "swap":
        return Manipulation("swap", K, positions=(1,), vectors=torch.randn(1, 32))
    return Manipulation(kind, K)


CASES = [("baseline", False)] + [(kind, False) for kind in KINDS] + [("freeze", True), ("skip_attention", True)]


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kind,efficient", CASES)
def test_a_decode_steps_forward_reads_nothing_back(model, kind, efficient, static):
    manipulation = manipulation_of(kind)
    layers = LAYERS if manipulation is None else manipulation.cache_layers(LAYERS, efficient)
    ids = torch.tensor([[0, 0, 0, 0, 5, 6, 7], [1, 2, 3, 4, 5, 6, 7]])
    cache = new_cache(model, 2, 12, layers, static)
    model(ids, ids > 0, cache=cache, manipulation=manipulation, last_logits_only=True, efficient=efficient)
    token = torch.tensor([[9], [8]])
    def step():
        return model(token, cache=cache, manipulation=manipulation, last_logits_only=True, efficient=efficient,
                     checked=True)

    step()  # the first use of a seed makes its noise table
    assert host_reads(step) == Counter()


@pytest.mark.parametrize("mode", ["cached", "faithful"])
@pytest.mark.parametrize("kind,efficient", CASES)
def test_a_generation_step_reads_the_chosen_tokens_once(model, kind, efficient, mode):
    manipulation = manipulation_of(kind)

    def generation(new_tokens):
        return lambda: generate_tokens(model, PROMPTS, new_tokens, manipulation=manipulation, mode=mode,
                                       efficient=efficient)

    generation(1)()
    runs = {n: host_reads(generation(n)) for n in (3, 4)}
    one_step = runs[4] - runs[3]
    assert one_step == Counter({".tolist()": 1}), one_step


def test_a_forward_with_a_given_mask_checks_it_once(model):
    """Without `checked`, the mask's check is the forward's one read (negative control for the counter)."""
    ids = torch.tensor([[0, 5, 6], [1, 2, 3]])
    assert host_reads(lambda: model(ids, ids > 0)) == Counter({".__bool__()": 1, "_local_scalar_dense": 1})
    assert host_reads(lambda: model(ids)) == Counter()


@pytest.mark.parametrize("kind", PACKED_KINDS)
def test_a_packed_decode_step_reads_nothing_back(model, kind):
    manipulations = [Manipulation(kind, 1), Manipulation(kind, K), None]
    states = PromptStates.compute(model, PROMPTS, 4)
    runs = [start(model, PROMPTS, 4, pad_id=0, manipulation=manipulation, mode="cached", prompt_states=states,
                  efficient=True)[0] for manipulation in manipulations]
    cache = KVCache.concatenate([run.cache for run in runs], model.config, torch.float32, "cpu")
    packed = PackedRuns.of(manipulations, len(PROMPTS), LAYERS)
    token = torch.tensor([9, 8] * len(manipulations))
    packed.decode_step(model, cache, token)  # the first use of a seed makes its noise table
    assert host_reads(lambda: packed.decode_step(model, cache, token)) == Counter()
