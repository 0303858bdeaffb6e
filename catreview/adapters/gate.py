"""The gate: may a new LoRA adapter replace the reference automatically?

:func:`gate` uses the export's **test** split, never the validation split: the round picks its
best checkpoint (and stops early) on validation, and the best of several validation evaluations
is optimistically biased against a reference evaluated once. So the round scores the selected
adapter and the reference once each on the test photos, with the app's scorer, and a new version
is activated automatically only if its test balanced accuracy is strictly higher than the
reference's, also in at least ``min_p_better`` of the paired bootstrap resamples of the test
photos (ties never pass), and no breed with at least ``min_breed_photos`` test photos loses more
than ``max_breed_drop`` accuracy. With fewer than ``min_test_photos`` test photos there is no
decision: "not enough test photos to gate; promote by hand". Which reference a round is gated
against is :func:`catreview.adapters.rounds.register_round`'s business.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from pydantic import ConfigDict, Field

from catreview.adapters.results import EvalMetrics
from catreview.adapters.validation import ConfigModel


class GatePolicy(ConfigModel):
    """When a new adapter may replace the reference automatically.

    The gate decides on the round's **test** split, which model selection (best checkpoint, early
    stopping: validation) never saw; candidate and reference are each scored once on the same test
    photos (see :func:`gate`).

    Attributes:
        min_breed_photos: breeds with fewer test photos than this are not checked for drops
            (their accuracy moves in steps of ``1 / n``; default 5).
        max_breed_drop: largest allowed fall of a checked breed's test accuracy, absolute
            (default 0.10 = 10 points).
        min_test_photos: fewest test photos the gate decides on (default 20); with fewer the
            version is not gated, not activated, and left for promotion by hand.
        min_p_better: share of paired bootstrap resamples of the test photos in which the
            candidate's balanced accuracy must be strictly higher than the reference's
            (default 0.9).
        n_bootstrap: bootstrap resamples (default 1000).
        seed: seed of the resampling (default 0: the same photos give the same decision).

    Why 0.9: simulated on 10 breeds x 20 test photos with per-photo outcomes drawn independently
    (or half shared), an equally good candidate passes 12-13% of the time (0.8: 21-25%, the old
    rule ">=" on best-of-N validation: 87%), a worse one (57% vs 60%) 1-3%, a better one (+5
    points) 39-57% and (+10 points) 83-93%. A blocked version can still be promoted by hand.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_breed_photos: int = Field(5, ge=1)
    max_breed_drop: float = Field(0.10, ge=0, le=1)
    min_test_photos: int = Field(20, ge=1)
    min_p_better: float = Field(0.9, gt=0, le=1)
    n_bootstrap: int = Field(1000, ge=1)
    seed: int = 0

    def describe(self, reference: str = "the active one's") -> str:
        """The rule in words, for people: ``"on at least 20 held-out test photos its balanced
        accuracy is higher than <reference> in at least 90% of 1000 paired bootstrap resamples
        (a tie is not higher) and no breed with at least 5 test photos drops by more than 10
        points"`` (numbers from this policy; a point is one percentage point of accuracy)."""
        points = f"{100 * self.max_breed_drop:.4g}"
        photos = f"{self.min_breed_photos} test photo{'s' if self.min_breed_photos != 1 else ''}"
        return (
            f"on at least {self.min_test_photos} held-out test photos its balanced accuracy is higher than {reference} "
            f"in at least {100 * self.min_p_better:.4g}% of {self.n_bootstrap} paired bootstrap resamples (a tie is not "
            f"higher) and no breed with at least {photos} drops by more than {points} point{'' if points == '1' else 's'}"
        )


#: The policy new rounds are gated by unless another is given.
DEFAULT_POLICY = GatePolicy()


@dataclass(frozen=True)
class BreedComparison:
    """One breed's test accuracy, reference vs candidate (``None`` = breed absent)."""

    breed: str
    n: int
    reference: float | None
    candidate: float | None
    checked: bool
    blocking: bool

    @property
    def delta(self) -> float | None:
        if self.reference is None or self.candidate is None:
            return None
        return self.candidate - self.reference


@dataclass(frozen=True)
class GateDecision:
    """Outcome of :func:`gate`.

    Attributes:
        passed: may be activated automatically.
        reasons: why not (empty when passed).
        reference: what was compared against (``"adapter #3"``, ``"no adapter (base model)"``).
        reference_balanced_accuracy, candidate_balanced_accuracy: the two scores on ``split``
            (``None`` when there was nothing to compare).
        breeds: per-breed comparison, sorted by breed.
        split: the photos the scores come from (``"test"``; decisions stored before the gate
            moved to the test split read ``"validation"``).
        n: photos both were scored on.
        p_better: share of paired bootstrap resamples in which the candidate's balanced
            accuracy is strictly higher (``None``: not computed).
        gated: ``False`` when no decision could be made (too few test photos, no common test
            photos, no evaluated reference): the version is kept inactive for promotion by hand.
    """

    passed: bool
    reasons: list[str]
    reference: str
    reference_balanced_accuracy: float | None
    candidate_balanced_accuracy: float | None
    breeds: list[BreedComparison] = field(default_factory=list)
    split: str = "validation"
    n: int | None = None
    p_better: float | None = None
    gated: bool = True

    def rows(self) -> list[dict[str, Any]]:
        """Table rows for the UI / CLI: breed, n, reference, candidate, delta, checked, blocking."""
        return [{**asdict(b), "delta": b.delta} for b in self.breeds]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["breeds"] = self.rows()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateDecision:
        breeds = [BreedComparison(**{k: v for k, v in b.items() if k != "delta"}) for b in d.get("breeds", [])]
        return cls(**{**d, "breeds": breeds})

    @property
    def outcome(self) -> str:
        """``"passed"``, ``"blocked"`` or ``"not gated"``."""
        return "passed" if self.passed else ("blocked" if self.gated else "not gated")

    def summary(self) -> str:
        """One line for people."""
        head = (
            f"{self.split} balanced accuracy: candidate {_pct(self.candidate_balanced_accuracy)} vs {self.reference} "
            f"{_pct(self.reference_balanced_accuracy)}"
        )
        if self.n is not None:
            head += f", {self.n} photos"
        if self.p_better is not None:
            head += f", higher in {_pct(self.p_better)} of bootstrap resamples"
        if self.passed:
            return f"gate passed ({head})"
        return f"gate {'blocked' if self.gated else 'not applied'} ({head}): " + "; ".join(self.reasons)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def paired_bootstrap_p_better(
    truth: Sequence[str], candidate: Sequence[str], reference: Sequence[str], *, n_resamples: int = 1000, seed: int = 0
) -> float:
    """Share of paired bootstrap resamples in which the candidate's balanced accuracy is strictly
    higher than the reference's.

    Each resample draws ``len(truth)`` photos with replacement; the **same** photos are used for
    both models (paired), so what the two share (easy and hard photos) cancels. Balanced accuracy
    is the mean per-class recall over the classes present in the resample, as in
    :func:`catreview.metrics.balanced_accuracy`. Ties count as not higher, so two models with
    identical predictions give 0.

    This is the paired bootstrap comparison of two systems on one test set (Efron & Tibshirani
    1993, *An Introduction to the Bootstrap*, ch. 16: a bootstrap estimate of
    ``P(theta_candidate > theta_reference)``; Koehn 2004, "Statistical Significance Tests for
    Machine Translation Evaluation", uses the same resample-and-count procedure).

    Args:
        truth: each photo's correct answer.
        candidate, reference: each model's prediction for the same photos, same order.
        n_resamples: bootstrap resamples.
        seed: resampling seed (``numpy.random.default_rng``).

    Raises:
        ValueError: empty or unequal-length inputs.
    """
    import numpy as np

    n = len(truth)
    if n == 0 or len(candidate) != n or len(reference) != n:
        raise ValueError(
            f"need equal, non-empty lists (truth {n}, candidate {len(candidate)}, reference {len(reference)})"
        )
    classes = {c: i for i, c in enumerate(sorted(set(truth)))}
    cls = np.array([classes[t] for t in truth], dtype=np.int64)
    k = len(classes)
    right_c = np.array([c == t for c, t in zip(candidate, truth)], dtype=np.float64)
    right_r = np.array([r == t for r, t in zip(reference, truth)], dtype=np.float64)
    rng = np.random.default_rng(seed)
    wins = 0
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        c = cls[idx]
        count = np.bincount(c, minlength=k)
        present = count > 0
        ba_c = (np.bincount(c, weights=right_c[idx], minlength=k)[present] / count[present]).mean()
        ba_r = (np.bincount(c, weights=right_r[idx], minlength=k)[present] / count[present]).mean()
        wins += bool(ba_c > ba_r)
    return wins / n_resamples


def _metrics(m: EvalMetrics | Mapping[str, Any] | None) -> EvalMetrics:
    """``m`` as :class:`EvalMetrics` (``None`` and ``{}``: nothing scored)."""
    if isinstance(m, EvalMetrics):
        return m
    return EvalMetrics.model_validate(dict(m or {}))


def _not_enough(n: int, policy: GatePolicy) -> str:
    return (
        f"not enough test photos to gate; promote by hand ({n} test photos, at least {policy.min_test_photos} needed)"
    )


def gate(
    candidate: EvalMetrics | Mapping[str, Any] | None,
    reference: EvalMetrics | Mapping[str, Any] | None,
    policy: GatePolicy = DEFAULT_POLICY,
    *,
    reference_name: str = "reference",
) -> GateDecision:
    """Compare two metric dicts measured **once each on the same held-out test photos**.

    Model selection (best checkpoint, early stopping) uses the validation split; the best of
    several validation evaluations is optimistically biased, so it is never compared with a
    reference evaluated once. The round therefore scores its selected adapter and the reference
    once each on the test split (:func:`training.lora.train_round`), and only those numbers are
    gated here.

    Args:
        candidate, reference: test metrics as written by :func:`training.evaluation.evaluate_test`
            (:class:`~catreview.adapters.results.EvalMetrics`, or its dict: ``{"n",
            "balanced_accuracy", "per_breed": {breed: {"n", "accuracy", ...}}, "photos", "truth",
            "predicted"}``); ``None`` or ``{}`` when there were no test photos.
        policy: thresholds.
        reference_name: how the reference is named in messages.

    Returns:
        :class:`GateDecision` with ``split="test"``. ``passed`` iff all of:

        * at least ``min_test_photos`` test photos, both scored on the same photos (else
          ``gated=False``: "not enough test photos to gate; promote by hand");
        * the candidate's test balanced accuracy is **strictly** higher than the reference's (a
          tie does not pass);
        * in at least ``min_p_better`` of ``n_bootstrap`` paired bootstrap resamples of the test
          photos it is strictly higher (:func:`paired_bootstrap_p_better`);
        * no breed with at least ``min_breed_photos`` test photos loses more than
          ``max_breed_drop`` accuracy.
    """
    cand, ref = _metrics(candidate), _metrics(reference)
    cand_ba, ref_ba, n = cand.balanced_accuracy, ref.balanced_accuracy, cand.n
    c_breeds, r_breeds = cand.per_breed, ref.per_breed

    def breed_rows(check: bool) -> tuple[list[BreedComparison], list[str]]:
        rows, why = [], []
        for breed in sorted(set(c_breeds) | set(r_breeds)):
            c, r = c_breeds.get(breed), r_breeds.get(breed)
            n_breed = (c or r).n  # type: ignore[union-attr]  # the breed is in one of the two
            c_acc = None if c is None else c.accuracy
            r_acc = None if r is None else r.accuracy
            checked = check and c_acc is not None and r_acc is not None and n_breed >= policy.min_breed_photos
            blocking = checked and c_acc < r_acc - policy.max_breed_drop - 1e-12  # type: ignore[operator]
            if blocking:
                why.append(f"{breed} ({n_breed} test photos) fell from {_pct(r_acc)} to {_pct(c_acc)}")
            rows.append(BreedComparison(breed, n_breed, r_acc, c_acc, checked, blocking))
        return rows, why

    def not_gated(reason: str) -> GateDecision:
        rows, _ = breed_rows(check=False)
        return GateDecision(False, [reason], reference_name, ref_ba, cand_ba, rows, split="test", n=n, gated=False)

    if cand_ba is None or n < policy.min_test_photos:
        return not_gated(_not_enough(n if cand_ba is not None else 0, policy))
    if ref_ba is None:
        return not_gated(f"{reference_name} was not scored on the test photos; promote by hand")
    if (
        cand.photos is None
        or cand.truth is None
        or cand.predicted is None
        or ref.photos != cand.photos
        or ref.truth != cand.truth
    ):
        return not_gated(f"{reference_name} and the candidate were not scored on the same test photos; promote by hand")
    if ref.predicted is None or not len(cand.photos) == len(cand.predicted) == len(ref.predicted) == n:
        return not_gated(f"the test metrics lack per-photo predictions for {n} photos; promote by hand")

    reasons = []
    p_better = paired_bootstrap_p_better(
        cand.truth, cand.predicted, ref.predicted, n_resamples=policy.n_bootstrap, seed=policy.seed
    )
    if cand_ba < ref_ba:
        reasons.append(f"test balanced accuracy fell from {_pct(ref_ba)} to {_pct(cand_ba)}")
    elif cand_ba == ref_ba:
        reasons.append(f"test balanced accuracy did not improve ({_pct(ref_ba)} both; a tie does not pass)")
    elif p_better < policy.min_p_better:
        reasons.append(
            f"test balanced accuracy rose from {_pct(ref_ba)} to {_pct(cand_ba)} but was higher in only {_pct(p_better)} "
            f"of {policy.n_bootstrap} bootstrap resamples of the {n} test photos ({_pct(policy.min_p_better)} needed)"
        )
    rows, drops = breed_rows(check=True)
    reasons += drops
    return GateDecision(
        not reasons, reasons, reference_name, ref_ba, cand_ba, rows, split="test", n=n, p_better=p_better
    )


__all__ = ["DEFAULT_POLICY", "BreedComparison", "GateDecision", "GatePolicy", "gate", "paired_bootstrap_p_better"]
