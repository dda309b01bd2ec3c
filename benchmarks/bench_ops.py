"""Ops dispatched, and host round-trips, per decode step of a 32-layer Llama-7B-shaped model.

Why count ops
    A decode step does little arithmetic per op, so on a GPU each op costs its launch (several
    microseconds on the host) more than its work: the number of kernel-launching ops per step
    decides the decode speed. A host round-trip (`.item()`, `.tolist()`, `.cpu()`, `if tensor:`)
    makes the host wait for the device, which stops it from queueing the next kernels.

What is counted
    The Llama-2-7B layout (32 layers, 32 heads; 32 key/value heads, and a GQA variant with 8),
    but narrow: hidden 256 (head_dim 8), MLP 688, vocabulary 1000, random weights. Which ops run
    depends on the layer count, the head layout and the code path, not on the widths, so the
    counts are those of the 7B model while the run takes seconds on a CPU. (One caveat: on CUDA,
    torch's attention picks its kernel from the shapes too; `--device cuda` counts there.)

    For each kind (baseline, random, freeze, swap, skip_attention at k = 16; freeze and
    skip_attention also with `efficient=True`, as sweeps run them), fp32 and bf16, batch 1 and 8:
    one decode step of `generate_tokens(mode="cached")`, the public API, so this keeps working
    when the model's internals change. A step is the difference between the counts of a
    generation with n + 1 and with n new tokens (the prefill and the first steps cancel); it is
    checked to be the same for n = 2 and n = 3. Everything of the step is in it: the forward,
    the choice of the token, and the loop's bookkeeping.

How it is counted
    Two interposition layers of torch, used together:

    TorchDispatchMode (torch.utils._python_dispatch) sees every ATen op that reaches the
        dispatcher below autograd, after composite ops are decomposed: what actually runs, so
        it gives the op counts. An op is a *view* (metadata only, no kernel) when its schema
        returns an alias of its input (`OpOverload.is_view`: view, transpose, slice, expand, ...),
        or *allocation only* (empty, empty_strided); every other op launches a kernel.
        `aten._unsafe_view` is a view too, though not tagged as one. `aten._local_scalar_dense`
        (what `.item()` and `bool(tensor)` run) is a device-to-host
        read; ops with a data-dependent output size (nonzero, unique, masked_select, indexing
        with a boolean mask) must read their result's size on the host, so they sync too.
        Copies between host and device memory (`_to_copy`, `copy_`) are counted each way; on a
        CPU run there are none to see, since host and device are the same memory.
    TorchFunctionMode (torch.overrides) sees the Python-level calls. It is needed for host
        round-trips, because on the CPU `.cpu()` and `.tolist()` of a CPU tensor dispatch no
        ATen op at all: counted are `.item()`, `.tolist()`, `.cpu()`, `.numpy()`,
        `bool/int/float/index(tensor)`, and `.to(...)`/`.copy_` from another device to the CPU.
        On a CPU run these are the calls that *would* be round-trips with the model on a GPU.

    Each counted event is attributed to the first line of code outside torch that caused it
    (file:line), which is listed for the host round-trips.

    On a GPU, RMSNorm launches fewer kernels than on the CPU. `F.rms_norm` of an fp32 tensor runs the
    textbook ops on the CPU (pow, mean, add, rsqrt, mul: 5 kernels) and one fused kernel on CUDA
    (`_fused_rms_norm`; checked with torch 2.11's CUDA build, where a fake CUDA tensor dispatches exactly that
    one op). TorchFunctionMode sees each `F.rms_norm` call, so the kernel-launching ops inside the calls are
    counted apart, and the column "as on CUDA" counts each call as the one kernel it is there. The other
    op that dispatches differently is a decode step's attention: one kernel on the CPU (torch's CPU flash
    kernel), and on CUDA one of its fused kernels (flash, memory-efficient or cuDNN attention, whichever
    torch picks for the shapes), which may first copy a mask into an aligned buffer (an op or two more).
    `--device cuda` counts all of it on the device itself.

Run
    python benchmarks/bench_ops.py                       # the tables, on the CPU (a few minutes)
    python benchmarks/bench_ops.py --out docs/benchmarks/ops_before.md
    python benchmarks/bench_ops.py --device cuda         # the same counts made on the GPU, and ms per step
    python benchmarks/bench_ops.py --compile --kv-heads 8 --batches 1    # also the compiled step, per kind
    python benchmarks/bench_ops.py --packed --kinds random,freeze,skip_attention  # also a packed step, per kind

A packed step (`--packed`: `generate_packed`)
    A sweep decodes the runs of one manipulation at many k together (minillm/packed.py). One run at each
    k = 2, 4, ..., 30 is packed, as `minillm sweep` packs a sweep over every other layer, and one step of the
    pack is counted (and timed) against one step of each of those runs decoded on its own.

The compiled step (`--compile`: `generate_tokens(compile=True)`)
    torch.compile cannot run under a dispatch mode, so its step is counted in two parts. The graph: the
    kernel calls in the `call()` of inductor's generated code for `layer_stack` (fused kernels, matmuls,
    attention; on a GPU the whole graph is one CUDA graph replay). Outside it: the eager bookkeeping of
    the step (mask, RoPE tables, edits, cache slots, token choice), counted as above with the graph
    replaced by a stub that makes the logits in one op, which stands for the graph's one launch.
"""

from __future__ import annotations

import argparse
import functools
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import common
import torch
from torch._inductor.utils import run_and_get_code
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from minillm.config import ModelConfig
from minillm.generate import PromptStates, generate_packed, generate_tokens
from minillm.manipulation import Manipulation
from minillm.model import Transformer
from minillm.packed import PACKED_KINDS

LAYERS, HEADS, K = 32, 32, 16
HIDDEN, MLP, VOCAB = 256, 688, 1000  # narrow stand-ins for 4096, 11008, 32000
PROMPT_TOKENS = 16
REPO = Path(__file__).resolve().parent.parent
THIS_FILE = str(Path(__file__).resolve())
TORCH_DIR = Path(torch.__file__).resolve().parent

ALLOCATION_ONLY = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}
# Views without the view tag: `_unsafe_view` (the reshape at the end of a matmul of a 3-D input, `F.linear`)
# returns its input's memory under a new shape, launching no kernel. (docs/benchmarks/ops_before.md and
# ops_after.md counted it as kernel-launching; docs/BENCHMARKS.md §7 recounts them this way.)
UNTRACKED_VIEWS = {"_unsafe_view"}
HOST_READ_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_device_argument(parser)
    parser.add_argument("--kv-heads", default="32,8", help="key/value head counts, comma-separated (default 32,8)")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="default float32,bfloat16")
    parser.add_argument("--batches", default="1,8", help="default 1,8")
    parser.add_argument("--time-steps", type=int, default=16,
                        help="also time this many decode steps per configuration (0: counts only; default 16)")
    parser.add_argument("--kinds", default=",".join(dict.fromkeys(case.kind for case in CASES)),
                        help="the cases of these kinds only, comma-separated (default: all)")
    parser.add_argument("--compile", action="store_true",
                        help="also count (and time) the compiled step of each case: one compile each")
    parser.add_argument("--packed", action="store_true",
                        help="also count (and time) a packed decode step of each packed kind: one run at every "
                             "other k, against those runs' own steps")
    parser.add_argument("--out", default=None, help="also write the tables as markdown to this file")
    args = parser.parse_args()
    unknown = set(args.kinds.split(",")) - {case.kind for case in CASES}
    if unknown:
        parser.error(f"--kinds: no case of kind {', '.join(sorted(unknown))}")
    return args


# ----------------------------------------------------------------------------- counting

@functools.cache
def project_file(filename: str) -> str | None:
    """The file's path in this repository, or None for torch's own files and this script."""
    path = Path(filename).resolve()
    if path.is_relative_to(TORCH_DIR) or str(path) == THIS_FILE:
        return None
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else filename


def caller() -> str:
    """file:line of the innermost frame outside torch and outside this file: the code that caused the event."""
    frame = sys._getframe(2)
    while frame is not None:
        name = project_file(frame.f_code.co_filename)
        if name is not None:
            return f"{name}:{frame.f_lineno} ({frame.f_code.co_name})"
        frame = frame.f_back
    return "?"


@dataclass
class Counts:
    ops: int = 0  # every ATen op dispatched
    launching: int = 0  # ops that run a kernel (not views, not bare allocations, not host reads)
    views: int = 0
    no_kernel: int = 0  # bare allocations (empty) and ops that return no tensor (promote_types)
    casts: int = 0  # dtype conversions (aten._to_copy to another dtype)
    scalar_reads: int = 0  # aten._local_scalar_dense: .item(), bool(tensor), ...
    data_dependent: int = 0  # ops whose output size depends on values (a sync on a GPU)
    host_reads: int = 0  # Python-level: .item(), .tolist(), .cpu(), bool(tensor), copies to the CPU
    norm_calls: int = 0  # Python-level: F.rms_norm calls
    norm_launching: int = 0  # kernel-launching ops inside F.rms_norm calls (one fused kernel each on CUDA)
    to_device: int = 0  # ATen copies from host memory to the device (only seen with --device cuda)
    to_host: int = 0  # ATen copies from the device to host memory (only seen with --device cuda)
    by_op: Counter = field(default_factory=Counter)
    host_read_sites: Counter = field(default_factory=Counter)
    launch_files: Counter = field(default_factory=Counter)

    def __sub__(self, other: Counts) -> Counts:
        return Counts(**{name: getattr(self, name) - getattr(other, name) for name in self.__dataclass_fields__})

    @property
    def launching_as_on_cuda(self) -> int:
        """Kernel-launching ops with each `F.rms_norm` call as the one fused kernel it runs on CUDA."""
        return self.launching - self.norm_launching + self.norm_calls


def returns_tensor(out) -> bool:
    if isinstance(out, (tuple, list)):
        return any(isinstance(o, torch.Tensor) for o in out)
    return isinstance(out, torch.Tensor)


def crossing(func, args, out) -> tuple[str | None, str | None]:
    """(source, target) device types of a copy op, (None, None) for other ops."""
    if func is torch.ops.aten._to_copy.default:
        return args[0].device.type, out.device.type
    if func is torch.ops.aten.copy_.default:
        return args[1].device.type, args[0].device.type
    return None, None


def is_data_dependent(func, args) -> bool:
    if torch.Tag.dynamic_output_shape not in func.tags:
        return False
    if func is torch.ops.aten.index.Tensor:  # integer indices are fine; a boolean mask needs its count
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1])
    return True


class DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: Counts):
        super().__init__()
        self.counts = counts
        self.in_norm = False  # set by CallCounter during an F.rms_norm call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        c = self.counts
        c.ops += 1
        c.by_op[func.__name__] += 1
        name = func._schema.name.split("::")[-1]
        if func.is_view or name in UNTRACKED_VIEWS:
            c.views += 1
        elif func is torch.ops.aten._local_scalar_dense.default:
            c.scalar_reads += 1
            c.host_read_sites[f"aten._local_scalar_dense at {caller()}"] += 1
        elif name in ALLOCATION_ONLY or not returns_tensor(out):  # e.g. aten.promote_types: host-side only
            c.no_kernel += 1
        else:
            c.launching += 1
            c.norm_launching += self.in_norm
            c.launch_files[caller().split(":")[0]] += 1
            if func is torch.ops.aten._to_copy.default and kwargs.get("dtype", args[0].dtype) != args[0].dtype:
                c.casts += 1
            source, target = crossing(func, args, out)
            if source == "cpu" and target != "cpu":
                c.to_device += 1
            elif source != "cpu" and target == "cpu":
                c.to_host += 1
                c.host_read_sites[f"copy to the host at {caller()}"] += 1
            if is_data_dependent(func, args):
                c.data_dependent += 1
                c.host_read_sites[f"data-dependent {name} at {caller()}"] += 1
        return out


def to_host(func, args, kwargs) -> bool:
    """A Python call that reads a tensor's values on the host."""
    name = getattr(func, "__name__", "")
    if name in HOST_READ_METHODS:
        return True
    if name in ("to", "copy_") and args and isinstance(args[0], torch.Tensor):
        source = args[1] if name == "copy_" else args[0]
        target = args[0] if name == "copy_" else next(
            (a for a in (*args[1:], kwargs.get("device")) if isinstance(a, (str, torch.device))), None)
        target_device = target.device if isinstance(target, torch.Tensor) else target
        return (target_device is not None and torch.device(target_device).type == "cpu"
                and isinstance(source, torch.Tensor) and source.device.type != "cpu")
    return False


class CallCounter(TorchFunctionMode):
    """Python-level calls: host reads, and `F.rms_norm` calls (whose ops the dispatch counter marks)."""

    def __init__(self, counts: Counts, dispatch: DispatchCounter):
        super().__init__()
        self.counts, self.dispatch = counts, dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if to_host(func, args, kwargs):
            self.counts.host_reads += 1
            self.counts.host_read_sites[f".{func.__name__}() at {caller()}"] += 1
        if func is not torch.nn.functional.rms_norm:
            return func(*args, **kwargs)
        self.counts.norm_calls += 1
        self.dispatch.in_norm = True
        try:
            return func(*args, **kwargs)
        finally:
            self.dispatch.in_norm = False


def count(call) -> Counts:
    counts = Counts()
    dispatch = DispatchCounter(counts)
    with CallCounter(counts, dispatch), dispatch:
        call()
    return counts


# ----------------------------------------------------------------------------- the model and the cases

def narrow_7b_model(kv_heads: int, dtype: torch.dtype, device: torch.device) -> Transformer:
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=HIDDEN,
                         intermediate_size=MLP, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=kv_heads,
                         head_dim=HIDDEN // HEADS, rms_norm_eps=1e-5, rope_theta=10000.0)
    torch.manual_seed(0)
    model = Transformer(config).to(device=device, dtype=dtype).eval()
    model.requires_grad_(False)
    return model


@dataclass(frozen=True)
class Case:
    kind: str  # "baseline" or a manipulation kind
    efficient: bool = False
    layer: int = K

    @property
    def name(self) -> str:
        return self.kind + (" (efficient)" if self.efficient else "")

    def manipulation(self, device: torch.device) -> Manipulation | None:
        if self.kind == "baseline":
            return None
        if self.kind == "swap":
            return Manipulation("swap", self.layer, positions=(1,), vectors=torch.randn(1, HIDDEN, device=device))
        return Manipulation(self.kind, self.layer)


CASES = [Case("baseline"), Case("random"), Case("freeze"), Case("freeze", True), Case("swap"),
         Case("skip_attention"), Case("skip_attention", True)]


def fixed_prompts(batch: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(1, VOCAB, (batch, PROMPT_TOKENS), generator=generator).tolist()


def decode(model, batch: int, case: Case, new_tokens: int, device: torch.device, compile: bool = False):
    """`generate_tokens` on fixed prompts (this and `decode_packed` are the only calls into minillm's generation:
    keep them in step with its API)."""
    prompts, manipulation = fixed_prompts(batch), case.manipulation(device)
    return lambda: generate_tokens(model, prompts, new_tokens, manipulation=manipulation, mode="cached",
                                   efficient=case.efficient, compile=compile)


# A pack as a sweep over every other layer makes it: one run at each of these k, decoded together.
PACKED_LAYERS = tuple(range(2, LAYERS, 2))


def decode_packed(model, batch: int, kind: str, new_tokens: int):
    """`generate_packed` of one run per k in PACKED_LAYERS over fixed prompts, from their prompt states, as
    `minillm sweep` runs a pack (efficient); the prompt states' pass is the same for every n, so it cancels in a
    step's difference."""
    prompts = fixed_prompts(batch)
    manipulations = [Manipulation(kind, k) for k in PACKED_LAYERS]
    return lambda: generate_packed(model, prompts, new_tokens, manipulations,
                                   PromptStates.compute(model, prompts, new_tokens), efficient=True)


def step_counts(generation) -> tuple[Counts, bool]:
    """Counts of one decode step, and whether two successive steps counted the same. `generation(n)` makes the
    call that generates n new tokens."""
    generation(2)()  # warm-up: one-time work (e.g. a seed's noise table) stays out of the counts
    runs = {n: count(generation(n)) for n in (2, 3, 4)}
    step, next_step = runs[3] - runs[2], runs[4] - runs[3]
    return step, (step.ops, step.launching, step.host_reads) == (next_step.ops, next_step.launching,
                                                                 next_step.host_reads)


def one_step(model, batch: int, case: Case, device: torch.device) -> tuple[Counts, bool]:
    return step_counts(lambda n: decode(model, batch, case, n, device))


# A kernel call in the `call()` of inductor's code: a fused kernel (C++ or Triton), an extern kernel (matmul)
# or an ATen op it falls back to (attention).
KERNEL_CALL = re.compile(r"^\s*(?:\w+ = )?(?:cpp_fused_\w+|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.\w+\.\w+"
                         r"(?:\.\w+)?)\(", re.MULTILINE)


def compiled_step(model, batch: int, case: Case, device: torch.device) -> tuple[int, Counts]:
    """The compiled step: (kernel calls in its graph, counts of the eager ops outside the graph)."""
    torch._dynamo.reset()  # a fresh compile, whose code we get to see
    _, code = run_and_get_code(decode(model, batch, case, 2, device, compile=True))
    graph_kernels = len(KERNEL_CALL.findall(code[-1][code[-1].index("def call("):]))

    def stub(x, *rest):  # the logits in one op, standing for the graph's one launch
        return x.new_zeros(x.shape[0], 1, VOCAB)

    model.compiled_layer_stack = lambda: stub  # shadows the method on this model only
    try:
        outside = count(decode(model, batch, case, 3, device, compile=True)) - count(
            decode(model, batch, case, 2, device, compile=True))
    finally:
        del model.compiled_layer_stack  # the method again
    return graph_kernels, outside


def packed_step(model, batch: int, kind: str, device: torch.device, time_steps: int) -> tuple:
    """A packed step against the same runs' own steps: (packed counts, steady, the runs' kernel-launching ops
    summed, packed ms, the runs' ms summed)."""
    packed_generation = functools.partial(decode_packed, model, batch, kind)  # (n) -> the call
    packed, steady = step_counts(packed_generation)
    alone = [Case(kind, efficient=True, layer=k) for k in PACKED_LAYERS]
    alone_launching = sum(one_step(model, batch, case, device)[0].launching for case in alone)
    if not time_steps:
        return packed, steady, alone_launching, None, None
    packed_ms = ms_per_step(packed_generation, device, time_steps)
    alone_ms = sum(ms_per_step(lambda n: decode(model, batch, case, n, device), device, time_steps)
                   for case in alone)
    return packed, steady, alone_launching, packed_ms, alone_ms


def ms_per_step(generation, device: torch.device, steps: int) -> float:
    """(time of 1 + steps new tokens - time of 1 new token) / steps, each the best of two, device synchronized:
    process CPU time on the CPU (steadier on a shared machine; one thread), wall time on a GPU. `generation(n)`
    makes the call that generates n new tokens."""
    times = {}
    for name, call in (("short", generation(1)), ("long", generation(1 + steps))):
        call()  # warm-up
        best = float("inf")
        for _ in range(2):
            with common.Timer(device) as t:
                call()
            best = min(best, t.cpu if device.type == "cpu" else t.wall)
        times[name] = best
    return (times["long"] - times["short"]) / steps * 1e3


# ----------------------------------------------------------------------------- report

def main() -> None:
    args = parse_args()
    device = common.parse_device(args.device)
    torch.set_grad_enabled(False)
    header = common.machine_header(device)
    print(header)
    rows, compiled_rows, packed_rows = [], [], []
    for kv_heads in map(int, args.kv_heads.split(",")):
        for dtype_name in args.dtypes.split(","):
            model = narrow_7b_model(kv_heads, DTYPES[dtype_name], device)
            for case in [case for case in CASES if case.kind in args.kinds.split(",")]:
                for batch in map(int, args.batches.split(",")):
                    counts, steady = one_step(model, batch, case, device)
                    ms = (ms_per_step(lambda n: decode(model, batch, case, n, device), device,
                                      args.time_steps) if args.time_steps else None)
                    rows.append((kv_heads, dtype_name, batch, case, counts, steady, ms))
                    print(row_line(rows[-1]), flush=True)
                    if args.compile:
                        graph_kernels, outside = compiled_step(model, batch, case, device)
                        compiled_ms = (ms_per_step(lambda n: decode(model, batch, case, n, device, True),
                                                   device, args.time_steps) if args.time_steps else None)
                        compiled_rows.append(rows[-1] + (graph_kernels, outside, compiled_ms))
                        print(compiled_row_line(compiled_rows[-1]), flush=True)
            for kind in [kind for kind in PACKED_KINDS if args.packed and kind in args.kinds.split(",")]:
                for batch in map(int, args.batches.split(",")):
                    packed_rows.append((kv_heads, dtype_name, batch, kind)
                                       + packed_step(model, batch, kind, device, args.time_steps))
                    print(packed_row_line(packed_rows[-1]), flush=True)
    lines = report(rows, header, args) + ["", common.format_peak_memory(device) + " over the whole run."]
    if compiled_rows:
        lines += compiled_report(compiled_rows)
    if packed_rows:
        lines += packed_report(packed_rows)
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"\nwrote {args.out}")


TABLE_HEAD = ("| kv heads | dtype | batch | kind (k = 16) | ops | kernel-launching | per layer "
              "| kernel-launching, rms_norm as on CUDA | views | casts "
              "| host reads (Python) | `_local_scalar_dense` | data-dependent | copies to device / to host | ms/step |")


def row_line(row) -> str:
    kv_heads, dtype_name, batch, case, c, steady, ms = row
    ms_text = f"{ms:.1f}" if ms is not None else ""
    flag = "" if steady else " (steps differ!)"
    return (f"| {kv_heads} | {dtype_name} | {batch} | {case.name}{flag} | {c.ops} | {c.launching} "
            f"| {c.launching / LAYERS:.1f} | {c.launching_as_on_cuda} | {c.views} | {c.casts} | {c.host_reads} "
            f"| {c.scalar_reads} "
            f"| {c.data_dependent} | {c.to_device} / {c.to_host} | {ms_text} |")


COMPILED_HEAD = ("| kv heads | dtype | batch | kind (k = 16) | eager: kernel-launching | compiled: kernels in the graph "
                 "| compiled: kernel-launching ops outside it (1 = the graph) | compiled / eager, kernels "
                 "| compiled / eager, launches with a CUDA graph | host reads (Python) | eager ms/step "
                 "| compiled ms/step |")


def compiled_row_line(row) -> str:
    kv_heads, dtype_name, batch, case, c, _, ms, graph_kernels, outside, compiled_ms = row
    times = [f"{t:.1f}" if t is not None else "" for t in (ms, compiled_ms)]
    return (f"| {kv_heads} | {dtype_name} | {batch} | {case.name} | {c.launching} | {graph_kernels} "
            f"| {outside.launching} | {(graph_kernels + outside.launching - 1) / c.launching:.1%} "
            f"| {outside.launching / c.launching:.1%} | {outside.host_reads} "
            f"| {times[0]} | {times[1]} |")


def compiled_report(rows) -> list[str]:
    return ["", "## The compiled step (`generate_tokens(compile=True)`)", "",
            "Kernels in the graph: the kernel calls in the `call()` of inductor's code for `layer_stack`. On a GPU "
            "the graph runs as one CUDA graph replay, so a step launches the ops outside it, its one replay and "
            "the copies of its inputs into the graph's buffers (the last ratio counts the first two). Without "
            "CUDA graphs (the CPU) every kernel of the graph runs from the host (the first ratio). "
            "Outside: the step's eager ops (mask, RoPE tables, edits, cache slots, token choice), counted with "
            "the graph replaced by one op.", "",
            COMPILED_HEAD, "|" + "---|" * 4 + "---:|" * 8] + [compiled_row_line(row) for row in rows]


PACKED_HEAD = ("| kv heads | dtype | batch per run | kind | rows | packed step: kernel-launching | per run "
               f"| the {len(PACKED_LAYERS)} runs alone: kernel-launching, all their steps | packed / alone "
               "| host reads (Python), packed step | packed ms/step | alone ms, all their steps |")


def packed_row_line(row) -> str:
    kv_heads, dtype_name, batch, kind, c, steady, alone_launching, packed_ms, alone_ms = row
    times = [f"{t:.1f}" if t is not None else "" for t in (packed_ms, alone_ms)]
    flag = "" if steady else " (steps differ!)"
    runs = len(PACKED_LAYERS)
    return (f"| {kv_heads} | {dtype_name} | {batch} | {kind}{flag} | {runs * batch} | {c.launching} "
            f"| {c.launching / runs:.1f} | {alone_launching} | {c.launching / alone_launching:.1%} "
            f"| {c.host_reads} | {times[0]} | {times[1]} |")


def packed_report(rows) -> list[str]:
    ks = ", ".join(map(str, PACKED_LAYERS[:3])) + f", ..., {PACKED_LAYERS[-1]}"
    return ["", "## A packed decode step (`generate_packed`, `--packed`)", "",
            f"One run at each k = {ks} ({len(PACKED_LAYERS)} runs, efficient), over the same prompts from their "
            "prompt states, decoded together as `minillm sweep` decodes a pack: one step of the pack against one "
            "step of each run decoded on its own (each counted as in the first table, at its own k). Per run: the "
            "packed step's kernel-launching ops over the runs.", "",
            PACKED_HEAD, "|" + "---|" * 4 + "---:|" * 8] + [packed_row_line(row) for row in rows]


def report(rows, header: str, args) -> list[str]:
    command = "python benchmarks/bench_ops.py " + " ".join(sys.argv[1:])
    model_text = (f"Model: the Llama-2-7B layout ({LAYERS} layers, {HEADS} heads) made narrow (hidden {HIDDEN}, "
                  f"MLP {MLP}, vocabulary {VOCAB}, random weights): op counts depend on the layers, heads and code "
                  f"path, not on the widths. Prompts of {PROMPT_TOKENS} tokens; one step of "
                  f"`generate_tokens(mode=\"cached\")` (forward, token choice and loop bookkeeping), counted as the "
                  f"difference of runs with n + 1 and n new tokens.")
    columns_text = ("ops: every ATen op dispatched (TorchDispatchMode); kernel-launching: ops that are not views, "
                    "bare allocations, host-side ops (`promote_types`) or scalar reads; rms_norm as on CUDA: the "
                    "same with each `F.rms_norm` call counted as the one fused kernel it runs on CUDA (the CPU runs "
                    "5 ops for it); casts: dtype conversions; "
                    "host reads (Python): `.item()`, `.tolist()`, `.cpu()`, `bool(tensor)`, ... (TorchFunctionMode); "
                    "`_local_scalar_dense`: the ATen op behind `.item()`/`bool()`; data-dependent: ops whose output "
                    "size depends on values (nonzero, unique, boolean-mask indexing), each a sync on a GPU; "
                    "copies between host and device memory (aten `_to_copy`/`copy_`; always 0 on a CPU run, where "
                    "host and device are the same). "
                    "ms/step: one step's time on this device (CPU time on a CPU, wall time on a GPU; "
                    f"{args.time_steps} steps, best of 2); with a model this narrow it is nearly all per-op overhead.")
    lines = ["# Ops and host round-trips per decode step", "",
             f"Command: `OMP_NUM_THREADS=1 {command.strip()}`", "", header, "", model_text, "", columns_text, "",
             TABLE_HEAD, "|" + "---|" * 4 + "---:|" * 11]
    lines += [row_line(row) for row in rows]

    first = rows[0]
    lines += ["", (f"**Where the host round-trips of one step come from** (kv heads {first[0]}, {first[1]}, "
                   f"batch {first[2]}; the same sites for the other shapes)"), ""]
    for row in rows:
        if row[0] == first[0] and row[1] == first[1] and row[2] == first[2]:
            sites = row[4].host_read_sites
            lines.append(f"- {row[3].name}: " + ("; ".join(f"{site} x{n}" for site, n in sorted(sites.items()))
                                                   if sites else "none"))
    lines += ["", "**Where the kernel-launching ops of one step come from** (same shape), by file:", ""]
    for row in rows:
        if row[0] == first[0] and row[1] == first[1] and row[2] == first[2]:
            files = ", ".join(f"{f} {n}" for f, n in row[4].launch_files.most_common())
            lines.append(f"- {row[3].name}: {files}")
    lines += ["", "**Most frequent ops of one baseline step** (same shape):", ""]
    base = rows[0][4].by_op.most_common(15)
    lines.append(", ".join(f"`{op}` {n}" for op, n in base))
    return lines


if __name__ == "__main__":
    main()
