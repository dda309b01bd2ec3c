"""What freezing the top layers or skipping their attention saves in compute and KV-cache memory, and what it costs.

What is compared
    SmolLM2-135M-Instruct (30 layers, fp32), the manipulation starting at k = 15, 20 and 24
    (50%, 67% and 80% of the depth), for `freeze` and `skip_attention`, three ways:

    baseline    the unmanipulated model
    plain       the manipulated model as the paper defines it, `efficient=False`
    efficient   the same manipulation with `efficient=True`, which gives the same tokens:
                freeze computes previous tokens only as keys/values from layer k-1 up (no
                attention query, no MLP for them); skip_attention allocates a KV cache for
                layers < k only (the layers above never read one)

    Timing, on long prompts since savings scale with the number of previous tokens: one
    512-token prompt (news articles from the summarization task, cut at 512 tokens) and a batch
    of context-qa prompts (~200-250 tokens each). Greedy decoding, cached mode, no stop:
    prefill = `generate_tokens(max_new_tokens=1)` (the prompt pass and one argmax);
    decode per token = (time for 1 + N new tokens - prefill) / N. Times are process CPU
    seconds with one torch thread (the machine is shared: wall time there measures the other
    jobs as much as ours; it is printed too). All configurations alternate in every round and
    the best of `--repeats` rounds is kept. KV-cache
    bytes are those of the `KVCache` that `generate_tokens` allocates for that configuration
    (its keys and values for prompt + new tokens), and a direct forward with a cache of that
    size checks that the configuration runs in it.

    Quality, with `efficient=True` (the timing runs check it gives the plain model's tokens), on
    the built-in tasks: capitals and context-qa (exact match) and summarization (ROUGE-L), each
    task's first `--quality-limit` examples, its own max_new_tokens and stop strings; "kept" =
    score / baseline score.

Run
    python benchmarks/bench_efficiency.py                       # writes docs/benchmarks/efficiency.{md,png}
    python benchmarks/bench_efficiency.py --repeats 2 --quality-limit capitals=20,context-qa=8,summarization=4
    python benchmarks/bench_efficiency.py --device cuda --out /tmp/efficiency   # wall time is the one on a GPU

`--model` takes any checkpoint with a tokenizer (default the embedded SmolLM2); `--device cuda` runs on the
GPU, with every timer synchronizing it; the peak memory (device, or host RSS) is reported at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import common
import torch

from minillm.generate import generate_tokens
from minillm.manipulation import Manipulation
from minillm.model import KVCache

LAYERS = (15, 20, 24)
KINDS = ("freeze", "skip_attention")
DEFAULT_QUALITY = "capitals=40,context-qa=16,summarization=6"
OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default=",".join(map(str, LAYERS)), help="k values (default 15,20,24)")
    parser.add_argument("--long-tokens", type=int, default=512, help="length of the single long prompt (default 512)")
    parser.add_argument("--batch", type=int, default=4, help="context-qa prompts in the batched timing (default 4)")
    parser.add_argument("--new-tokens", type=int, default=32, help="decode steps timed (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds, best kept (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    parser.add_argument("--quality-limit", default=DEFAULT_QUALITY, help=f"examples per task ({DEFAULT_QUALITY})")
    parser.add_argument("--out", default=str(OUT), help="folder for efficiency.md and efficiency.png")
    parser.add_argument("--model", default="smollm2-135m",
                        help="embedded name or checkpoint folder, with a tokenizer (default smollm2-135m)")
    common.add_device_argument(parser)
    return parser.parse_args()


@dataclass(frozen=True)
class Config:
    kind: str | None  # None: baseline
    layer: int
    efficient: bool = False

    @property
    def name(self) -> str:
        if self.kind is None:
            return "baseline"
        return f"{self.kind} k={self.layer} {'efficient' if self.efficient else 'plain'}"

    def manipulation(self) -> Manipulation | None:
        return None if self.kind is None else Manipulation(self.kind, self.layer)


def configs(layers: list[int]) -> list[Config]:
    out = [Config(None, 0)]
    for kind in KINDS:
        for k in layers:
            out += [Config(kind, k, False), Config(kind, k, True)]
    return out


# ----------------------------------------------------------------------------- prompts

def long_prompt(tokenizer, length: int) -> list[int]:
    """`length` tokens of real text: the summarization task's articles one after another."""
    from evals.tasks import get_task
    ids = []
    for example in get_task("summarization").examples:
        ids += tokenizer.encode(f"Article: {example.fields['document']}\n\n")
        if len(ids) >= length:
            return ids[:length]
    raise RuntimeError(f"the summarization articles hold fewer than {length} tokens")


def context_qa_prompts(tokenizer, count: int) -> list[list[int]]:
    from evals.tasks import get_task
    task = get_task("context-qa", count)
    return [tokenizer.encode(task.prompt(example)) for example in task.examples]


# ----------------------------------------------------------------------------- timing

def cache_layers(model, config: Config) -> int:
    """The layers of the KV cache `generate_tokens` allocates for this configuration (see generate.py)."""
    manipulation = config.manipulation()
    L = model.config.num_layers
    return L if manipulation is None else manipulation.cache_layers(L, config.efficient)


def cache_bytes(model, config: Config, batch: int, length: int) -> int:
    """Bytes of the KV cache `generate_tokens` allocates for this configuration (see generate.py)."""
    layers = cache_layers(model, config)
    return KVCache(model.config, batch, length, num_layers=layers).nbytes()


def check_cache_size(model, config: Config, prompts: list[list[int]], new_tokens: int, device) -> None:
    """A prompt pass in a cache of exactly `cache_bytes`' size runs, and gives the plain model's logits."""
    from minillm.generate import left_pad
    ids, mask = left_pad(prompts, 0, device)
    layers = cache_layers(model, config)
    cache = KVCache(model.config, len(prompts), ids.shape[1] + new_tokens, num_layers=layers, device=device)
    a = model(ids, mask, cache=cache, manipulation=config.manipulation(), efficient=config.efficient,
              last_logits_only=True)
    b = model(ids, mask, manipulation=config.manipulation(), last_logits_only=True)
    if not torch.allclose(a, b, atol=1e-4):
        raise RuntimeError(f"{config.name}: logits with a {cache.nbytes()}-byte cache differ from the plain model")


def timed(device, fn, *args) -> tuple[float, float]:
    """(process CPU seconds, wall seconds) of one call, the device synchronized on both ends."""
    with common.Timer(device) as t:
        fn(*args)
    return t.cpu, t.wall


def time_configs(model, prompts: list[list[int]], all_configs: list[Config], new_tokens: int,
                 repeats: int, device) -> dict[Config, dict]:
    """Best prefill and per-token decode times of each configuration, rounds alternating over configurations."""
    def run(config: Config, steps: int):
        return generate_tokens(model, prompts, steps, manipulation=config.manipulation(),
                               efficient=config.efficient, mode="cached").tokens

    results = {}
    for config in all_configs:  # warm-up, tokens kept for the check, cache size checked
        check_cache_size(model, config, prompts, 1 + new_tokens, device)
        results[config] = {"tokens": run(config, 1 + new_tokens), "prefill": float("inf"), "total": float("inf"),
                           "prefill_wall": float("inf"), "total_wall": float("inf")}
    for _ in range(repeats):
        for config in all_configs:
            r = results[config]
            cpu, wall = timed(device, run, config, 1)
            r["prefill"], r["prefill_wall"] = min(r["prefill"], cpu), min(r["prefill_wall"], wall)
            cpu, wall = timed(device, run, config, 1 + new_tokens)
            r["total"], r["total_wall"] = min(r["total"], cpu), min(r["total_wall"], wall)
    length = max(len(p) for p in prompts) + 1 + new_tokens
    for config, r in results.items():
        r["decode"] = max(r["total"] - r["prefill"], 0.0) / new_tokens
        r["decode_wall"] = max(r["total_wall"] - r["prefill_wall"], 0.0) / new_tokens
        r["kv_bytes"] = cache_bytes(model, config, len(prompts), length)
        plain = results.get(Config(config.kind, config.layer, False))
        r["same_as_plain"] = plain is None or plain["tokens"] == r["tokens"]
    return results


# ----------------------------------------------------------------------------- quality

def quality(model, tokenizer, limits: dict[str, int], all_configs: list[Config]) -> dict[Config, dict[str, float]]:
    """Mean primary score per task for the baseline and each efficient configuration."""
    from evals.tasks import get_task
    all_configs = [config for config in all_configs if config.kind is None or config.efficient]
    scores = {config: {} for config in all_configs}
    for name, limit in limits.items():
        task = get_task(name, limit)
        prompts = [tokenizer.encode(task.prompt(example)) for example in task.examples]

        def stop(tokens, task=task):
            text = tokenizer.decode(tokens).lstrip()
            return any(s in text for s in task.stop)

        for config in all_configs:
            result = generate_tokens(model, prompts, task.max_new_tokens, eos_ids=tokenizer.eos_ids,
                                     pad_id=tokenizer.pad_id, manipulation=config.manipulation(),
                                     efficient=config.efficient, stop=stop)
            texts = [tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids]) for tokens in result.tokens]
            values = [task.score(text, example)[task.primary] for text, example in zip(texts, task.examples)]
            scores[config][name] = sum(values) / len(values)
            print(f"  quality {name:13} {config.name:32} {task.primary} {scores[config][name]:.3f}", flush=True)
    return scores


# ----------------------------------------------------------------------------- report

def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def timing_table(title: str, results: dict[Config, dict]) -> list[str]:
    base = results[Config(None, 0)]
    lines = [f"**{title}** (CPU ms; wall ms in brackets)", "",
             "| configuration | prefill ms | vs baseline | decode ms/token | vs baseline | KV cache MiB | vs baseline "
             "| same tokens as plain |",
             "|---|---:|---:|---:|---:|---:|---:|:---:|"]
    for config, r in results.items():
        same = "" if config.kind is None or not config.efficient else ("yes" if r["same_as_plain"] else "**no**")
        lines.append(f"| {config.name} | {r['prefill'] * 1e3:.0f} ({r['prefill_wall'] * 1e3:.0f}) "
                     f"| {ratio(r['prefill'], base['prefill'])} "
                     f"| {r['decode'] * 1e3:.1f} ({r['decode_wall'] * 1e3:.1f}) | {ratio(r['decode'], base['decode'])} "
                     f"| {r['kv_bytes'] / 2 ** 20:.1f} | {ratio(r['kv_bytes'], base['kv_bytes'])} | {same} |")
    return lines


def quality_table(scores: dict[Config, dict[str, float]], limits: dict[str, int]) -> list[str]:
    base = scores[Config(None, 0)]
    names = list(limits)
    head = " | ".join(f"{n} (n={limits[n]})" for n in names)
    lines = ["**Quality kept (efficient=True; score, and in brackets the share of the baseline score)**", "",
             f"| configuration | {head} |", "|---|" + "---:|" * len(names)]
    for config, row in scores.items():
        cells = []
        for n in names:
            kept = f" ({row[n] / base[n]:.0%})" if config.kind is not None and base[n] > 0 else ""
            cells.append(f"{row[n]:.3f}{kept}")
        lines.append(f"| {config.name.replace(' efficient', '')} | " + " | ".join(cells) + " |")
    return lines


def plot(path: Path, layers: list[int], num_layers: int, timing: dict[Config, dict],
         scores: dict[Config, dict[str, float]]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base_t, base_q = timing[Config(None, 0)], scores[Config(None, 0)]
    depth = [k / num_layers for k in layers]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, kind in zip(axes, KINDS):
        for key, label, style in (("prefill", "prefill time", "o-"), ("decode", "decode time / token", "s-"),
                                  ("kv_bytes", "KV-cache bytes", "^-")):
            ax.plot(depth, [timing[Config(kind, k, True)][key] / base_t[key] for k in layers], style,
                    label=f"{label} (efficient)")
        for key, style in (("prefill", "o:"), ("decode", "s:")):
            ax.plot(depth, [timing[Config(kind, k, False)][key] / base_t[key] for k in layers], style, color="grey",
                    alpha=0.7, label=f"{key} (plain)")
        for task in base_q:
            if base_q[task] > 0:
                ax.plot(depth, [scores[Config(kind, k, True)][task] / base_q[task] for k in layers], "x--",
                        label=f"score kept: {task}")
        ax.axhline(1.0, color="black", lw=0.6)
        ax.set_title(kind)
        ax.set_xlabel("first manipulated layer k / L")
        ax.set_xticks(depth, [f"{k}/{num_layers}" for k in layers])
    axes[0].set_ylabel("relative to the unmanipulated model")
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    device, model, tokenizer = common.load_model(args)
    L = model.config.num_layers
    layers = [int(k) for k in args.layers.split(",")]
    limits = common.parse_limits(args.quality_limit)
    all_configs = configs(layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    prompt_sets = [(f"1 x {args.long_tokens}-token prompt", [long_prompt(tokenizer, args.long_tokens)])]
    if args.batch:
        batch = context_qa_prompts(tokenizer, args.batch)
        prompt_sets.append((f"{args.batch} x context-qa prompts ({min(map(len, batch))}-{max(map(len, batch))} tokens)",
                            batch))
    start = time.perf_counter()
    timings = []
    for title, prompts in prompt_sets:
        print(f"timing: {title}, {args.new_tokens} decode steps, best of {args.repeats}", flush=True)
        timings.append((title, time_configs(model, prompts, all_configs, args.new_tokens, args.repeats, device)))
        print("\n".join(timing_table(title, timings[-1][1])), flush=True)
    scores = quality(model, tokenizer, limits, all_configs)

    model_name = "SmolLM2-135M-Instruct" if args.model == "smollm2-135m" else args.model
    where = "CPU" if device.type == "cpu" else f"{common.gpu_info(device)} (CPU time is the host's share only)"
    lines = [f"{model_name}, fp32, {where}, {args.threads} thread(s), cached greedy decoding; times are "
             f"process CPU time, best of {args.repeats} alternating rounds; decode: {args.new_tokens} steps.", "",
             "Command: `python " + " ".join(["benchmarks/bench_efficiency.py", *sys.argv[1:]]) + "`", ""]
    for title, results in timings:
        lines += timing_table(title, results) + [""]
    lines += quality_table(scores, limits)
    lines += ["", "capitals and context-qa: exact match; summarization: ROUGE-L."]
    (out / "efficiency.md").write_text("\n".join(lines) + "\n")
    plot(out / "efficiency.png", layers, L, timings[0][1], scores)
    print("\n" + "\n".join(lines))
    print(common.format_peak_memory(device))
    print(f"\nwrote {out / 'efficiency.md'} and {out / 'efficiency.png'} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
