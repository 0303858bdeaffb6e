"""Tests for catreview.evaluate.calibration on hand-worked and seeded synthetic fixtures, and of its
array implementation against the per-record one it replaced (tests/calibration_reference.py)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from catreview.app.presenters.calibration import report_text
from catreview.data.labels import BreedVocabulary
from catreview.evaluate.calibration import CalibrationReport, CandidateArrays, ReviewRecord, calibrate
from catreview.evaluate.folds import deal_folds, stratified_folds
from catreview.evaluate.fusion_weight import fit_fusion_weight, fusion_weight_curve
from catreview.evaluate.temperature import _bisect, _NllGradient, fit_temperature, temperature_nll
from catreview.metrics import (
    balanced_accuracy,
    expected_calibration_error,
    macro_f1,
    per_class_accuracy,
    reliability_bins,
)
from catreview.predict.fusion import OTHER
from catreview.predict.temperature import apply_temperature, log_probabilities, scale_probabilities
from tests.calibration_reference import (
    assert_reports_equal,
    ref_fit_fusion_weight,
    ref_fit_temperature,
    ref_fusion_weight_curve,
    ref_stratified_folds,
    reference_calibrate,
)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sample_labels(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One label per row drawn from that row's distribution (inverse-CDF sampling)."""
    u = rng.random(len(probs))[:, None]
    return (probs.cumsum(axis=1) < u).sum(axis=1).clip(max=probs.shape[1] - 1)


# --------------------------------------------------------------------------- ECE

HAND_PROBS = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]])
HAND_LABELS = np.array([0, 1, 1, 0])
# Top-1: 0.9 right, 0.8 wrong, 0.7 right, 0.55 wrong. With 5 bins:
#   (0.4, 0.6]: {0.55}      conf 0.55, acc 0   -> 1/4 * 0.55 = 0.1375
#   (0.6, 0.8]: {0.7, 0.8}  conf 0.75, acc 0.5 -> 2/4 * 0.25 = 0.125   (0.8 sits on the right edge)
#   (0.8, 1.0]: {0.9}       conf 0.9,  acc 1   -> 1/4 * 0.1  = 0.025
HAND_ECE = 0.2875


def test_ece_matches_hand_worked_example():
    assert expected_calibration_error(HAND_PROBS, HAND_LABELS, n_bins=5) == pytest.approx(HAND_ECE)


def test_reliability_bins_hand_worked():
    bins = reliability_bins(HAND_PROBS, HAND_LABELS, n_bins=5)
    assert [b.count for b in bins] == [0, 0, 1, 2, 1]
    assert bins[3].lower == pytest.approx(0.6) and bins[3].upper == pytest.approx(0.8)
    assert bins[3].confidence == pytest.approx(0.75) and bins[3].accuracy == pytest.approx(0.5)
    assert math.isnan(bins[0].confidence) and math.isnan(bins[0].accuracy)


def test_ece_near_zero_for_calibrated_generator_and_large_when_sharpened():
    rng = np.random.default_rng(0)
    probs = softmax(rng.normal(0.0, 2.0, size=(20000, 5)))
    labels = sample_labels(rng, probs)
    assert expected_calibration_error(probs, labels) < 0.015
    assert expected_calibration_error(softmax(np.log(probs) / 0.3), labels) > 0.1


@pytest.mark.parametrize(
    "probs, labels",
    [
        (np.array([0.5, 0.5]), np.array([0])),  # not 2-D
        (np.array([[0.5, 0.5]]), np.array([2])),  # label out of range
        (np.array([[1.5, -0.5]]), np.array([0])),  # not probabilities
        (np.array([[0.5, 0.5]]), np.array([0.0])),  # float labels
    ],
)
def test_ece_rejects_bad_input(probs, labels):
    with pytest.raises(ValueError):
        expected_calibration_error(probs, labels)


# --------------------------------------------------------------------------- temperature


def test_apply_temperature_basics():
    z = np.array([[2.0, 0.0, -np.inf], [1.0, 1.0, 1.0]])
    p = apply_temperature(z, 1.0)
    assert p.sum(axis=1) == pytest.approx([1.0, 1.0])
    assert p[0, 2] == 0.0
    assert p[0, 0] == pytest.approx(math.exp(2) / (math.exp(2) + 1))
    assert apply_temperature(z, 2.0)[0, 0] == pytest.approx(math.exp(1) / (math.exp(1) + 1))
    assert apply_temperature(z[0], 1.0) == pytest.approx(p[0])
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            apply_temperature(z, bad)


def test_log_probabilities_round_trip_is_renormalisation():
    q = np.array([0.5, 0.2, 0.1])  # a stage-1 top-3, sums to 0.8
    assert apply_temperature(log_probabilities(q), 1.0) == pytest.approx(q / q.sum())
    assert scale_probabilities({"a": 0.5, "b": 0.2, "c": 0.1}, 0.5) == pytest.approx(
        dict(zip("abc", q**2 / (q**2).sum()))
    )


def test_fit_temperature_recovers_known_temperature():
    rng = np.random.default_rng(1)
    logits = rng.normal(0.0, 3.0, size=(8000, 6))
    labels = sample_labels(rng, softmax(logits / 2.0))  # the true temperature is 2
    t = fit_temperature(logits, labels)
    assert t == pytest.approx(2.0, rel=0.08)
    nll = temperature_nll(logits, labels, t)
    assert nll < temperature_nll(logits, labels, t * 1.1)
    assert nll < temperature_nll(logits, labels, t / 1.1)
    assert nll < temperature_nll(logits, labels, 1.0)


def test_overconfident_model_gets_t_above_one_and_lower_ece():
    rng = np.random.default_rng(2)
    calibrated = softmax(rng.normal(0.0, 1.5, size=(6000, 5)))
    labels = sample_labels(rng, calibrated)
    overconfident = softmax(np.log(calibrated) / 0.3)  # sharpened with T = 0.3
    ece_before = expected_calibration_error(overconfident, labels)

    t = fit_temperature(log_probabilities(overconfident), labels)  # stored probabilities as logits
    after = apply_temperature(log_probabilities(overconfident), t)
    ece_after = expected_calibration_error(after, labels)

    assert t > 1.0
    assert t == pytest.approx(1 / 0.3, rel=0.1)
    assert ece_after < ece_before / 3
    assert ece_after < 0.03
    assert np.array_equal(after.argmax(axis=1), overconfident.argmax(axis=1))


def test_underconfident_model_gets_t_below_one():
    rng = np.random.default_rng(3)
    logits = rng.normal(0.0, 2.0, size=(5000, 4))
    labels = sample_labels(rng, softmax(logits))
    assert fit_temperature(logits * 0.5, labels) == pytest.approx(0.5, rel=0.1)


def test_fit_temperature_ignores_minus_inf_padding():
    rng = np.random.default_rng(4)
    logits = rng.normal(0.0, 2.0, size=(2000, 3))
    labels = sample_labels(rng, softmax(logits / 1.7))
    padded = np.hstack([logits, np.full((2000, 2), -np.inf)])
    assert fit_temperature(padded, labels) == pytest.approx(fit_temperature(logits, labels), rel=1e-9)


def test_fit_temperature_errors_and_bounds():
    with pytest.raises(ValueError, match="-inf"):
        fit_temperature(np.array([[0.0, -np.inf]]), np.array([1]))
    with pytest.raises(ValueError, match="not identifiable"):
        fit_temperature(np.zeros((4, 3)), np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    # Every prediction right: the NLL keeps falling as T -> 0, so the lower bound is returned.
    with pytest.warns(RuntimeWarning, match="bound"):
        assert fit_temperature(np.array([[3.0, 0.0], [0.0, 2.0]]), np.array([0, 1])) == 1e-2


# --------------------------------------------------------------------------- classification metrics


def test_balanced_accuracy_differs_from_accuracy_on_imbalanced_data():
    y_true = ["Domestic Short Hair"] * 8 + ["Bengal"] * 2
    y_pred = ["Domestic Short Hair"] * 10
    accuracy = np.mean([a == b for a, b in zip(y_true, y_pred)])
    assert accuracy == pytest.approx(0.8)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(0.5)


def test_balanced_accuracy_matches_confusion_matrix_definition():
    # sklearn: C = confusion_matrix(y_true, y_pred); mean(diag(C) / C.sum(axis=1)) over classes in y_true.
    y_true = ["a", "a", "a", "b", "b", "c", "c", "c", "c", "c"]
    y_pred = ["a", "b", "a", "b", "c", "c", "c", "a", "c", "d"]  # "d" occurs only as a prediction
    classes = sorted(set(y_true) | set(y_pred))
    cm = np.zeros((len(classes), len(classes)))
    for t, p in zip(y_true, y_pred):
        cm[classes.index(t), classes.index(p)] += 1
    rows = cm.sum(axis=1) > 0
    expected = np.mean(np.diag(cm)[rows] / cm.sum(axis=1)[rows])  # (2/3 + 1/2 + 3/5) / 3
    assert expected == pytest.approx((2 / 3 + 1 / 2 + 3 / 5) / 3)
    assert balanced_accuracy(y_true, y_pred) == pytest.approx(expected)
    assert per_class_accuracy(y_true, y_pred) == {
        "a": (2, 3, pytest.approx(2 / 3)),
        "b": (1, 2, 0.5),
        "c": (3, 5, 0.6),
    }


def test_per_class_accuracy_with_explicit_labels_and_errors():
    result = per_class_accuracy(["a", "b"], ["a", "a"], labels=["b", "z"])
    assert result["b"] == (0, 1, 0.0)
    assert result["z"][:2] == (0, 0) and math.isnan(result["z"][2])
    with pytest.raises(ValueError):
        balanced_accuracy(["a"], ["a", "b"])
    with pytest.raises(ValueError):
        balanced_accuracy(["a"], ["a"], labels=["z"])


def test_macro_f1_hand_worked():
    y_true = ["a", "a", "b", "b", "c"]
    y_pred = ["a", "b", "b", "b", "a"]
    # a: TP1 FP1 FN1 -> 0.5; b: TP2 FP1 FN0 -> 0.8; c: TP0 FP0 FN1 -> 0
    assert macro_f1(y_true, y_pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


# --------------------------------------------------------------------------- fusion weight

# Complementary errors: on "Bengal" photos stage 1 is confidently right and the VLM mildly wrong;
# on "Ocicat" photos stage 1 is mildly wrong and the VLM confidently right. Worked by hand:
# Bengal photos are right for w < 0.85/0.95 = 0.8947, Ocicat photos for w > 0.05/0.9 = 0.0556.
CANDS = ("Bengal", "Ocicat", "Savannah")
S1_BENGAL = dict(zip(CANDS, (0.9, 0.05, 0.05)))
VLM_BENGAL = dict(zip((*CANDS, OTHER), (0.3, 0.4, 0.2, 0.1)))
S1_OCICAT = dict(zip(CANDS, (0.4, 0.35, 0.25)))
VLM_OCICAT = dict(zip((*CANDS, OTHER), (0.05, 0.9, 0.03, 0.02)))


def complementary_fixture():
    routed = [("Savannah", 0.05), ("Ocicat", 0.05), ("Bengal", 0.9)]  # top-1 not listed first
    stage1 = [S1_BENGAL] * 6 + [S1_OCICAT] * 3 + [routed]
    vlm = [VLM_BENGAL] * 6 + [VLM_OCICAT] * 3 + [None]  # the last photo skipped the VLM
    human = ["Bengal"] * 6 + ["Ocicat"] * 3 + ["Bengal"]
    return stage1, vlm, human


def test_fusion_weight_beats_both_ends_with_complementary_errors():
    stage1, vlm, human = complementary_fixture()
    weights, scores = fusion_weight_curve(stage1, vlm, human)
    assert scores[0] == pytest.approx(0.5)  # stage 1 alone: every Ocicat wrong
    assert scores[-1] == pytest.approx((1 / 7 + 1) / 2)  # VLM alone: 6 of 7 Bengals wrong
    w = fit_fusion_weight(stage1, vlm, human)
    assert 0.0 < w < 1.0
    assert scores[np.isclose(weights, w)][0] == pytest.approx(1.0)
    assert scores[np.isclose(weights, w)][0] > max(scores[0], scores[-1])


def test_fusion_weight_ties_go_to_the_weight_closest_to_current():
    stage1, vlm, human = complementary_fixture()
    assert fit_fusion_weight(stage1, vlm, human, current_weight=0.5) == pytest.approx(0.5)
    assert fit_fusion_weight(stage1, vlm, human, current_weight=0.0) == pytest.approx(0.06)
    assert fit_fusion_weight(stage1, vlm, human, current_weight=1.0) == pytest.approx(0.89)
    assert fit_fusion_weight(stage1, vlm, human, current_weight=0.0, n_steps=21) == pytest.approx(0.1)


def test_fusion_weight_input_errors_name_the_record():
    stage1, vlm, human = complementary_fixture()
    vlm = [*vlm[:2], {"Siamese": 1.0}, *vlm[3:]]
    with pytest.raises(ValueError, match="record 2"):
        fit_fusion_weight(stage1, vlm, human)
    with pytest.raises(ValueError, match="equal length"):
        fit_fusion_weight(stage1[:3], vlm, human)


# --------------------------------------------------------------------------- calibrate()

BREEDS = ["Abyssinian", "Bengal", "Birman", "Bombay", "Maine Coon", "Siamese"]


def synthetic_records(n: int, seed: int) -> list[ReviewRecord]:
    """Stage 1 sharpened with T=0.4 (over-confident); VLM flattened with T=3 (under-confident).

    Stage-1 truth is drawn from softmax(g), so softmax(g) is calibrated. VLM scores x over the
    candidates + OTHER are Gaussian around the true outcome (mean 2 there, 0 elsewhere, sd 1),
    whose posterior under a uniform prior is softmax(2 x); the stored VLM verdict is softmax(2x / 3).
    Every fifth photo skipped the VLM.
    """
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        g = rng.normal(0.0, 1.0, len(BREEDS))
        g[rng.integers(len(BREEDS))] += 3.0
        truth = BREEDS[sample_labels(rng, softmax(g)[None, :])[0]]
        stored = softmax(g / 0.4)
        top = np.argsort(-stored)[:3]
        topk = [(BREEDS[j], float(stored[j])) for j in top]
        outcomes = [BREEDS[j] for j in top] + [OTHER]
        target = outcomes.index(truth) if truth in outcomes else 3
        x = rng.normal(0.0, 1.0, 4)
        x[target] += 2.0
        vlm = dict(zip(outcomes, map(float, softmax(2.0 * x / 3.0))))
        records.append(ReviewRecord(truth, topk, None if i % 5 == 4 else vlm))
    return records


@pytest.fixture(scope="module")
def report() -> CalibrationReport:
    return calibrate(synthetic_records(1500, seed=5), min_reviews=30)


def test_calibrate_fits_temperatures_in_the_right_direction(report):
    assert report.n_reviews == 1500 and report.n_with_vlm == 1200
    assert report.stage1_temperature > 1.5  # over-confident stage 1
    assert report.vlm_temperature < 0.6  # under-confident VLM
    assert report.stage1.ece_after < report.stage1.ece_before
    assert report.vlm.ece_after < report.vlm.ece_before
    assert report.vlm.ece_after < 0.05
    # Stage 1's ECE counts the ~8% of photos whose label is outside its top 3 as confident misses
    # (renormalised top-k cannot express them), so it stays near that miss rate after scaling.
    assert report.stage1.ece_after < 0.1
    # Temperature scaling never changes a stage's own argmax.
    assert report.stage1.accuracy_after == report.stage1.accuracy_before
    assert report.vlm.accuracy_after == report.vlm.accuracy_before
    assert report.excluded_from_fit["vlm"] == 0
    assert report.excluded_from_fit["stage1"] > 0  # some truths fall outside the top 3


def test_pool_gets_its_own_temperature(report):
    # Both stages are calibrated after scaling, and their linear pool is under-confident
    # (Ranjan & Gneiting 2010): the fused temperature sharpens it, and the fused ECE falls to the
    # level of the calibrated stages, in-sample and cross-validated.
    assert report.fused_temperature < 0.8
    assert report.fused.ece_after < 0.08 and report.fused.ece_after_cv < 0.08
    assert report.fused.ece_after < report.fused.ece_before / 2
    assert "fused (after the pool) T=" in report_text(report)


def test_calibrate_weight_is_the_best_on_calibrated_inputs(report):
    records = synthetic_records(1500, seed=5)
    stage1 = [scale_probabilities(dict(r.stage1_topk), report.stage1_temperature) for r in records]
    vlm = [None if r.vlm_probs is None else scale_probabilities(r.vlm_probs, report.vlm_temperature) for r in records]
    _, scores = fusion_weight_curve(stage1, vlm, [r.human_label for r in records])
    assert report.fused.balanced_accuracy_after == pytest.approx(scores.max())
    assert report.fused.balanced_accuracy_after >= report.stage1.balanced_accuracy_after


def test_calibrate_per_breed_counts_add_up(report):
    rows = report.per_breed_rows()
    assert {r["breed"] for r in rows} == set(BREEDS)
    assert sum(r["reviews"] for r in rows) == 1500
    assert sum(r["vlm_reviews"] for r in rows) == 1200
    assert sum(r["stage1_correct"] for r in rows) == pytest.approx(report.stage1.accuracy_after * 1500)
    assert sum(r["fused_correct"] for r in rows) == pytest.approx(report.fused.accuracy_after * 1500)
    assert np.mean([r["stage1_accuracy"] for r in rows]) == pytest.approx(report.stage1.balanced_accuracy_after)
    table = report_text(report)
    assert "stage 1" in table and "VLM" in table and "fused" in table
    assert all(b in table for b in BREEDS)
    assert f"{report.stage1_temperature:.3f}" in table
    assert len(report.reliability["fused_after"]) == 15


def test_calibrate_scores_non_candidate_label_as_other():
    cands = [("Bengal", 0.7), ("Ocicat", 0.2), ("Savannah", 0.1)]
    records = [
        # The true breed is not a candidate; the VLM says "other".
        ReviewRecord("Siamese", cands, {"Bengal": 0.1, "Ocicat": 0.1, "Savannah": 0.1, OTHER: 0.7}),
        ReviewRecord("Bengal", cands, {"Bengal": 0.6, "Ocicat": 0.2, "Savannah": 0.1, OTHER: 0.1}),
        {
            "human_label": "Ocicat",
            "stage1_topk": cands,
            "vlm_probs": {"Bengal": 0.2, "Ocicat": 0.6, "Savannah": 0.1, OTHER: 0.1},
        },
        ReviewRecord("Bengal", cands, None),
    ]
    with pytest.warns(RuntimeWarning, match="bound"):  # the VLM is right on all 3: T -> 0
        rep = calibrate(records, n_bins=10, min_reviews=2, current_weight=1.0)
    assert rep.vlm_temperature == 1e-2
    assert rep.per_breed["Siamese"]["stage1"] == (0, 1, 0.0)
    assert rep.per_breed["Siamese"]["vlm"] == (1, 1, 1.0)
    assert rep.per_breed["Ocicat"]["stage1"] == (0, 1, 0.0)
    assert rep.vlm.accuracy_before == 1.0
    assert rep.excluded_from_fit == {"stage1": 1, "vlm": 0}
    assert rep.fused.accuracy_before == 1.0  # weight 1: the VLM's answers, stage 1 on the skipped photo


def test_calibrate_needs_min_reviews():
    with pytest.raises(ValueError, match="at least 30"):
        calibrate(synthetic_records(29, seed=6), min_reviews=30)


def test_calibrate_without_any_vlm_verdicts():
    records = [ReviewRecord(r.human_label, r.stage1_topk, None) for r in synthetic_records(200, seed=7)]
    rep = calibrate(records, min_reviews=30, current_weight=0.3)
    assert rep.vlm is None and rep.vlm_temperature is None
    assert rep.weight == pytest.approx(0.3)  # every weight ties: keep the current one
    assert rep.fused.accuracy_after == rep.stage1.accuracy_after
    assert "n/a" in report_text(rep)


# --------------------------------------------------------------------------- cross-validation


def test_stratified_folds_spread_every_label_and_balance_sizes():
    labels = ["Bengal"] * 7 + ["Ocicat"] * 3 + ["Bombay"] * 11 + ["Siamese"]
    folds = stratified_folds(labels, 5)
    assert folds.tolist() == stratified_folds(labels, 5).tolist()  # deterministic
    sizes = np.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == len(labels)
    for label in set(labels):
        per_fold = np.bincount(folds[[i for i, x in enumerate(labels) if x == label]], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1, label  # as even as the count allows
    for bad in (1, 0, len(labels) + 1, 2.5):
        with pytest.raises(ValueError, match="n_folds"):
            stratified_folds(labels, bad)


def test_cross_validated_ece_also_falls(report):
    assert report.n_folds == 5 and report.cv_note is None
    assert report.vlm.ece_after_cv < report.vlm.ece_before and report.vlm.ece_after_cv < 0.06
    assert report.stage1.ece_after_cv < report.stage1.ece_before
    assert report.fused.ece_after_cv < report.fused.ece_before
    assert report.stage1.accuracy_after_cv == report.stage1.accuracy_before  # T keeps the argmax
    assert "ECE CV" in report_text(report) and "5-fold cross-validated" in report_text(report)


def test_in_sample_fit_is_optimistic_and_cv_is_not():
    # A VLM that is pure noise: the weight search fits the noise of the photos it sees, so
    # in-sample balanced accuracy beats the cross-validated one (which never scores a photo with
    # a fit that saw it). Equality would mean the CV numbers leak the fit.
    for seed in range(4):
        rng = np.random.default_rng(seed)
        records = []
        for r in synthetic_records(60, seed=seed):
            outcomes = [label for label, _ in r.stage1_topk] + [OTHER]
            noise = rng.dirichlet(np.full(len(outcomes), 0.3))
            records.append(ReviewRecord(r.human_label, r.stage1_topk, dict(zip(outcomes, map(float, noise)))))
        with warnings.catch_warnings():  # the noise VLM's T may run to its bound (it says so)
            warnings.simplefilter("ignore", RuntimeWarning)
            rep = calibrate(records, min_reviews=30)
        assert rep.fused.balanced_accuracy_after_cv < rep.fused.balanced_accuracy_after, seed


def test_cross_validation_is_skipped_with_a_reason():
    records = synthetic_records(40, seed=3)
    rep = calibrate(records, min_reviews=30, n_folds=25)
    assert rep.n_folds == 0 and "too few for 25 folds" in rep.cv_note
    assert rep.fused.ece_after_cv is None and rep.fused.ece_after is not None
    assert "no cross-validation" in report_text(rep) and "ECE CV" in report_text(rep)
    assert calibrate(records, min_reviews=30, n_folds=0).cv_note == "n_folds=0"


def test_top1_only_stage1_keeps_its_temperature():
    # top_k = 1 (allowed by the config): one logit per photo, nothing to scale in stage 1; the
    # VLM and the pool (candidate + OTHER) are still fitted.
    records = [
        ReviewRecord(
            r.human_label,
            r.stage1_topk[:1],
            r.vlm_probs
            and {r.stage1_topk[0][0]: r.vlm_probs[r.stage1_topk[0][0]], OTHER: 1.0 - r.vlm_probs[r.stage1_topk[0][0]]},
        )
        for r in synthetic_records(200, seed=2)
    ]
    rep = calibrate(records, min_reviews=30)
    assert rep.stage1_temperature == 1.0 and rep.vlm_temperature is not None and rep.vlm_temperature != 1.0


# --------------------------------------------------------------------------- arrays vs the per-record fit
# calibrate() runs on arrays; tests/calibration_reference.py is the per-record implementation it
# replaced. Counts, accuracies, the weight and bin counts must be equal, and floats within 1e-12
# (the brief allows 1e-6; the two share their arithmetic, so they agree to the bit on this data).


def users_like_records(n: int, seed: int) -> list[ReviewRecord]:
    """Records over the users' 67 classes, long-tailed (weight 1/rank^1.1), stage-1 top 3 (every
    37th photo top 4), VLM over the candidates + other; every 5th photo skipped the VLM, and some
    verdicts are stored in another order, lack "other", or hold exact ties and zeros."""
    names = BreedVocabulary.default().names
    rng = np.random.default_rng(seed)
    freq = 1.0 / np.arange(1, len(names) + 1) ** 1.1
    records = []
    for i in range(n):
        truth = int(rng.choice(len(names), p=freq / freq.sum()))
        g = rng.normal(0.0, 1.0, len(names))
        g[truth] += rng.normal(2.5, 1.0)
        p = softmax(g / 0.5)
        top = np.argsort(-p)[: 4 if i % 37 == 0 else 3]
        probs = [float(p[j]) for j in top]
        if i % 53 == 0:
            probs[1] = probs[2]  # an exact tie
        if i % 71 == 0:
            probs[-1] = 0.0  # a zero probability
        cands = [names[j] for j in top]
        topk = list(zip(cands, probs))
        vlm = None
        if i % 5 != 4:
            x = rng.normal(0.0, 1.0, len(cands) + 1)
            x[cands.index(names[truth]) if names[truth] in cands else len(cands)] += 1.5
            keys, v = [*cands, OTHER], softmax(x / 2.0)
            if i % 11 == 0:  # stored in another order
                order = rng.permutation(len(keys))
                keys, v = [keys[k] for k in order], v[order]
            vlm = {k: float(q) for k, q in zip(keys, v)}
            if i % 13 == 0:
                vlm.pop(OTHER)
            if i % 29 == 0:
                vlm[cands[0]] = vlm[cands[1]]
        records.append(ReviewRecord(names[truth], topk if i % 3 else dict(topk), vlm))
    return records


def both(records, **kw):
    """calibrate() and the reference on the same records, warnings of temperatures at a bound ignored."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return calibrate(records, **kw), reference_calibrate(records, **kw)


@pytest.mark.parametrize(
    "seed, n, kw",
    [
        (1, 400, {}),
        (2, 300, {"current_weight": 0.3, "n_folds": 3}),
        (3, 250, {"current_weight": 1.0, "n_weight_steps": 21, "n_bins": 10}),
        (4, 60, {"n_folds": 25}),  # too few photos: no cross-validation
    ],
)
def test_arrays_equal_the_per_record_fit_on_users_like_records(seed, n, kw):
    new, old = both(users_like_records(n, seed), **kw)
    assert_reports_equal(new, old, tol=1e-12)
    assert len(new.per_breed) > 15  # many of the 67 classes, rare ones included


def test_arrays_equal_the_per_record_fit_on_the_fixtures_data():
    for records, kw in [
        (synthetic_records(300, seed=5), {}),
        ([ReviewRecord(r.human_label, r.stage1_topk, None) for r in synthetic_records(200, seed=7)], {}),
        ([ReviewRecord(r.human_label, r.stage1_topk[:1], None) for r in synthetic_records(100, seed=2)], {}),
        ([ReviewRecord(h, s, v) for s, v, h in zip(*complementary_fixture())], {"min_reviews": 2, "n_folds": 2}),
        (
            [ReviewRecord(h, s, v) for s, v, h in zip(*complementary_fixture())],
            {"min_reviews": 2, "current_weight": 0.0},
        ),
    ]:
        new, old = both(records, **kw)
        assert_reports_equal(new, old, tol=1e-12)


def test_candidate_arrays_give_the_fit_of_their_records():
    records = users_like_records(200, seed=8)
    arrays = CandidateArrays.from_records(records)
    assert arrays.records() == [
        ReviewRecord(r.human_label, list(dict(r.stage1_topk).items()), r.vlm_probs) for r in records
    ]
    assert arrays.stage1_labels.shape == (200, 4) and int(arrays.has_vlm.sum()) == 160
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        new, old = calibrate(arrays), reference_calibrate(records)
    assert_reports_equal(new, old, tol=1e-12)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"stage1_topk": []}, "record 3: stage-1 top-k is empty"),
        ({"stage1_topk": [("Bengal", 0.5), ("Bengal", 0.2)]}, "record 3: duplicate stage-1 label"),
        ({"stage1_topk": [("Bengal", 0.5), (OTHER, 0.2)]}, "record 3: 'other' is reserved"),
        ({"stage1_topk": [("Bengal", -0.5), ("Ocicat", 0.2)]}, "record 3: stage-1 probability"),
        ({"stage1_topk": [("Bengal", float("nan"))]}, "record 3: stage-1 probability"),
        ({"stage1_topk": [("Bengal", 0.0), ("Ocicat", 0.0)]}, "record 3: stage-1 top-k probabilities are all zero"),
        ({"vlm_probs": {"Siamese": 1.0}}, "record 3: VLM labels \\['Siamese'\\] are not stage-1 candidates"),
        ({"vlm_probs": {"Bengal": 0.5, OTHER: 0.5}}, "record 3: VLM probabilities lack candidates"),
        ({"vlm_probs": {"Bengal": 0.5, "Ocicat": float("inf"), "Savannah": 0.1}}, "record 3: VLM probability"),
        ({"vlm_probs": {"Bengal": 0.0, "Ocicat": 0.0, "Savannah": 0.0}}, "record 3: VLM probabilities are all zero"),
        ({"stage1_topk": [("Bengal", "x")]}, "record 3: could not convert"),
    ],
)
def test_invalid_records_are_named_as_before(bad, message):
    base = {"human_label": "Bengal", "stage1_topk": [("Bengal", 0.5), ("Ocicat", 0.3), ("Savannah", 0.2)]}
    good = ReviewRecord(**base, vlm_probs={"Bengal": 0.6, "Ocicat": 0.2, "Savannah": 0.1, OTHER: 0.1})
    # record 4's verdict is bad too: the first bad record is named, and a bad stage-1 top-k
    # anywhere wins over a bad verdict, as before
    records = [good] * 3 + [ReviewRecord(**{**base, "vlm_probs": good.vlm_probs, **bad})]
    records.append(ReviewRecord(**base, vlm_probs={"Siamese": 1.0}))

    def from_arrays(recs, **kw):  # fit_and_store's input: the record is rebuilt from the arrays
        return calibrate(CandidateArrays.from_records(recs), **kw)

    for fit in (calibrate, reference_calibrate, from_arrays):
        with pytest.raises(ValueError, match=message):
            fit(records, min_reviews=2)


def test_bad_record_types_and_weights_raise_as_before():
    records = synthetic_records(40, seed=9)
    with pytest.raises(TypeError, match="record 1: expected ReviewRecord"):
        calibrate([records[0], 42, *records[2:]])
    with pytest.raises(ValueError, match="record 2: missing keys \\['human_label'\\]"):
        calibrate([*records[:2], {"stage1_topk": records[2].stage1_topk}, *records[3:]])
    with pytest.raises(ValueError, match="current_weight must be in"):
        calibrate(records, current_weight=1.5)
    with pytest.raises(ValueError, match="n_folds must be an integer"):
        calibrate(records, n_folds=1)


def test_temperature_search_is_the_plain_bisection_in_fewer_passes():
    # fit_temperature replays the bisection after a Newton search has bracketed the root: the
    # same temperature, bit for bit, as bisecting 37 times (the reference's fit).
    rng = np.random.default_rng(11)
    for trial in range(40):
        n, c = int(rng.integers(20, 3000)), int(rng.integers(2, 6))
        z = rng.normal(0.0, rng.uniform(0.3, 4.0), (n, c))
        if trial % 3 == 0:
            z[rng.random((n, c)) < 0.25] = -np.inf
            z[:, 0] = np.where(np.isinf(z[:, 0]), 0.0, z[:, 0])
        y = sample_labels(rng, softmax(np.where(np.isinf(z), -np.inf, z / rng.uniform(0.3, 3.0))))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            assert fit_temperature(z, y) == ref_fit_temperature(z, y), trial
    z = rng.normal(0.0, 3.0, (5000, 4))
    y = sample_labels(rng, softmax(z / 2.0))
    grad = _NllGradient(z, z[np.arange(5000), y])
    lo, hi = math.log(1e-2), math.log(1e2)
    assert grad(lo) < 0 < grad(hi)
    grad.calls = 0
    assert _bisect(grad, lo, hi, 1e-10) == ref_fit_temperature(z, y)
    assert grad.calls <= 15  # plain bisection: 37


def test_folds_and_weight_curve_arrays_equal_the_per_record_versions():
    rng = np.random.default_rng(12)
    labels = [
        str(x)
        for x in rng.choice(["Bengal", "Ocicat", "Bombay", "Siamese", "Sphynx"], 500, p=[0.5, 0.3, 0.1, 0.08, 0.02])
    ]
    assert stratified_folds(labels, 5).tolist() == ref_stratified_folds(labels, 5).tolist()
    with pytest.raises(ValueError, match="n_folds"):
        deal_folds(np.zeros(3, dtype=np.int64), 4)
    records = users_like_records(300, seed=13)
    args = ([r.stage1_topk for r in records], [r.vlm_probs for r in records], [r.human_label for r in records])
    for n_steps in (101, 7):
        weights, scores = fusion_weight_curve(*args, n_steps=n_steps)
        ref_weights, ref_scores = ref_fusion_weight_curve(*args, n_steps=n_steps)
        assert weights.tolist() == ref_weights.tolist() and scores.tolist() == ref_scores.tolist()
    for w in (0.0, 0.37, 1.0):
        assert fit_fusion_weight(*args, current_weight=w) == ref_fit_fusion_weight(*args, current_weight=w)
