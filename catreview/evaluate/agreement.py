"""Inter-annotator agreement on the overlap photos, and each annotator's accuracy against adjudication.

Inputs are the blind votes of the overlap round (:class:`Vote`: one label per annotator and photo)
and, where a reviewer settled a photo, its adjudicated label. Figures (all from libraries):

- **Krippendorff's alpha**, nominal, over all annotators at once; it allows any number of votes per
  photo (Krippendorff 2011, "Computing Krippendorff's Alpha-Reliability"; the ``krippendorff``
  package). 1 = perfect agreement, 0 = chance level, < 0 = systematic disagreement.
- **Cohen's kappa** for each pair of annotators over the photos both voted on
  (``sklearn.metrics.cohen_kappa_score``), with the observed share of equal votes.
- **Accuracy against adjudicated labels** per annotator (photos a reviewer adjudicated, or on
  which all votes agreed, count; the annotator's own vote is compared with that final label).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from itertools import combinations

import krippendorff
import numpy as np
from sklearn.metrics import cohen_kappa_score


@dataclass(frozen=True)
class Vote:
    """One annotator's blind label for one overlap photo."""

    image_id: int
    annotator: str
    label: str


@dataclass(frozen=True)
class PairAgreement:
    """Agreement of annotators ``a`` and ``b`` (``a < b``) on the ``n`` photos both voted on:
    ``observed`` share of equal labels (0..1) and Cohen's ``kappa`` (``None`` when undefined:
    fewer than 2 shared photos, or a single label used by both)."""

    a: str
    b: str
    n: int
    observed: float
    kappa: float | None


@dataclass(frozen=True)
class AnnotatorAgreement:
    """One annotator: ``votes`` cast, ``agree`` = share of their pairwise comparisons with other
    annotators that matched (``None`` without any), ``correct``/``n_final`` = votes equal to the
    photo's final label among the ``n_final`` photos that have one, ``accuracy`` their ratio."""

    annotator: str
    votes: int
    agree: float | None
    n_final: int
    correct: int

    @property
    def accuracy(self) -> float | None:
        """``correct / n_final``, or ``None`` when no voted photo has a final label."""
        return self.correct / self.n_final if self.n_final else None


@dataclass(frozen=True)
class AgreementReport:
    """Agreement figures of one set of votes (see the module docstring).

    Attributes:
        n_photos: photos with at least two votes (the ones agreement is measured on).
        n_votes: votes on those photos.
        alpha: Krippendorff's alpha (nominal), ``None`` when undefined (fewer than 2 photos with
            2 votes, or one label only).
        pairs: per annotator pair, sorted by names.
        annotators: per annotator, sorted by name.
        disputed: ids of photos whose votes differ (what the adjudication queue holds).
    """

    n_photos: int
    n_votes: int
    alpha: float | None
    pairs: list[PairAgreement]
    annotators: list[AnnotatorAgreement]
    disputed: list[int]


def _alpha(by_photo: Mapping[int, Mapping[str, str]], annotators: list[str]) -> float | None:
    labels = sorted({lab for votes in by_photo.values() for lab in votes.values()})
    if len(by_photo) < 2 or len(labels) < 2:
        return None
    code = {lab: float(i) for i, lab in enumerate(labels)}
    photos = sorted(by_photo)
    data = np.full((len(annotators), len(photos)), np.nan)
    for j, photo in enumerate(photos):
        for i, who in enumerate(annotators):
            if who in by_photo[photo]:
                data[i, j] = code[by_photo[photo][who]]
    return float(krippendorff.alpha(reliability_data=data, level_of_measurement="nominal"))


def agreement_report(votes: Iterable[Vote], final_labels: Mapping[int, str] | None = None) -> AgreementReport:
    """Agreement of ``votes`` and accuracy against ``final_labels`` (``{image_id: label}``: the
    reviewers' adjudicated labels; a consensus label is made of the votes it would score, so it is
    not a reference).

    Raises:
        ValueError: an annotator voted twice on one photo (a round keeps one vote per person).
    """
    by_photo: dict[int, dict[str, str]] = defaultdict(dict)
    for v in votes:
        if v.annotator in by_photo[v.image_id]:
            raise ValueError(f"{v.annotator} has two votes on photo {v.image_id}")
        by_photo[v.image_id][v.annotator] = v.label
    multi = {i: d for i, d in by_photo.items() if len(d) >= 2}
    annotators = sorted({who for d in by_photo.values() for who in d})
    final = dict(final_labels or {})

    pairs = []
    compared: dict[str, list[bool]] = defaultdict(list)
    for a, b in combinations(annotators, 2):
        shared = sorted(i for i, d in multi.items() if a in d and b in d)
        if not shared:
            continue
        ya, yb = [multi[i][a] for i in shared], [multi[i][b] for i in shared]
        same = [x == y for x, y in zip(ya, yb, strict=True)]
        compared[a] += same
        compared[b] += same
        defined = len(shared) >= 2 and len(set(ya) | set(yb)) >= 2
        kappa = float(cohen_kappa_score(ya, yb)) if defined else None
        if kappa is not None and np.isnan(kappa):
            kappa = None
        pairs.append(PairAgreement(a, b, len(shared), sum(same) / len(same), kappa))

    per = []
    for who in annotators:
        mine = {i: d[who] for i, d in by_photo.items() if who in d}
        judged = [i for i in mine if i in final]
        per.append(
            AnnotatorAgreement(
                annotator=who,
                votes=len(mine),
                agree=(sum(compared[who]) / len(compared[who])) if compared[who] else None,
                n_final=len(judged),
                correct=sum(mine[i] == final[i] for i in judged),
            )
        )
    disputed = sorted(i for i, d in multi.items() if len(set(d.values())) > 1)
    return AgreementReport(
        n_photos=len(multi),
        n_votes=sum(len(d) for d in multi.values()),
        alpha=_alpha(multi, annotators),
        pairs=pairs,
        annotators=per,
        disputed=disputed,
    )


__all__ = ["AgreementReport", "AnnotatorAgreement", "PairAgreement", "Vote", "agreement_report"]
