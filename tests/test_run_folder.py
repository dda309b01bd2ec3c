"""Result folders that never mix or lose, shards, the report on any folder, and the intervals on every point.

A tiny random Llama and a few examples of the built-in tasks keep each sweep to a second or two.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evals.aggregate import aggregate
from evals.cli import main
from evals.report import decide, recovery_range, results_table, write_report
from evals.results import SweepError, claimed_folder, load_results
from evals.stats import bootstrap_mean, newcombe_paired, wilson
from evals.sweep import LayerGrid, Shard, run_sweep
from evals.tasks import get_task
from minillm.checkpoint import load_model
from minillm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir), load_tokenizer(tiny_dir)


def sweep(tiny, out, tasks=None, kinds=("freeze",), layers="0:4:2", **options):
    model, tokenizer = tiny
    tasks = tasks or [get_task("capitals", limit=4)]
    return run_sweep(model, tokenizer, tasks, list(kinds), LayerGrid.parse(layers), out, model_name="tiny",
                     batch_size=2, progress=False, **options)


# ----------------------------------------------------------------------------- the manifest

@pytest.mark.parametrize("change, setting", [
    (lambda task: get_task("capitals", limit=3), "holds results for task capitals: number of examples (--limit) 4"),
    (lambda task: dataclasses.replace(task, max_new_tokens=task.max_new_tokens + 1), "holds results for task capitals: max_new_tokens "),
    (lambda task: dataclasses.replace(task, template="Capital of {country}? A:"),
     "holds results for task capitals: template "),
    (lambda task: dataclasses.replace(task, examples=(dataclasses.replace(task.examples[0], golds=("Paris",)),
                                                      *task.examples[1:])),
     "holds results for other task capitals: examples (an edited data file?)"),
])
def test_a_resume_with_other_settings_is_refused_naming_the_setting(tiny, tmp_path, change, setting):
    task = get_task("capitals", limit=4)
    sweep(tiny, tmp_path, [task])
    before = (tmp_path / "results.jsonl").read_bytes()
    with pytest.raises(SweepError, match=re.escape(setting)):
        sweep(tiny, tmp_path, [change(task)])
    assert (tmp_path / "results.jsonl").read_bytes() == before


def test_a_resume_that_adds_layers_kinds_and_seeds_extends_the_run_and_says_so(tiny, tmp_path, capsys):
    first = sweep(tiny, tmp_path, layers="0:4:2")
    before = (tmp_path / "results.jsonl").read_bytes()
    capsys.readouterr()
    second = sweep(tiny, tmp_path, kinds=("freeze", "random"), layers="0:4:1", seeds=2)
    assert "extending the run with kinds random; layers 0, 3; seeds 1 -> 2" in capsys.readouterr().err
    assert (tmp_path / "results.jsonl").read_bytes().startswith(before)  # nothing rewritten, only appended
    assert {(r["kind"], r["k"]) for r in second.records} > {(r["kind"], r["k"]) for r in first.records}
    manifest = json.loads((tmp_path / "run.json").read_text())
    assert manifest["sweep"]["layers"] == [0, 1, 2, 3] and manifest["sweep"]["seeds"] == 2
    assert manifest["model"] == "tiny" and len(manifest["checkpoint"]) == 64
    assert set(manifest["sweep"]["tasks"]["capitals"]) >= {"examples_sha256", "prompts_sha256", "template", "shots",
                                                          "max_new_tokens"}


def test_another_checkpoint_under_the_same_name_is_refused(tiny, tmp_path):
    model, tokenizer = tiny
    sweep(tiny, tmp_path)
    other = type(model)(model.config)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        other.layers[1].mlp.down_proj.weight[0, 0] += 1  # one weight of a middle layer, as a fine-tune would
    with pytest.raises(SweepError, match="checkpoint weights"):
        run_sweep(other, tokenizer, [get_task("capitals", limit=4)], ["freeze"], LayerGrid.parse("0:4:2"), tmp_path,
                  model_name="tiny", batch_size=2, progress=False)


def test_a_stored_record_with_other_gold_answers_is_refused_not_skipped(tiny, tmp_path):
    sweep(tiny, tmp_path)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines()
    record = json.loads(lines[0])
    record["golds"] = ["Somewhere else"]
    path.write_text("\n".join([json.dumps(record)] + lines[1:]) + "\n")
    with pytest.raises(SweepError, match="has another gold answers than this run's: the data changed"):
        sweep(tiny, tmp_path)


def test_records_carry_the_prompt_text(tiny, tmp_path):
    model, tokenizer = tiny
    task = get_task("capitals", limit=4)
    for record in sweep(tiny, tmp_path, [task]).records:
        example = next(e for e in task.examples if e.id == record["example"])
        assert record["prompt"] == task.prompt(example)
        assert record["prompt_ids"] == tokenizer.encode(record["prompt"])


def test_tasks_are_told_apart_by_name_even_with_the_same_example_ids(tiny, tmp_path):
    """What two data files both called data.jsonl become once their tasks are named apart: two tasks, all kept."""
    base = get_task("capitals", limit=3)
    first = dataclasses.replace(base, name="a/data.jsonl")
    second = dataclasses.replace(base, name="b/data.jsonl",
                                 examples=tuple(dataclasses.replace(e, fields={"country": "Narnia"})
                                                for e in base.examples))
    sweep(tiny, tmp_path, [first, second])
    records = load_results(tmp_path)
    assert len(records) == 2 * 3 * 3  # both tasks, every example, baseline and freeze at k = 1, 2
    with pytest.raises(SweepError, match="two tasks are named 'a/data.jsonl'"):
        sweep(tiny, tmp_path / "other", [first, first])


# ----------------------------------------------------------------------------- one writer

def test_a_second_writer_stops_at_once_and_the_first_runs_file_is_unharmed(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sweep", "--model", str(tiny_dir), "--task", "capitals", "--manipulation", "freeze", "--layers",
            "0:4:2", "--limit", "3", "--batch-size", "2", "--out", str(out)]
    assert main(argv) == 0
    with open(out / "results.jsonl", "a") as file:  # the first writer, caught mid-line
        file.write('{"task": "capitals", "exam')
    before = (out / "results.jsonl").read_bytes()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time\n"
                               "f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(60)", str(out / ".results.jsonl.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert main(argv + ["--model", "/no/such/model"]) != 0  # refused before the model would load
        error = capsys.readouterr().err.strip()
        assert "another process is writing results.jsonl" in error and "\n" not in error
        assert (out / "results.jsonl").read_bytes() == before  # not even its partial last line was cut
    finally:
        holder.kill()
        holder.wait()


def test_out_is_checked_before_the_model_loads(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["sweep", "--model", "/no/such/model", "--task", "capitals", "--manipulation", "freeze",
                 "--out", str(blocker)]) != 0
    error = capsys.readouterr().err.strip()
    assert error == f"minillm: error: --out {blocker}: exists and is not a folder"  # not a model error: out came first
    with pytest.raises(SweepError, match="exists and is not a folder"):
        with claimed_folder(blocker, "results.jsonl"):
            pass


# ----------------------------------------------------------------------------- hostile folders and arguments

@pytest.mark.parametrize("line, message", [
    ("{}", "not a result record (no field 'task')"),
    ("[1, 2]", "not a result record (a JSON list"),
    ("{not json", "not a JSON record"),
])
def test_a_malformed_line_is_named_by_file_and_line(tiny_dir, tmp_path, capsys, line, message):
    out = tmp_path / "run"
    argv = ["sweep", "--model", str(tiny_dir), "--task", "capitals", "--manipulation", "freeze", "--layers",
            "0:4:2", "--limit", "2", "--out", str(out)]
    assert main(argv) == 0
    path = out / "results.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:2] + [line] + lines[2:]) + "\n")
    capsys.readouterr()
    for command in (argv, ["report", str(out)]):
        assert main(command) != 0
        error = capsys.readouterr().err.strip()
        assert f"{path}:3: {message}" in error and "\n" not in error


def test_a_repeated_task_is_refused_before_anything_runs(tiny_dir, tmp_path, capsys):
    argv = ["sweep", "--model", str(tiny_dir), "--manipulation", "freeze", "--layers", "0:4:2", "--limit", "2"]
    assert main(argv + ["--task", "capitals,capitals", "--out", str(tmp_path / "twice")]) == 2
    assert capsys.readouterr().err.strip() == "minillm: error: --task names 'capitals' twice: each task runs once"
    assert not (tmp_path / "twice").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--layers", "40::1"], "reaches k=40, but the model has 4 layers"),
    (["--shard", "0/2"], "shards count from 1: 1/2 ... 2/2"),
    (["--shard", "auto"], "--shard auto: found neither torchrun's RANK/WORLD_SIZE nor a Slurm array's"),
])
def test_cli_refuses_layers_and_shards_it_cannot_honour(tiny_dir, tmp_path, capsys, monkeypatch, arguments, message):
    for name in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(name, raising=False)
    out = tmp_path / "run"
    argv = ["sweep", "--model", str(tiny_dir), "--task", "capitals", "--manipulation", "freeze", "--limit", "2",
            "--out", str(out), *arguments]
    assert main(argv) != 0
    error = capsys.readouterr().err.strip()
    assert message in error and "\n" not in error
    assert not out.exists()


@pytest.mark.parametrize("environment, shard", [
    ({"RANK": "0", "WORLD_SIZE": "2"}, Shard(1, 2)),
    ({"RANK": "3", "WORLD_SIZE": "4", "SLURM_ARRAY_TASK_ID": "9", "SLURM_ARRAY_TASK_COUNT": "10"}, Shard(4, 4)),
    ({"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "0"}, Shard(1, 3)),
    ({"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "1"}, Shard(3, 3)),
    ({"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "3", "SLURM_ARRAY_TASK_MIN": "10",
      "SLURM_ARRAY_TASK_STEP": "2"}, Shard(3, 3)),
])
def test_shard_auto_reads_torchrun_and_slurm_arrays_in_one_numbering(environment, shard):
    assert Shard.parse("auto", environment) == shard


@pytest.mark.slow
def test_torchrun_shards_merge_to_the_unsharded_run_byte_for_byte(tiny_dir, tmp_path):
    common = ["sweep", "--model", str(tiny_dir), "--task", "capitals,fanoutqa", "--manipulation", "freeze,random",
              "--layers", "0:4:2", "--limit", "3", "--seeds", "2", "--batch-size", "2"]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
                    "evals.cli", *common, "--threads", "1", "--shard", "auto", "--out", str(tmp_path / "sharded")],
                   check=True, env=environment, capture_output=True, timeout=300)
    assert main(common + ["--threads", "1", "--out", str(tmp_path / "whole")]) == 0
    shards = sorted(path.name for path in (tmp_path / "sharded").glob("results*.jsonl"))
    assert shards == ["results.shard-1-of-2.jsonl", "results.shard-2-of-2.jsonl"]
    as_bytes = lambda folder: json.dumps(sorted(load_results(folder).values(), key=json.dumps)).encode()  # noqa: E731
    assert as_bytes(tmp_path / "sharded") == as_bytes(tmp_path / "whole")
    write_report(tmp_path / "sharded")
    write_report(tmp_path / "whole")
    assert (tmp_path / "sharded" / "summary.json").read_bytes() == (tmp_path / "whole" / "summary.json").read_bytes()


# ----------------------------------------------------------------------------- reports and smoke runs

def test_report_on_a_swap_only_folder(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["swap", "--model", str(tiny_dir), "--limit", "30", "--layers", "0:4:2", "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "## Swap" in report and "## Recovery" not in report
    summary = json.loads((out / "summary.json").read_text())
    assert "swap" in summary and summary["tasks"] == {}


def test_reproduce_quick_is_a_smoke_run_and_its_limit_and_layers_reach_the_swap(tiny_dir, tmp_path, capsys):
    out = tmp_path / "quick"
    assert main(["reproduce", "--quick", "--model", str(tiny_dir), "--limit", "3", "--layers", "0:4:2",
                 "--out", str(out)]) == 0
    assert "Smoke run (`--quick`)" in (out / "report.md").read_text()
    swap = [json.loads(line) for line in (out / "swap.jsonl").read_text().splitlines()]
    assert {r["k"] for r in swap} <= {0, 2, 4}
    assert len({r["example"] for r in swap if r["kind"] == "baseline"}) <= 3
    printed = capsys.readouterr().out
    assert "95% half-widths:" in printed and "smoke run" in printed


def test_sweep_ends_with_a_results_table_of_every_point(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["sweep", "--model", str(tiny_dir), "--task", "capitals", "--manipulation", "freeze", "--layers",
                 "0:4:2", "--limit", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split() == ["task", "metric", "kind", "k", "n", "score", "95%", "interval", "vs", "baseline",
                                  "[95%", "CI]"]
    summary = aggregate(load_results(out).values())["capitals"]
    baseline = summary.baseline
    assert printed[2].split() == ["capitals", "exact_match", "baseline", "4", "5", f"{baseline.score:.3f}",
                                  f"[{baseline.lo:.3f},", f"{baseline.hi:.3f}]"]
    assert len([line for line in printed if line.startswith("capitals")]) == 1 + 2  # baseline, freeze k = 1, 2
    assert results_table({"capitals": summary}) in "\n".join(printed)


# ----------------------------------------------------------------------------- intervals on every point

def record(example, kind, k, seed, score, metric="exact_match"):
    return {"task": "t", "example": example, "kind": kind, "k": k, "seed": seed, "num_layers": 4, "metric": metric,
            "chance": 0.0, "scores": {metric: score}}


def test_points_carry_n_intervals_seed_spread_and_the_paired_difference():
    baseline = [record(f"e{i}", "baseline", 4, None, float(i < 6)) for i in range(8)]
    freeze = [record(f"e{i}", "freeze", 2, None, float(i < 3)) for i in range(8)]
    # random with two seeds: seed 0 gets examples 0-3 right, seed 1 examples 0-1
    random_ = [record(f"e{i}", "random", 0, seed, float(i < (4 if seed == 0 else 2))) for i in range(8)
               for seed in (0, 1)]
    summary = aggregate(baseline + freeze + random_)["t"]
    assert (summary.baseline.n, summary.baseline.count) == (8, 8)
    assert (summary.baseline.lo, summary.baseline.hi) == wilson(6, 8)
    point = summary.curves["freeze"][0]
    assert (point.k, point.score, point.n, (point.lo, point.hi)) == (2, 3 / 8, 8, wilson(3, 8))
    assert (point.difference_lo, point.difference_hi) == newcombe_paired([float(i < 3) for i in range(8)],
                                                                         [float(i < 6) for i in range(8)])
    pooled = summary.curves["random"][0]
    assert (pooled.n, pooled.count, pooled.score) == (8, 16, 6 / 16)  # examples, records, mean over both
    assert pooled.seed_spread == pytest.approx((4 / 8 - 2 / 8) / 2 ** 0.5)  # sample sd of the two seeds' means
    assert (pooled.lo, pooled.hi) == bootstrap_mean([1.0, 1.0, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0])  # seeds averaged first
    graded = aggregate([dict(r, metric="f1", scores={"f1": r["scores"]["exact_match"]}) for r in baseline])["t"]
    assert (graded.baseline.lo, graded.baseline.hi) == bootstrap_mean([1.0] * 6 + [0.0] * 2)  # F1: the bootstrap


def test_curves_csv_and_summary_json_carry_the_bounds(tiny_dir, tmp_path):
    out = tmp_path / "run"
    assert main(["sweep", "--model", str(tiny_dir), "--task", "capitals", "--manipulation", "freeze", "--layers",
                 "0:4:2", "--limit", "4", "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    header, *rows = (out / "figures" / "curves.csv").read_text().splitlines()
    assert header.split(",")[:9] == ["task", "kind", "k", "k_over_L", "score", "count", "n", "lo", "hi"]
    summary = aggregate(load_results(out).values())["capitals"]
    freeze_1 = next(row.split(",") for row in rows if row.startswith("capitals,freeze,1,"))
    assert (float(freeze_1[7]), float(freeze_1[8])) == (summary.curves["freeze"][0].lo, summary.curves["freeze"][0].hi)
    stored = json.loads((out / "summary.json").read_text())["tasks"]["capitals"]["curves"]["freeze"][0]
    assert (stored["n"], stored["lo"], stored["hi"]) == (4, summary.curves["freeze"][0].lo,
                                                         summary.curves["freeze"][0].hi)


def test_the_verdict_says_when_the_sample_is_too_small_to_tell():
    from evals.aggregate import Point, TaskSummary

    def point(k, score, lo, hi):
        return Point(k, score, 40, 40, score - 0.1, score + 0.1, None, score - 0.8, lo, hi)

    L, baseline = 30, Point(30, 0.8, 40, 40, 0.65, 0.9, None, 0.0, 0.0, 0.0)
    # clearly below up to k = 9, clearly within 10% of the baseline from k = 18: recovery in 12..18 (k/L 0.4-0.6)
    wide = [point(0, 0.0, -0.9, -0.7), point(9, 0.2, -0.7, -0.5), point(12, 0.6, -0.4, 0.1),
            point(15, 0.7, -0.3, 0.05), point(18, 0.8, -0.05, 0.05), point(24, 0.8, -0.05, 0.05), baseline]
    summary = TaskSummary("t", "exact_match", 0.0, L, baseline, {"freeze": wide})
    assert recovery_range(wide, 0.8) == (12, 18)
    assert decide(summary, wide).startswith("too few examples to tell: recovery somewhere in k = 12..18")
    # the same curve measured precisely: every point's interval is clear of the threshold
    narrow = [dataclasses.replace(p, difference_lo=p.difference - 0.01, difference_hi=p.difference + 0.01)
              for p in wide[:-1]] + [baseline]
    narrow = [dataclasses.replace(p, difference=p.score - 0.8, difference_lo=p.score - 0.81,
                                  difference_hi=p.score - 0.79) if p.k < L else p for p in narrow]
    earliest, latest = recovery_range(narrow, 0.8)
    assert earliest == latest == 18
    assert decide(summary, narrow).startswith("agrees with the paper")


def test_report_on_a_swap_only_folder_with_pairs(tmp_path):
    """Swap records as `evals.swap` writes them (built here: the tiny model knows no capital), reported alone."""
    L, countries = 4, ["france", "italy", "spain", "peru", "chile"]
    golds = dict(zip(countries, [["Paris"], ["Rome"], ["Madrid"], ["Lima"], ["Santiago"]]))
    base = {"task": "capitals-swap", "num_layers": L, "model": "m", "dtype": "float32", "metric": "accuracy",
            "chance": 0.0, "seed": None}
    records = [base | {"example": c, "kind": "baseline", "k": L, "golds": golds[c], "prediction": golds[c][0],
                       "scores": {"accuracy": 1.0}} for c in countries]
    for index, recipient in enumerate(countries):
        donor = countries[(index + 1) % len(countries)]
        for k in (0, 2):
            follows_donor = k == 0 or index == 0  # swapped low: the donor's capital; at k = 2 only one pair
            records.append(base | {"example": recipient, "kind": "swap", "k": k, "golds": golds[recipient],
                                   "donor": donor, "donor_golds": golds[donor],
                                   "scores": {"original": float(not follows_donor),
                                              "injected": float(follows_donor)}})
    (tmp_path / "swap.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    write_report(tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())["swap"]
    assert summary["pairs"] == 5 and summary["ks"] == [0, 2, 4]
    assert summary["injected"] == [1.0, 0.2, 0.0] and summary["original"] == [0.0, 0.8, 1.0]
    assert summary["injected_interval"][1] == list(wilson(1, 5))
    report = (tmp_path / "report.md").read_text()
    assert "5 country pairs" in report and "## Recovery" not in report
    assert (tmp_path / "figures" / "swap.csv").read_text().startswith("k,k_over_L,original,original_lo")


def test_a_refused_reproduce_leaves_no_folder_behind(tiny_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["reproduce", "--quick", "--model", str(tiny_dir), "--layers", "9:9:1", "--out", str(out)]) != 0
    assert "reaches k=9" in capsys.readouterr().err
    assert not out.exists()


def test_a_sweep_without_a_folder_runs_in_memory_and_plots_to_a_str_path(tiny, tmp_path, monkeypatch):
    from evals.plots import plot_curves

    monkeypatch.chdir(tmp_path)
    in_memory = sweep(tiny, None)
    assert in_memory.path is None and list(tmp_path.iterdir()) == []  # nothing written
    on_disk = sweep(tiny, tmp_path / "run")
    assert in_memory.records == on_disk.records and in_memory.summaries == on_disk.summaries
    point = in_memory.summaries["capitals"].curves["freeze"][0]
    assert point.n == 4 and point.lo is not None and point.difference_lo is not None
    png, table = plot_curves(in_memory, "curves.png")
    assert png.stat().st_size > 0 and table.read_text().startswith("task,kind,k,k_over_L,score,count,n,lo,hi")


def test_under_torchrun_cuda_means_this_ranks_own_gpu(monkeypatch):
    from evals.cli import device_of_this_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert device_of_this_rank("cuda") == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert (device_of_this_rank("cuda"), device_of_this_rank("cuda:0"), device_of_this_rank("cpu")) == (
        "cuda:3", "cuda:0", "cpu")


# ----------------------------------------------------------------------------- --batch-size auto

def test_batch_size_auto_sizes_the_batch_from_the_memory_budget(tiny_dir, tmp_path, monkeypatch, capsys):
    from minillm import memory
    from minillm.config import ModelConfig

    config = ModelConfig.from_hf(json.loads((tiny_dir / "config.json").read_text()))
    task = get_task("capitals", limit=5)
    tokenizer = load_tokenizer(tiny_dir)
    longest = max(len(tokenizer.encode(task.prompt(example))) for example in task.examples)
    each = memory.bytes_per_sequence(config, torch.float32, longest, task.max_new_tokens, True)
    argv = ["sweep", "--model", str(tiny_dir), "--task", "capitals", "--manipulation", "freeze", "--layers", "0:4:2",
            "--limit", "5", "--batch-size", "auto"]
    for fits, expected in ((3.5, 3), (1.2, 1)):  # the budget holds 3.5 (1.2) sequences beside the headroom
        monkeypatch.setattr(memory, "memory_budget", lambda device, fits=fits: int(fits * each / 0.8))
        assert main(argv + ["--out", str(tmp_path / str(expected))]) == 0
        assert f"--batch-size auto: {expected}\n" in capsys.readouterr().err
    manifest = json.loads((tmp_path / "3" / "run.json").read_text())["sweep"]
    assert manifest["batch_size"] == 3
    # packed conditions hold their caches at once: no more cache slots than the batch that fits
    assert manifest["pack_tokens"] == 3 * (longest + task.max_new_tokens)
    # the batch size is part of the run (other shapes round differently): resuming with another is refused
    monkeypatch.setattr(memory, "memory_budget", lambda device: int(1.2 * each / 0.8))
    assert main(argv + ["--out", str(tmp_path / "3")]) == 2
    assert "holds results for batch size (--batch-size) 3, this run has 1" in capsys.readouterr().err
    assert main(["sweep", "--batch-size", "many"]) == 2
    assert "argument --batch-size: expected a whole number or 'auto', got 'many'" in capsys.readouterr().err
