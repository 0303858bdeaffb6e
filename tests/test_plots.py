"""The evaluation plots (``catreview.evaluate.plots``) and the Evaluation tab's plot and cell handlers.

The figures are read back (image arrays, bar sizes, line data, texts), not compared as pixels, and
checked against the evaluation report of real predictions (the shared photos, the tiny random
built-in models; the database of tests/test_grid.py) and against an independent recomputation of
the reliability bins from the photo views the Review tab shows.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.figure import Figure

from catreview.app.core import ReviewApp
from catreview.app.presenters.evaluate import cell_choice, shown_rows
from catreview.app.presenters.grid import ANY, NO_QUEUE
from catreview.app.ui import evaluate_tab
from catreview.evaluate.plots import (
    confusion_figure,
    per_breed_figure,
    reliability_figure,
    report_per_breed_figure,
    row_confusion_figure,
    row_reliability_figure,
)
from catreview.evaluate.report import ANOTHER_BREED, RELIABILITY_BINS, EvaluationReport
from catreview.metrics import ClassAccuracy, ece_from_bins
from catreview.query.photos import iter_views
from tests.test_grid import BREEDS, PER_BREED, grid_db  # noqa: F401  (the shared database fixture)


@pytest.fixture
def evaluated(grid_db: Path, settings) -> tuple[ReviewApp, EvaluationReport]:
    shutil.copy(grid_db, settings.database_url.removeprefix("sqlite:///"))
    app = ReviewApp(settings)
    return app, app.evaluation()


def test_confusion_figure_holds_the_report_matrix(evaluated) -> None:
    _, report = evaluated
    assert [r.stage for r in report.rows] == ["stage 1", "VLM", "fused"]
    for row in report.rows:
        fig = row_confusion_figure(row)
        assert isinstance(fig, Figure)
        ax = fig.axes[0]
        np.testing.assert_array_equal(ax.images[0].get_array(), row.confusion)
        assert [t.get_text() for t in ax.get_xticklabels()] == row.columns
        assert [t.get_text() for t in ax.get_yticklabels()] == row.labels == sorted(BREEDS)
        written = sorted(int(t.get_text()) for t in ax.texts)
        assert written == sorted(int(n) for n in row.confusion.ravel() if n)
        assert sum(written) == row.n == len(BREEDS) * PER_BREED
        assert ax.get_title().replace("\n", " ") == f"{row.name} (n={row.n})"
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        confusion_figure(["a", "b"], ["a", "b", "c"], np.zeros((3, 3), dtype=int), "x")
    with pytest.raises(ValueError, match="non-negative"):
        confusion_figure(["a"], ["a"], np.array([[-1]]), "x")


def test_per_breed_figure_shows_accuracy_and_counts(evaluated) -> None:
    _, report = evaluated
    rows = shown_rows(report)
    fig = report_per_breed_figure(report, rows)
    ax = fig.axes[0]
    assert len(ax.containers) == len(rows)
    for container, row in zip(ax.containers, rows):
        widths = [bar.get_width() for bar in container]
        assert widths == pytest.approx([row.per_breed[b].accuracy for b in report.breeds])
        assert container.get_label() == row.stage
    assert [t.get_text() for t in ax.get_yticklabels()] == [f"{b} (n={PER_BREED})" for b in report.breeds]
    # A series that scored no photo of a breed gets no bar (width 0), and the count is the largest seen.
    fig = per_breed_figure(["A", "B"], {"x": {"A": ClassAccuracy(1, 2, 0.5)}, "y": {"A": ClassAccuracy(0, 3, 0.0),
                           "B": ClassAccuracy(0, 0, math.nan)}})  # fmt: skip
    ax = fig.axes[0]
    assert [b.get_width() for b in ax.containers[0]] == [0.5, 0.0]
    assert [b.get_width() for b in ax.containers[1]] == [0.0, 0.0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["A (n=3)", "B (n=0)"]


def test_reliability_diagram_matches_an_independent_binning(evaluated) -> None:
    app, report = evaluated
    stage1 = report.rows[0]
    # Independent: confidence = the top-1 stage-1 probability the Review tab shows, right = it is the label.
    conf, right = [], []
    for v in iter_views(app.engine, app.registry):
        if v["review"] and v["stage1"]:
            conf.append(v["stage1"][0]["probability"])
            right.append(app.vocabulary.canonical_or_same(v["stage1"][0]["label"]) == v["review"]["label"])
    conf_a, right_a = np.array(conf), np.array(right)
    index = np.clip(np.ceil(conf_a * RELIABILITY_BINS).astype(int) - 1, 0, RELIABILITY_BINS - 1)  # bins (a, b]
    counts = np.bincount(index, minlength=RELIABILITY_BINS)
    assert [b.count for b in stage1.reliability] == counts.tolist() and counts.sum() == stage1.n
    for m, b in enumerate(stage1.reliability):
        if b.count:
            assert b.confidence == pytest.approx(conf_a[index == m].mean())
            assert b.accuracy == pytest.approx(right_a[index == m].mean())
    fig = row_reliability_figure(shown_rows(report))
    curve, hist = fig.axes
    lines = curve.get_lines()
    np.testing.assert_allclose(lines[0].get_xydata(), [[0, 0], [1, 1]])  # the diagonal
    assert len(lines) == 1 + len(shown_rows(report))
    for line, container, row in zip(lines[1:], hist.containers, shown_rows(report)):
        full = [b for b in row.reliability if b.count]
        np.testing.assert_allclose(line.get_xydata(), [[b.confidence, b.accuracy] for b in full])
        assert line.get_label() == f"{row.stage} (ECE {ece_from_bins(row.reliability):.3f})"
        assert [bar.get_height() for bar in container] == [b.count for b in row.reliability]
    # The JSON report carries the same bins (NaN -> null for empty bins).
    bins = report.to_dict()["rows"][0]["reliability"]
    assert [b["count"] for b in bins] == counts.tolist()
    assert all((b["accuracy"] is None) == (b["count"] == 0) for b in bins)
    assert len(reliability_figure({}).axes[0].get_lines()) == 1  # nothing to show: only the diagonal


def test_evaluation_tab_plots_and_cell_clicks_open_the_grid(evaluated) -> None:
    _, report = evaluated
    assert evaluate_tab.plots(None, None) == (None, None, None)
    fused = report.rows[-1]
    confusion, per_breed, reliability = evaluate_tab.plots(report, report.rows[0].name)
    np.testing.assert_array_equal(confusion.axes[0].images[0].get_array(), report.rows[0].confusion)
    assert len(per_breed.axes[0].containers) == 3 and len(reliability.axes) == 2
    # A cell: current label x that stage's prediction; the true-breed column: any prediction.
    j = int(np.argmax(fused.confusion[0, : len(fused.labels)]))  # a breed column of the first row
    label, predicted, by, queue, note, tab = evaluate_tab.open_cell(report, fused.name, [0, j + 1])
    assert (label["value"], predicted["value"], by["value"], queue["value"]) == (
        fused.labels[0], fused.columns[j], "fused", NO_QUEUE
    )  # fmt: skip
    assert note.startswith(f"Current label {fused.labels[0]}, fused prediction {fused.columns[j]}.")
    assert tab.selected == "grid-tab"
    label, predicted, *_ = evaluate_tab.open_cell(report, fused.name, [1, 0])
    assert (label["value"], predicted["value"]) == (fused.labels[1], ANY)
    other = cell_choice(fused, 0, fused.columns.index(ANOTHER_BREED) + 1)
    assert other is not None and other.predicted is None and ANOTHER_BREED in other.note
    assert cell_choice(fused, len(fused.labels), 1) is None and cell_choice(fused, 0, len(fused.columns) + 1) is None
    unchanged = evaluate_tab.open_cell(report, "no such row", [0, 1])
    assert all(u == {"__type__": "update"} for u in unchanged)
