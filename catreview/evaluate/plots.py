"""The evaluation report as plots: confusion matrix, per-breed accuracy with counts, reliability diagram.

Each function returns a :class:`matplotlib.figure.Figure` made without ``pyplot`` (no global
figure state, safe from the app's worker threads; Gradio's ``gr.Plot`` renders it). The plotted
numbers are exactly the report's (:class:`catreview.evaluate.report.EvaluationRow`), so a test reads
them back from the figure (image array, bar heights, line data) instead of comparing pixels.

* :func:`confusion_figure`: counts of true breed (rows) x shown label (columns), one cell per
  count, darker = more photos, the count written in every non-empty cell.
* :func:`per_breed_figure`: per-breed accuracy (recall) of each given row as horizontal bars, the
  breed's photo count in its tick label (``"Bengal (n=12)"``).
* :func:`reliability_figure`: reliability diagram (Guo, Pleiss, Sun & Weinberger 2017, fig. 1;
  DeGroot & Fienberg 1983): per equal-width confidence bin, the fraction right against the mean
  confidence, one line per row, the diagonal of perfect calibration, and the photos per bin below.
  The bins are the calibration code's (:func:`catreview.metrics.reliability_bins_from_confidences`).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from catreview.evaluate.report import EvaluationReport, EvaluationRow
from catreview.metrics import ClassAccuracy, ReliabilityBin, ece_from_bins

__all__ = [
    "confusion_figure",
    "per_breed_figure",
    "reliability_figure",
    "report_per_breed_figure",
    "row_confusion_figure",
    "row_reliability_figure",
]

#: Figure width and height in inches at most (matplotlib's default DPI, 100: 1000 x 800 px).
MAX_SIZE = (10.0, 8.0)


def confusion_figure(labels: Sequence[str], columns: Sequence[str], matrix: np.ndarray, title: str) -> Figure:
    """A confusion-matrix heat map.

    Args:
        labels: the rows (true breeds), length R.
        columns: the columns (shown labels), length C.
        matrix: int array ``(R, C)``: photos of breed i shown as column j.
        title: the axes' title.

    Returns:
        A figure with one axes: ``axes[0].images[0].get_array()`` is ``matrix``; every non-zero cell
        carries its count as text.

    Raises:
        ValueError: ``matrix`` is not ``(len(labels), len(columns))`` or has negative counts.
    """
    m = np.asarray(matrix)
    if m.shape != (len(labels), len(columns)):
        raise ValueError(f"matrix must have shape ({len(labels)}, {len(columns)}), got {m.shape}")
    if m.size and m.min() < 0:
        raise ValueError("confusion counts must be non-negative")
    width = min(MAX_SIZE[0], 2.5 + 0.45 * len(columns))
    height = min(MAX_SIZE[1], 2.0 + 0.4 * len(labels))
    fig = Figure(figsize=(width, height), layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(m, cmap="Blues", vmin=0, vmax=max(1, int(m.max()) if m.size else 1), aspect="auto")
    ax.set_xticks(range(len(columns)), labels=list(columns), rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels=list(labels), fontsize=8)
    ax.set_xlabel("shown label")
    ax.set_ylabel("true breed (current label)")
    ax.set_title(title, fontsize=9)
    top = m.max() if m.size else 0
    for (i, j), n in np.ndenumerate(m):
        if n:
            ax.text(j, i, str(int(n)), ha="center", va="center", fontsize=7,
                    color="white" if n > top / 2 else "black")  # fmt: skip
    fig.colorbar(image, ax=ax, label="photos", shrink=0.8)
    return fig


def row_confusion_figure(row: EvaluationRow) -> Figure:
    """:func:`confusion_figure` of one report row (title: its :attr:`~EvaluationRow.name` and n,
    wrapped at spaces to lines of at most 60 characters)."""
    return confusion_figure(
        row.labels, row.columns, row.confusion, "\n".join(textwrap.wrap(f"{row.name} (n={row.n})", 60))
    )


def per_breed_figure(breeds: Sequence[str], series: Mapping[str, Mapping[str, ClassAccuracy]]) -> Figure:
    """Per-breed accuracy as grouped horizontal bars.

    Args:
        breeds: the breeds, top to bottom.
        series: ``{name: {breed: ClassAccuracy(correct, total, accuracy)}}``, one bar group per
            name (in order); a breed a series did not score (absent or total 0) gets no bar.

    Returns:
        A figure with one axes: ``axes[0].containers[k]`` is series k's bars (one per breed, height
        0 for none; accuracy in [0, 1] as the bar's width); y tick labels ``"<breed> (n=<photos>)"``
        with the most photos any series scored of that breed.
    """
    names = list(series)
    height = min(MAX_SIZE[1], 1.5 + 0.35 * len(breeds) * max(1, len(names)) ** 0.5)
    fig = Figure(figsize=(7.0, height), layout="constrained")
    ax = fig.add_subplot()
    y = np.arange(len(breeds), dtype=float)
    bar = 0.8 / max(1, len(names))
    for k, name in enumerate(names):
        accs = [series[name].get(b) for b in breeds]
        widths = [a.accuracy if a is not None and a.total else 0.0 for a in accs]
        ax.barh(y + (k - (len(names) - 1) / 2) * bar, widths, height=bar, label=name)
    counts = [max((s[b].total for s in series.values() if b in s), default=0) for b in breeds]
    ax.set_yticks(y, labels=[f"{b} (n={n})" for b, n in zip(breeds, counts)], fontsize=8)
    ax.invert_yaxis()  # first breed on top
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("accuracy (recall) on held-out photos")
    if names:
        ax.legend(fontsize=7, loc="lower right")
    return fig


def report_per_breed_figure(report: EvaluationReport, rows: Sequence[EvaluationRow]) -> Figure:
    """:func:`per_breed_figure` of ``rows`` (each under its stage name) over the report's breeds."""
    return per_breed_figure(report.breeds, {r.stage if _unique_stages(rows) else r.name: r.per_breed for r in rows})


def _unique_stages(rows: Sequence[EvaluationRow]) -> bool:
    return len({r.stage for r in rows}) == len(rows)


def reliability_figure(series: Mapping[str, Sequence[ReliabilityBin]]) -> Figure:
    """A reliability diagram of one or more models.

    Args:
        series: ``{name: bins}``, equal-width bins lowest first
            (:func:`catreview.metrics.reliability_bins_from_confidences`).

    Returns:
        A figure with two axes. ``axes[0]``: line 0 is the diagonal; line k + 1 is series k, through
        ``(confidence, accuracy)`` of its non-empty bins; its legend label carries the ECE
        (Guo et al. 2017, eq. 3). ``axes[1]``: series k's photo counts per bin as bars
        (``containers[k]``, one per bin, at the bin centres).
    """
    fig = Figure(figsize=(6.0, 6.0), layout="constrained")
    ax, hist = fig.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    names = list(series)
    for k, name in enumerate(names):
        bins = list(series[name])
        full = [b for b in bins if b.count]
        ece = ece_from_bins(bins) if full else math.nan
        ax.plot([b.confidence for b in full], [b.accuracy for b in full], marker="o",
                label=f"{name} (ECE {ece:.3f})")  # fmt: skip
        width = (bins[0].upper - bins[0].lower) / max(1, len(names)) if bins else 0.0
        centres = [b.lower + (k + 0.5) * width for b in bins]
        hist.bar(centres, [b.count for b in bins], width=width, label=name)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(0.0, 1.0)
    ax.set_ylabel("fraction right")
    ax.set_title("Reliability diagram (held-out photos)", fontsize=9)
    ax.legend(fontsize=7, loc="upper left")
    hist.set_xlabel("confidence (probability of the shown label)")
    hist.set_ylabel("photos")
    return fig


def row_reliability_figure(rows: Sequence[EvaluationRow]) -> Figure:
    """:func:`reliability_figure` of ``rows`` (each under its stage name, or its full name when two
    rows share a stage); rows without bins are left out."""
    named = {(r.stage if _unique_stages(rows) else r.name): r.reliability for r in rows if r.reliability}
    return reliability_figure(named)
