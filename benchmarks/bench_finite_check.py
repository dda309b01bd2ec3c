"""What checking every weight for NaN/infinity costs when loading the embedded SmolLM2-135M (docs/reliability.md).

The model is loaded ROUNDS times with the check and ROUNDS times with it replaced by a no-op,
alternating, so that both see the same load on a shared machine; the medians and their ratio are
printed, with the time of the check alone (isfinite over every loaded weight).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_finite_check.py [--rounds 7] [--dtype float32]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from minillm import checkpoint
from minillm.api import parse_dtype
from minillm.checkpoint import load_model, resolve_checkpoint


def timed_load(folder, dtype) -> tuple[float, torch.nn.Module]:
    started = time.perf_counter()
    model = load_model(folder, dtype=dtype)
    return time.perf_counter() - started, model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    dtype = parse_dtype(args.dtype)
    folder = resolve_checkpoint("smollm2-135m")
    real_check = checkpoint.check_finite
    timed_load(folder, dtype)  # warm the page cache and torch

    with_check, without_check = [], []
    for _ in range(args.rounds):
        checkpoint.check_finite = real_check
        with_check.append(timed_load(folder, dtype)[0])
        checkpoint.check_finite = lambda *args: None
        seconds, model = timed_load(folder, dtype)
        without_check.append(seconds)
    checkpoint.check_finite = real_check

    weights = [p.detach() for p in model.parameters()]
    check_alone = min(time_checks(lambda w: real_check(folder, "w", w, w), weights) for _ in range(3))
    elementwise = min(time_checks(lambda w: torch.isfinite(w).all().item(), weights) for _ in range(3))

    on, off = statistics.median(with_check), statistics.median(without_check)
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}, "
          f"dtype {args.dtype}, {args.rounds} rounds each, alternating")
    print(f"load with the check     median {on * 1000:7.1f} ms  (all: {', '.join(f'{t * 1000:.0f}' for t in with_check)})")
    print(f"load without the check  median {off * 1000:7.1f} ms  (all: {', '.join(f'{t * 1000:.0f}' for t in without_check)})")
    print(f"difference of the medians {100 * (on - off) / off:+.1f}%")
    print(f"over the {sum(w.numel() for w in weights) / 1e6:.0f}M loaded weights, best of 3: the check (finite sum) "
          f"{check_alone * 1000:.1f} ms; isfinite(x).all() {elementwise * 1000:.1f} ms")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def time_checks(check, weights) -> float:
    started = time.perf_counter()
    for weight in weights:
        check(weight)
    return time.perf_counter() - started

if __name__ == "__main__":
    main()
