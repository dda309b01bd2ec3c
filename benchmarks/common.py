"""What every benchmark here shares: the device it runs on, timers that wait for it, peak memory, the machine.

    add_device_argument(parser)   --device (default cpu)
    parse_device(text)            a torch.device, or a one-line exit when it is not there (e.g. no CUDA)
    Timer(device)                 wall and process-CPU seconds of a block; on CUDA it synchronizes on entry
                                  and exit, so the time covers the kernels, not only their launch
    reset_peak_memory(device)     start a new peak-memory window
    peak_memory(device)           (bytes, what was measured): torch.cuda.max_memory_allocated on CUDA,
                                  the process's peak resident memory (VmHWM) on the CPU
    machine_header(device)        one line naming the CPU (model, SIMD/AMX flags, threads), torch, and the GPU

CUDA kernels run asynchronously: a Python timer around `model(x)` stops when the last kernel has been
queued, not when it has run. Every timer here therefore synchronizes before it starts and before it stops.
"""

from __future__ import annotations

import argparse
import subprocess
import time

import torch

GIB = 2 ** 30
# The CPU flags that decide which matmul kernels torch can use (AMX and AVX512-BF16 matter for bf16).
CPU_FLAGS_OF_INTEREST = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx_vnni", "amx_bf16", "amx_tile",
                         "amx_int8", "amx_fp16")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")


def parse_device(text: str) -> torch.device:
    """The device named by --device; exits with one line when it does not exist on this machine."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise SystemExit(f"--device: {text!r} is not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {text}: this torch ({torch.__version__}) sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s) here")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        raise SystemExit(f"--device {text}: only cpu and cuda are supported by these benchmarks")
    return device


def load_model(args: argparse.Namespace):
    """How the benchmarks on a real checkpoint start: (device, model, tokenizer) for --device and --model,
    with torch on --threads threads and autograd off."""
    import minillm

    device = parse_device(args.device)
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    model, tokenizer = minillm.load(args.model, device=device)
    return device, model, tokenizer


def parse_limits(spec: str) -> dict[str, int]:
    """Examples per task from 'capitals=16,context-qa=4'."""
    return {name: int(count) for name, count in (item.split("=") for item in spec.split(","))}


def synchronize(device: torch.device) -> None:
    """Wait until every kernel queued on the device has finished (nothing to wait for on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Timer:
    """`with Timer(device) as t: ...` then t.wall and t.cpu (seconds); synchronizes the device on both ends."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.wall = self.cpu = 0.0

    def __enter__(self):
        synchronize(self.device)
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        synchronize(self.device)
        self.wall = time.perf_counter() - self._wall
        self.cpu = time.process_time() - self._cpu


def proc_status_kb(field: str) -> int:
    """A field of /proc/self/status in kB (-1 where the kernel has none)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak window: CUDA's allocator statistics, or the kernel's VmHWM (Linux: clear_refs 5)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # not Linux, or not allowed: the peak then covers the whole process


def peak_memory(device: torch.device) -> tuple[int, str]:
    """Peak bytes since the last reset_peak_memory, and what they are."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    return proc_status_kb("VmHWM") * 1024, "host peak RSS (VmHWM, the whole process)"


def format_peak_memory(device: torch.device) -> str:
    peak, what = peak_memory(device)
    return f"peak memory {peak / GIB:.2f} GiB ({what})"


def cpu_info() -> dict:
    """CPU model, CPU count and the SIMD/AMX flags that matter for matmuls, from lscpu."""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        lscpu = ""
    fields = {}
    for line in lscpu.splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    flags = fields.get("Flags", "").split()
    return {"cpu": fields.get("Model name", "unknown"), "cpus": fields.get("CPU(s)", "?"),
            "flags": [f for f in CPU_FLAGS_OF_INTEREST if f in flags]}


def gpu_info(device: torch.device) -> str:
    if device.type != "cuda":
        return ""
    p = torch.cuda.get_device_properties(device)
    return (f"{p.name} (compute capability {p.major}.{p.minor}, {p.total_memory / GIB:.0f} GiB, "
            f"CUDA {torch.version.cuda})")


def machine_header(device: torch.device) -> str:
    """One line for a report's header: the CPU always (it launches the kernels), the GPU when there is one."""
    cpu = cpu_info()
    line = (f"CPU: {cpu['cpu']} ({cpu['cpus']} CPUs; flags: {' '.join(cpu['flags']) or 'none of interest'}), "
            f"torch {torch.__version__} (cpu capability {torch.backends.cpu.get_cpu_capability()}), "
            f"{torch.get_num_threads()} thread(s)")
    if device.type == "cuda":
        line += f"; device: {gpu_info(device)}"
    return line
