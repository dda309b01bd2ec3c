"""Peak memory of `minillm.checkpoint.load_model` on a 7B-shape checkpoint, against the size of the weights.

What is measured
    `load_model` promises never to hold two copies of the weights: it builds the
    model on the meta device and reads each tensor from disk into its final
    memory, one at a time. So loading should peak at about 1x the weights (plus
    the Python/torch baseline and one tensor in flight), not 2x.

How
    1. A checkpoint with the Llama-2-7B shape (32 layers, hidden 4096, MLP 11008,
       32 heads, vocabulary 32000, untied embeddings) and random bf16 weights is
       written into a temporary folder as sharded safetensors with an index
       (~13.5 GB). It is written tensor by tensor, straight to disk, so the writer
       itself never holds more than one tensor.
    2. A fresh Python process (nothing else loaded in it) imports torch and minillm,
       notes its resident memory, calls `load_model(folder, dtype=...)`, and reports
       its peak resident memory two ways: `getrusage(RUSAGE_SELF).ru_maxrss` and
       VmHWM from /proc/self/status. VmHWM is the trustworthy one: Linux may carry
       ru_maxrss over from the parent process across fork/exec.
    3. The same for fp32 (bf16 files cast to fp32 as they are read). The full 7B in
       fp32 is ~27 GB, more than this 24 GiB machine has, so that run uses the same
       shape with half the layers (16; ~7 GB on disk, ~14 GB in fp32).
    4. The checkpoints are deleted at the end (unless --keep-dir).

The folder is read through the page cache; those pages are not part of the
process's resident memory (the loader reads, it does not memory-map).

With `--device cuda` the child loads straight onto the GPU and also reports
torch.cuda.max_memory_allocated: the device peak should be ~1x the weights too.
`--tiny` writes the same layout with tiny widths (hidden 64): only for checking
that scripts using these checkpoints (benchmarks/gpu_check.sh --cpu-smoke) work.

Run
    python benchmarks/bench_load_memory.py                    # both runs, temp folders deleted at the end
    python benchmarks/bench_load_memory.py --keep-dir /data/ckpt   # keep (and on reruns reuse) the checkpoints
    python benchmarks/bench_load_memory.py --runs bfloat16 --layers 4   # a quick, small check
Needs about 14 GB of free disk (checked first) and about 15 GB of free memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common

GB = 1e9
GIB = 2 ** 30

LLAMA2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "bfloat16",
}
# The same layout with tiny widths: for smoke tests of the scripts, not for measuring.
TINY = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 1000}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep-dir", default=None,
                        help="write the checkpoints under this folder and keep them; a later run with the same "
                             "folder reuses them instead of writing again")
    parser.add_argument("--runs", default="bfloat16,float32",
                        help="load dtypes to measure, comma-separated (default bfloat16,float32)")
    parser.add_argument("--layers", type=int, default=32, help="layers of the bf16 run (default 32: the 7B shape)")
    parser.add_argument("--fp32-layers", type=int, default=16,
                        help="layers of the fp32 run (default 16: half the 7B, so that fp32 fits in RAM)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="target shard size in GB (default 2)")
    parser.add_argument("--force", action="store_true",
                        help="load even when /proc/meminfo says there is not enough memory available")
    parser.add_argument("--tiny", action="store_true", help="tiny widths (hidden 64), to smoke-test scripts")
    common.add_device_argument(parser)
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "DTYPE", "DEVICE"), help=argparse.SUPPRESS)
    return parser.parse_args()


# ----------------------------------------------------------------------------- writing the checkpoint

def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of a Llama checkpoint, in Hugging Face names and order."""
    d, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    kv = config["num_key_value_heads"] * (d // config["num_attention_heads"])
    shapes = [("model.embed_tokens.weight", (v, d))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (d,)),
                   (p + "self_attn.q_proj.weight", (d, d)),
                   (p + "self_attn.k_proj.weight", (kv, d)),
                   (p + "self_attn.v_proj.weight", (kv, d)),
                   (p + "self_attn.o_proj.weight", (d, d)),
                   (p + "post_attention_layernorm.weight", (d,)),
                   (p + "mlp.gate_proj.weight", (f, d)),
                   (p + "mlp.up_proj.weight", (f, d)),
                   (p + "mlp.down_proj.weight", (d, f))]
    shapes.append(("model.norm.weight", (d,)))
    if not config.get("tie_word_embeddings", False):  # tied: the embedding is the output layer too
        shapes.append(("lm_head.weight", (v, d)))
    return shapes


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def split_into_shards(shapes, bytes_per_element: int, shard_bytes: float) -> list[list]:
    """Consecutive groups of tensors of about shard_bytes each."""
    shards, current, size = [], [], 0
    for name, shape in shapes:
        nbytes = numel(shape) * bytes_per_element
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes
    shards.append(current)
    return shards


def write_safetensors_streaming(path: Path, tensors, make_tensor) -> int:
    """Write a bf16 safetensors file whose tensors are made one at a time by make_tensor(name, shape).

    The safetensors layout: 8-byte little-endian header length, a JSON header giving
    each tensor's dtype, shape and byte range, then the raw data, in that order.
    Since every size is known from the shapes, the header goes first and each
    tensor is written (and freed) as soon as it is made.
    """
    import torch
    header, offset = {}, 0
    for name, shape in tensors:
        nbytes = numel(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name, shape in tensors:
            tensor = make_tensor(name, shape)
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))  # the raw bytes, no copy
            del tensor
    return path.stat().st_size


def write_checkpoint(folder: Path, config: dict, shard_gb: float) -> int:
    """A sharded bf16 safetensors checkpoint with random weights; returns the bytes written."""
    import torch
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)

    def make_tensor(name, shape):
        if name.endswith("norm.weight"):
            return torch.ones(shape, dtype=torch.bfloat16)
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=generator)

    shards = split_into_shards(tensor_shapes(config), 2, shard_gb * GB)
    weight_map, total = {}, 0
    start = time.perf_counter()
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors_streaming(folder / name, tensors, make_tensor)
        weight_map.update({tensor_name: name for tensor_name, _ in tensors})
        print(f"    shard {i}/{len(shards)}: {name} ({total / GB:.1f} GB so far, "
              f"{time.perf_counter() - start:.0f} s)", flush=True)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    (folder / "COMPLETE").write_text("written by benchmarks/bench_load_memory.py\n")  # marks a finished write
    return total


def checkpoint_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


# ----------------------------------------------------------------------------- measuring (in a child process)

def child_main(folder: str, dtype_name: str, device_name: str) -> None:
    """Runs in the fresh process: load the checkpoint and print one JSON line of memory figures."""
    import resource

    import torch

    from minillm.checkpoint import load_model

    device = common.parse_device(device_name)
    if device.type == "cuda":
        torch.cuda.init()  # the CUDA context's host memory belongs to the baseline, not to the loading
    baseline_kb = common.proc_status_kb("VmRSS")  # Python, torch and minillm imported, nothing loaded yet
    with common.Timer(device) as timer:
        model = load_model(folder, dtype=getattr(torch, dtype_name), device=device)
    seconds = timer.wall
    unique = {id(p): p for p in model.parameters()}.values()
    print(json.dumps({
        "device_peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
        "baseline_kb": baseline_kb,
        "vmhwm_kb": common.proc_status_kb("VmHWM"),
        "vmrss_after_kb": common.proc_status_kb("VmRSS"),
        "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "weights_bytes": sum(p.numel() * p.element_size() for p in unique),
        "largest_tensor_bytes": max(p.numel() * p.element_size() for p in unique),
        "parameters": sum(p.numel() for p in unique),
        "load_seconds": seconds,
    }))


def measure(folder: Path, dtype_name: str, device: str) -> dict:
    """Run child_main in a fresh interpreter and return its figures."""
    command = [sys.executable, os.path.abspath(__file__), "--child", str(folder), dtype_name, device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"the loading process failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- the runs

def available_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return -1


def check_disk(where: Path, needed: float) -> None:
    """Refuse to start when the disk holding `where` has less than `needed` bytes free (as df reports)."""
    where.mkdir(parents=True, exist_ok=True)
    df = subprocess.run(["df", "-h", str(where)], capture_output=True, text=True).stdout.strip()
    free = shutil.disk_usage(where).free
    print(f"disk: {free / GB:.1f} GB free where the checkpoints go ({where}); up to {needed / GB:.1f} GB needed\n"
          + "\n".join("    " + line for line in df.splitlines()))
    if free < needed:
        raise SystemExit(f"not enough free disk under {where}: {free / GB:.1f} GB free, {needed / GB:.1f} GB needed. "
                         f"Free some space or pass --keep-dir on a larger disk.")


def shape(layers: int, tiny: bool) -> dict:
    """The config.json of the checkpoint: the 7B layout with this many layers (tiny widths with --tiny)."""
    return dict(LLAMA2_7B, num_hidden_layers=layers, **(TINY if tiny else {}))


def checkpoint_folder(root: Path, config: dict) -> Path:
    width = "7b" if config["hidden_size"] == LLAMA2_7B["hidden_size"] else f"tiny{config['hidden_size']}"
    return root / f"llama2-{width}-shape-{config['num_hidden_layers']}layers-bf16"


def one_run(root: Path, dtype_name: str, config: dict, shard_gb: float, keep: bool, force: bool,
            device: str) -> dict:
    """Write (or reuse) the checkpoint of this config, load it as dtype_name in a child, report."""
    layers = config["num_hidden_layers"]
    folder = checkpoint_folder(root, config)
    if (folder / "COMPLETE").is_file() and json.loads((folder / "config.json").read_text()) == config:
        print(f"  reusing {folder}")
        file_bytes = checkpoint_bytes(folder)
    else:
        shutil.rmtree(folder, ignore_errors=True)  # a partial write from an interrupted run
        expected = sum(numel(shape) for _, shape in tensor_shapes(config)) * 2
        print(f"  writing {layers}-layer checkpoint ({expected / GB:.1f} GB, random bf16) to {folder}")
        file_bytes = write_checkpoint(folder, config, shard_gb)

    in_memory = file_bytes * (2 if dtype_name == "float32" else 1)  # roughly: the headers are a few KB
    available = available_memory_bytes()
    print(f"  loading it as {dtype_name} in a fresh process (~{in_memory / GB:.1f} GB of weights; "
          f"{available / GB:.1f} GB of memory available now) ...", flush=True)
    if available < in_memory + 1 * GB and not force:
        # Running out of memory would bring in the OOM killer, which may pick someone else's process.
        raise SystemExit(f"  not enough free memory to load {in_memory / GB:.1f} GB safely ({available / GB:.1f} GB "
                         f"available). Close other programs, use --layers/--fp32-layers for a smaller shape, or "
                         f"pass --force.")
    figures = measure(folder, dtype_name, device)
    if not keep:
        shutil.rmtree(folder)
        print(f"  deleted {folder}")
    return dict(figures, dtype=dtype_name, layers=layers, file_bytes=file_bytes, folder=str(folder))


def report(results: list[dict]) -> None:
    print(f"\n{'load dtype':10} {'layers':>6} {'params':>7} {'files GB':>9} {'weights GB':>10} {'baseline GB':>11} "
          f"{'VmHWM GB':>9} {'ru_maxrss GB':>12} {'(VmHWM-base)/weights':>20} {'extra GB':>8} {'load s':>7}  verdict")
    for r in results:
        weights, largest = r["weights_bytes"], r["largest_tensor_bytes"]
        hwm, base, maxrss = r["vmhwm_kb"] * 1024, r["baseline_kb"] * 1024, r["ru_maxrss_kb"] * 1024
        extra = hwm - base - weights
        # One tensor in flight (read in the file's dtype, then cast) is expected; a second copy is not.
        verdict = "met: no second copy" if extra <= 2 * largest else "MISSED: more than one tensor in flight"
        print(f"{r['dtype']:10} {r['layers']:6d} {r['parameters'] / 1e9:6.2f}B {r['file_bytes'] / GB:9.2f} "
              f"{weights / GB:10.2f} {base / GB:11.2f} {hwm / GB:9.2f} {maxrss / GB:12.2f} "
              f"{(hwm - base) / weights:19.3f}x {extra / GB:8.2f} {r['load_seconds']:7.1f}  {verdict}")
        if r.get("device_peak_bytes") is not None:
            device_peak = r["device_peak_bytes"]
            verdict = ("met: no second copy" if device_peak - weights <= 2 * largest
                       else "MISSED: more than one tensor in flight")
            print(f"{'':10} device peak (torch.cuda.max_memory_allocated) {device_peak / GB:.2f} GB = "
                  f"{device_peak / weights:.3f}x the weights  {verdict}")
    print("GB = 1e9 bytes. weights: the loaded parameters' bytes; baseline: resident memory of the fresh process "
          "after importing torch and minillm, before loading;\nextra: peak - baseline - weights.")
    print("Target: peak ~1x the weights, i.e. no second copy: the extra stays within about one tensor in flight "
          f"(the largest here, the embedding, is {results[0]['largest_tensor_bytes'] / GB:.2f} GB in "
          f"{results[0]['dtype']}); a second copy would make (VmHWM - baseline) / weights about 2.")


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(*args.child)
        return
    common.parse_device(args.device)  # a missing device fails here, before anything is written

    keep = args.keep_dir is not None
    runs = [name.strip() for name in args.runs.split(",")]
    for name in runs:
        if name not in ("bfloat16", "float32"):
            raise SystemExit(f"--runs: unknown dtype {name!r} (bfloat16 or float32)")
    configs = {"bfloat16": shape(args.layers, args.tiny), "float32": shape(args.fp32_layers, args.tiny)}
    root = Path(args.keep_dir) if keep else Path(tempfile.mkdtemp(prefix="minillm-load-memory-"))
    # Each checkpoint is deleted before the next is written (unless kept): the largest one must fit.
    # Kept checkpoints from an earlier run need no new space.
    sizes = [sum(numel(s) for _, s in tensor_shapes(configs[n])) * 2
             for n in runs if not (checkpoint_folder(root, configs[n]) / "COMPLETE").is_file()]
    needed = (sum(sizes) if keep else max(sizes)) if sizes else 0

    results = []
    try:
        check_disk(root, needed * 1.02)
        for number, name in enumerate(runs, 1):
            print(f"\n[{number}/{len(runs)}] load as {name}, {configs[name]['num_hidden_layers']} layers, "
                  f"on {args.device}")
            results.append(one_run(root, name, configs[name], args.shard_gb, keep, args.force, args.device))
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    report(results)


if __name__ == "__main__":
    main()
