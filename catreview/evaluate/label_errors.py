"""Likely label errors: confident learning on out-of-fold stage-1 probabilities, mixed with the VLM.

Input (per labelled photo, imported or reviewed):

* the out-of-fold stage-1 probabilities stored with the active head version
  (:func:`catreview.heads.versions.load_oof`): each photo's row comes from a head fitted on the
  other folds only, which is what confident learning needs (Northcutt et al., "Confident
  Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021; cleanlab's docs: "label issues
  are most accurate when computed on out-of-sample pred_probs");
* where the active VLM ran on the photo, its candidate probabilities (three stage-1 candidates
  plus ``"other"``, :func:`catreview.query.photos.vlm_probs`).

Mixing rule (:func:`mix_vlm`): the VLM's distribution is extended to all C head classes by
spreading its ``"other"`` mass over the non-candidate classes in proportion to their
out-of-fold probabilities (candidates the head does not know are dropped, the rest renormalised);
the photo's row is then the equal-weight average of the out-of-fold row and that extended VLM
row (each sums to 1, so the mix does too). Photos the VLM did not score (not run yet, skipped by
routing) keep their out-of-fold row, and so do all photos while the active VLM is an untrained
built-in one (its verdicts mean nothing; the Review tab hides them for the same reason).

On the resulting (N, C) matrix cleanlab (the library, not a copy) gives:

* ``score = 1 - cleanlab.rank.get_label_quality_scores(labels, probs, method="self_confidence")``:
  one minus the (mixed) probability of the given label, 0..1, higher = more likely wrong.
  ``self_confidence`` rather than ``normalized_margin``: on the shared photos with 10% of the labels
  flipped (5 seeds, Lite2 features) it ranked the flipped ones better (precision among the top
  33: 0.79-0.88 vs 0.58-0.76; AUROC 0.97-0.99 vs 0.95-0.98).
* ``flagged = cleanlab.filter.find_label_issues(labels, probs)`` (``prune_by_noise_rate``,
  cleanlab's default): the photos confident learning counts as label issues; only these are
  stored as the "likely label errors" queue (:func:`store_issues`).

The suggested label is the most probable class other than the given one (mixed row).

Caveat: the VLM part is not out-of-fold. Its three candidates come from the active head, which
was fitted on the photo's (possibly wrong) label, and a VLM trained on the reviews may have seen
it too; the equal weight keeps the out-of-fold half decisive when the two disagree.

cleanlab references: https://docs.cleanlab.ai/stable/cleanlab/filter.html (``find_label_issues``)
and https://docs.cleanlab.ai/stable/cleanlab/rank.html (``get_label_quality_scores``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col

from catreview.data.db import ImageRecord, Review, active_adapter_version
from catreview.data.labels import SPECIAL_LABELS, BreedVocabulary
from catreview.errors import CatreviewError
from catreview.heads.versions import StoredOutOfFold, load_oof

IMPORT_SOURCE = "import"  # catreview.data.importer.IMPORT_SOURCE (a review by the importer)
OTHER = "other"


class LabelIssuesUnavailable(CatreviewError, RuntimeError):
    """No out-of-fold stage-1 probabilities to rank with (no stage-1 head version trained)."""


@dataclass(frozen=True)
class LabelIssue:
    """One labelled photo's label-error estimate.

    Attributes:
        image_id: ``images.id``.
        given_label: its current label (imported or a person's).
        score: 0..1, ``1 - P(given label)`` of the mixed probabilities (higher = more likely wrong).
        suggested_label: the most probable other class; ``suggested_prob``: its mixed probability (0..1).
        reason: one line for the reviewer ("imported label Persian, out-of-fold stage-1 says ...").
        flagged: cleanlab's ``find_label_issues`` counts it as a label issue.
        imported: the label is an imported (unverified) one, not a person's decision.
        stage1_label, stage1_prob: the out-of-fold stage-1 top-1 and its probability.
        vlm_label, vlm_prob: the VLM's top answer (a candidate or ``"other"``), ``None`` where it did not run.
    """

    image_id: int
    given_label: str
    score: float
    suggested_label: str
    suggested_prob: float
    reason: str
    flagged: bool
    imported: bool
    stage1_label: str
    stage1_prob: float
    vlm_label: str | None = None
    vlm_prob: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (the ``label-errors --json`` line)."""
        return asdict(self)


@dataclass
class LabelIssueRanking:
    """What :func:`rank_label_issues` found.

    Attributes:
        issues: every ranked photo, most likely wrong first (score descending, then image id).
        head_version: the ``adapters`` row id of the head whose out-of-fold probabilities were used.
        n_without_oof: labelled photos (breed labels) that have no out-of-fold row (labelled after
            that head was fitted: retrain the classifier to rank them).
        n_unknown_label: photos whose label is not one of the head's classes.
        n_with_vlm: ranked photos whose row mixes in the VLM.
        stored: rows written to ``photo_scores.label_issue`` (``None``: not stored).
    """

    issues: list[LabelIssue]
    head_version: int
    n_without_oof: int = 0
    n_unknown_label: int = 0
    n_with_vlm: int = 0
    stored: int | None = None

    def __iter__(self) -> Iterator[LabelIssue]:
        """Iterates over :attr:`issues` (so the ranking reads like the contract's ``list[LabelIssue]``)."""
        return iter(self.issues)

    def __len__(self) -> int:
        return len(self.issues)

    def __getitem__(self, i: int) -> LabelIssue:
        return self.issues[i]

    @property
    def flagged(self) -> list[LabelIssue]:
        """The issues cleanlab flags, in rank order."""
        return [i for i in self.issues if i.flagged]

    def summary(self) -> str:
        """One line for people."""
        line = (
            f"{len(self.issues)} labelled photos ranked (stage-1 head #{self.head_version} out-of-fold"
            f"{f', VLM on {self.n_with_vlm}' if self.n_with_vlm else ''}); {len(self.flagged)} likely label errors"
        )
        if self.n_without_oof:
            line += f"; {self.n_without_oof} labelled since that head was fitted (retrain the classifier to rank them)"
        if self.n_unknown_label:
            line += f"; {self.n_unknown_label} with a label the head does not know"
        return line


def mix_vlm(oof_row: np.ndarray, classes: Sequence[str], vlm: Mapping[str, float]) -> np.ndarray:
    """The module's mixing rule for one photo: ``0.5 * oof_row + 0.5 * vlm_extended``.

    Args:
        oof_row: (C,) out-of-fold probabilities over ``classes`` (sum 1).
        classes: the C head classes.
        vlm: ``{candidate or "other": probability}`` of the VLM (sum 1).

    Returns:
        (C,) float64 probabilities summing to 1. The VLM's ``"other"`` mass (plus that of
        candidates not in ``classes``) goes to the non-candidate classes in proportion to
        ``oof_row`` (uniformly if those are all 0); if every class is a candidate, the candidate
        probabilities are renormalised.
    """
    p = np.asarray(oof_row, dtype=np.float64)
    index = {c: i for i, c in enumerate(classes)}
    v = np.zeros(len(classes), dtype=np.float64)
    known = {c: float(q) for c, q in vlm.items() if c in index}
    for c, q in known.items():
        v[index[c]] = q
    rest = max(0.0, 1.0 - sum(known.values()))
    others = np.array([c not in known for c in classes])
    if others.any():
        w = np.where(others, p, 0.0)
        w = w / w.sum() if w.sum() > 0 else others / others.sum()
        v += rest * w
    v = v / v.sum() if v.sum() > 0 else p
    return 0.5 * p + 0.5 * v


@dataclass(frozen=True)
class _Labelled:
    image_id: int
    sha256: str
    label: str
    imported: bool


def _labelled(session: Session, vocabulary: BreedVocabulary | None) -> dict[str, _Labelled]:
    """``{sha256: _Labelled}`` of decodable photos whose current label names a breed."""
    q = (
        sa_select(col(ImageRecord.id), col(ImageRecord.sha256), col(Review.label), col(Review.source))
        .join(Review, col(Review.id) == col(ImageRecord.current_review_id))
        .where(col(ImageRecord.error).is_(None))
        .execution_options(yield_per=2000)
    )
    canon = vocabulary.canonical_or_same if vocabulary is not None else (lambda x: x)
    out: dict[str, _Labelled] = {}
    for image_id, sha, label, source in session.execute(q):
        if label in SPECIAL_LABELS:
            continue
        out[sha] = _Labelled(int(image_id), sha, canon(label), source == IMPORT_SOURCE)
    return out


def active_oof(engine: Engine, registry: Any) -> tuple[int, StoredOutOfFold]:
    """``(head version id, its out-of-fold probabilities)`` of the active stage-1 head.

    Raises:
        LabelIssuesUnavailable: no active head version of the registry's backbone.
        catreview.heads.versions.HeadVersionError: its out-of-fold file is missing or damaged.
    """
    base = registry.stage1_backbone().base_model
    with Session(engine) as s:
        row = active_adapter_version(s, base)
    if row is None or row.id is None:
        raise LabelIssuesUnavailable(
            "no out-of-fold stage-1 probabilities: train the stage-1 head first "
            "(python -m catreview train --stage classifier, or Train -> Retrain classifier)"
        )
    return int(row.id), load_oof(row.path)


def _vlm_rows(engine: Engine, registry: Any, image_ids: list[int]) -> dict[int, dict[str, float]]:
    """``{image_id: VLM candidate probabilities}`` of the active VLM where it ran (current
    stage-1 candidates; photos routing skipped have none)."""
    from catreview.query.photos import iter_views

    out: dict[int, dict[str, float]] = {}
    for view in iter_views(engine, registry, image_ids=image_ids):
        v = view["vlm"]
        if v and not v.get("skipped") and v.get("probabilities"):
            out[int(view["id"])] = {k: float(p) for k, p in v["probabilities"].items()}
    return out


def _reason(given: str, imported: bool, s1_label: str, s1_prob: float, vlm: Mapping[str, float] | None) -> str:
    what = "imported label" if imported else "reviewed label"
    if s1_label == given:
        line = f"{what} {given}, out-of-fold stage-1 agrees {s1_prob:.2f}"
    else:
        line = f"{what} {given}, out-of-fold stage-1 says {s1_label} {s1_prob:.2f}"
    if vlm:
        top = max(vlm, key=lambda k: vlm[k])
        line += f", VLM says {top} {vlm[top]:.2f}"
    return line


def rank_label_issues(
    engine: Engine,
    registry: Any,
    *,
    use_vlm: bool = True,
    store: bool = True,
    vocabulary: BreedVocabulary | None = None,
) -> LabelIssueRanking:
    """Rank every labelled photo with an out-of-fold row by how likely its label is wrong.

    Args:
        engine: the database.
        registry: a :class:`catreview.models.registry.ModelRegistry` (active head, active VLM).
        use_vlm: mix in the active VLM's stored candidate probabilities (module docstring);
            never those of an untrained built-in VLM (``registry.untrained_reason()`` set).
        store: write the flagged photos' scores and reasons to ``photo_scores`` through
            :func:`catreview.query.queues.store_label_issues` (and clear all other rows).
        vocabulary: canonicalises stored labels (default: the classifier's labels file).

    Returns:
        A :class:`LabelIssueRanking` (issues sorted by score descending, then image id).

    Raises:
        LabelIssuesUnavailable: no stage-1 head version with out-of-fold probabilities.
        ValueError: from cleanlab, when the labels cannot be ranked (e.g. a single class).
    """
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    if vocabulary is None:
        vocabulary = BreedVocabulary.from_labels_file(registry.settings.classifier.labels_file)
    head_id, oof = active_oof(engine, registry)
    classes = list(oof.label_names)
    col_of = {c: i for i, c in enumerate(classes)}
    with Session(engine) as s:
        labelled = _labelled(s, vocabulary)
    row_of = {sha: i for i, sha in enumerate(oof.sha256)}
    ranked = [p for sha, p in labelled.items() if sha in row_of and p.label in col_of]
    unknown = sum(1 for sha, p in labelled.items() if sha in row_of and p.label not in col_of)
    ranking = LabelIssueRanking([], head_id, n_without_oof=sum(1 for sha in labelled if sha not in row_of))
    ranking.n_unknown_label = unknown
    if not ranked:
        if store:
            ranking.stored = store_issues(engine, [])
        return ranking
    ranked.sort(key=lambda p: p.image_id)
    oof_probs = np.stack([oof.probabilities[row_of[p.sha256]] for p in ranked]).astype(np.float64)
    oof_probs /= oof_probs.sum(axis=1, keepdims=True)
    # an untrained built-in VLM's verdicts mean nothing (the app hides them too): not mixed in
    vlm_ok = use_vlm and registry.untrained_reason() is None
    vlm = _vlm_rows(engine, registry, [p.image_id for p in ranked]) if vlm_ok else {}
    probs = oof_probs.copy()
    for i, p in enumerate(ranked):
        if p.image_id in vlm:
            probs[i] = mix_vlm(oof_probs[i], classes, vlm[p.image_id])
    labels = np.array([col_of[p.label] for p in ranked], dtype=np.int64)
    quality = get_label_quality_scores(labels, probs, method="self_confidence")
    flagged = find_label_issues(labels, probs)
    issues = []
    for i, p in enumerate(ranked):
        others = probs[i].copy()
        others[labels[i]] = -1.0
        sug = int(others.argmax())
        s1 = int(oof_probs[i].argmax())
        v = vlm.get(p.image_id)
        vtop = max(v, key=lambda k: v[k]) if v else None
        issues.append(
            LabelIssue(
                image_id=p.image_id,
                given_label=p.label,
                score=float(np.clip(1.0 - quality[i], 0.0, 1.0)),
                suggested_label=classes[sug],
                suggested_prob=float(probs[i, sug]),
                reason=_reason(p.label, p.imported, classes[s1], float(oof_probs[i, s1]), v),
                flagged=bool(flagged[i]),
                imported=p.imported,
                stage1_label=classes[s1],
                stage1_prob=float(oof_probs[i, s1]),
                vlm_label=vtop,
                vlm_prob=float(v[vtop]) if v and vtop is not None else None,
            )
        )
    issues.sort(key=lambda it: (-it.score, it.image_id))
    ranking.issues = issues
    ranking.n_with_vlm = sum(1 for p in ranked if p.image_id in vlm)
    if store:
        ranking.stored = store_issues(engine, ranking.flagged)
    return ranking


def store_issues(engine: Engine, issues: Iterable[LabelIssue]) -> int:
    """Write ``issues`` as the "likely label errors" queue (``photo_scores.label_issue`` and
    ``label_issue_reason``; every other row cleared) in one transaction; returns rows written
    (photos without a ``photo_scores`` row, i.e. no stage-1 prediction of the active versions,
    are not written)."""
    from catreview.query.queues import store_label_issues

    with Session(engine) as s:
        n = store_label_issues(s, [(i.image_id, i.score, i.reason) for i in issues])
        s.commit()
    return int(n)


__all__ = [
    "LabelIssue",
    "LabelIssueRanking",
    "LabelIssuesUnavailable",
    "active_oof",
    "mix_vlm",
    "rank_label_issues",
    "store_issues",
]
