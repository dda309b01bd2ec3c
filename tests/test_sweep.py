"""The eval harness: sweeps that resume and shard exactly, the CLI's refusals, the report's arithmetic.

Most tests run a tiny random Llama (4 layers, width 32) with a byte-level tokenizer, saved as an
ordinary checkpoint folder so the CLI loads it by path like any other model: a sweep over a few
capitals examples then takes a second or two. Only the last test loads SmolLM2-135M.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from evals.aggregate import Point, TaskSummary, aggregate
from evals.cli import main
from evals.report import crossover_layer, recovery_layer, verdict
from evals.results import SweepError, load_results
from evals.swap import SwapRates
from evals.sweep import LayerGrid, Shard, run_sweep
from evals.tasks import TASKS, evenly_spaced, get_task
from minillm.checkpoint import load_model
from minillm.packed import PACK_TOKENS
from minillm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return load_model(tiny_dir), load_tokenizer(tiny_dir)


def small_sweep(tiny, out_dir, shard=None, **options):
    """The path of the records file of a small sweep into out_dir."""
    model, tokenizer = tiny
    tasks = [get_task("capitals", limit=5), get_task("fanoutqa", limit=3)]
    return run_sweep(model, tokenizer, tasks, ["random", "freeze", "skip_attention"], LayerGrid.parse("0::2"),
                     out_dir, model_name="tiny", seeds=2, batch_size=2, shard=shard or Shard(), progress=False, **options).path


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ----------------------------------------------------------------------------- resume, shards, determinism

def test_a_sweep_records_every_condition_once(tiny, tmp_path):
    path = small_sweep(tiny, tmp_path)
    records = [json.loads(line) for line in lines(path)]
    keys = [(r["task"], r["example"], r["kind"], r["k"], r["seed"]) for r in records]
    assert len(keys) == len(set(keys))
    # per example: the baseline, random at k = 0, 2 with 2 seeds, freeze at k = 1 (for 0), 2, skip_attention at 0, 2
    assert len(records) == 8 * (1 + 2 * 2 + 2 + 2)
    assert {(r["kind"], r["k"], r["seed"]) for r in records if r["task"] == "capitals"} == {
        ("baseline", 4, None), ("random", 0, 0), ("random", 0, 1), ("random", 2, 0), ("random", 2, 1),
        ("freeze", 1, None), ("freeze", 2, None), ("skip_attention", 0, None), ("skip_attention", 2, None)}
    first = records[0]
    assert first["manipulation"] is None and first["kind"] == "baseline"
    assert next(r for r in records if r["kind"] == "random")["manipulation"]["kind"] == "random"
    assert first["prediction"] == get_task("capitals").postprocess(first["generation"])


def test_the_same_command_twice_gives_identical_files(tiny, tmp_path):
    first, second = small_sweep(tiny, tmp_path / "a"), small_sweep(tiny, tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()


def test_a_rerun_after_a_kill_mid_run_finishes_with_the_same_file(tiny, tmp_path, monkeypatch):
    reference = small_sweep(tiny, tmp_path / "reference")

    # Kill the run after 23 records, in the middle of a work unit...
    from evals.results import ResultLog

    write = ResultLog.write
    written = []

    def write_then_die(self, record):
        if len(written) == 23:
            raise KeyboardInterrupt  # what the process sees is irrelevant: it stops here
        write(self, record)
        written.append(record)

    monkeypatch.setattr(ResultLog, "write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        small_sweep(tiny, tmp_path / "run")
    monkeypatch.undo()
    path = tmp_path / "run" / "results.jsonl"
    assert len(lines(path)) == 23
    # ... and as if the kill had come mid-write: half of the next line is on disk.
    next_line = lines(reference)[23]
    with open(path, "a", encoding="utf-8") as file:
        file.write(next_line[:len(next_line) // 2])

    resumed = small_sweep(tiny, tmp_path / "run")
    assert resumed.read_bytes() == reference.read_bytes()  # no duplicates, nothing lost, same order
    again = small_sweep(tiny, tmp_path / "run")  # a finished run has nothing left to do
    assert again.read_bytes() == reference.read_bytes()


def test_shards_together_equal_one_unsharded_run(tiny, tmp_path):
    whole = small_sweep(tiny, tmp_path / "whole")
    parts = [small_sweep(tiny, tmp_path / "sharded", shard=Shard(index, 3)) for index in (1, 2, 3)]
    assert [path.name for path in parts] == [f"results.shard-{i}-of-3.jsonl" for i in (1, 2, 3)]
    assert all(lines(path) for path in parts)  # every shard got work
    assert sum(len(lines(path)) for path in parts) == len(lines(whole))
    assert load_results(tmp_path / "sharded") == load_results(tmp_path / "whole")
    merged = aggregate(load_results(tmp_path / "sharded").values())
    assert merged == aggregate(load_results(tmp_path / "whole").values())


def test_conditions_decoded_together_give_the_answers_each_gives_alone(tiny, tmp_path):
    packed = [json.loads(line) for line in lines(small_sweep(tiny, tmp_path / "packed"))]
    alone = [json.loads(line) for line in lines(small_sweep(tiny, tmp_path / "alone", pack_tokens=1))]
    assert [(r["task"], r["example"], r["kind"], r["k"], r["seed"], r["generation"]) for r in packed] == [
        (r["task"], r["example"], r["kind"], r["k"], r["seed"], r["generation"]) for r in alone]
    assert len({r["generation"] for r in packed if r["kind"] == "random"}) > 3  # the conditions do differ
    assert json.loads((tmp_path / "packed" / "run.json").read_text())["sweep"]["pack_tokens"] == PACK_TOKENS
    # how rows are packed is part of the run (other batches round differently): resuming with another is refused
    with pytest.raises(SweepError, match=rf"holds results for cache slots decoded together \(--pack-tokens\) 1, this run has {PACK_TOKENS}"):
        small_sweep(tiny, tmp_path / "alone")
    with pytest.raises(SweepError, match="--pack-tokens must be at least 1, got 0"):
        small_sweep(tiny, tmp_path / "zero", pack_tokens=0)


def test_a_directory_of_another_model_is_refused(tiny, tmp_path):
    small_sweep(tiny, tmp_path)
    model, tokenizer = tiny
    with pytest.raises(SweepError, match="holds results for model 'tiny'"):
        run_sweep(model, tokenizer, [get_task("capitals", limit=2)], ["freeze"], LayerGrid(), tmp_path,
                  model_name="another", progress=False)


# ----------------------------------------------------------------------------- the CLI

def test_cli_sweep_swap_and_report_end_to_end(tiny_dir, tmp_path, capsys):
    out = tmp_path / "run"
    sweep = ["sweep", "--model", str(tiny_dir), "--task", "capitals,fanoutqa", "--manipulation", "freeze,random",
             "--layers", "0:4:2", "--limit", "4", "--batch-size", "3", "--out", str(out)]
    assert main(sweep) == 0
    first = (out / "results.jsonl").read_bytes()
    assert main(sweep) == 0  # resumes: nothing to do, nothing added
    assert (out / "results.jsonl").read_bytes() == first
    assert main(["swap", "--model", str(tiny_dir), "--limit", "30", "--layers", "0:4:2", "--out", str(out)]) == 0
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| capitals | exact_match |" in report and "figures/curves.png" in report
    assert (out / "figures" / "curves.png").stat().st_size > 0
    assert (out / "figures" / "curves.csv").read_text().startswith("task,kind,k,k_over_L,score,count")
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["tasks"]) == {"capitals", "fanoutqa"}


@pytest.mark.parametrize("arguments, message", [
    (["--task", "trivia"], "unknown task 'trivia'"),
    (["--manipulation", "scramble"], "unknown manipulation 'scramble'"),
    (["--manipulation", "swap"], "swap is not a sweep kind"),
    (["--layers", "0-30"], "--layers must be 'all' or START:STOP:STEP"),
    (["--layers", "5:2:1"], "need 0 <= START <= STOP"),
    (["--layers", "0:9:3"], "reaches k=9, but the model has 4 layers"),
    (["--shard", "3/2"], "need 1 <= I <= N"),
    (["--shard", "one/two"], "--shard must be I/N"),
    (["--limit", "0"], "argument --limit: must be at least 1"),
    (["--seeds", "0"], "--seeds must be at least 1"),
    (["--batch-size", "0"], "argument --batch-size: must be at least 1"),
    (["--pack-tokens", "0"], "argument --pack-tokens: must be at least 1"),
])
def test_cli_refuses_bad_input_in_one_line_and_writes_nothing(tiny_dir, tmp_path, capsys, arguments, message):
    out = tmp_path / "run"
    command = {"--task": "capitals", "--manipulation": "freeze", "--layers": "all", "--limit": "2"}
    command.update(zip(arguments[::2], arguments[1::2]))
    argv = ["sweep", "--model", str(tiny_dir), "--out", str(out)] + [part for pair in command.items() for part in pair]
    assert main(argv) != 0
    error = capsys.readouterr().err.strip()
    assert error.startswith("minillm: error:") and message in error and "\n" not in error
    assert not out.exists()


def test_report_of_a_directory_without_results_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) != 0
    assert "no sweep results" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the report's arithmetic

def curve(*scores_by_k):
    return [Point(k, score, 10) for k, score in scores_by_k]


def test_recovery_is_the_smallest_k_from_which_every_higher_point_holds():
    baseline = 0.8  # threshold 0.72
    clean = curve((0, 0.0), (10, 0.2), (15, 0.75), (20, 0.78), (30, baseline))
    assert recovery_layer(clean, baseline) == 15
    # a lucky point low in the model does not count: 25 dips again, so recovery starts above it
    noisy = curve((0, 0.0), (5, 0.9), (10, 0.2), (20, 0.8), (25, 0.7), (28, 0.73), (30, baseline))
    assert recovery_layer(noisy, baseline) == 28
    exactly_at_threshold = curve((0, 0.1), (12, 0.72), (30, baseline))
    assert recovery_layer(exactly_at_threshold, baseline) == 12
    never_hurt = curve((0, 0.79), (15, 0.9), (30, baseline))
    assert recovery_layer(never_hurt, baseline) == 0
    assert recovery_layer(curve((0, 0.0), (30, 0.5)), baseline) is None  # even the top is below


def summary_of(points, baseline=0.8, chance=0.0, L=30):
    return TaskSummary("t", "f1", chance, L, Point(L, baseline, 10), {"freeze": points})


@pytest.mark.parametrize("recovered_at, expected", [
    (6, "recovers earlier than the paper"), (15, "agrees with the paper"), (21, "agrees with the paper"),
    (24, "recovers later than the paper")])
def test_verdict_places_the_recovery_against_the_papers_range(recovered_at, expected):
    points = curve((0, 0.0), (recovered_at, 0.8), (30, 0.8))
    assert verdict(summary_of(points), points, recovery_layer(points, 0.8)).startswith(expected)


def test_verdict_of_a_curve_near_chance_claims_nothing():
    points = curve((0, 0.0), (30, 0.02))
    assert verdict(summary_of(points, baseline=0.02), points, 0).startswith("baseline within 0.05 of chance")
    unknown = summary_of(points, chance=float("nan"))  # one example: no other example's answer to score
    assert verdict(unknown, points, 0).startswith("chance level unknown")


def test_verdict_of_a_curve_that_recovers_only_at_the_baseline():
    points = curve((0, 0.0), (27, 0.5), (30, 0.8))
    assert verdict(summary_of(points), points, recovery_layer(points, 0.8)).startswith("no measured k < L")


def test_swap_crossover_is_where_the_original_answer_wins_from_then_on():
    rates = SwapRates(num_layers=6, pairs=10, ks=[0, 1, 2, 3, 4, 5, 6],
                      original=[0.0, 0.1, 0.6, 0.4, 0.8, 0.9, 1.0], injected=[1.0, 0.8, 0.3, 0.5, 0.1, 0.0, 0.0])
    assert crossover_layer(rates) == 4


# ----------------------------------------------------------------------------- SmolLM2-135M

@pytest.mark.slow
@pytest.mark.parametrize("task_name", TASKS)
def test_smollm2_baseline_beats_chance_on_every_builtin_task(smollm2_dir, tmp_path, task_name):
    model, tokenizer = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    sizes = {"capitals": 8, "fanoutqa": 16, "context-qa": 6, "summarization": 4}  # ~1 minute in all on 2 cores
    task = evenly_spaced(get_task(task_name), sizes[task_name])
    run_sweep(model, tokenizer, [task], [], LayerGrid(), tmp_path, model_name="smollm2-135m", batch_size=8,
              progress=False)
    summary = aggregate(load_results(tmp_path).values())[task_name]
    assert summary.baseline.score > summary.chance


@pytest.mark.slow
def test_smollm2_follows_a_country_swapped_low_and_ignores_it_at_the_top(smollm2_dir, tmp_path):
    from evals.swap import run_swap, swap_rates

    model, tokenizer = load_model(smollm2_dir), load_tokenizer(smollm2_dir)
    run_swap(model, tokenizer, LayerGrid.parse("0:29:29"), tmp_path, model_name="smollm2-135m", limit=60,
             progress=False)
    rates = swap_rates(tmp_path)
    assert rates.pairs >= 5 and rates.ks == [0, 29, 30]
    assert rates.injected[0] > rates.original[0]  # swapped at the bottom: the injected country is followed
    assert rates.original[1] > rates.injected[1]  # swapped at the last layer: ignored
    assert (rates.original[2], rates.injected[2]) == (1.0, 0.0)  # no swap: every recipient's own capital


def test_swap_verdict_uses_the_intervals_of_the_rates():
    from evals.report import crossover_range, swap_verdict
    from evals.stats import wilson

    def rates_of(pairs, original_wins):  # original_wins[k]: how many of the pairs give the original capital
        ks = list(range(len(original_wins)))
        return SwapRates(num_layers=ks[-1], pairs=pairs, ks=ks, original=[w / pairs for w in original_wins],
                         injected=[1 - w / pairs for w in original_wins],
                         original_interval=[wilson(w, pairs) for w in original_wins],
                         injected_interval=[wilson(pairs - w, pairs) for w in original_wins])

    many = rates_of(60, [0, 0, 0, 55, 58, 60, 60])  # L = 6: top third from k = 4; clear from k = 3
    assert crossover_range(many) == (3, 3) and swap_verdict(many) == "agrees"
    few = rates_of(4, [0, 0, 1, 3, 3, 4, 4])  # 3 of 4 is not clearly more than 1 of 4
    assert crossover_range(few) == (2, 5)
    assert swap_verdict(few).startswith("too few pairs to tell")
    late = rates_of(60, [0, 0, 0, 0, 0, 2, 60])
    assert swap_verdict(late) == "a smaller top part here"
