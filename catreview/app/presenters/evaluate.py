"""Text and tables of the Evaluation tab and of ``python -m catreview evaluate``.

Made from the typed :class:`~catreview.evaluate.report.EvaluationReport`;
:mod:`catreview.app.ui.evaluate_tab` lays it out and :mod:`catreview.cli.evaluate` prints
:func:`report_text`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from catreview.app.presenters.calibration import format_table
from catreview.evaluate.report import ANOTHER_BREED, EvaluationReport, EvaluationRow

__all__ = [
    "INTRO",
    "NOTHING_TO_EVALUATE",
    "SUMMARY_COLUMNS",
    "CellChoice",
    "cannot_evaluate",
    "cell_choice",
    "confusion_rows",
    "header_text",
    "nothing_to_evaluate",
    "per_breed_table",
    "report_text",
    "shown_rows",
    "summary_table",
]

INTRO = (
    "How each model version does on **held-out photos**: reviewed photos (breed labels) that no compared "
    "version was trained on. **top1**: the shown breed is the reviewer's; **balanced accuracy**: the mean "
    "of per-breed accuracy (each breed counts the same, however rare); **candidate accuracy** (VLM): among "
    "photos whose breed is one of stage 1's candidates, how often the VLM ranks it first (chance: 1 / number "
    'of candidates). A VLM or fused answer "other" (none of the candidates) is never a right breed. '
    "Compare rows with equal n: a version not yet predicted on every photo covers fewer."
)
NOTHING_TO_EVALUATE = (
    "Nothing to evaluate yet: no held-out reviewed photo has predictions. Review some photos (or import "
    "labels) and let the predictions run."
)
SUMMARY_COLUMNS = ["stage", "active", "n", "top1", "balanced_accuracy", "candidate_accuracy", "vlm_version",
                   "stage1_version", "blend"]  # fmt: skip


def cannot_evaluate(exc: Exception) -> str:
    """The tab's notice when the report fails (stored predictions that are not probabilities)."""
    return f"Cannot evaluate: {exc}"


def nothing_to_evaluate(report: EvaluationReport) -> str:
    """:data:`NOTHING_TO_EVALUATE` with the photo counts that explain it."""
    return f"{NOTHING_TO_EVALUATE} ({header_text(report)})"


def header_text(report: EvaluationReport) -> str:
    """One paragraph: photos reviewed / left out / evaluated, then the notes."""
    head = (
        f"{report.n_evaluated} held-out photos of {len(report.breeds)} breeds evaluated: "
        f"{report.n_reviewed} reviewed with a breed label, {report.n_excluded} left out "
        "(a compared version may have been trained on them)."
    )
    return " ".join([head, *report.notes])


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def summary_table(report: EvaluationReport) -> list[dict[str, Any]]:
    """Rows for the app's summary table (:data:`SUMMARY_COLUMNS`; rates rounded to 3 decimals)."""
    out = []
    for r in report.summary_rows():
        out.append(
            {
                **{k: r[k] for k in SUMMARY_COLUMNS},
                "top1": round(r["top1"], 3),
                "balanced_accuracy": round(r["balanced_accuracy"], 3),
                "candidate_accuracy": None if r["candidate_accuracy"] is None else round(r["candidate_accuracy"], 3),
            }
        )
    return out


def per_breed_table(report: EvaluationReport) -> list[dict[str, Any]]:
    """:meth:`EvaluationReport.per_breed_rows` with accuracies rounded to 3 decimals."""
    return [
        {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()} for row in report.per_breed_rows()
    ]


def confusion_rows(row: EvaluationRow) -> list[dict[str, Any]]:
    """The confusion matrix of one row as table rows: ``true breed``, then one count per column."""
    return [
        {"true breed": label, **{c: int(n) for c, n in zip(row.columns, counts)}}
        for label, counts in zip(row.labels, row.confusion)
    ]


@dataclass(frozen=True)
class CellChoice:
    """A clicked confusion-matrix cell as a Grid filter: current label ``label``, prediction
    ``predicted`` (``None``: any) of ``predicted_by`` (the row's stage), and the Grid tab's note."""

    label: str
    predicted: str | None
    predicted_by: str
    note: str


def cell_choice(row: EvaluationRow, row_index: int, column_index: int) -> CellChoice | None:
    """The Grid filter of cell ``(row_index, column_index)`` of :func:`confusion_rows` ``(row)``
    (column 0 is the true breed: every prediction); ``None`` outside the matrix."""
    if not 0 <= row_index < len(row.labels) or not 0 <= column_index <= len(row.columns):
        return None
    label = row.labels[row_index]
    shown = row.columns[column_index - 1] if column_index else None
    scope = (
        f"Photos of the active model versions' {row.stage} predictions: all photos with this label, not "
        f"only the held-out ones the Evaluation counted for {row.name}."
    )
    if shown == ANOTHER_BREED or shown is None:
        why = "" if shown is None else f" ({ANOTHER_BREED} is not one label: every prediction is shown)"
        return CellChoice(label, None, row.stage, f"Current label {label}, any prediction{why}. {scope}")
    return CellChoice(label, shown, row.stage, f"Current label {label}, {row.stage} prediction {shown}. {scope}")


def report_text(report: EvaluationReport) -> str:
    """Plain text for a terminal: :func:`header_text`, the summary table, per-breed accuracy of
    the active rows (or of the first of each stage), and the active fused row's confusion matrix."""
    lines = [header_text(report), ""]
    head = ["stage", "active", "n", "top1", "bal.acc", "cand.acc", "VLM version", "stage-1 version"]
    body = [
        [
            r.stage,
            "*" if r.active else "",
            str(r.n),
            _pct(r.accuracy),
            _pct(r.balanced_accuracy),
            _pct(r.candidate_accuracy),
            r.vlm_version or "-",
            r.stage1_version,
        ]
        for r in report.rows
    ]
    lines += format_table(head, body)
    shown = shown_rows(report)
    if shown:
        lines += ["", "Per-breed accuracy (" + ", ".join(r.stage for r in shown) + ")"]
        head = ["breed", *[r.stage for r in shown]]
        body = []
        for breed in report.breeds:
            cells = [breed]
            for r in shown:
                a = r.per_breed.get(breed)
                cells.append("-" if a is None or not a.total else f"{a.correct}/{a.total} {_pct(a.accuracy)}")
            body.append(cells)
        lines += format_table(head, body)
        last = shown[-1]
        lines += ["", f"Confusion matrix, {last.stage} (rows: true breed; columns: shown)"]
        short = [c[:12] for c in last.columns]
        lines += format_table(
            ["true \\ shown", *short],
            [[lab, *(str(int(n)) for n in counts)] for lab, counts in zip(last.labels, last.confusion)],
        )
    return "\n".join(lines)


def shown_rows(report: EvaluationReport) -> list[EvaluationRow]:
    """One row per stage: the active one, else the first."""
    out = []
    for stage in ("stage 1", "VLM", "fused"):
        rows = [r for r in report.rows if r.stage == stage]
        if rows:
            out.append(next((r for r in rows if r.active), rows[0]))
    return out
