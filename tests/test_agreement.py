"""Agreement figures (issue 14) checked against values computed here from their definitions."""

from __future__ import annotations

from collections import Counter
from itertools import combinations

import pytest

from catreview.evaluate.agreement import Vote, agreement_report


def _cohen(a: list[str], b: list[str]) -> float:
    """Cohen (1960): (p_o - p_e) / (1 - p_e), p_e from the two raters' marginals."""
    n = len(a)
    po = sum(x == y for x, y in zip(a, b, strict=True)) / n
    ca, cb = Counter(a), Counter(b)
    pe = sum(ca[k] * cb[k] for k in set(a) | set(b)) / n**2
    return (po - pe) / (1 - pe)


def _alpha_nominal(units: list[list[str]]) -> float:
    """Krippendorff's alpha, nominal, from the coincidence matrix (Krippendorff 2011, section C)."""
    units = [u for u in units if len(u) >= 2]
    o: Counter[tuple[str, str]] = Counter()
    for u in units:
        m = len(u)
        for i, j in ((i, j) for i in range(m) for j in range(m) if i != j):
            o[(u[i], u[j])] += 1 / (m - 1)
    values = sorted({v for u in units for v in u})
    n_c = {c: sum(o[(c, k)] for k in values) for c in values}
    n = sum(n_c.values())
    d_o = sum(o[(c, k)] for c in values for k in values if c != k)
    d_e = sum(n_c[c] * n_c[k] for c in values for k in values if c != k) / (n - 1)
    return 1 - d_o / d_e


VOTES = {  # photo -> {annotator: label}: three annotators, some photos with two votes only
    1: {"ann": "Persian", "bea": "Persian", "cy": "Persian"},
    2: {"ann": "Birman", "bea": "Ragdoll", "cy": "Birman"},
    3: {"ann": "Siamese", "bea": "Siamese", "cy": "Siamese"},
    4: {"ann": "Bengal", "bea": "Bengal"},
    5: {"ann": "Ragdoll", "cy": "Birman"},
    6: {"bea": "Persian", "cy": "Persian"},
    7: {"ann": "Sphynx", "bea": "Sphynx", "cy": "Bengal"},
    8: {"ann": "Birman"},  # one vote only: not part of agreement
}


def test_agreement_matches_the_definitions() -> None:
    votes = [Vote(i, who, lab) for i, d in VOTES.items() for who, lab in d.items()]
    report = agreement_report(votes, final_labels={2: "Birman", 5: "Birman", 7: "Sphynx"})
    multi = {i: d for i, d in VOTES.items() if len(d) >= 2}
    assert report.n_photos == len(multi) == 7 and report.n_votes == 18
    assert report.alpha == pytest.approx(_alpha_nominal([list(d.values()) for d in multi.values()]), abs=1e-9)
    for pair in report.pairs:
        shared = [i for i, d in multi.items() if pair.a in d and pair.b in d]
        a, b = [multi[i][pair.a] for i in shared], [multi[i][pair.b] for i in shared]
        assert pair.n == len(shared)
        assert pair.kappa == pytest.approx(_cohen(a, b), abs=1e-9)
        assert pair.observed == pytest.approx(sum(x == y for x, y in zip(a, b, strict=True)) / len(a))
    assert {(p.a, p.b) for p in report.pairs} == set(combinations(["ann", "bea", "cy"], 2))
    assert report.disputed == [2, 5, 7]
    by = {a.annotator: a for a in report.annotators}
    # the reference is the adjudicated labels only (2, 5, 7; unanimous photos are not scored: their
    # label is the votes): ann 2 and 7 right, 5 wrong; bea (no vote on 5) misses 2; cy misses 7
    assert [(by[w].n_final, by[w].correct) for w in ("ann", "bea", "cy")] == [(3, 2), (2, 1), (3, 2)]
    assert by["bea"].accuracy == pytest.approx(1 / 2)


def test_two_votes_by_one_annotator_on_a_photo_are_refused() -> None:
    with pytest.raises(ValueError, match="two votes on photo 1"):
        agreement_report([Vote(1, "ann", "Persian"), Vote(1, "ann", "Birman")])
