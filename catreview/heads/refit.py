"""One stage-1 refit from the current reviews: features, fit, out-of-fold, version, gate.

:func:`refit_classifier`:

1. takes every decodable photo whose current review names a breed (as exports do:
   :func:`catreview.export.rows.reviewed_labels`);
2. splits them with the export's sticky, stratified assignment (:func:`catreview.export.splits.assign_splits`
   over the stored ``split_assignments``; new assignments are stored), so the test photos of
   stage 1 and of the VLM rounds are the same photos and neither model is trained on them;
3. computes the missing features (:func:`catreview.heads.features.ensure_features`);
4. fits the head on the train split only (:func:`catreview.heads.fit.fit_head`; so
   :func:`catreview.adapters.versions.training_photo_hashes` names exactly the photos a head
   version saw, as for adapters; validation photos stay unseen) and the
   out-of-fold probabilities on every labelled photo (:func:`catreview.heads.fit.out_of_fold`);
5. scores the new head and the reference once each on the test photos and gates
   (:func:`catreview.adapters.gate.gate`). The reference is the active head version, else the
   user's own checkpoint head, else (the built-in backbone, which has no breed head) nothing:
   then the first version is activated without a gate (there is no stage-1 model to protect,
   and without one no photo gets predictions at all);
6. stores the version (folder before row) and activates it if the gate passed.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.adapters.gate import DEFAULT_POLICY, GateDecision, GatePolicy, gate
from catreview.adapters.versions import flip_active
from catreview.data.db import (
    ImageRecord,
    SplitAssignment,
    active_adapter_version,
    insert_ignoring_conflicts,
    utcnow,
)
from catreview.data.labels import BreedVocabulary
from catreview.data.phash import stored_groups
from catreview.errors import CatreviewError
from catreview.export.rows import reviewed_labels
from catreview.export.splits import DB_SPLIT, FROM_DB_SPLIT, SPLITS, assign_splits
from catreview.heads.features import FeatureExtractor, FeaturePhoto, ensure_features, load_extractor
from catreview.heads.fit import DEFAULT_C, DEFAULT_FOLDS, HeadFitError, eval_metrics, fit_head, out_of_fold
from catreview.heads.versions import heads_root, load_head, register_head, save_version

Progress = Callable[[str, int, int], None]


class RefitCancelled(CatreviewError, RuntimeError):
    """The refit was stopped before it finished (features computed so far stay cached)."""


@dataclass
class LabelledFeaturePhoto:
    """A reviewed photo with its breed and split (``train`` / ``validation`` / ``test``)."""

    photo: FeaturePhoto
    label: str
    split: str


@dataclass
class RefitResult:
    """What a refit did.

    Attributes:
        version_id: the new ``adapters`` row; ``folder``: its version folder.
        activated: it became the active head.
        decision: the gate's decision (``None``: the first head of the built-in backbone, activated
            without a gate).
        first_version: no stage-1 model existed before (built-in backbone, no active head).
        n_train, n_test: photos fitted on (train split) and scored on (test split).
        test: the new head's test metrics (gate format); ``reference_test``: the reference's.
        features_computed, features_cached: photos featurised now / read from the cache.
        failed: ``(path, reason)`` of photos that could not be decoded.
        seconds: wall time (features included); ``feature_seconds``: of those, the features.
        message: one line for people.
    """

    version_id: int
    folder: str
    activated: bool
    decision: GateDecision | None
    first_version: bool
    n_train: int
    n_test: int
    test: dict[str, Any]
    reference_test: dict[str, Any]
    features_computed: int
    features_cached: int
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    feature_seconds: float = 0.0
    message: str = ""


def labelled_photos(engine: Engine, vocabulary: BreedVocabulary | None, *, seed: int = 0) -> list[LabelledFeaturePhoto]:
    """Decodable photos whose current review names a breed, with their sticky split.

    Splits are the export's (stored ``split_assignments``, new photos assigned stratified by
    :func:`assign_splits` with ``seed``); the new assignments are stored (``INSERT ... ON
    CONFLICT DO NOTHING``: a concurrent export's assignment wins) and re-read.
    """
    with Session(engine) as s:
        photos, _skipped = reviewed_labels(s, vocabulary)
        q = select(col(ImageRecord.id), col(ImageRecord.sha256), col(ImageRecord.path)).where(
            col(ImageRecord.current_review_id).is_not(None), col(ImageRecord.error).is_(None)
        )
        where = {sha: (int(i), p) for i, sha, p in s.execute(q)}
        stored = {
            sha: FROM_DB_SPLIT.get(split, split)
            for sha, split in s.execute(select(col(SplitAssignment.sha256), col(SplitAssignment.split)))
        }
        sticky = {sha: sp for sha, sp in stored.items() if sp in SPLITS}
        labels = {p.sha256: p.label for p in photos if p.sha256 in where}
        splits = assign_splits(labels, sticky, seed=seed, groups=stored_groups(s, labels))  # near copies: one split
        now = utcnow()
        fresh = [
            {"sha256": sha, "split": DB_SPLIT[sp], "assigned_at": now}
            for sha, sp in splits.items()
            if sha not in sticky
        ]
        if fresh:
            s.execute(insert_ignoring_conflicts(s, SplitAssignment, ["sha256"]), fresh)
            s.commit()
            rows = s.execute(
                select(col(SplitAssignment.sha256), col(SplitAssignment.split)).where(
                    col(SplitAssignment.sha256).in_([f["sha256"] for f in fresh])
                )
            )
            splits.update({sha: FROM_DB_SPLIT.get(sp, sp) for sha, sp in rows})
    return [
        LabelledFeaturePhoto(FeaturePhoto(where[sha][0], sha, where[sha][1]), label, splits[sha])
        for sha, label in sorted(labels.items())
    ]


def labels_digest(items: list[LabelledFeaturePhoto]) -> str:
    """sha256 over the sorted ``sha256:label:split`` lines: what a head was fitted and gated on
    (stored as the version's ``export_hash``)."""
    h = hashlib.sha256()
    for it in sorted(items, key=lambda i: i.photo.sha256):
        h.update(f"{it.photo.sha256}:{it.label}:{it.split}\n".encode())
    return h.hexdigest()


def _head_predictions(model: torch.nn.Module, labels: list[str], features: np.ndarray) -> list[str]:
    """Top-1 labels of a timm model's own classifier applied to its pre-logit ``features``."""
    if len(features) == 0:
        return []
    with torch.inference_mode():
        fc = model.get_classifier()
        param = next(fc.parameters())
        logits = fc(torch.from_numpy(features).to(param.device, param.dtype))
    return [labels[i] for i in logits.argmax(dim=1).tolist()]


def _reference(
    engine: Engine, extractor: FeatureExtractor, vocabulary: BreedVocabulary | None, test_x: np.ndarray
) -> tuple[str, list[str] | None, int | None]:
    """``(name, test predictions or None, active version id)`` of what the new head is gated against."""
    with Session(engine) as s:
        row = active_adapter_version(s, extractor.backbone.base_model)
    canon = vocabulary.canonical_or_same if vocabulary is not None else (lambda x: x)
    if row is not None:
        head = load_head(row.path, extractor.model)
        return f"head #{row.id}", [canon(p) for p in head.predict(test_x)], row.id
    own = extractor.own_classifier
    if own is not None:
        return "the checkpoint's own head", [canon(p) for p in _head_predictions(own.model, own.labels, test_x)], None
    return "no stage-1 model", None, None


def refit_classifier(
    registry: Any,
    engine: Engine | None = None,
    *,
    policy: GatePolicy = DEFAULT_POLICY,
    auto_activate: bool = True,
    c: float = DEFAULT_C,
    n_splits: int = DEFAULT_FOLDS,
    seed: int = 0,
    num_workers: int | None = None,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
) -> RefitResult:
    """Refit the stage-1 head of ``registry``'s backbone on the current reviews (module docstring).

    Args:
        registry: a :class:`catreview.models.registry.ModelRegistry` (its settings, backbone, engine).
        engine: the database (default: the registry's).
        policy: the gate's thresholds (:class:`GatePolicy`; the test split decides).
        auto_activate: activate the new version when the gate passes (else it stays inactive).
        c: inverse L2 strength (scikit-learn ``C``); n_splits: out-of-fold folds; seed: splits, folds.
        num_workers, progress, stop: as for :func:`ensure_features` (progress also reports
            ``("fit", 0|1, 1)``).

    Raises:
        HeadFitError: fewer than two reviewed breeds (or too few photos to cross-fit).
        RefitCancelled: ``stop`` was set during feature extraction.
        catreview.models.classifier.ClassifierError: the backbone cannot be loaded.
    """
    t0 = time.perf_counter()
    settings = registry.settings
    engine = engine if engine is not None else registry.engine
    vocabulary = BreedVocabulary.from_labels_file(settings.classifier.labels_file)
    items = labelled_photos(engine, vocabulary, seed=seed)
    if len({it.label for it in items}) < 2:
        raise HeadFitError(
            f"stage 1 needs reviewed photos of at least 2 breeds to learn from ({len(items)} reviewed photos "
            f"of {len({it.label for it in items})} breed(s) now)"
        )
    backbone = registry.stage1_backbone()
    extractor = load_extractor(settings, backbone)
    feats = ensure_features(
        settings, extractor, [it.photo for it in items], num_workers=num_workers, progress=progress, stop=stop
    )
    if feats.cancelled:
        raise RefitCancelled(f"stage-1 refit cancelled ({feats.computed} photos' features computed and cached)")
    items = [it for it in items if it.photo.sha256 in feats.features]
    x = np.stack([feats.features[it.photo.sha256] for it in items])
    y = [it.label for it in items]
    is_train = np.array([it.split == "train" for it in items])
    if progress:
        progress("fit", 0, 1)
    train_labels = [label for label, t in zip(y, is_train) if t]
    if len(set(train_labels)) < 2:
        raise HeadFitError("the train split holds fewer than 2 breeds; review more photos")
    head = fit_head(x[is_train], train_labels, c=c, seed=seed)
    oof = out_of_fold(x, y, n_splits=n_splits, c=c, seed=seed)
    test_idx = np.flatnonzero([it.split == "test" for it in items])
    test_x = x[test_idx]
    test_truth = [y[i] for i in test_idx]
    test_shas = [items[i].photo.sha256 for i in test_idx]
    test = eval_metrics(test_shas, test_truth, head.predict(test_x))
    ref_name, ref_pred, active_id = _reference(engine, extractor, vocabulary, test_x)
    first = backbone.builtin and active_id is None
    reference_test = eval_metrics(test_shas, test_truth, ref_pred) if ref_pred is not None else {"n": 0}
    decision: GateDecision | None = None
    if not first:
        decision = gate(test, reference_test, policy, reference_name=ref_name)
    activate = auto_activate and (first or (decision is not None and decision.passed))
    if progress:
        progress("fit", 1, 1)
    hyper = {"c": c, "n_splits": int(oof.folds.max()) + 1, "seed": seed, "class_weight": "balanced"}
    info = {
        "backbone": backbone.key,
        "model_id": backbone.model_id,
        "labels": head.labels,
        "n_train": int(is_train.sum()),
        "n_test": len(test_idx),
        "n_oof": len(items),
        **hyper,
    }
    folder = save_version(
        heads_root(settings, backbone.key),
        extractor.model,
        head,
        oof,
        [it.photo.image_id for it in items],
        [it.photo.sha256 for it in items],
        info,
    )
    metrics = {
        "n_train": int(is_train.sum()),
        "test": test,
        "reference_test": reference_test,
        "reference": ref_name,
        "balanced_accuracy": test.get("balanced_accuracy"),
        "first_version": first,
        "gate": decision.to_dict() if decision is not None else {"passed": True, "gated": False, "first": True},
    }
    with Session(engine) as s:
        row = register_head(
            s,
            folder,
            base_model=backbone.base_model,
            labels_hash=labels_digest(items),
            hyperparams=hyper,
            metrics=metrics,
        )
        if activate:
            flip_active(s, backbone.base_model, row.id)
        s.commit()
        version_id = int(row.id)  # type: ignore[arg-type]
    if first:
        message = f"stage-1 head #{version_id} trained on {int(is_train.sum())} photos and " + (
            "activated (the first stage-1 model)" if activate else "kept inactive (promote by hand)"
        )
    else:
        assert decision is not None
        verb = "activated" if activate else "kept inactive"
        message = f"stage-1 head #{version_id} {verb}: {decision.summary()}"
    seconds = time.perf_counter() - t0
    return RefitResult(
        version_id=version_id,
        folder=str(folder),
        activated=activate,
        decision=decision,
        first_version=first,
        n_train=int(is_train.sum()),
        n_test=len(test_idx),
        test=test,
        reference_test=reference_test,
        features_computed=feats.computed,
        features_cached=feats.cached,
        failed=feats.failed,
        seconds=seconds,
        feature_seconds=feats.seconds,
        message=message,
    )


__all__ = [
    "LabelledFeaturePhoto",
    "RefitCancelled",
    "RefitResult",
    "labelled_photos",
    "labels_digest",
    "refit_classifier",
]
