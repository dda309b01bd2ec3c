"""scripts/beyond_paper.py's recovery rule and summary, and the window heat-map's numbers (evals.plots)."""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from evals.plots import plot_window_heatmap

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "beyond_paper.py"


@pytest.fixture(scope="module")
def beyond():
    spec = importlib.util.spec_from_file_location("beyond_paper", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


def test_recovery_is_the_smallest_k_from_which_every_point_keeps_90_percent(beyond):
    points = [{"k": k, "score": s} for k, s in [(20, 0.5), (22, 0.1), (24, 0.37), (26, 0.38), (28, 0.4)]]
    assert beyond.recovery(points, 0.4, 30) == 24  # k = 20 is a lucky point: k = 22 falls below
    assert beyond.recovery([{"k": 28, "score": 0.1}], 0.4, 30) == 30  # none: the baseline


def test_window_heatmap_writes_every_measured_cell(tmp_path):
    cells = {(0, 1): {"score": 0.1, "low95": 0.0, "high95": 0.3, "n": 20},
             (3, 1): {"score": 0.4, "low95": 0.2, "high95": 0.6, "n": 20},
             (0, 2): {"score": 0.0, "low95": 0.0, "high95": 0.16, "n": 20}}
    png, table = plot_window_heatmap(cells, 0.4, 30, tmp_path / "windows.png", title="t")
    assert png.stat().st_size > 1000
    with open(table) as handle:
        rows = list(csv.DictReader(handle))
    assert [(int(r["k"]), int(r["w"])) for r in rows] == [(0, 1), (0, 2), (3, 1)]
    assert [float(r["score_over_baseline"]) for r in rows] == pytest.approx([0.25, 0.0, 1.0])


def test_summary_of_records_pairs_the_spared_variant_with_the_original(beyond, tmp_path):
    """Four examples: the baseline gets 3 right; freeze at k = 28 keeps 1 of them, sparing the sink keeps 3.
    A record of a condition no longer planned and a half-written last line are left out."""
    def record(condition, part, curve, kind, k, example, score, seed=None, spare=0):
        return {"task": "capitals", "example": f"e{example}", "condition": condition, "part": part, "curve": curve,
                "kind": kind, "k": k, "seed": seed, "spare_first": spare, "window": None, "num_layers": 30,
                "score": score}
    rows = [record("baseline k=30", "baseline", "baseline", "baseline", 30, e, s) for e, s in enumerate([1, 1, 1, 0])]
    rows += [record("freeze k=28", "sink", "freeze", "freeze", 28, e, s) for e, s in enumerate([1, 0, 0, 0])]
    rows += [record("freeze k=28 spare=1", "sink", "freeze, spare_first=1", "freeze", 28, e, s, spare=1)
             for e, s in enumerate([1, 1, 1, 0])]
    rows += [record("freeze k=29", "sink", "freeze", "freeze", 29, e, 1) for e in range(4)]  # not planned
    text = "".join(json.dumps(row) + "\n" for row in rows)
    (tmp_path / "records-capitals-x.jsonl").write_text(text + '{"task": "capi')
    summary = beyond.summarize(tmp_path)["tasks"]["capitals"]
    assert (summary["n"], summary["baseline"], summary["n_right"]) == (4, 0.75, 3)
    freeze = summary["curves"]["freeze"]
    assert [p["k"] for p in freeze["points"]] == [28]
    assert (freeze["points"][0]["score"], freeze["points"][0]["kept"]) == (0.25, 1 / 3)
    assert freeze["recovers_from_k"] == 30 and summary["curves"]["freeze, spare_first=1"]["recovers_from_k"] == 28
    difference = summary["spared_minus_original"]["freeze"][0]
    assert difference["k"] == 28 and difference["difference"] == 0.5
    assert difference["low95"] < 0.5 < difference["high95"]
    assert (tmp_path / "sink.png").stat().st_size > 1000
