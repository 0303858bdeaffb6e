"""The aggregate comparison over the reviewed photos: per-photo outcomes, metrics, tables.

Over photos whose latest review is a breed: accuracy and balanced accuracy of each side against
the human label, per-breed accuracy, agreement between the two, mean and p95 verdict latency. A
verdict is correct when its label (canonicalised) equals the human label; ``"other"`` is never
correct here (unlike :func:`catreview.evaluate.calibration.calibrate`, which counts ``"other"``
as right when the human label is outside the candidates).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from catreview.compare.errors import CompareError
from catreview.compare.memory import MemoryReading
from catreview.data.db import ImageRecord
from catreview.metrics import balanced_accuracy, per_class_accuracy

if TYPE_CHECKING:
    import pandas as pd

SUMMARY_COLUMNS = (
    "side", "profile", "model_version", "photos", "accuracy", "balanced_accuracy", "agreement",
    "mean_latency_ms", "p95_latency_ms", "computed", "cached", "peak_memory_mib",
)  # fmt: skip
"""Columns of :meth:`CompareAggregate.summary_frame`."""

ACCURACY_NOTE = (
    "Accuracy here: a verdict is right only when it names the reviewed breed; 'other' never counts "
    "(calibrate counts 'other' as right when the breed is not a stage-1 candidate, so its VLM "
    "accuracy is higher on the same photos)."
)
"""The line :meth:`CompareAggregate.to_text` prints under its header."""


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 photo"``, ``"2 photos"``: ``n`` and ``word`` (``many``, default ``word + "s"``, unless 1)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def per_breed_columns(name_a: str, name_b: str) -> list[str]:
    """Columns of :meth:`CompareAggregate.per_breed_frame` for sides named ``name_a``/``name_b``
    (``"accuracy A: <name>"`` and ``"accuracy B: <name>"`` when both sides have the same name)."""
    if name_a == name_b:
        return ["breed", "photos", f"accuracy A: {name_a}", f"accuracy B: {name_b}"]
    return ["breed", "photos", f"accuracy {name_a}", f"accuracy {name_b}"]


@dataclass(frozen=True)
class PhotoOutcome:
    """Both verdicts for one reviewed photo. Labels are canonical class names or ``"other"``."""

    image_id: int
    path: str
    human: str
    candidates: list[str]
    label_a: str
    confidence_a: float
    seconds_a: float
    label_b: str
    confidence_b: float
    seconds_b: float

    @property
    def correct_a(self) -> bool:
        """Side A's label is the human label."""
        return self.label_a == self.human

    @property
    def correct_b(self) -> bool:
        """Side B's label is the human label."""
        return self.label_b == self.human

    @property
    def agree(self) -> bool:
        """Both sides gave the same label."""
        return self.label_a == self.label_b


@dataclass(frozen=True)
class SideRun:
    """One side of an aggregate run: identity, cache use, time and memory.

    ``computed``/``cached``: verdicts computed now / read from the cache. ``seconds``: scoring
    wall time of this run (0 when all cached). ``memory``: ``None`` when nothing was computed.
    """

    name: str
    model_id: str
    model_version: str
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0
    load_seconds: float | None = None
    memory: MemoryReading | None = None


@dataclass(frozen=True)
class AggregateMetrics:
    """Metrics over ``n`` photos; pairs are (side A, side B).

    Accuracies in [0, 1]; latencies in seconds per photo (stored verdict seconds: batched work
    divided evenly over its photos); p95 by linear interpolation (``numpy.percentile``).
    ``per_breed``: ``{breed: (photos, accuracy A, accuracy B)}``, breeds sorted.
    """

    n: int
    accuracy: tuple[float, float]
    balanced_accuracy: tuple[float, float]
    agreement: float
    mean_latency_s: tuple[float, float]
    p95_latency_s: tuple[float, float]
    per_breed: dict[str, tuple[int, float, float]]


def aggregate_metrics(photos: Sequence[PhotoOutcome]) -> AggregateMetrics:
    """Accuracy, balanced accuracy, per-breed accuracy, agreement and latency of both sides.

    Raises:
        CompareError: no photos.
    """
    if not photos:
        raise CompareError("no reviewed photo with a breed label has verdicts from both models")
    human = [p.human for p in photos]
    pred_a, pred_b = [p.label_a for p in photos], [p.label_b for p in photos]
    per_a, per_b = per_class_accuracy(human, pred_a), per_class_accuracy(human, pred_b)
    lat_a = np.array([p.seconds_a for p in photos])
    lat_b = np.array([p.seconds_b for p in photos])
    return AggregateMetrics(
        n=len(photos),
        accuracy=(float(np.mean([p.correct_a for p in photos])), float(np.mean([p.correct_b for p in photos]))),
        balanced_accuracy=(balanced_accuracy(human, pred_a), balanced_accuracy(human, pred_b)),
        agreement=float(np.mean([p.agree for p in photos])),
        mean_latency_s=(float(lat_a.mean()), float(lat_b.mean())),
        p95_latency_s=(float(np.percentile(lat_a, 95)), float(np.percentile(lat_b, 95))),
        per_breed={str(c): (per_a[c][1], per_a[c][2], per_b[c][2]) for c in per_a},
    )


@dataclass(frozen=True)
class CompareAggregate:
    """Result of an aggregate run: both sides, per-photo outcomes, metrics, what was skipped."""

    a: SideRun
    b: SideRun
    photos: list[PhotoOutcome]
    metrics: AggregateMetrics
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (image id, reason)
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)  # photos left out on purpose, and why

    def summary_frame(self) -> pd.DataFrame:
        """One row per side: profile, version, photos, accuracy, balanced accuracy, agreement,
        mean/p95 latency (ms), verdicts computed/cached in this run, peak memory (MiB)."""
        import pandas as pd

        m = self.metrics
        rows = []
        for i, side in enumerate((self.a, self.b)):
            rows.append(
                {
                    "side": "AB"[i],
                    "profile": side.name,
                    "model_version": side.model_version,
                    "photos": m.n,
                    "accuracy": round(m.accuracy[i], 4),
                    "balanced_accuracy": round(m.balanced_accuracy[i], 4),
                    "agreement": round(m.agreement, 4),
                    "mean_latency_ms": round(m.mean_latency_s[i] * 1000, 1),
                    "p95_latency_ms": round(m.p95_latency_s[i] * 1000, 1),
                    "computed": side.computed,
                    "cached": side.cached,
                    "peak_memory_mib": round(side.memory.peak_bytes / 2**20, 1) if side.memory else None,
                }
            )
        return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))

    def per_breed_frame(self) -> pd.DataFrame:
        """``breed, photos, accuracy <A>, accuracy <B>``."""
        import pandas as pd

        cols = per_breed_columns(self.a.name, self.b.name)
        return pd.DataFrame(
            [[b, n, round(x, 4), round(y, 4)] for b, (n, x, y) in self.metrics.per_breed.items()], columns=cols
        )

    def photos_frame(self) -> pd.DataFrame:
        """One row per photo: id, path, human label, candidates, both verdicts, correctness,
        seconds, agreement."""
        import pandas as pd

        return pd.DataFrame(
            [
                {
                    "image_id": p.image_id,
                    "path": p.path,
                    "human_label": p.human,
                    "candidates": " | ".join(p.candidates),
                    "label_a": p.label_a,
                    "confidence_a": round(p.confidence_a, 6),
                    "correct_a": p.correct_a,
                    "seconds_a": round(p.seconds_a, 6),
                    "label_b": p.label_b,
                    "confidence_b": round(p.confidence_b, 6),
                    "correct_b": p.correct_b,
                    "seconds_b": round(p.seconds_b, 6),
                    "agree": p.agree,
                }
                for p in self.photos
            ]
        )

    def plot_frame(self) -> pd.DataFrame:
        """Long table for a bar plot: ``group`` ("accuracy", "balanced accuracy", then each breed
        with the side), ``accuracy``, ``model``. One row per bar, so bars never stack."""
        import pandas as pd

        m = self.metrics
        rows: list[dict[str, Any]] = []
        for i, side in enumerate((self.a, self.b)):
            tag = f"{'AB'[i]}: {side.name}"
            rows.append({"group": f"all · {'AB'[i]}", "accuracy": m.accuracy[i], "model": tag})
            rows.append({"group": f"balanced · {'AB'[i]}", "accuracy": m.balanced_accuracy[i], "model": tag})
        for breed, (_, x, y) in m.per_breed.items():
            rows.append({"group": f"{breed} · A", "accuracy": x, "model": f"A: {self.a.name}"})
            rows.append({"group": f"{breed} · B", "accuracy": y, "model": f"B: {self.b.name}"})
        order = {"all": 0, "balanced": 1}
        rows.sort(key=lambda r: (order.get(r["group"].split(" · ")[0], 2), r["group"]))
        return pd.DataFrame(rows)

    def write_csv(self, out_dir: str | Path) -> list[Path]:
        """Write ``compare_summary.csv``, ``compare_per_breed.csv`` and ``compare_photos.csv``
        into ``out_dir`` (created); returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for stem, frame in (
            ("summary", self.summary_frame()),
            ("per_breed", self.per_breed_frame()),
            ("photos", self.photos_frame()),
        ):
            path = out / f"compare_{stem}.csv"
            frame.to_csv(path, index=False)
            paths.append(path)
        return paths

    def to_text(self) -> str:
        """The aggregate as plain-text tables (the CLI output)."""
        lines = [
            f"A = {self.a.name} ({self.a.model_version}), B = {self.b.name} ({self.b.model_version})",
            f"{plural(self.metrics.n, 'reviewed photo')}; agreement A vs B: {self.metrics.agreement:.1%}",
            ACCURACY_NOTE,
        ]
        lines += self.notes
        if self.skipped:
            lines.append(
                f"{plural(len(self.skipped), 'reviewed photo')} skipped (no verdict): "
                + ", ".join(f"#{i} {r}" for i, r in self.skipped[:5])
            )
        if self.cancelled:
            lines.append("cancelled before the end: metrics cover the photos done so far")
        cols = [
            "side",
            "profile",
            "photos",
            "accuracy",
            "balanced_accuracy",
            "mean_latency_ms",
            "p95_latency_ms",
            "computed",
            "cached",
            "peak_memory_mib",
        ]
        lines += [
            "",
            self.summary_frame()[cols].to_string(index=False),
            "",
            self.per_breed_frame().to_string(index=False),
        ]
        return "\n".join(lines)


def photo_outcomes(
    images: Sequence[ImageRecord],
    human: dict[int, str],
    topk: dict[int, list[tuple[str, float]]],
    preds_a: dict[int, Any],
    preds_b: dict[int, Any],
    canonical: Callable[[str], str],
) -> tuple[list[PhotoOutcome], list[tuple[int, str]]]:
    """Join stored verdicts (``Prediction`` rows) with human labels.

    Returns ``(outcomes, skipped)``; a photo without stage 1 or either verdict is skipped with a
    reason. Verdict labels go through ``canonical`` (folder-style stage-1 names).
    """
    outcomes, skipped = [], []
    for rec in images:
        rid: int = rec.id  # type: ignore[assignment]
        missing = [
            what
            for what, ok in (("stage 1", rid in topk), ("verdict A", rid in preds_a), ("verdict B", rid in preds_b))
            if not ok
        ]
        if missing:
            skipped.append((rid, "no " + ", ".join(missing)))
            continue
        pa, pb = preds_a[rid].payload, preds_b[rid].payload
        outcomes.append(
            PhotoOutcome(
                image_id=rid,
                path=rec.path,
                human=human[rid],
                candidates=[lab for lab, _ in topk[rid]],
                label_a=canonical(pa["label"]),
                confidence_a=float(pa["confidence"]),
                seconds_a=float(preds_a[rid].seconds),
                label_b=canonical(pb["label"]),
                confidence_b=float(pb["confidence"]),
                seconds_b=float(preds_b[rid].seconds),
            )
        )
    return outcomes, skipped


__all__ = [
    "ACCURACY_NOTE",
    "SUMMARY_COLUMNS",
    "AggregateMetrics",
    "CompareAggregate",
    "PhotoOutcome",
    "SideRun",
    "aggregate_metrics",
    "per_breed_columns",
    "photo_outcomes",
    "plural",
]
