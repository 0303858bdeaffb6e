"""Text of the Calibration tab and of ``catreview calibrate``: the intro, the report, notices.

Made from the typed :class:`~catreview.evaluate.calibration.CalibrationReport`;
:mod:`catreview.app.ui.calibration_tab` lays it out and :mod:`catreview.cli.main` prints
:func:`report_text`.
"""

from __future__ import annotations

import math

from catreview.evaluate.calibration import CalibrationReport
from catreview.query.photos import RoutingStats

__all__ = ["cannot_calibrate", "fit_notice", "intro", "report_header", "report_text", "routing_text"]


def intro(min_reviews: int) -> str:
    """The tab's first paragraph (Markdown); ``min_reviews`` is ``fusion.calibration_min_reviews``."""
    return (
        f"Fits a temperature per stage (Guo et al. 2017), the fusion weight that maximises balanced "
        f"accuracy, and a temperature of the blended distribution (a blend of calibrated stages is "
        f"under-confident), on the reviewed photos (at least {min_reviews}). ECE uses 15 equal-width bins. "
        '"after" is measured on the photos the fit saw; the "_cv" columns are cross-validated '
        "(each photo measured with a fit that did not see it), the honest estimate. "
        'The VLM and the fusion answer over the stage-1 candidates **plus "other"**: when the human '
        'breed is not among stage 1\'s candidates, "other" counts as the right answer.'
    )


def cannot_calibrate(exc: Exception) -> str:
    """The tab's notice when the fit fails (too few reviews, a temperature the reviews do not determine)."""
    return f"Cannot calibrate yet: {exc}"


def _pct(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{100 * x:.1f}%"


def format_table(head: list[str], body: list[list[str]]) -> list[str]:
    """A plain-text table: the first column left-aligned, the others right-aligned; one str per line."""
    widths = [max(len(row[i]) for row in [head, *body]) for i in range(len(head))]

    def fmt(row: list[str]) -> str:
        cells = (c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        return "  ".join(cells).rstrip()

    return [fmt(head), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)]


def report_header(report: CalibrationReport) -> str:
    """The report's opening paragraph (plain text, one line per item): data, CV, fitted values, caveats."""
    t_vlm = "n/a" if report.vlm_temperature is None else f"{report.vlm_temperature:.3f}"
    excluded = report.excluded_from_fit["stage1"]
    cv = (
        f"'CV' is {report.n_folds}-fold cross-validated (stratified by breed): each photo is measured "
        "with the calibration fitted on the other folds."
        if report.n_folds
        else f"no cross-validation: {report.cv_note}"
    )
    lines = [
        f"Calibration on {report.n_reviews} reviewed photos ({report.n_with_vlm} with a VLM verdict), "
        f"ECE with {report.n_bins} bins. 'after' is in-sample (fitted and measured on the same photos); " + cv,
        f"Temperature: stage 1 T={report.stage1_temperature:.3f}, VLM T={t_vlm}, "
        f"fused (after the pool) T={report.fused_temperature:.3f}. "
        f"Fusion weight (VLM share): {report.current_weight:.2f} -> {report.weight:.2f}.",
        f"Stage 1 missed the human breed in its top-k on {excluded} of "
        f"{report.n_reviews} photos, so its temperature is fitted on the other "
        f"{report.n_reviews - excluded} (few photos make it unreliable). "
        "The VLM and the fusion answer over the candidates plus 'other', "
        "so on those photos 'other' counts as correct; a model that says 'other' often scores "
        "well when stage 1 is weak."
        + (" No label was a candidate, so stage 1's temperature stays 1." if excluded >= report.n_reviews else "")
        + (f" {report.data_note}" if report.data_note else ""),
    ]
    return "\n".join(lines)


def report_text(report: CalibrationReport) -> str:
    """Plain-text report for a terminal: :func:`report_header`, the stage table, the per-breed table."""
    lines = [report_header(report), ""]
    head = ["stage", "n", "ECE before", "ECE after", "ECE CV", "acc before", "acc after", "acc CV",
            "bal.acc before", "bal.acc after", "bal.acc CV"]  # fmt: skip
    body = [
        [
            r["stage"],
            str(r["n"]),
            f"{r['ece_before']:.3f}",
            f"{r['ece_after']:.3f}",
            "-" if r["ece_after_cv"] is None else f"{r['ece_after_cv']:.3f}",
            _pct(r["accuracy_before"]),
            _pct(r["accuracy_after"]),
            _pct(r["accuracy_after_cv"]),
            _pct(r["balanced_accuracy_before"]),
            _pct(r["balanced_accuracy_after"]),
            _pct(r["balanced_accuracy_after_cv"]),
        ]
        for r in report.summary_rows()
    ]
    lines += format_table(head, body)
    lines += ["", "Per-breed accuracy (fused: after calibration)"]
    head = ["breed", "reviews", "stage 1", "VLM", "fused"]
    body = [
        [
            r["breed"],
            str(r["reviews"]),
            f"{r['stage1_correct']}/{r['reviews']} {_pct(r['stage1_accuracy'])}",
            "-" if not r["vlm_reviews"] else f"{r['vlm_correct']}/{r['vlm_reviews']} {_pct(r['vlm_accuracy'])}",
            f"{r['fused_correct']}/{r['reviews']} {_pct(r['fused_accuracy'])}",
        ]
        for r in report.per_breed_rows()
    ]
    lines += format_table(head, body)
    return "\n".join(lines)


def fit_notice(report: CalibrationReport, row_id: int | None) -> str:
    """The tab's text after a fit: :func:`report_header` and where the fit was stored."""
    return report_header(report) + f"\nStored as calibration #{row_id}; fused predictions now use it."


def routing_text(stats: RoutingStats) -> str:
    """One line on routing: photos sent to / past the VLM and the VLM time saved."""
    if stats.threshold is None:
        return f"Routing off: all {stats.photos} photos with stage-1 predictions go to the VLM."
    return (
        f"Routing threshold {stats.threshold}: {stats.to_vlm} of {stats.photos} photos went to the VLM, "
        f"{stats.skipped} skipped; VLM time saved ≈ {stats.saved_seconds:.1f} s "
        f"({stats.mean_vlm_seconds * 1000:.0f} ms per photo measured)."
    )
