"""Where minillm's side of the sweep benchmark spends its time, phase by phase, per manipulation.

It runs minillm's side of `bench_sweep.py`'s grid (the same tasks, examples, kinds and k; no paper side)
and times each phase of generation by wrapping the function of `minillm.generate` that does it:

    prompt states   the unmanipulated pass over a task's prompts, once per task (`PromptStates.compute`)
    first pass      a run's pass over the prompts from its layer k (`start`, without the cache fork)
    cache fork      the run's own copy of the cache layers >= k (`KVCache.fork`; the layers below are shared)
    cache pack      the packed runs' caches copied side by side (`KVCache.concatenate`)
    decode          one token per step for every row still in the batch (`decode_step`); with the number of
                    steps and the mean rows per step, the batch a step really has once rows finish
    drop finished   rows that stopped leave the batch (`drop_finished`: the cache rows are copied)
    choose, stop    the greedy choice and the task's stop rule (which decodes each answer with the tokenizer)
    other           the rest of `generate_tokens` / `generate_packed`: the checks, the Python loop

The cells are packed as `bench_sweep.py` and `minillm sweep` pack them (`--pack-tokens`): each line is one
pack, the runs of one manipulation at the k it lists, decoded together.

Times are process CPU seconds (with `--threads 1`, the steady figure on a shared machine) and wall
seconds, the device synchronized around each phase. The wrappers cost a few microseconds a call.

Run
    python benchmarks/sweep_breakdown.py                                                # bench_sweep's default grid
    python benchmarks/sweep_breakdown.py --limit capitals=64,context-qa=16 --layers 0,10,20
    python benchmarks/sweep_breakdown.py --pack-tokens 1                                # each cell alone
"""

from __future__ import annotations

import argparse
import importlib
from collections import defaultdict

import bench_sweep
import common
import torch

from minillm.manipulation import KINDS
from minillm.model import KVCache
from minillm.packed import PACK_TOKENS

# The module, not the package's `generate` function of the same name, which `import minillm.generate as` would give.
generation = importlib.import_module("minillm.generate")
PHASES = ("first pass", "cache fork", "cache pack", "decode", "drop finished", "choose, stop")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", default=bench_sweep.DEFAULT_LIMITS, help="examples per task, as task=N,...")
    parser.add_argument("--layers", default=bench_sweep.DEFAULT_LAYERS, help="comma-separated k values")
    parser.add_argument("--kinds", default=",".join(KINDS), help="manipulations (default: all four)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--pack-tokens", type=int, default=PACK_TOKENS, help="as bench_sweep.py's (default %(default)s)")
    parser.add_argument("--model", default="smollm2-135m", help="embedded name or checkpoint folder")
    common.add_device_argument(parser)
    return parser.parse_args()


class PhaseClock:
    """CPU and wall seconds per (cell, phase), and decode steps and rows per cell."""

    def __init__(self, device: torch.device):
        self.device = device
        self.label = None  # the cell being run, e.g. "capitals random k=0"
        self.cpu, self.wall = defaultdict(float), defaultdict(float)
        self.steps, self.rows = defaultdict(int), defaultdict(int)

    def timed(self, phase: str, fn):
        """fn, with its time added to (current label, phase)."""
        def wrapper(*args, **kwargs):
            with common.Timer(self.device) as t:
                result = fn(*args, **kwargs)
            self.cpu[self.label, phase] += t.cpu
            self.wall[self.label, phase] += t.wall
            return result
        return wrapper


def instrument(clock: PhaseClock, tasks: list[bench_sweep.TaskData]) -> None:
    """Wrap the phases' functions (for this process only: the script ends after one grid)."""
    decode_step = generation.decode_step

    def counted_decode_step(model, batch, token, *args):
        clock.steps[clock.label] += 1
        clock.rows[clock.label] += token.shape[0]
        return decode_step(model, batch, token, *args)

    generation.start = clock.timed("first pass", generation.start)  # includes the fork, subtracted below
    generation.decode_step = clock.timed("decode", counted_decode_step)
    generation.drop_finished = clock.timed("drop finished", generation.drop_finished)
    generation.choose_next = clock.timed("choose, stop", generation.choose_next)
    KVCache.fork = clock.timed("cache fork", KVCache.fork)
    KVCache.concatenate = classmethod(clock.timed("cache pack", KVCache.concatenate.__func__))
    for data in tasks:
        data.stop = clock.timed("choose, stop", data.stop)


def main() -> None:
    args = parse_args()
    device, model, tokenizer = common.load_model(args)
    L = model.config.num_layers
    limits = common.parse_limits(args.limit)
    layers = [int(k) for k in args.layers.split(",")]
    tasks = bench_sweep.load_tasks(limits, tokenizer)
    ours = bench_sweep.MinillmSweep(model, tokenizer, seed=0, efficient=True)
    clock = PhaseClock(device)
    instrument(clock, tasks)
    print(common.machine_header(device))
    print(f"{args.model} on {device}, {args.threads} thread(s); {args.limit}; k in {layers}")

    totals = defaultdict(float)  # label -> CPU seconds of the whole phase or run
    wall = 0.0
    for data in tasks:
        clock.label = f"{data.name} prompt states"
        with common.Timer(device) as t:
            ours.start_task(data)
        totals[clock.label] += t.cpu
        wall += t.wall
        cells = bench_sweep.grid(data.name, args.kinds.split(","), layers, L)
        for pack in bench_sweep.packs(cells, data, args.pack_tokens):
            clock.label = f"{data.name} {pack[0].kind} k={','.join(str(cell.layer) for cell in pack)}"
            with common.Timer(device) as t:
                ours.run(pack)
            totals[clock.label] += t.cpu
            wall += t.wall
    report(clock, totals, wall)


def report(clock: PhaseClock, totals: dict[str, float], wall: float) -> None:
    cpu = dict(clock.cpu)
    for label in totals:  # the first pass's time included the fork
        cpu[label, "first pass"] = cpu.get((label, "first pass"), 0.0) - cpu.get((label, "cache fork"), 0.0)
    grand = sum(totals.values())
    print(f"\nCPU seconds per phase (whole sweep: CPU {grand:.1f} s, wall {wall:.1f} s)")
    print(f"  {'':44} {'total':>7} " + " ".join(f"{phase:>13}" for phase in PHASES)
          + f" {'other':>7}  decode steps, mean rows per step")
    by_phase = defaultdict(float)
    for label, total in totals.items():
        if label.endswith("prompt states"):
            by_phase["prompt states"] += total
            print(f"  {label:44} {total:7.2f}")
            continue
        parts = [cpu.get((label, phase), 0.0) for phase in PHASES]
        for phase, seconds in zip(PHASES, parts, strict=True):
            by_phase[phase] += seconds
        other = total - sum(parts)
        by_phase["other"] += other
        steps = clock.steps[label]
        rows = clock.rows[label] / steps if steps else 0.0
        print(f"  {label:44} {total:7.2f} " + " ".join(f"{seconds:13.2f}" for seconds in parts)
              + f" {other:7.2f}  {steps:4d}, {rows:5.1f}")
    print("  share of the sweep's CPU time by phase: " + ", ".join(
        f"{phase} {seconds / grand * 100:.1f}%" for phase, seconds in by_phase.items()))
    by_kind = defaultdict(float)
    for label, total in totals.items():
        by_kind["prompt states" if label.endswith("prompt states") else label.split()[1]] += total
    print("  by manipulation (its runs' whole time): " + ", ".join(
        f"{kind} {seconds / grand * 100:.1f}%" for kind, seconds in by_kind.items()))


if __name__ == "__main__":
    main()
