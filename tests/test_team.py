"""The Team tab (issue 14): an overlap round of three accounts gives the agreement figures computed
here from their definitions; a reviewer adjudicates the disputed photos; the export carries the
adjudicated label and says it was adjudicated; audit log and users for admins; every event guarded.

Real shared photos imported with their folder labels (unverified, so they enter the round), real
accounts (argon2) in "login" mode, the tab's own handlers called as Gradio calls them (the guarded
function with a ``gr.Request`` carrying the user name), on SQLite and PostgreSQL.
"""

from __future__ import annotations

import csv
import json
import shutil
from collections import Counter
from datetime import datetime
from itertools import combinations
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pytest
from sqlmodel import Session, col, select

from catreview.app import team
from catreview.app.auth import AuthConfig, Guards, unguarded_events
from catreview.app.core import ReviewApp
from catreview.app.presenters import team as text
from catreview.app.ui import team_tab
from catreview.cli.main import main as cli_main
from catreview.cli.users import CLI_ACTOR
from catreview.config import load_settings
from catreview.data import accounts, audit, overlap
from catreview.data.audit import AuditAction
from catreview.data.db import ImageRecord, OverlapItem
from catreview.data.importer import import_folder
from catreview.data.reviews import history
from catreview.export.dataset import export_dataset

BREEDS = ("Bengal", "Persian", "Siamese", "Sphynx")
PER_BREED = 5  # 20 shared photos
PASSWORD = "correct horse battery"
ANNOTATORS = ("ann", "bea", "cy")


# ------------------------------------------------------------------ reference figures, from their definitions
def cohen_kappa(a: list[str], b: list[str]) -> float:
    """Cohen (1960) from the two raters' contingency table C (n x n over the labels used):
    p_o = trace(C) / N, p_e = sum_c rowsum_c * colsum_c / N^2, kappa = (p_o - p_e) / (1 - p_e)."""
    labels = sorted(set(a) | set(b))
    idx = {lab: i for i, lab in enumerate(labels)}
    c = np.zeros((len(labels), len(labels)))
    for x, y in zip(a, b, strict=True):
        c[idx[x], idx[y]] += 1
    n = c.sum()
    p_o = np.trace(c) / n
    p_e = float(c.sum(axis=1) @ c.sum(axis=0)) / n**2
    return float((p_o - p_e) / (1 - p_e))


def krippendorff_alpha_nominal(units: list[list[str]]) -> float:
    """Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", nominal data:
    coincidences o_ck = sum_u n_uc * n_uk / (m_u - 1) for c != k (n_uc: votes for c in unit u,
    m_u: votes in u, units with m_u >= 2), n_c = sum_k o_ck (incl. o_cc), n = sum_c n_c, and
    alpha = 1 - D_o / D_e = 1 - (n - 1) * sum_{c != k} o_ck / sum_{c != k} n_c * n_k."""
    units = [u for u in units if len(u) >= 2]
    values = sorted({v for u in units for v in u})
    o = {(c, k): 0.0 for c in values for k in values}
    for u in units:
        m, counts = len(u), Counter(u)
        for c in values:
            for k in values:
                pairs = counts[c] * (counts[k] - (c == k))  # ordered pairs of votes within the unit
                o[(c, k)] += pairs / (m - 1)
    n_c = {c: sum(o[(c, k)] for k in values) for c in values}
    n = sum(n_c.values())
    disagree_observed = sum(o[(c, k)] for c in values for k in values if c != k)
    disagree_expected = sum(n_c[c] * n_c[k] for c in values for k in values if c != k)
    return 1 - (n - 1) * disagree_observed / disagree_expected


# ------------------------------------------------------------------ fixtures and helpers
@pytest.fixture
def team_app(tmp_path: Path, cats_dir: Path, db_url: str):
    root = tmp_path / "photos"
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:PER_BREED]:
            shutil.copy(p, root / breed / p.name)
    app = ReviewApp(load_settings(database_url=db_url, data_dir=tmp_path / "data"))
    import_folder(app.engine, root, vocabulary=app.vocabulary, labels_from_folders=True, workers=1)
    with Session(app.engine) as s:
        for name in ANNOTATORS:
            accounts.add_user(s, name, "annotator", PASSWORD)
        accounts.add_user(s, "rita", "reviewer", PASSWORD)
        accounts.add_user(s, "ada", "admin", PASSWORD)
    guards = Guards(app.engine, AuthConfig("login"))
    with gr.Blocks() as demo:
        team_tab.build(app, guards)
    try:
        yield app, demo
    finally:
        app.stop()


def endpoint(demo: gr.Blocks, api_name: str):
    """The guarded handler Gradio runs for ``api_name``."""
    found = [f.fn for f in demo.fns.values() if f.api_name == api_name]
    assert len(found) == 1, f"{api_name}: {len(found)} handlers"
    return found[0]


def call(demo: gr.Blocks, api_name: str, user: str, *inputs: Any) -> Any:
    """Call the tab's handler as Gradio does: its inputs, then the request of ``user``."""
    return endpoint(demo, api_name)(*inputs, gr.Request(username=user))


def export_rows(out: Path) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, str]]]:
    """({sha256: LLaVA record metadata} over every split, {sha256: manifest.csv row})."""
    meta = {}
    for f in sorted((out / "llava").glob("*.jsonl")):
        for line in f.read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            meta[rec["metadata"]["sha256"]] = rec["metadata"]
    with open(out / "manifest.csv", encoding="utf-8", newline="") as fh:
        manifest = {row["sha256"]: row for row in csv.DictReader(fh)}
    return meta, manifest


# ------------------------------------------------------------------ the done-when test
def test_three_accounts_give_the_agreement_figures_computed_here(team_app, tmp_path: Path) -> None:
    app, demo = team_app
    assert unguarded_events(demo) == []

    # A reviewer starts the round from the tab: every imported (unverified) photo, 3 annotators each.
    assert call(demo, "team_start_round", "rita", 1.0, 3) == text.round_started(len(BREEDS) * PER_BREED, 1.0, 3)
    with Session(app.engine) as s:
        ids = sorted(int(i) for i in s.exec(select(OverlapItem.image_id)))
        truth = {i: str(s.get(ImageRecord, i).current_label) for i in ids}
        sha = {i: s.get(ImageRecord, i).sha256 for i in ids}
    assert len(ids) == len(BREEDS) * PER_BREED

    # A known pattern of disagreements: ann wrong on every 6th photo (from the 6th), bea on every
    # 4th, cy on every 5th from the 3rd, with a different wrong label than the other two.
    names = sorted(set(truth.values()))
    shift = {b: {d: names[(names.index(b) + d) % len(names)] for d in (1, 2)} for b in names}
    wrong = {"ann": lambda n: n % 6 == 5, "bea": lambda n: n % 4 == 0, "cy": lambda n: n % 5 == 2}
    step = {"ann": 1, "bea": 1, "cy": 2}
    chosen = {
        w: {i: shift[truth[i]][step[w]] if wrong[w](n) else truth[i] for n, i in enumerate(ids)} for w in ANNOTATORS
    }
    # Each account votes through the core path the Review tab uses: served by next_for, cast_vote.
    with Session(app.engine) as s:
        for who in ANNOTATORS:
            served: list[int] = []
            nxt = overlap.next_for(s, who)
            while nxt is not None:
                served.append(nxt)
                overlap.cast_vote(s, nxt, chosen[who][nxt], who, vocabulary=app.vocabulary, note=f"{who} on {nxt}")
                nxt = overlap.next_for(s, who, nxt)
            assert sorted(served) == ids

    units = [[chosen[w][i] for w in ANNOTATORS] for i in ids]
    unanimous = [i for i, u in zip(ids, units, strict=True) if len(set(u)) == 1]
    disputed = [i for i in ids if i not in unanimous]
    assert 4 <= len(disputed) <= 12 and any(len(set(u)) == 3 for u in units)  # the pattern is not degenerate

    # Agreement: the tab's tables and the core's figures against the formulas.
    figures = team.agreement(app.engine)
    r = figures.report
    want_alpha = krippendorff_alpha_nominal(units)
    assert r.alpha == pytest.approx(want_alpha, abs=1e-9)
    assert (r.n_photos, r.n_votes) == (len(ids), 3 * len(ids))
    assert figures.counts == {"open": 0, "agreed": len(unanimous), "disputed": len(disputed), "adjudicated": 0}
    want_kappa = {
        (a, b): cohen_kappa([chosen[a][i] for i in ids], [chosen[b][i] for i in ids])
        for a, b in combinations(ANNOTATORS, 2)
    }
    assert {(p.a, p.b) for p in r.pairs} == set(want_kappa)
    for p in r.pairs:
        assert p.n == len(ids)
        assert p.kappa == pytest.approx(want_kappa[(p.a, p.b)], abs=1e-9)
        assert p.observed == pytest.approx(np.mean([chosen[p.a][i] == chosen[p.b][i] for i in ids]), abs=1e-9)
    summary, pair_rows, people_rows = call(demo, "team_agreement", "rita")
    assert f"Krippendorff's alpha: {want_alpha:.3f}" in summary and f"{len(disputed)} disputed" in summary
    assert [[row[0], row[1], row[4]] for row in pair_rows] == [
        [a, b, f"{want_kappa[(a, b)]:.3f}"] for a, b in combinations(ANNOTATORS, 2)
    ]
    assert [row[:2] for row in people_rows] == [[w, len(ids)] for w in ANNOTATORS]

    # Roles: an annotator sees no one's figures and adjudicates nothing; the audit log is admins' only.
    for api, user, inputs in (
        ("team_agreement", "ann", ()),
        ("team_queue", "bea", ()),
        ("team_decide", "cy", (disputed[0], truth[disputed[0]], "")),
        ("team_start_round", "ann", (0.5, 2)),
        ("team_audit", "rita", ()),
        ("team_users", "rita", ()),
    ):
        with pytest.raises(gr.Error, match="needs the"):
            call(demo, api, user, *inputs)

    # The adjudication queue: one disputed photo at a time with every vote, by id; skip moves on.
    photo, votes_md, shown, _ = call(demo, "team_queue", "rita")
    assert shown == disputed[0] and photo is not None and Path(photo).is_file()
    for who in ANNOTATORS:
        assert f"**{who}**: {chosen[who][shown]}" in votes_md and f"{who} on {shown}" in votes_md
    assert f"({len(disputed)} disputed photos waiting)" in votes_md
    assert call(demo, "team_next", "rita", shown)[2] == disputed[1]
    # The reviewer decides each: the most common vote, ties to ann's (so some decisions differ from
    # the folder label, and accuracy is against the decisions, not the folders).
    decision = {i: Counter(chosen[w][i] for w in ANNOTATORS).most_common(1)[0][0] for i in disputed}
    assert any(decision[i] != truth[i] for i in disputed)
    order = []
    while shown is not None:
        order.append(shown)
        photo, votes_md, nxt, message, breed, note = call(
            demo, "team_decide", "rita", shown, decision[shown], "settled"
        )
        assert (breed, note) == (None, "")  # the form is cleared for the next photo
        assert message == text.decided(shown, decision[shown], "rita")
        shown = nxt
    assert order == disputed and votes_md == text.queue_empty()
    # a second decision on a settled photo is refused with the reason, nothing stored
    _, _, _, message, breed, _ = call(demo, "team_decide", "rita", disputed[0], truth[disputed[0]], "")
    assert breed == truth[disputed[0]]  # not stored: the choice stays in the form
    assert message.startswith("Not saved:") and "adjudicated" in message
    with Session(app.engine) as s:
        assert [r.source for r in history(s, disputed[0])] == ["import", "adjudication"]

    final = dict(decision)  # accuracy is against the reviewers' decisions (consensus labels are the votes)
    figures = team.agreement(app.engine)
    assert figures.counts == {"open": 0, "agreed": len(unanimous), "disputed": 0, "adjudicated": len(disputed)}
    by = {a.annotator: a for a in figures.report.annotators}
    for w in ANNOTATORS:
        correct = sum(chosen[w][i] == final[i] for i in final)
        assert (by[w].votes, by[w].n_final, by[w].correct) == (len(ids), len(final), correct)
        assert by[w].accuracy == pytest.approx(correct / len(final), abs=1e-12)
        others = [chosen[w][i] == chosen[o][i] for o in ANNOTATORS if o != w for i in ids]
        assert by[w].agree == pytest.approx(np.mean(others), abs=1e-12)
    assert figures.report.alpha == pytest.approx(want_alpha, abs=1e-9)  # votes, not decisions

    # The export takes the adjudicated label and records that it was adjudicated.
    out = tmp_path / "export"
    export_dataset(app.engine, out, vocabulary=app.vocabulary, workers=1)
    meta, manifest = export_rows(out)
    for i in disputed:
        m = meta[sha[i]]
        assert (m["breed"], m["source"], m["annotator"], m["note"]) == (decision[i], "adjudication", "rita", "settled")
        assert (manifest[sha[i]]["breed"], manifest[sha[i]]["source"]) == (decision[i], "adjudication")
    for i in unanimous:
        assert (meta[sha[i]]["breed"], meta[sha[i]]["source"]) == (truth[i], "consensus")
        assert manifest[sha[i]]["source"] == "consensus"

    # The audit log (admins): the round's start, by the reviewer who started it; the users, no hashes.
    rows, line, state = call(demo, "team_audit", "ada")
    assert rows[0][1:4] == ["rita", "overlap_start", "overlap round"] and "added=20" in rows[0][4]
    assert line.startswith("Page 1: 1 event") and state.before is None
    users = call(demo, "team_users", "ada")
    assert [u[:3] for u in users] == [["ada", "admin", "no"], ["ann", "annotator", "no"],
                                      ["bea", "annotator", "no"], ["cy", "annotator", "no"],
                                      ["rita", "reviewer", "no"]]  # fmt: skip
    assert not any("argon2" in str(v) for u in users for v in u)


def test_cli_agreement_and_overlap_start(team_app, capsys) -> None:
    app, _ = team_app
    url = app.settings.database_url
    assert cli_main(["agreement", "--db", url]) == 0
    assert "no overlap round yet" in capsys.readouterr().out
    assert cli_main(["overlap", "start", "--db", url, "--share", "1", "--k", "2"]) == 0
    assert "20 photos added" in capsys.readouterr().out
    with Session(app.engine) as s:
        event = audit.events(s, limit=1)[0]
        assert (event.actor, event.action, json.loads(event.detail_json)) == (
            CLI_ACTOR,
            AuditAction.OVERLAP_START.value,
            {"added": 20, "k": 2, "share": 1.0},
        )
        ids = sorted(int(i) for i in s.exec(select(OverlapItem.image_id).order_by(col(OverlapItem.image_id))))
        for i in ids[:3]:  # two votes each: agreed, agreed, disputed
            overlap.cast_vote(s, i, "Bengal", "ann", vocabulary=app.vocabulary)
            overlap.cast_vote(s, i, "Persian" if i == ids[2] else "Bengal", "bea", vocabulary=app.vocabulary)
    assert cli_main(["agreement", "--db", url, "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got == json.loads(json.dumps(team.agreement(app.engine).to_dict()))
    assert got["counts"] == {"open": 17, "agreed": 2, "disputed": 1, "adjudicated": 0} and got["disputed"] == [ids[2]]
    assert got["n_votes"] == 6 and got["pairs"][0]["kappa"] == pytest.approx(cohen_kappa(
        ["Bengal"] * 3, ["Bengal", "Bengal", "Persian"]), abs=1e-9)  # fmt: skip
    assert cli_main(["agreement", "--db", url]) == 0
    assert "Krippendorff's alpha (nominal):" in capsys.readouterr().out
    with pytest.raises(SystemExit):  # argparse refuses k < 2 with its usage line
        cli_main(["overlap", "start", "--db", url, "--k", "1"])
    assert "at least 2 annotators" in capsys.readouterr().err
    # a second start adds nothing (the photos are in the round or have a human decision)
    assert cli_main(["overlap", "start", "--db", url, "--share", "1"]) == 0
    assert "0 photos added" in capsys.readouterr().out


def test_audit_log_pages_newest_first_by_keyset(team_app) -> None:
    app, demo = team_app
    with Session(app.engine) as s:
        made = [audit.record(s, "ada", AuditAction.EXPORT, f"export {n}", n=n).id for n in range(team.AUDIT_PAGE + 7)]
    rows, line, state = call(demo, "team_audit", "ada")
    assert [r[3] for r in rows] == [f"export {n}" for n in range(len(made) - 1, 6, -1)]
    assert line.endswith("older ones on the next page.") and state == team_tab.AuditState(1, made[7])
    rows, line, state = call(demo, "team_audit_older", "ada", state)
    assert [r[3] for r in rows] == [f"export {n}" for n in range(6, -1, -1)]
    assert line == "Page 2: 7 events, newest first; no older events." and state.before is None
    assert call(demo, "team_audit_older", "ada", state)[1].startswith("Page 1:")  # past the end: newest again


def test_the_reference_alpha_reproduces_the_papers_worked_example() -> None:
    # Krippendorff (2011), section C: 4 observers, 12 units, missing values; nominal alpha = 0.743
    rows = ["1 2 3 3 2 1 4 1 2 . . .", "1 2 3 3 2 2 4 1 2 5 . 3", ". 3 3 3 2 3 4 2 2 5 1 .", "1 2 3 3 2 4 4 1 2 5 1 ."]
    units = [[v for v in unit if v != "."] for unit in zip(*(r.split() for r in rows), strict=True)]
    assert round(krippendorff_alpha_nominal(units), 3) == 0.743


def test_presenter_texts() -> None:
    assert text.number(None) == "\u2014" and text.number(0.12345) == "0.123"
    assert text.when(datetime(2026, 12, 1, 14, 3, 22)) == "2026-12-01 14:03:22 UTC"
    assert text.share_refused(0.1, 2) is None
    assert "at most 1" in (text.share_refused(1.5, 2) or "") and "at most 1" in (text.share_refused(0, 2) or "")
    assert "whole number of at least 2" in (text.share_refused(0.1, 1) or "")
    assert "whole number" in (text.share_refused(0.1, 2.5) or "")
    assert text.round_started(3, 0.1, 2) == "Overlap round: 3 photos added (10% share, 2 annotators each)."
    assert text.round_started(0, 0.1, 2).startswith("No photos added")
