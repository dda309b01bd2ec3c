"""scripts/beyond_paper.py's recovery rule and summary, and the window heat-map's numbers (evals.plots)."""

from __future__ import annotations

import csv
import importlib.util
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
