"""The overlap round (issue 14): blind votes by several accounts, consensus or adjudication, and
the agreement figures of the stored round against values computed here from their definitions.

Real shared photos imported with their folder labels (imported labels are unverified, so they
enter the round), on SQLite and the PostgreSQL server the tests start.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from catreview.data import overlap
from catreview.data.db import ImageRecord, OverlapItem, make_engine
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.data.reviews import history, record_review
from catreview.evaluate.agreement import Vote, agreement_report
from tests.test_agreement import _alpha_nominal, _cohen

BREEDS = ("Bengal", "Persian", "Siamese", "Sphynx")


@pytest.fixture
def collection(tmp_path: Path, cats_dir: Path, db_url: str):
    root = tmp_path / "photos"
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:5]:
            shutil.copy(p, root / breed / p.name)
    engine = make_engine(db_url)
    vocab = BreedVocabulary.default()
    import_folder(engine, root, vocabulary=vocab, labels_from_folders=True, workers=1)
    return engine, vocab


def test_a_round_takes_the_share_of_photos_without_a_human_decision(collection) -> None:
    engine, vocab = collection
    with Session(engine) as s:
        first = s.exec(select(ImageRecord).order_by(col(ImageRecord.id))).first()
        first_id = first.id
        record_review(s, first_id, "Bengal", "ann", vocabulary=vocab)  # a human decision: never in a round
    with Session(engine) as s:
        added = overlap.start_round(s, 0.5, k=2)
        images = list(s.exec(select(ImageRecord)))
        want = {i.id for i in images if i.id != first_id and overlap.overlap_key(i.sha256) < 0.5}
        assert {r.image_id for r in s.exec(select(OverlapItem))} == want and added == len(want) > 0
        assert overlap.start_round(s, 0.5, k=2) == 0  # a second start adds nothing
        with pytest.raises(ValueError, match="k >= 2"):
            overlap.start_round(s, 0.5, k=1)


def test_three_accounts_vote_blind_then_agreement_and_adjudication(collection) -> None:
    engine, vocab = collection
    with Session(engine) as s:
        overlap.start_round(s, 1.0, k=3)
        ids = sorted(r.image_id for r in s.exec(select(OverlapItem)))
        truth = {i: s.get(ImageRecord, i).current_label for i in ids}
    # Scripted votes: ann always right; bea wrong on every 4th photo; cy wrong on every 5th.
    names = sorted(set(truth.values()))  # canonical names (folder "Sphynx" is "Sphynx - Hairless Cat")
    other = {b: names[(names.index(b) + 1) % len(names)] for b in names}
    chosen = {
        "ann": {i: truth[i] for i in ids},
        "bea": {i: other[truth[i]] if n % 4 == 0 else truth[i] for n, i in enumerate(ids)},
        "cy": {i: other[truth[i]] if n % 5 == 0 else truth[i] for n, i in enumerate(ids)},
    }
    with Session(engine) as s:
        for who in ("ann", "bea", "cy"):
            seen = []
            nxt = overlap.next_for(s, who)
            while nxt is not None and nxt not in seen:
                seen.append(nxt)
                out = overlap.cast_vote(s, nxt, chosen[who][nxt], who, vocabulary=vocab)
                assert out.votes == {"ann": 1, "bea": 2, "cy": 3}[who]
                nxt = overlap.next_for(s, who, nxt)
            assert sorted(seen) == ids  # each account is served every round photo once
            assert overlap.next_for(s, who) is None
        status = overlap.counts(s)
        disputed = overlap.disputed(s)
        unanimous = [i for i in ids if len({chosen[w][i] for w in chosen}) == 1]
        assert status == {"agreed": len(unanimous), "disputed": len(ids) - len(unanimous)}
        assert disputed == sorted(set(ids) - set(unanimous))
        agreed = history(s, unanimous[0])
        assert [r.source for r in agreed] == ["import", "consensus"] and agreed[-1].label == truth[unanimous[0]]
        with pytest.raises(overlap.OverlapError, match="reviewer settles it"):
            overlap.cast_vote(s, disputed[0], "Bengal", "dan", vocabulary=vocab)
        for i in disputed:
            review = overlap.adjudicate(s, i, truth[i], "rita", vocabulary=vocab)
            assert review.source == "adjudication" and review.annotator == "rita"
        with pytest.raises(overlap.OverlapError, match="only disputed photos"):
            overlap.adjudicate(s, disputed[0], "Bengal", "rita", vocabulary=vocab)
        votes, final = overlap.round_votes(s)
    assert final == {i: truth[i] for i in disputed}  # the reference for accuracy: adjudicated photos only
    report = agreement_report([Vote(*v) for v in votes], final)
    units = [[chosen[w][i] for w in ("ann", "bea", "cy")] for i in ids]
    assert report.alpha == pytest.approx(_alpha_nominal(units), abs=1e-9)
    kappas = {(p.a, p.b): p.kappa for p in report.pairs}
    for a, b in (("ann", "bea"), ("ann", "cy"), ("bea", "cy")):
        assert kappas[(a, b)] == pytest.approx(_cohen([chosen[a][i] for i in ids], [chosen[b][i] for i in ids]))
    acc = {a.annotator: a.accuracy for a in report.annotators}
    for who in chosen:
        assert acc[who] == pytest.approx(sum(chosen[who][i] == truth[i] for i in disputed) / len(disputed))
    assert acc["ann"] == 1.0 and acc["bea"] < 1.0 and acc["cy"] < 1.0
