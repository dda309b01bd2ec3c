"""minillm against transformers' LlamaForCausalLM on SmolLM2-135M-Instruct (or --model), on the CPU or a GPU.

What is compared
    Both models hold the same weights (the embedded SmolLM2 folder), in the same
    dtype, and run with the same number of torch threads, in one process:

    forward   one full forward pass with logits for every position (no cache):
              1 x 512 tokens and 8 x 128 tokens.
    decode    greedy generation with a KV cache: 32-token prompts, exactly 128
              new tokens (no end-of-sequence stop on either side), batch 1 and 8.
              Ours: `generate_tokens(mode="cached")` (static preallocated cache).
              Theirs: `model.generate(do_sample=False)` with its default cache.

How
    * transformers memory-maps safetensors, and mmap-backed fp32 weights make CPU
      matmuls much slower on this machine; our loader reads into fresh memory. To
      compare the models rather than the loaders, every transformers parameter is
      copied into fresh memory after `from_pretrained` (`p.data = p.data.clone()`).
    * Each case runs once untimed (warm-up, also used for the correctness checks),
      then ours and theirs alternate N times (`--repeats`); the best time is kept.
      Alternating spreads the noise of a shared machine over both sides.
    * Prefill efficiency: FLOPs of the forward = 2 * (matmul parameters) * tokens
      plus the causal attention (QK^T and AV over the T(T+1)/2 allowed pairs),
      as GFLOP/s and as a fraction of this machine's matmul peak: a 4096^3
      `torch.mm` in that dtype, timed in the same rounds as the forwards so that
      both see the same load from other users.
    * Correctness: largest logit difference of the forward, and whether greedy
      decoding picks the same tokens (first divergence printed; never fatal,
      bf16 rounding may legitimately differ).
    * Decode floor: the decode's weight matmuls alone (same shapes, same weights,
      no attention, norms, RoPE or Python bookkeeping), timed alongside. A small
      model's decode streams all its weights from memory every step, so this is
      the most any implementation built on torch's kernels can reach. With
      `--compile` on the CPU, also the packed floor: the same matmuls compiled
      with frozen weights, which the compiler packs ahead into oneDNN's or MKL's
      blocked layout, as it does for our compiled step; that step can beat the
      plain floor, so it is judged against both.
    * `--clock cpu` times with this process's CPU time instead of wall time: on
      a machine others are using it is far steadier, but it is only meaningful
      with `--threads 1` (with more threads, OpenMP's spin-waiting counts too),
      and only on the CPU (a GPU's work is not this process's CPU time).
    * `--device cuda`: both models, the inputs and the matmul peak/floor on the GPU;
      every timer synchronizes the device before it starts and before it stops, and
      the peak memory reported is torch.cuda.max_memory_allocated (host peak RSS on
      the CPU), per dtype, both models included.

Run
    python benchmarks/bench_model.py                      # fp32 and bf16, 2 threads, best of 5
    python benchmarks/bench_model.py --dtypes float32 --repeats 3 --threads 1
    python benchmarks/bench_model.py --profile            # also where the time goes (torch.profiler)
    python benchmarks/bench_model.py --device cuda --model FOLDER --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import json
import time

import common
import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PROMPT_TOKENS = 32
NEW_TOKENS = 128
FORWARD_SHAPES = [(1, 512), (8, 128)]  # (batch, tokens)
DECODE_BATCHES = [1, 8]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16,float16")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per case, best kept (default 5)")
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the embedded SmolLM2)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: time.perf_counter (default); cpu: time.process_time, this process's CPU "
                             "time, which other users' load barely moves; meaningful with --threads 1")
    parser.add_argument("--cases", default="forward,decode", help="which cases to run (default forward,decode)")
    parser.add_argument("--profile", action="store_true", help="profile one forward and one decode of each side")
    parser.add_argument("--compile", action="store_true",
                        help="also time our decode with its compiled step (generate_tokens(compile=True))")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    common.add_device_argument(parser)
    return parser.parse_args()


# ----------------------------------------------------------------------------- the machine

def machine_info(device: torch.device) -> dict:
    """CPU model, cores, AMX flags, torch build facts and the device, for the JSON report."""
    cpu = common.cpu_info()
    return {
        "cpu": cpu["cpu"],
        "cpus": cpu["cpus"],
        "amx_flags": [f for f in cpu["flags"] if f.startswith("amx")],
        "avx512_bf16": "avx512_bf16" in cpu["flags"],
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "device": common.machine_header(device),
    }


clock = "wall"  # "wall" or "cpu", set from --clock in main()


PEAK_N = 4096


def matmul_peak_call(dtype: torch.dtype, device: torch.device, n: int = PEAK_N):
    """A large square torch.mm in this dtype on this device, and its FLOPs: timed alongside the forward, it
    gives the device's matmul ceiling under the same conditions (other users' load included)."""
    a = torch.randn(n, n).to(device=device, dtype=dtype)
    b = torch.randn(n, n).to(device=device, dtype=dtype)
    torch.mm(a, b)  # warm-up: lets oneDNN/MKL pick and cache its kernel
    return (lambda: torch.mm(a, b)), 2 * n ** 3


# ----------------------------------------------------------------------------- the two models

def load_ours(folder, dtype, device):
    from minillm.checkpoint import load_model
    return load_model(folder, dtype=dtype, device=device)


def load_hf(folder, dtype, device):
    import transformers
    transformers.utils.logging.disable_progress_bar()  # keep the results table readable
    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa")
    if device.type == "cpu":
        # Out of the memory map into fresh memory (tied weights are one Parameter, so this keeps them tied).
        for p in model.parameters():
            p.data = p.data.clone()
        for b in model.buffers():
            b.data = b.data.clone()
    else:
        model.to(device)  # a copy into device memory
    # No end-of-sequence stop: exactly NEW_TOKENS tokens, like ours (which stops only at eos ids it is given).
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = model.config.pad_token_id or 0
    return model.eval()


def forward_flops(model, batch: int, tokens: int) -> float:
    """2 * matmul parameters * tokens + causal attention (QK^T and AV) for one full forward."""
    c = model.config
    per_layer = (c.hidden_size * c.num_heads * c.head_dim * 2  # q_proj, o_proj
                 + c.hidden_size * c.num_kv_heads * c.head_dim * 2  # k_proj, v_proj
                 + c.hidden_size * c.intermediate_size * 3)  # gate, up, down
    matmul_params = per_layer * c.num_layers + c.hidden_size * c.vocab_size  # + lm_head (embedding lookup: no flops)
    pairs = tokens * (tokens + 1) / 2  # (query, key) pairs a causal mask allows
    attention = 2 * 2 * c.num_heads * c.head_dim * pairs * c.num_layers  # QK^T and AV, 2 flops per multiply-add
    return batch * (2 * matmul_params * tokens + attention)


@torch.no_grad()
def ours_forward(model, ids):
    return model(ids)


@torch.no_grad()
def hf_forward(model, ids):
    return model(input_ids=ids, use_cache=False).logits


@torch.no_grad()
def ours_decode(model, ids, new_tokens=NEW_TOKENS, compile=False):
    from minillm.generate import generate_tokens
    return generate_tokens(model, ids.tolist(), new_tokens, mode="cached", compile=compile).tokens


@torch.no_grad()
def hf_decode(model, ids, new_tokens=NEW_TOKENS):
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                         do_sample=False, eos_token_id=None)
    return out[:, ids.shape[1]:].tolist()


class DecodeMatmuls(torch.nn.Module):
    """The weight matmuls of one pass of a decode: `rows` [n, in_features] through every projection, `last`
    [batch, hidden] through the head; the very modules of the model, so the very weights."""

    def __init__(self, model):
        super().__init__()
        self.projections = torch.nn.ModuleList(m for name, m in model.named_modules()
                                               if isinstance(m, torch.nn.Linear) and name != "lm_head")
        self.lm_head = model.lm_head

    def forward(self, rows: dict, last: torch.Tensor) -> list:
        # Every product is returned: a compiler would drop the ones nobody reads.
        return [m(rows[m.in_features]) for m in self.projections] + [self.lm_head(last)]


def matmul_floor(model, batch: int, new_tokens=NEW_TOKENS, packed: bool = False):
    """A callable doing only the weight matmuls of a decode: what no implementation on these kernels can beat.

    One prefill (batch x PROMPT_TOKENS rows through every layer's projections, lm_head
    on the last position) and new_tokens - 1 steps of batch rows, as the decode does;
    no attention, norms, RoPE, sampling or Python bookkeeping.
    packed: the same matmuls compiled with frozen weights, packed ahead as the CPU's compiled decode step has
    them (`Transformer.compiled_layer_stack`): the floor of that step's kernels. Call it once before timing.
    """
    matmuls = DecodeMatmuls(model)
    like = {"dtype": model.lm_head.weight.dtype, "device": model.lm_head.weight.device}
    widths = {m.in_features for m in matmuls.projections}
    prefill = {d: torch.randn(batch * PROMPT_TOKENS, d).to(**like) for d in widths}
    step = {d: torch.randn(batch, d).to(**like) for d in widths}
    last = torch.randn(batch, model.lm_head.in_features).to(**like)
    one_pass = torch.compile(matmuls, dynamic=False) if packed else matmuls

    @torch.no_grad()
    def run():
        with torch._inductor.config.patch(freezing=packed):  # as `compiled_layer_stack` runs on the CPU
            for rows in [prefill] + [step] * (new_tokens - 1):
                one_pass(rows, last)
    return run


# ----------------------------------------------------------------------------- timing and checks

def best_of_interleaved(calls: dict, repeats: int, device: torch.device) -> dict:
    """Best time of each call; the calls alternate in every round (the caller has warmed them up)."""
    best = {name: float("inf") for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            with common.Timer(device) as t:
                call()
            best[name] = min(best[name], t.cpu if clock == "cpu" else t.wall)
    return best


def first_divergence(ours: list[list[int]], theirs: list[list[int]], expected_length: int) -> str:
    """A one-line verdict on whether two batches of greedy tokens agree (ours: transformers', or eager's)."""
    lengths = {len(s) for s in ours} | {len(s) for s in theirs}
    if lengths != {expected_length}:
        return f"LENGTHS DIFFER: {[len(s) for s in ours]} against {[len(s) for s in theirs]}"
    diverged = []
    for row, (a, b) in enumerate(zip(ours, theirs)):
        where = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if where is not None:
            diverged.append(f"seq {row} from token {where}")
    if not diverged:
        return f"same greedy tokens ({len(ours)} x {expected_length})"
    return f"differ in {len(diverged)}/{len(ours)} sequences: " + ", ".join(diverged)


def profile_top(label: str, call, device: torch.device, rows: int = 12) -> None:
    """Print the ops that take the most self CPU time in one call, and how much of the wall time they cover."""
    from torch.profiler import ProfilerActivity, profile
    call()
    common.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        call()
        common.synchronize(device)
        wall = time.perf_counter() - start
    events = prof.key_averages()
    op_time = sum(e.self_cpu_time_total for e in events) / 1e6
    print(f"\n--- profile: {label}: wall {wall * 1e3:.1f} ms (under the profiler), "
          f"self time of all ops {op_time * 1e3:.1f} ms")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=45))


# ----------------------------------------------------------------------------- the run

def run_dtype(ours, hf, dtype_name: str, cases: set, repeats: int, device: torch.device,
              compile: bool = False) -> list[dict]:
    """Time every case of one dtype, ours and transformers interleaved; print each row as it is done."""
    vocab = ours.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    results = []
    peak_mm, peak_flops = matmul_peak_call(DTYPES[dtype_name], device) if "forward" in cases else (None, None)

    for batch, tokens in FORWARD_SHAPES if "forward" in cases else []:
        ids = torch.randint(100, vocab, (batch, tokens), generator=generator).to(device)
        a, b = ours_forward(ours, ids), hf_forward(hf, ids)  # warm-up and check
        diff = (a.float() - b.float()).abs().max().item()
        times = best_of_interleaved({"ours": lambda: ours_forward(ours, ids),
                                     "hf": lambda: hf_forward(hf, ids), "peak": peak_mm}, repeats, device)
        results.append({"dtype": dtype_name, "case": f"forward {batch}x{tokens}", "tokens": batch * tokens,
                        "ours_s": times["ours"], "hf_s": times["hf"], "flops": forward_flops(ours, batch, tokens),
                        "peak": peak_flops / times["peak"] / 1e9, "check": f"max |logit diff| {diff:.2e}"})
        print_row(results[-1])

    for batch in DECODE_BATCHES if "decode" in cases else []:
        ids = torch.randint(100, vocab, (batch, PROMPT_TOKENS), generator=generator).to(device)
        a, b = ours_decode(ours, ids), hf_decode(hf, ids)  # warm-up and check
        floor = matmul_floor(ours, batch)
        floor()
        calls = {"ours": lambda: ours_decode(ours, ids), "hf": lambda: hf_decode(hf, ids), "floor": floor}
        check = first_divergence(a, b, NEW_TOKENS)
        if compile:
            resident = common.proc_status_kb("VmRSS")
            compiled = ours_decode(ours, ids, compile=True)  # warm-up: compiles
            calls["compiled"] = lambda: ours_decode(ours, ids, compile=True)
            check += "; compiled against eager: " + first_divergence(compiled, a, NEW_TOKENS)
            if device.type == "cpu":  # where the compiled step packs its weights, graph by graph
                weights = sum(p.nbytes for p in ours.parameters()) / 2 ** 20
                check += (f"; compiling this graph grew the resident memory by "
                          f"{(common.proc_status_kb('VmRSS') - resident) / 1024:.0f} MiB (weights: {weights:.0f} MiB)")
                calls["packed floor"] = matmul_floor(ours, batch, packed=True)
                calls["packed floor"]()
        times = best_of_interleaved(calls, repeats, device)
        results.append({"dtype": dtype_name, "case": f"decode b={batch} {PROMPT_TOKENS}+{NEW_TOKENS}",
                        "tokens": batch * NEW_TOKENS, "ours_s": times["ours"], "hf_s": times["hf"],
                        "floor_s": times["floor"], "check": check})
        if compile:
            results[-1]["compiled_s"] = times["compiled"]
            results[-1]["check"] += (f" ({times['compiled'] * 1e3:.1f} ms, "
                                     f"{times['floor'] / times['compiled']:.1%} of the floor")
            if "packed floor" in times:
                results[-1]["packed_floor_s"] = times["packed floor"]
                results[-1]["check"] += (f", {times['packed floor'] / times['compiled']:.1%} of the packed floor: "
                                         f"{times['packed floor'] * 1e3:.1f} ms")
            results[-1]["check"] += ")"
        print_row(results[-1])
    return results


def profile_dtype(ours, hf, dtype_name: str, device: torch.device) -> None:
    """Where the time goes: the top ops of a 1x512 forward and of a short batch-1 decode, each side."""
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(100, ours.config.vocab_size, (1, 512), generator=generator).to(device)
    profile_top(f"{dtype_name} ours forward 1x512", lambda: ours_forward(ours, ids), device)
    profile_top(f"{dtype_name} transformers forward 1x512", lambda: hf_forward(hf, ids), device)
    ids = ids[:, :PROMPT_TOKENS]
    profile_top(f"{dtype_name} ours decode b=1 {PROMPT_TOKENS}+32", lambda: ours_decode(ours, ids, 32), device)
    profile_top(f"{dtype_name} transformers decode b=1 {PROMPT_TOKENS}+32", lambda: hf_decode(hf, ids, 32),
                device)


HEADER = (f"{'dtype':9} {'case':22} {'ours ms':>9} {'HF ms':>9} {'ours tok/s':>10} {'HF tok/s':>9} "
          f"{'ours/HF':>7} {'speedup':>7} {'peak GF/s':>9} {'ours %peak':>10} {'HF %peak':>8} "
          f"{'mm floor ms':>11}  check")


def print_row(r: dict) -> None:
    ratio = r["ours_s"] / r["hf_s"]
    if "flops" in r:
        eff = (f"{r['peak']:9.1f} {r['flops'] / r['ours_s'] / 1e9 / r['peak']:>10.0%} "
               f"{r['flops'] / r['hf_s'] / 1e9 / r['peak']:>8.0%}")
    else:
        eff = f"{'':>9} {'':>10} {'':>8}"
    floor = f"{r['floor_s'] * 1e3:11.1f}" if "floor_s" in r else f"{'':>11}"
    print(f"{r['dtype']:9} {r['case']:22} {r['ours_s'] * 1e3:9.1f} {r['hf_s'] * 1e3:9.1f} "
          f"{r['tokens'] / r['ours_s']:10.1f} {r['tokens'] / r['hf_s']:9.1f} {ratio:7.2f} {1 / ratio:6.2f}x "
          f"{eff} {floor}  {r['check']}", flush=True)


NOISE = 0.03  # run-to-run differences this small are noise on a shared machine
FLOOR_TARGET = 0.8  # issue 13: decode at or above 80% of its mm floor


def verdicts(results: list[dict]) -> list[str]:
    """The issue's targets: forward no slower than transformers; decoding >= 1.5x its tokens/s."""
    lines = []
    for r in results:
        speedup = r["hf_s"] / r["ours_s"]
        if r["case"].startswith("forward"):
            target = "forward no slower (speedup >= 1.00)"
            verdict = "MET" if speedup >= 1.0 else "PARITY" if speedup >= 1.0 - NOISE else "MISSED"
        else:
            target = "decode >= 1.5x tokens/s"
            verdict = "MET" if speedup >= 1.5 else "MISSED"
            target += f"; bare matmuls alone would be {r['hf_s'] / r['floor_s']:.2f}x HF"
            for step in ("ours", "compiled") if "compiled_s" in r else ("ours",):
                share = r["floor_s"] / r[f"{step}_s"]
                lines.append(f"{'MET' if share >= FLOOR_TARGET else 'MISSED':7} {r['dtype']:9} {r['case']:22} "
                             f"{step:8} at {share:6.1%} of the mm floor  target: >= {FLOOR_TARGET:.0%}")
        lines.append(f"{verdict:7} {r['dtype']:9} {r['case']:22} speedup {speedup:5.2f}x  target: {target}")
    lines.append(f"(PARITY: slower, but by less than {NOISE:.0%}, which is within this machine's run-to-run noise)")
    return lines


def main() -> None:
    global clock
    args = parse_args()
    device = common.parse_device(args.device)
    if args.clock == "cpu" and device.type != "cpu":
        raise SystemExit(f"--clock cpu measures this process's CPU time, not the work of {device}: use --clock wall")
    torch.set_num_threads(args.threads)
    clock = args.clock
    import transformers

    from minillm.embedded import ensure_smollm2
    folder = args.model or str(ensure_smollm2())
    dtype_names = args.dtypes.split(",")
    cases = set(args.cases.split(","))
    info = machine_info(device)
    print(f"{info['device']}, transformers {transformers.__version__}")
    print(f"lscpu AMX flags: {' '.join(info['amx_flags']) or 'none'}; avx512_bf16: {info['avx512_bf16']}")
    print(f"model: {folder}; best of {args.repeats} ({args.clock} clock), ours and transformers interleaved; "
          f"transformers weights copied out of the mmap\n")

    print(HEADER)
    results, memory = [], {}
    for name in dtype_names:
        common.reset_peak_memory(device)
        ours, hf = load_ours(folder, DTYPES[name], device), load_hf(folder, DTYPES[name], device)
        results += run_dtype(ours, hf, name, cases, args.repeats, device, args.compile)
        memory[name], what = common.peak_memory(device)
        print(f"{name}: peak memory {memory[name] / 2 ** 30:.2f} GiB ({what}; both models loaded)", flush=True)
        del ours, hf
    print(f"\nours/HF: time ratio (lower is better); speedup: HF time / ours time;\n"
          f"peak GF/s: a {PEAK_N}^3 torch.mm in that dtype, timed in the same rounds as the forwards; "
          f"%peak: prefill GFLOP/s over that peak;\n"
          f"mm floor: the decode's weight matmuls alone (no attention, norms or Python), "
          f"the best any implementation on these kernels could do;\n"
          f"packed floor (--compile, CPU): the same matmuls on weights packed as the compiled step packs them")
    print("\n".join(verdicts(results)))
    if args.profile:
        for name in dtype_names:
            profile_dtype(load_ours(folder, DTYPES[name], device), load_hf(folder, DTYPES[name], device), name, device)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "results": results, "peak_memory_bytes": memory}, f,
                      indent=1)


if __name__ == "__main__":
    main()
