"""Tests for catreview.predict.fusion: the linear opinion pool and VLM routing."""

from __future__ import annotations

import math

import numpy as np
import pytest

from catreview.predict.fusion import OTHER, fuse, normalise_topk, should_route_to_vlm, top_label

TOPK = [("Bengal", 0.6), ("Ocicat", 0.2), ("Egyptian Mau", 0.1)]  # sums to 0.9
VLM = {"Bengal": 0.2, "Ocicat": 0.5, "Egyptian Mau": 0.1, OTHER: 0.2}


def test_stage1_is_renormalised_over_candidates():
    p = normalise_topk(TOPK)
    assert list(p) == ["Bengal", "Ocicat", "Egyptian Mau"]
    assert p["Bengal"] == pytest.approx(0.6 / 0.9)
    assert p["Ocicat"] == pytest.approx(0.2 / 0.9)
    assert math.fsum(p.values()) == pytest.approx(1.0)


def test_linear_pool_value_worked_by_hand():
    fused = fuse(TOPK, VLM, 0.25)
    assert list(fused) == ["Bengal", "Ocicat", "Egyptian Mau", OTHER]
    assert fused["Bengal"] == pytest.approx(0.75 * (6 / 9) + 0.25 * 0.2)  # 0.55
    assert fused["Ocicat"] == pytest.approx(0.75 * (2 / 9) + 0.25 * 0.5)  # 0.291666...
    assert fused["Egyptian Mau"] == pytest.approx(0.75 * (1 / 9) + 0.25 * 0.1)
    assert fused[OTHER] == pytest.approx(0.25 * 0.2)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("keep_other", [True, False])
def test_fused_probabilities_sum_to_one(seed, keep_other):
    rng = np.random.default_rng(seed)
    labels = [f"breed{i}" for i in range(3)]
    topk = dict(zip(labels, rng.dirichlet(np.ones(10))[:3]))
    vlm = dict(zip([*labels, OTHER], rng.dirichlet(np.ones(4))))
    for w in np.linspace(0, 1, 11):
        fused = fuse(topk, vlm, float(w), keep_other=keep_other)
        assert math.fsum(fused.values()) == pytest.approx(1.0, abs=1e-12)
        assert all(0.0 <= v <= 1.0 for v in fused.values())
        assert (OTHER in fused) is keep_other


def test_weight_zero_is_stage1_and_weight_one_is_vlm():
    at0 = fuse(TOPK, VLM, 0.0)
    stage1 = normalise_topk(TOPK)
    for label, p in stage1.items():
        assert at0[label] == pytest.approx(p)
    assert at0[OTHER] == 0.0

    at1 = fuse(TOPK, VLM, 1.0)
    assert at1 == pytest.approx(VLM)
    assert top_label(at0) == "Bengal" and top_label(at1) == "Ocicat"


def test_keep_other_false_conditions_vlm_on_candidates():
    at1 = fuse(TOPK, VLM, 1.0, keep_other=False)
    assert OTHER not in at1
    assert at1["Ocicat"] == pytest.approx(0.5 / 0.8)
    assert at1["Bengal"] == pytest.approx(0.2 / 0.8)


def test_other_is_kept_as_its_own_outcome_and_can_win():
    vlm = {"Bengal": 0.02, "Ocicat": 0.03, "Egyptian Mau": 0.05, OTHER: 0.9}
    fused = fuse(TOPK, vlm, 0.8)
    assert top_label(fused) == OTHER
    assert fused[OTHER] == pytest.approx(0.8 * 0.9)


def test_vlm_without_other_key_means_zero_other():
    vlm = {"Bengal": 0.5, "Ocicat": 0.25, "Egyptian Mau": 0.25}
    fused = fuse(TOPK, vlm, 0.5)
    assert fused[OTHER] == 0.0
    assert math.fsum(fused.values()) == pytest.approx(1.0)


@pytest.mark.parametrize("weight", [0.0, 0.3, 1.0])
def test_skipped_vlm_returns_stage1(weight):
    fused = fuse(dict(TOPK), None, weight)
    assert fused == pytest.approx({**normalise_topk(TOPK), OTHER: 0.0})
    assert list(fuse(TOPK, None, weight, keep_other=False)) == ["Bengal", "Ocicat", "Egyptian Mau"]


@pytest.mark.parametrize(
    "topk, vlm, weight, match",
    [
        (TOPK, VLM, 1.5, "weight"),
        (TOPK, VLM, -0.1, "weight"),
        (TOPK, {**VLM, "Siamese": 0.1}, 0.5, "not stage-1 candidates"),
        (TOPK, {"Bengal": 0.5, OTHER: 0.5}, 0.5, "lack candidates"),
        (TOPK, {**VLM, "Bengal": -0.1}, 0.5, "finite and >= 0"),
        ([("Bengal", 0.5), ("Bengal", 0.2)], None, 0.5, "duplicate"),
        ([], None, 0.5, "empty"),
        ([(OTHER, 0.5)], None, 0.5, "reserved"),
        ([("Bengal", 0.0), ("Ocicat", 0.0)], None, 0.5, "all zero"),
        ([("Bengal", float("nan"))], None, 0.5, "finite"),
    ],
)
def test_invalid_inputs_raise(topk, vlm, weight, match):
    with pytest.raises(ValueError, match=match):
        fuse(topk, vlm, weight)


def test_routing_threshold():
    assert should_route_to_vlm(0.99, None) is True
    assert should_route_to_vlm(0.95, 0.9) is False  # confident: skip the VLM
    assert should_route_to_vlm(0.9, 0.9) is True  # skip only when strictly above
    assert should_route_to_vlm(0.4, 0.9) is True
    assert should_route_to_vlm(1.0, 1.0) is True
    with pytest.raises(ValueError):
        should_route_to_vlm(1.2, 0.9)
    with pytest.raises(ValueError):
        should_route_to_vlm(0.5, 1.5)
    with pytest.raises(ValueError):
        should_route_to_vlm(float("nan"), 0.5)
