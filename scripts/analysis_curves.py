"""Where the capitals answer forms: logit-lens and attention curves, averaged over the examples a model gets right.

    .venv/bin/python scripts/analysis_curves.py                    # SmolLM2-135M, all correct examples
    .venv/bin/python scripts/analysis_curves.py --limit 40 --out /tmp/curves

For every capitals example (three-shot, Q and A on separate lines) the model first answers greedily,
unmanipulated; only the examples it answers exactly right are kept. For those, at the last prompt
position (the "A:" that precedes the answer), per layer j:

- the logit lens of H[j]: the probability and rank of the model's own first answer token;
- the norms of layer j's attention output and MLP output, each over the norm of H[j];
- the attention of the last token (mean over heads) on token 0 and on the country's tokens.

Each curve is the mean over examples (the rank: the median) with a 95% bootstrap interval over
examples (2000 resamples, seeded). Writes capitals_curves.csv and capitals_curves.png to --out.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

import minillm
from evals.metrics import METRICS
from evals.tasks import capitals, evenly_spaced
from minillm.analysis import (
    attention_probabilities,
    layer_norms,
    logit_lens,
    token_rank,
)

RESAMPLES = 2000


def correct_examples(model, tokenizer, task, batch_size: int = 16):
    """(example, prompt ids, first answer token) for every example the model answers exactly right."""
    kept = []
    for start in range(0, len(task.examples), batch_size):
        examples = task.examples[start:start + batch_size]
        prompts = [tokenizer.encode(task.prompt(example)) for example in examples]
        generated = minillm.generate_tokens(model, prompts, task.max_new_tokens, eos_ids=tokenizer.eos_ids,
                                            pad_id=tokenizer.pad_id).tokens
        for example, ids, tokens in zip(examples, prompts, generated):
            answer = task.postprocess(tokenizer.decode([t for t in tokens if t not in tokenizer.eos_ids]))
            if METRICS[task.metric](answer, example.golds)[task.primary] == 1.0:
                kept.append((example, ids, tokens[0]))
    return kept


def country_positions(tokenizer, task, example, ids: list[int]) -> list[int]:
    """Positions of the country's tokens in the last question (tokenizing the prompt up to and past it)."""
    question = task.prefix + task.template.split("{country}")[0]
    before = len(tokenizer.encode(question.rstrip()))
    after = len(tokenizer.encode(question + example.fields["country"]))
    if ids[:after] != tokenizer.encode(question + example.fields["country"]):
        raise ValueError(f"{example.id}: the country's tokens do not line up with the prompt's")
    return list(range(before, after))


@torch.no_grad()
def measure(model, tokenizer, task, kept) -> dict[str, np.ndarray]:
    """Per-example curves: each value [n, L+1] (lens, read from H[0..L]) or [n, L] (layers 0..L-1)."""
    rows = {name: [] for name in ("p_answer", "top1", "rank", "attention_ratio", "mlp_ratio",
                                  "attention_to_first_token", "attention_to_country")}
    for example, ids, answer_id in kept:
        _, states = model(torch.tensor([ids]), output_hidden_states=True)
        lens = logit_lens(model, states)[:, 0]  # [L+1, V]
        rank = token_rank(lens, answer_id)
        norms = layer_norms(model, states)
        heads_mean = attention_probabilities(model, states)[:, 0].mean(dim=1)  # [L, T]
        rows["p_answer"].append(lens[:, answer_id])
        rows["top1"].append((rank == 0).float())
        rows["rank"].append(rank.float())
        rows["attention_ratio"].append(norms.attention[:, 0] / norms.residual[:, 0])
        rows["mlp_ratio"].append(norms.mlp[:, 0] / norms.residual[:, 0])
        rows["attention_to_first_token"].append(heads_mean[:, 0])
        rows["attention_to_country"].append(heads_mean[:, country_positions(tokenizer, task, example, ids)].sum(-1))
    return {name: torch.stack(values).numpy() for name, values in rows.items()}


def bootstrap(values: np.ndarray, statistic, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """statistic over examples (axis 0) per layer, and its 95% percentile bootstrap interval."""
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(values), size=(RESAMPLES, len(values)))
    resampled = np.stack([statistic(values[rows], axis=0) for rows in samples])
    low, high = np.percentile(resampled, [2.5, 97.5], axis=0)
    return statistic(values, axis=0), low, high


def summarise(curves: dict[str, np.ndarray]) -> tuple[list[str], list[list]]:
    """CSV columns and rows, one row per j = 0..L (layer columns are empty at j = L: there is no layer L)."""
    n, lens_length = curves["p_answer"].shape
    header, columns = ["j", "n"], [list(range(lens_length)), [n] * lens_length]
    for name, values in curves.items():
        statistic = np.median if name == "rank" else np.mean
        label = f"{name}_median" if name == "rank" else f"{name}_mean"
        for suffix, column in zip(("", "_low95", "_high95"), bootstrap(values, statistic)):
            header.append(label + suffix)
            columns.append([f"{v:.6g}" for v in column] + [""] * (lens_length - len(column)))
    return header, [list(row) for row in zip(*columns)]


def plot(curves: dict[str, np.ndarray], model_name: str, path: Path) -> None:
    n = len(curves["p_answer"])
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = [
        (axes[0], ["p_answer", "top1"], ["P(answer token)", "answer is the top token"], "logit lens of H[j]"),
        (axes[1], ["attention_ratio", "mlp_ratio"], ["|attention out| / |H[j]|", "|MLP out| / |H[j]|"],
         "last token: how much layer j moves it"),
        (axes[2], ["attention_to_first_token", "attention_to_country"], ["token 0", "country tokens"],
         "last token's attention (head mean)"),
    ]
    for axis, names, labels, title in panels:
        for name, label in zip(names, labels):
            mean, low, high = bootstrap(curves[name], np.mean)
            layers = np.arange(len(mean))
            axis.plot(layers, mean, marker=".", label=label)
            axis.fill_between(layers, low, high, alpha=0.25)
        axis.set_xlabel("j")
        axis.set_title(title)
        if axis is axes[1]:
            axis.set_yscale("log")  # layer 0's ratios are large only because the embeddings are small
        axis.legend()
    fig.suptitle(f"{model_name}, capitals (3-shot), the {n} examples answered correctly; bands: 95% bootstrap")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, help="consider N examples spread evenly over the task (default: all)")
    parser.add_argument("--out", default="docs/analysis", help="output folder (default: docs/analysis)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model, tokenizer = minillm.load(args.model)
    task = evenly_spaced(capitals(), args.limit) if args.limit else capitals()
    kept = correct_examples(model, tokenizer, task)
    if not kept:
        raise SystemExit(f"{args.model} answers none of the {len(task.examples)} capitals examples correctly")
    print(f"{len(kept)} of {len(task.examples)} examples answered correctly")
    curves = measure(model, tokenizer, task, kept)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = summarise(curves)
    with open(out / "capitals_curves.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)
    plot(curves, args.model, out / "capitals_curves.png")
    print(f"wrote {out / 'capitals_curves.csv'} and {out / 'capitals_curves.png'}")


if __name__ == "__main__":
    main()
