"""A layer sweep of the four manipulations, run by minillm and by the paper's approach, side by side.

What is compared
    The same sweep, computed twice in one process on SmolLM2-135M-Instruct (same fp32 weights,
    same torch threads, same token ids):

    minillm   `generate_packed`, as `evals/sweep.py` runs it: all examples of a task in one left-padded
              batch, a KV cache, and prefix reuse: the unmanipulated prompt pass (`PromptStates`) is done
              once per task, and every manipulated run starts at its layer k from those states and the
              cached keys/values of the layers below k. The runs of one manipulation (consecutive cells,
              their caches within `--pack-tokens` token slots) then decode together in one batch;
              `--pack-tokens 1` runs each cell on its own (`generate_tokens`).
    paper     the approach of the paper's released code, rebuilt on `transformers`: forward
              pre-hooks on `LlamaForCausalLM`'s decoder layers, batch size 1, and no KV cache:
              every generated token reruns the whole sequence (only the last position's logits
              are computed, `logits_to_keep=1`, which is the cheaper choice for this side).

    minillm runs with `efficient=True`, as `evals/sweep.py` does (freeze then computes previous
    tokens only as keys/values from layer k-1 up; same tokens); `--no-efficient` turns it off.

    The grid: tasks `capitals` and `context-qa` (their first `--limit` examples), the
    unmanipulated baseline (k = L), and each manipulation at each k of `--layers` or `--stride`
    (k = 0 is skipped for freeze, which needs H[k-1]). Greedy decoding, each task's
    max_new_tokens, and the same stop rule on both sides: the tokenizer's end-of-sequence id, or
    one of the task's stop strings appearing in the decoded answer (after its leading whitespace).

    The manipulations (docs/manipulations.md), as hooks on the transformers side:
    random          pre-hook on layer k: previous tokens' inputs become `random_directions(seed,
                    position)` rescaled to each token's norm: the same noise minillm uses.
    freeze          pre-hook on layer k-1 keeps its input H[k-1]; pre-hooks on layers j >= k
                    overwrite previous tokens' inputs with it.
    swap            pre-hook on layer k: one position gets a donor vector. Position: the first
                    token of the example's own text (capitals: the country's first token;
                    context-qa: the passage's first word), the same position in every prompt of a
                    task because the demonstrations before it are fixed. Donor: the unmanipulated
                    H[k] at that position in the next example's prompt (cyclically). Each side
                    computes its donor states with its own model.
    skip_attention  layers j >= k get an identity input norm and an attention that adds zero, so
                    the residual passes through and the MLP still runs.

How it is timed
    minillm's run of a pack of cells (task, manipulation, k) alternates with the paper approach's runs
    of the same cells, so the noise of a shared machine falls on both. A pack's time is split evenly
    among its cells in the per-cell figures. Each side's time
    includes everything it needs: minillm's prompt states per task, the paper side's donor passes.
    Wall time and process CPU time are both reported; with `--threads 1` (default) the CPU time
    is the steadier of the two when other jobs share the cores.

    The paper's side costs ~1 s (CPU) per short capitals generation and ~5 s per context-qa one on
    one core, so a large grid is out of reach in minutes. `--paper-every N` runs it on every
    N-th example only (every cell still runs) and EXTRAPOLATES its time to all examples
    (x examples / examples run). Its examples are independent batch-1 runs, so the cost is a sum
    over examples; the estimate's error is the sampling of prompt lengths and answer lengths. The
    report says so wherever a number is extrapolated. The default (N = 1) measures everything. Scores are compared cell by cell
    (mean primary score) and generation by generation (identical new tokens). Floating-point
    results of a batched, cached run and a batch-1 full recompute differ at the 1e-6 level, so
    a greedy choice between two near-tied tokens may differ; the report counts such cases.

Run
    python benchmarks/bench_sweep.py          # capitals=16, context-qa=4, k in 0,15 (+ baseline); 5 min CPU
    python benchmarks/bench_sweep.py --limit capitals=64,context-qa=16 --layers 0,10,20 --paper-every 8
    python benchmarks/bench_sweep.py --limit capitals=2,context-qa=1 --stride 1    # every k: ~12 min CPU
    python benchmarks/bench_sweep.py --device cuda --limit capitals=8,context-qa=2   # both sides on the GPU

`--model` takes any checkpoint with a tokenizer (default the embedded SmolLM2); `--device cuda` runs both
sides on the GPU, with every timer synchronizing it; the peak memory (device, or host RSS) is reported.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass, field

import common
import torch
from torch import nn

from minillm.generate import PromptStates, generate_packed, generate_tokens
from minillm.manipulation import KINDS, Manipulation, random_directions
from minillm.packed import PACK_TOKENS, in_packs

DEFAULT_LIMITS = "capitals=16,context-qa=4"
DEFAULT_LAYERS = "0,15"
TARGET_SPEEDUP = 20  # issue 13's, on the CPU


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", default=DEFAULT_LIMITS,
                        help=f"examples per task, as task=N,... (default {DEFAULT_LIMITS})")
    parser.add_argument("--layers", default=DEFAULT_LAYERS, help=f"comma-separated k values (default {DEFAULT_LAYERS})")
    parser.add_argument("--stride", type=int, default=None,
                        help="instead of --layers: k = 0, stride, 2*stride, ... below L (1 = every k)")
    parser.add_argument("--paper-every", type=int, default=1,
                        help="run the paper's side on every N-th example only and extrapolate its time (default 1)")
    parser.add_argument("--no-efficient", action="store_true", help="minillm without efficient=True")
    parser.add_argument("--pack-tokens", type=int, default=PACK_TOKENS,
                        help="minillm decodes the cells of one manipulation together, their caches within this "
                             "many token slots (default %(default)s, as `minillm sweep`; 1: each cell alone)")
    parser.add_argument("--kinds", default=",".join(KINDS), help="manipulations (default: all four)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed of the random manipulation")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--skip-paper", action="store_true", help="run only the minillm side (no comparison)")
    parser.add_argument("--csv", default=None, help="write one row per (task, manipulation, k) to this CSV")
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded name or checkpoint folder, with a tokenizer (default smollm2-135m)")
    common.add_device_argument(parser)
    return parser.parse_args()


# ----------------------------------------------------------------------------- the grid

@dataclass
class Cell:
    task: str
    kind: str  # "none" for the unmanipulated baseline
    layer: int


@dataclass
class TaskData:
    """A task's examples as token ids, with the swap position and the stop rule."""

    name: str
    task: object
    prompts: list[list[int]]
    swap_position: int
    stop: object  # callable(new_tokens) -> bool

    def donor(self, index: int) -> int:
        return (index + 1) % len(self.prompts)


def swap_position(task, tokenizer) -> int:
    """The position of the first token of each example's own text: the same in every prompt of the task.

    The prompt is the fixed demonstrations, then the template up to its first field, then the example's
    text; we check that the tokens before that text are the same for every example and are a prefix of
    every prompt (a clean token boundary), so "position p" names the same place everywhere.
    """
    # Without trailing spaces: the byte-level BPE attaches a space to the word after it (" France").
    head = tokenizer.encode((task.prefix + task.template.split("{", 1)[0]).rstrip())
    for example in task.examples:
        if tokenizer.encode(task.prompt(example))[:len(head)] != head:
            raise RuntimeError(f"{task.name}: the example text of {example.id} does not start on a token boundary")
    return len(head)


def stop_rule(task, tokenizer):
    """True once the decoded answer (after its leading whitespace) contains one of the task's stop strings."""
    def stop(tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens).lstrip()
        return any(s in text for s in task.stop)
    return stop


def load_tasks(limits: dict[str, int], tokenizer) -> list[TaskData]:
    from evals.tasks import get_task
    tasks = []
    for name, limit in limits.items():
        task = get_task(name, limit)
        prompts = [tokenizer.encode(task.prompt(example)) for example in task.examples]
        tasks.append(TaskData(name, task, prompts, swap_position(task, tokenizer), stop_rule(task, tokenizer)))
    return tasks


def packs(cells: list[Cell], data: TaskData, pack_tokens: int) -> list[list[Cell]]:
    """Consecutive cells of one manipulation together, as `minillm sweep` packs them."""
    return in_packs(cells, lambda cell: cell.kind, data.prompts, data.task.max_new_tokens, pack_tokens)


def grid(task: str, kinds: list[str], layers: list[int], num_layers: int) -> list[Cell]:
    """The baseline, then every manipulation at every valid k (k = L is the baseline, so not repeated)."""
    cells = [Cell(task, "none", num_layers)]
    for kind in kinds:
        for k in layers:
            if k == num_layers or (kind == "freeze" and k == 0):
                continue
            cells.append(Cell(task, kind, k))
    return cells


# ----------------------------------------------------------------------------- minillm's side

class MinillmSweep:
    """One batch per task: its unmanipulated prompt states kept, then one batched, cached run per cell."""

    def __init__(self, model, tokenizer, seed: int, efficient: bool):
        self.model, self.tokenizer, self.seed, self.efficient = model, tokenizer, seed, efficient
        self.prompt_states = None

    def start_task(self, data: TaskData) -> None:
        self.data = data
        self.prompt_states = None  # the previous task's states are freed before this prefill, not after
        self.prompt_states = PromptStates.compute(self.model, data.prompts, data.task.max_new_tokens,
                                                  pad_id=self.tokenizer.pad_id)

    def donor_vectors(self, layer: int) -> torch.Tensor:
        """[B, 1, D]: H[layer] at the swap position in each example's donor prompt (from the kept prompt states)."""
        states, width = self.prompt_states.states, self.prompt_states.input_ids.shape[1]
        rows = []
        for b in range(len(self.data.prompts)):
            donor = self.data.donor(b)
            offset = width - len(self.data.prompts[donor])  # left padding before the donor's first token
            rows.append(states[layer, donor, offset + self.data.swap_position])
        return torch.stack(rows)[:, None]

    def manipulation(self, cell: Cell) -> Manipulation | None:
        if cell.kind == "none":
            return None
        if cell.kind == "random":
            return Manipulation("random", cell.layer, seed=self.seed)
        if cell.kind == "swap":
            return Manipulation("swap", cell.layer, positions=(self.data.swap_position,),
                                vectors=self.donor_vectors(cell.layer))
        return Manipulation(cell.kind, cell.layer)

    def run(self, cells: list[Cell]) -> list[list[list[int]]]:
        """New tokens of every example under each cell: one cell alone, or several decoded together."""
        options = dict(eos_ids=self.tokenizer.eos_ids, pad_id=self.tokenizer.pad_id, stop=self.data.stop,
                       efficient=self.efficient)
        prompts, new_tokens = self.data.prompts, self.data.task.max_new_tokens
        if len(cells) == 1:
            return [generate_tokens(self.model, prompts, new_tokens, manipulation=self.manipulation(cells[0]),
                                    prompt_states=self.prompt_states, **options).tokens]
        results = generate_packed(self.model, prompts, new_tokens, [self.manipulation(cell) for cell in cells],
                                  self.prompt_states, **options)
        return [result.tokens for result in results]


# ----------------------------------------------------------------------------- the paper's side

class NoAttention(nn.Module):
    """Stands in for a decoder layer's self-attention: adds nothing to the residual stream."""

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def load_paper_model(folder: str, device: torch.device):
    """transformers' LlamaForCausalLM with the same weights, copied out of the memory map into fresh memory."""
    import transformers
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="sdpa")
    for p in model.parameters():
        p.data = p.data.clone()
    for b in model.buffers():
        b.data = b.data.clone()
    return model.to(device).eval()


class PaperSweep:
    """Forward pre-hooks on the decoder layers; batch size 1; the whole sequence rerun for every new token."""

    def __init__(self, model, tokenizer, seed: int, every: int):
        self.model, self.tokenizer, self.seed, self.every = model, tokenizer, seed, every
        self.layers = model.model.layers
        self.device = model.device
        self.forwards, self.generations = {}, {}  # per task: full-sequence passes, generations
        self.handles = []
        self.patched = []  # (layer, original input norm, original attention) for skip_attention

    def start_task(self, data: TaskData) -> None:
        """Donor states for swap: one unmanipulated forward per donor prompt, keeping H[j] at the swap position."""
        self.data = data
        self.examples = list(range(0, len(data.prompts), self.every))  # the examples this side runs
        self.donor_states = {}
        for index in self.examples:
            donor = data.donor(index)
            out = self.model(input_ids=torch.tensor([data.prompts[donor]], device=self.device), use_cache=False,
                             output_hidden_states=True)
            # hidden_states[j] is the input of layer j for j < L (the last entry is after the final norm)
            self.donor_states[donor] = [h[0, data.swap_position].clone() for h in out.hidden_states[:-1]]

    # -- hooks, one manipulation at a time

    def clear(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []
        for layer, norm, attention in self.patched:
            layer.input_layernorm, layer.self_attn = norm, attention
        self.patched = []

    def pre_hook(self, layer: int, rewrite) -> None:
        """Rewrite the hidden states entering `layer` (its first positional argument) with rewrite(h)."""
        def hook(module, args, kwargs):
            return (rewrite(args[0]), *args[1:]), kwargs
        self.handles.append(self.layers[layer].register_forward_pre_hook(hook, with_kwargs=True))

    def install(self, cell: Cell, example: int) -> None:
        self.clear()
        k = cell.layer
        if cell.kind == "random":
            def randomize(h):
                T = h.shape[1]
                directions = random_directions(self.seed, torch.arange(T - 1), h.shape[-1])[None].to(h.device)
                previous = h[:, :-1]
                scale = previous.float().norm(dim=-1, keepdim=True) / directions.norm(dim=-1, keepdim=True)
                return torch.cat([(directions * scale).to(h.dtype), h[:, -1:]], dim=1)
            self.pre_hook(k, randomize)
        elif cell.kind == "freeze":
            kept = {}

            def keep(h):
                kept["h"] = h
                return h

            def freeze(h):
                return torch.cat([kept["h"][:, :-1], h[:, -1:]], dim=1)
            self.pre_hook(k - 1, keep)
            for j in range(k, len(self.layers)):
                self.pre_hook(j, freeze)
        elif cell.kind == "swap":
            donor = self.donor_states[self.data.donor(example)][k]
            position = self.data.swap_position

            def swap(h):
                h = h.clone()
                h[:, position] = donor
                return h
            self.pre_hook(k, swap)
        elif cell.kind == "skip_attention":
            for j in range(k, len(self.layers)):
                layer = self.layers[j]
                self.patched.append((layer, layer.input_layernorm, layer.self_attn))
                layer.input_layernorm, layer.self_attn = nn.Identity(), NoAttention()

    def generate_one(self, ids: list[int]) -> list[int]:
        sequence, new = list(ids), []
        name = self.data.name
        self.generations[name] = self.generations.get(name, 0) + 1
        for _ in range(self.data.task.max_new_tokens):
            self.forwards[name] = self.forwards.get(name, 0) + 1
            logits = self.model(input_ids=torch.tensor([sequence], device=self.device), use_cache=False,
                                logits_to_keep=1).logits
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token in self.tokenizer.eos_ids or self.data.stop(new):
                break
            sequence.append(token)
        return new

    def run(self, cell: Cell) -> dict[int, list[int]]:
        """New tokens of each example this side runs, by example index."""
        out = {}
        try:
            for index in self.examples:
                self.install(cell, index)
                out[index] = self.generate_one(self.data.prompts[index])
        finally:
            self.clear()
        return out


# ----------------------------------------------------------------------------- checks, timing, scoring

def check_hooks(ours: MinillmSweep, paper: PaperSweep, data: TaskData, kinds: list[str], layer: int) -> None:
    """Before timing: last-position logits of both sides for one prompt, each manipulation at one k."""
    ours.start_task(data)
    paper.start_task(data)
    ids = torch.tensor([data.prompts[0]], device=paper.device)
    for kind in kinds:
        cell = Cell(data.name, kind, layer)
        manipulation = ours.manipulation(cell)
        if kind == "swap":  # batch of one: the first example's donor only
            manipulation = Manipulation("swap", layer, positions=manipulation.positions,
                                        vectors=manipulation.vectors[0])
        a = ours.model(ids, manipulation=manipulation, last_logits_only=True)[0, -1]
        paper.install(cell, 0)
        try:
            b = paper.model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
        finally:
            paper.clear()
        print(f"  check {data.name:10} {kind:14} k={layer:2}: max |logit diff| minillm vs hooks "
              f"{(a - b).abs().max().item():.1e}")


class Clock:
    """Accumulated wall and process CPU seconds, in total and per task (the device synchronized around each call)."""

    def __init__(self, device: torch.device):
        self.wall, self.cpu = {}, {}
        self.device = device

    def __call__(self, task: str, fn, *args):
        with common.Timer(self.device) as t:
            result = fn(*args)
        self.wall[task] = self.wall.get(task, 0.0) + t.wall
        self.cpu[task] = self.cpu.get(task, 0.0) + t.cpu
        return result


@dataclass
class Row:
    cell: Cell
    ours_score: float  # over all examples
    ours_s: float
    ours_subset_score: float = float("nan")  # over the examples the paper's side ran
    paper_score: float = float("nan")
    paper_s: float = float("nan")  # measured, on its examples only
    identical: int = 0
    compared: int = 0
    diverged: list = field(default_factory=list)


def mean_score(data: TaskData, generations: dict[int, list[int]], tokenizer) -> float:
    task = data.task
    scores = [task.score(tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids]),
                         task.examples[index])[task.primary]
              for index, tokens in generations.items()]
    return sum(scores) / len(scores)


def main() -> None:
    args = parse_args()
    from minillm.checkpoint import resolve_checkpoint

    device, model, tokenizer = common.load_model(args)
    L = model.config.num_layers
    limits = common.parse_limits(args.limit)
    layers = list(range(0, L, args.stride)) if args.stride else [int(k) for k in args.layers.split(",")]
    kinds = args.kinds.split(",")
    tasks = load_tasks(limits, tokenizer)
    ours = MinillmSweep(model, tokenizer, args.seed, efficient=not args.no_efficient)
    paper = None
    if not args.skip_paper:
        paper = PaperSweep(load_paper_model(str(resolve_checkpoint(args.model)), device), tokenizer, args.seed,
                           args.paper_every)

    cells = {data.name: grid(data.name, kinds, layers, L) for data in tasks}
    print(common.machine_header(device))
    print(f"{args.model} fp32 on {device}, {args.threads} thread(s), torch {torch.__version__}; k in {layers}; "
          f"kinds {kinds}; minillm efficient={ours.efficient}, pack tokens {args.pack_tokens}")
    for data in tasks:
        lengths = [len(p) for p in data.prompts]
        print(f"  {data.name}: {len(data.prompts)} examples (prompts {min(lengths)}-{max(lengths)} tokens), "
              f"{len(cells[data.name])} cells, swap position {data.swap_position}; paper side runs "
              f"{len(range(0, len(data.prompts), args.paper_every))} of them per cell")
    if paper is not None:
        for data in tasks:
            check_hooks(ours, paper, data, kinds, L // 2)

    ours_clock, paper_clock = Clock(device), Clock(device)
    rows: list[Row] = []
    for data in tasks:
        name = data.name
        ours_clock(name, ours.start_task, data)
        if paper is not None:
            paper_clock(name, paper.start_task, data)
        for pack in packs(cells[name], data, args.pack_tokens):
            before = ours_clock.wall[name]
            pack_tokens = ours_clock(name, ours.run, pack)
            share = (ours_clock.wall[name] - before) / len(pack)
            for cell, tokens in zip(pack, pack_tokens, strict=True):
                rows.append(compare_cell(data, cell, dict(enumerate(tokens)), share, paper, paper_clock, tokenizer))

    report(tasks, rows, ours_clock, paper_clock, paper, args)
    print(common.format_peak_memory(device) + " (both sides' models loaded)")


def compare_cell(data: TaskData, cell: Cell, ours_tokens: dict[int, list[int]], ours_s: float,
                 paper: PaperSweep | None, paper_clock: Clock, tokenizer) -> Row:
    """The paper side's run of one cell (timed), against minillm's tokens for it."""
    name = data.name
    row = Row(cell, mean_score(data, ours_tokens, tokenizer), ours_s=ours_s)
    if paper is not None:
        before = paper_clock.wall[name]
        paper_tokens = paper_clock(name, paper.run, cell)
        row.paper_s = paper_clock.wall[name] - before
        row.paper_score = mean_score(data, paper_tokens, tokenizer)
        row.ours_subset_score = mean_score(data, {i: ours_tokens[i] for i in paper_tokens}, tokenizer)
        row.compared = len(paper_tokens)
        row.identical = sum(ours_tokens[i] == paper_tokens[i] for i in paper_tokens)
        row.diverged = [(data.task.examples[i].id, tokenizer.decode(ours_tokens[i]), tokenizer.decode(paper_tokens[i]))
                        for i in paper_tokens if ours_tokens[i] != paper_tokens[i]]
    print(f"  {name:10} {cell.kind:14} k={cell.layer:2}  score minillm {row.ours_subset_score:.3f} "
          f"paper {row.paper_score:.3f} (on {row.compared})  identical {row.identical}/{row.compared}  "
          f"time {row.ours_s:6.2f} s vs {row.paper_s:7.2f} s", flush=True)
    return row


def report(tasks: list[TaskData], rows: list[Row], ours_clock: Clock, paper_clock: Clock, paper: PaperSweep | None,
           args) -> None:
    print("\nwall and CPU seconds per task (each side's whole part of the sweep, prefill/donor passes included)")
    for data in tasks:
        name, n = data.name, len(data.prompts)
        line = f"  {name:10} minillm ({n} examples, batched): wall {ours_clock.wall[name]:7.1f} s  CPU {ours_clock.cpu[name]:7.1f} s"
        if name in paper_clock.wall:
            run = len(range(0, n, args.paper_every))
            line += (f" | paper ({run} examples, batch 1): wall {paper_clock.wall[name]:7.1f} s  "
                     f"CPU {paper_clock.cpu[name]:7.1f} s")
        print(line)
    if paper is not None:
        print("  (the paper's side reruns the whole sequence once per new token, minillm runs each prompt once from "
              "layer k: new tokens per generation on the paper's side, mean: "
              + ", ".join(f"{d.name} {paper.forwards[d.name] / paper.generations[d.name]:.1f}" for d in tasks) + ")")
    if args.skip_paper:
        print(f"minillm total: wall {sum(ours_clock.wall.values()):.1f} s, CPU {sum(ours_clock.cpu.values()):.1f} s")
        return

    # The paper's side, scaled to all examples (x1 when it ran them all).
    scale = {d.name: len(d.prompts) / len(range(0, len(d.prompts), args.paper_every)) for d in tasks}
    label = "" if args.paper_every == 1 else f" EXTRAPOLATED from 1 in {args.paper_every} examples"
    totals = {}
    for clock_name, clock in (("ours_wall", ours_clock.wall), ("ours_cpu", ours_clock.cpu)):
        totals[clock_name] = sum(clock.values())
    totals["paper_wall"] = sum(paper_clock.wall[d.name] * scale[d.name] for d in tasks)
    totals["paper_cpu"] = sum(paper_clock.cpu[d.name] * scale[d.name] for d in tasks)
    print(f"\nthe whole sweep, all examples{label}:")
    for data in tasks:
        name = data.name
        print(f"  {name:10} speed-up {paper_clock.wall[name] * scale[name] / ours_clock.wall[name]:5.1f}x wall, "
              f"{paper_clock.cpu[name] * scale[name] / ours_clock.cpu[name]:5.1f}x CPU")
    print(f"  minillm (batched, cached, prefix reuse): wall {totals['ours_wall']:8.1f} s   CPU {totals['ours_cpu']:8.1f} s")
    print(f"  paper approach (hooks, batch 1, rerun):  wall {totals['paper_wall']:8.1f} s   "
          f"CPU {totals['paper_cpu']:8.1f} s{label}")
    wall_ratio, cpu_ratio = totals["paper_wall"] / totals["ours_wall"], totals["paper_cpu"] / totals["ours_cpu"]
    print(f"  speed-up of minillm: {wall_ratio:.1f}x wall, {cpu_ratio:.1f}x CPU time "
          f"(target >= {TARGET_SPEEDUP}x: {'MET' if min(wall_ratio, cpu_ratio) >= TARGET_SPEEDUP else 'MISSED'})"
          f"{label}")

    print("\nper manipulation, on the examples both sides ran: cells with the same mean score, identical generations")
    for kind in ["none", *KINDS]:
        mine = [r for r in rows if r.cell.kind == kind]
        if not mine:
            continue
        same_cells = sum(r.ours_subset_score == r.paper_score for r in mine)
        worst = max(abs(r.ours_subset_score - r.paper_score) for r in mine)
        print(f"  {kind:14} same score in {same_cells}/{len(mine)} cells (largest difference {worst:.3f}); "
              f"identical generations {sum(r.identical for r in mine)}/{sum(r.compared for r in mine)}")
    diverged = [(r.cell, d) for r in rows for d in r.diverged]
    for cell, (example, a, b) in diverged[:20]:
        print(f"  differs: {cell.task} {cell.kind} k={cell.layer} {example}: minillm {a!r} vs paper {b!r}")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["task", "manipulation", "k", "minillm_score_all", "minillm_score_compared",
                             "paper_score_compared", "compared", "identical_generations", "minillm_s",
                             "paper_s_measured"])
            for r in rows:
                writer.writerow([r.cell.task, r.cell.kind, r.cell.layer, f"{r.ours_score:.4f}",
                                 f"{r.ours_subset_score:.4f}", f"{r.paper_score:.4f}", r.compared, r.identical,
                                 f"{r.ours_s:.3f}", f"{r.paper_s:.3f}"])
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
