"""Compare two VLM profiles: two tiny offline LLaVAs of different sizes (0.6M "demo" and 14M
"14m") on reviewed shared photos. Aggregates are checked against a direct computation from the
stored per-photo outputs; caching, blind mode, preferences, adapter pairs and the CLI run for
real. No mocks."""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session, select

from catreview.app.compare_job import AggregateJob
from catreview.app.presenters.compare import ALREADY_RUNNING, BUSY_AGGREGATE, display_sides, error_notice
from catreview.cli.compare import add_compare_parser, cmd_compare
from catreview.compare.aggregate import SUMMARY_COLUMNS, per_breed_columns, plural
from catreview.compare.blind import BlindTrial, preference_refusal
from catreview.compare.errors import BUSY_PHOTO, CompareError, ModelsBusy
from catreview.compare.memory import model_bytes
from catreview.compare.pairs import (
    PairChoice,
    blind_swapped,
    default_pair,
    known_adapters,
    model_label,
    split_model_label,
)
from catreview.compare.photo import PhotoPick
from catreview.compare.session import CompareSession
from catreview.config import load_settings
from catreview.data.db import AdapterVersion, ImageRecord, Prediction, Preference, SplitAssignment, make_engine
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.export.preferences import export_preference_pairs
from catreview.jobs import JobState
from catreview.models.registry import ModelRegistry
from tests.conftest import REPO_ROOT

BREEDS = ["Bengal", "Persian", "Siamese"]
SMALL, LARGE = "small-llava", "large-llava"


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, demo_dir: Path) -> dict[str, Path]:
    """The demo LLaVA (0.6M params) and a 14M-param LLaVA (336 px, 576 image tokens)."""
    from catreview.models.tiny_llava import build_tiny_llava

    return {
        SMALL: demo_dir / "llava-tiny",
        LARGE: build_tiny_llava(tmp_path_factory.mktemp("vlm14m") / "llava-14m", size="14m"),
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory, cats_dir: Path) -> Path:
    root = tmp_path_factory.mktemp("compare-photos")
    for breed in BREEDS:
        (root / breed).mkdir()
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:2]:
            shutil.copy(p, root / breed / p.name)
    return root


def make_settings(db: Path, demo_dir: Path, models: dict[str, Path], **extra):
    profiles = {name: {"model": str(path), "max_new_tokens": 12, "batch_size": 4} for name, path in models.items()}
    return load_settings(
        database_url=f"sqlite:///{db}",
        demo_dir=demo_dir,
        vlm_profiles=profiles,
        active_vlm=SMALL,
        compare_profiles=(SMALL, LARGE),
        **extra,
    )


def new_session(db: Path, demo_dir: Path, models: dict[str, Path], photos: Path) -> CompareSession:
    """A compare session on a fresh database holding the photos, labelled from their folders."""
    settings = make_settings(db, demo_dir, models)
    engine = make_engine(settings.database_url)
    summary = import_folder(engine, photos, vocabulary=BreedVocabulary.default(), labels_from_folders=True)
    assert summary.labels_recorded == len(summary.image_ids)
    return CompareSession(settings, ModelRegistry(settings), engine)


@pytest.fixture(scope="module")
def session(tmp_path_factory, demo_dir: Path, tiny_models, photos: Path) -> CompareSession:
    """Shared by the tests that only read or add to the cache (any order works)."""
    return new_session(tmp_path_factory.mktemp("db") / "compare.db", demo_dir, tiny_models, photos)


@pytest.fixture
def fresh(tmp_path: Path, demo_dir: Path, tiny_models, photos: Path) -> CompareSession:
    """A session on its own empty database (for tests that count computed vs cached)."""
    return new_session(tmp_path / "fresh.db", demo_dir, tiny_models, photos)


# --------------------------------------------------------------------------- choosing profiles


def test_default_pair_falls_back_and_says_so(settings) -> None:
    assert default_pair(("7B", "13B"), ["7B", "13B", "x"]) == PairChoice("7B", "13B")
    fallback = default_pair(("7B", "13B"), ["q", "r", "s"])
    assert (fallback.a, fallback.b) == ("q", "r") and "not both configured" in fallback.note
    # The plain test settings configure no profile: only the demo is there, and the note says so.
    only = CompareSession(settings, ModelRegistry(settings), make_engine(settings.database_url)).default_pair()
    assert (only.a, only.b) == ("demo", "demo")
    assert "Only the demo profile" in only.note and "compared with itself" in only.note
    with pytest.raises(CompareError):
        default_pair(("7B", "13B"), [])


MEMORY_PROBE = """
import torch
from catreview.compare.memory import MemoryMeter
with MemoryMeter("cpu") as meter:
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB of float32, touched
    block += 1
print(meter.working_bytes)
"""


def test_memory_meter_sees_a_cpu_allocation() -> None:
    import subprocess
    import sys

    import torch

    # In a fresh process: on CPU the meter reads the process RSS, which other tests' threads in this
    # process (apps, background jobs freeing memory) would move while the block is allocated.
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE], capture_output=True, text=True, check=True, cwd=REPO_ROOT, timeout=300
    )
    assert int(out.stdout.split()[-1]) > 48 * 2**20
    lin = torch.nn.Linear(100, 10)
    assert model_bytes(lin) == (100 * 10 + 10) * 4


# --------------------------------------------------------------------------- aggregate


def direct_metrics(rows: list[dict]) -> dict:
    """Metrics computed by hand from per-photo (human, label_a, label_b, seconds) rows."""

    def recall_mean(key: str) -> float:
        breeds = sorted({r["human"] for r in rows})
        return sum(
            sum(r[key] == b for r in rows if r["human"] == b) / sum(r["human"] == b for r in rows) for b in breeds
        ) / len(breeds)

    def p95(xs: list[float]) -> float:  # linear interpolation between closest ranks
        xs = sorted(xs)
        k = 0.95 * (len(xs) - 1)
        lo, hi = math.floor(k), math.ceil(k)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    n = len(rows)
    return {
        "accuracy": tuple(sum(r[k] == r["human"] for r in rows) / n for k in ("label_a", "label_b")),
        "balanced": (recall_mean("label_a"), recall_mean("label_b")),
        "agreement": sum(r["label_a"] == r["label_b"] for r in rows) / n,
        "mean": tuple(sum(r[k] for r in rows) / n for k in ("seconds_a", "seconds_b")),
        "p95": tuple(p95([r[k] for r in rows]) for k in ("seconds_a", "seconds_b")),
    }


def test_aggregate_matches_direct_computation_and_second_run_is_cached(fresh: CompareSession, tmp_path: Path) -> None:
    session = fresh
    # First run in the background job, one model resident at a time.
    job = AggregateJob(session)
    assert job.start(SMALL, LARGE, one_at_a_time=True)
    assert job.wait(timeout=300), "aggregate comparison still running after 300 s"
    assert job.state.error is None, job.state.log
    first = job.result
    assert first is not None and job.version == 1 and "6 reviewed photos" in job.state.message
    assert job.state.stage.startswith("VLM B") and job.state.done == job.state.total == 6
    assert (first.a.computed, first.b.computed, first.a.cached, first.b.cached) == (6, 6, 0, 0)
    assert not session.vlm(SMALL).loaded and session.vlm(LARGE).loaded  # A was unloaded before B loaded
    assert first.a.memory and first.b.memory and first.b.memory.weights_bytes > 10 * first.a.memory.weights_bytes

    # Recompute every metric from the stored predictions, straight from the database.
    human = {}
    with Session(session.engine) as s:
        from catreview.data.reviews import current_reviews

        human = {i: r.label for i, r in current_reviews(s).items()}
        stored = {(p.model_version, p.image_id): p for p in s.exec(select(Prediction).where(Prediction.kind == "vlm"))}
    rows = []
    for o in first.photos:
        pa, pb = stored[(first.a.model_version, o.image_id)], stored[(first.b.model_version, o.image_id)]
        rows.append(
            {
                "human": human[o.image_id],
                "label_a": pa.payload["label"],
                "label_b": pb.payload["label"],
                "seconds_a": pa.seconds,
                "seconds_b": pb.seconds,
            }
        )
        assert pa.payload["candidates"] == [*o.candidates, "other"]
    want = direct_metrics(rows)
    m = first.metrics
    assert m.n == 6 and {r["human"] for r in rows} == {"Bengal", "Persian", "Siamese"}
    assert m.accuracy == pytest.approx(want["accuracy"])
    assert m.balanced_accuracy == pytest.approx(want["balanced"])
    assert m.agreement == pytest.approx(want["agreement"])
    assert m.mean_latency_s == pytest.approx(want["mean"])
    assert m.p95_latency_s == pytest.approx(want["p95"])
    for breed, (n, acc_a, acc_b) in m.per_breed.items():
        mine = [r for r in rows if r["human"] == breed]
        assert n == len(mine) == 2
        assert acc_a == pytest.approx(sum(r["label_a"] == breed for r in mine) / n)
        assert acc_b == pytest.approx(sum(r["label_b"] == breed for r in mine) / n)

    # Tables, plot data and CSV agree with the metrics.
    summary = first.summary_frame()
    assert list(summary["profile"]) == [SMALL, LARGE]
    assert list(summary["accuracy"]) == pytest.approx([round(x, 4) for x in want["accuracy"]])
    assert len(first.plot_frame()) == 2 * (2 + 3) and first.plot_frame()["group"].is_unique
    paths = first.write_csv(tmp_path / "csv")
    import pandas as pd

    photos_csv = pd.read_csv(paths[2])
    assert len(photos_csv) == 6 and list(photos_csv["label_b"]) == [r["label_b"] for r in rows]

    # Second run on a fresh registry (a restart): nothing computed, nothing loaded, same numbers.
    again = CompareSession(session.settings, ModelRegistry(session.settings), session.engine)
    second = again.run_aggregate(SMALL, LARGE)
    assert (second.a.computed, second.b.computed, second.a.cached, second.b.cached) == (0, 0, 6, 6)
    assert second.a.memory is None and not again.vlm(SMALL).loaded and not again.vlm(LARGE).loaded
    assert second.metrics == first.metrics


def test_cli_compare_prints_the_table(demo_dir: Path, tiny_models, photos: Path, tmp_path: Path, capsys) -> None:
    shutil.copytree(photos / "Bengal", tmp_path / "photos" / "Bengal")  # 2 photos keep it quick
    session = new_session(tmp_path / "cli.db", demo_dir, tiny_models, tmp_path / "photos")
    st = session.settings
    lines = [f'active_vlm = "{SMALL}"', f'compare_profiles = ["{SMALL}", "{LARGE}"]', f'demo_dir = "{st.demo_dir}"']
    for name, prof in st.vlm_profiles.items():
        lines += [
            f"[vlm_profiles.{name}]",
            f'model = "{prof.model}"',
            f"max_new_tokens = {prof.max_new_tokens}",
            f"batch_size = {prof.batch_size}",
        ]
    config = tmp_path / "config.toml"
    config.write_text("\n".join(lines) + "\n")
    parser = argparse.ArgumentParser()
    add_compare_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["compare", "--config", str(config), "--db", st.database_url, "--csv", str(tmp_path / "out")]
    )
    assert cmd_compare(args) == 0  # defaults: compare_profiles from the config
    out = capsys.readouterr().out
    assert f"A = {SMALL}" in out and f"B = {LARGE}" in out and "2 reviewed photos" in out
    assert "balanced_accuracy" in out and "agreement A vs B" in out and "note:" not in out
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "compare_per_breed.csv",
        "compare_photos.csv",
        "compare_summary.csv",
    ]


# --------------------------------------------------------------------------- per photo


def test_photo_comparison_streams_measures_and_caches(fresh: CompareSession, capsys) -> None:
    session = fresh
    image_id = session.reviewed_image_ids()[0]
    comps = []
    for comp in session.compare_photo(image_id, SMALL, LARGE, one_at_a_time=True):
        comps.append(json.dumps(display_sides(comp)))  # snapshot: the state object is updated in place
    assert len(comps) > 4  # status changes and streamed reasoning chunks
    assert any(
        json.loads(c)["left"]["reasoning"] and not json.loads(c)["right"]["verdict"].startswith("Verdict")
        for c in comps
    )
    first = json.loads(comps[-1])
    for panel, name in ((first["left"], SMALL), (first["right"], LARGE)):
        assert panel["title"] == f"{'A' if name == SMALL else 'B'}: {name}"
        assert "peak" in panel["stats"] and "verdict latency" in panel["stats"] and "load" in panel["stats"]
        assert sum(panel["probabilities"].values()) == pytest.approx(1.0, abs=1e-6)
        assert panel["reasoning"]
    assert not session.vlm(SMALL).loaded and session.vlm(LARGE).loaded  # one at a time
    for side in comp.sides:
        assert side.memory is not None and side.memory.weights_bytes == model_bytes(session.vlm(side.name).load().model)
        assert side.memory.peak_bytes >= side.memory.weights_bytes
        assert side.verdict_seconds > 0 and side.reasoning_seconds > 0 and side.load_seconds is not None
        assert side.verdict["candidates"][-1] == "other" and not side.verdict_cached and not side.reasoning_cached
    with capsys.disabled():  # the figures the tab shows for the two tiny models
        for side in comp.sides:
            print(
                f"\n[compare figures] {side.name}: verdict {side.verdict_seconds * 1000:.0f} ms, reasoning "
                f"{side.reasoning_seconds * 1000:.0f} ms, load {side.load_seconds * 1000:.0f} ms, {side.memory.text()}"
            )

    # Run again: everything from the cache, no memory measured, latency from the stored rows.
    *_, again = list(session.compare_photo(image_id, SMALL, LARGE))
    for side, before in zip(again.sides, comp.sides):
        assert side.status == "done" and side.verdict_cached and side.reasoning_cached and side.memory is None
        assert side.verdict_seconds == pytest.approx(before.verdict_seconds) and side.reasoning == before.reasoning
    shown = display_sides(again)
    assert "cached" in shown["left"]["stats"] and "not measured" in shown["right"]["stats"]


def test_blind_mode_hides_names_and_exports_preferences(session: CompareSession, tmp_path: Path) -> None:
    ids = session.reviewed_image_ids()
    # Pick one photo shown in A/B order and one shown swapped (the order is deterministic).
    straight = next(i for i in ids if not blind_swapped(i, SMALL, LARGE))
    swapped = next(i for i in ids if blind_swapped(i, SMALL, LARGE))
    secrets = [SMALL, LARGE]
    for name in (SMALL, LARGE):
        v = session.vlm(name)
        secrets += [v.model_id, v.model_version, Path(v.model_id).name]

    trials = {}
    for image_id in (straight, swapped):
        comp = None
        for comp in session.compare_photo(image_id, SMALL, LARGE, blind=True):
            payload = display_sides(comp)
            text = json.dumps(payload)
            assert not [s for s in secrets if s in text], "blind payload names a model"
            assert (payload["left"]["title"], payload["right"]["title"]) == ("Model 1", "Model 2")
            assert payload["left"]["stats"] == payload["right"]["stats"] == ""
        assert comp is not None and comp.finished and comp.trial_id
        assert display_sides(comp)["can_prefer"]
        trials[image_id] = comp

    # Model 1 better on the straight photo (= A, small), Model 1 better on the swapped one (= B, large).
    p1 = session.record_preference(trials[straight].trial_id, "1", "alice")
    p2 = session.record_preference(trials[swapped].trial_id, "1", "alice")
    assert split_model_label(p1.model_a)[0] == SMALL and split_model_label(p2.model_a)[0] == LARGE
    assert p1.choice == p2.choice == "a"
    assert p1.output_a == trials[straight].sides[0].reasoning and p2.output_a == trials[swapped].sides[1].reasoning
    session.record_preference(trials[straight].trial_id, "tie", "bob")
    with pytest.raises(CompareError, match="annotator"):
        session.record_preference(trials[straight].trial_id, "2", " ")
    with pytest.raises(CompareError, match="choice"):
        session.record_preference(trials[straight].trial_id, "a", "alice")
    # A named (non-blind) comparison offers nothing to judge.
    *_, named = list(session.compare_photo(straight, SMALL, LARGE))
    assert named.trial_id is None and not display_sides(named)["can_prefer"]
    with pytest.raises(CompareError, match="blind"):
        session.record_preference("", "1", "alice")

    with Session(session.engine) as s:
        rows = list(s.exec(select(Preference).order_by(Preference.id)))
    assert [(r.image_id, r.annotator, r.choice) for r in rows] == [
        (straight, "alice", "a"),
        (swapped, "alice", "a"),
        (straight, "bob", "tie"),
    ]
    assert all(r.prompt.startswith("This cat is one of these breeds") for r in rows)

    result = export_preference_pairs(session.engine, tmp_path / "prefs.jsonl")
    assert (result.pairs, result.ties, result.superseded) == (2, 1, 0)
    records = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert [set(r) for r in records] == [{"prompt", "chosen", "rejected", "image", "metadata"}] * 2
    by_image = {r["metadata"]["image_id"]: r for r in records}
    assert by_image[straight]["chosen"] == trials[straight].sides[0].reasoning
    assert by_image[straight]["rejected"] == trials[straight].sides[1].reasoning
    assert split_model_label(by_image[swapped]["metadata"]["chosen_model"])[0] == LARGE
    assert Path(by_image[swapped]["image"]).is_file() and all(
        isinstance(r["prompt"], str) and r["prompt"] for r in records
    )


def test_no_preference_between_one_model_and_itself(demo_dir: Path, tiny_models, photos: Path, tmp_path: Path) -> None:
    """The demo compared with itself (or two profile names for one checkpoint) offers nothing to
    judge: no trial, a message saying why, nothing stored; the export drops chosen == rejected."""
    shutil.copytree(photos / "Bengal", tmp_path / "one" / "Bengal", ignore=lambda d, names: sorted(names)[1:])
    twin = "small-twin"  # another profile name for the same model folder: the same model version
    session = new_session(
        tmp_path / "one.db", demo_dir, {SMALL: tiny_models[SMALL], twin: tiny_models[SMALL]}, tmp_path / "one"
    )
    (image_id,) = session.reviewed_image_ids()
    assert session.vlm(SMALL).model_version == session.vlm(twin).model_version

    for a, b, why in ((SMALL, SMALL, "same profile"), (SMALL, twin, "same model version")):
        *_, comp = list(session.compare_photo(image_id, a, b, blind=True))
        assert comp.finished and comp.trial_id is None and "same model version" in comp.preference_refused
        shown = display_sides(comp)
        assert not shown["can_prefer"] and shown["trial_id"] == ""
        assert shown["preference_note"].startswith(
            "⚠️ No preference can be recorded: both sides are the same model version"
        )
        assert why in shown["notice"] and "no blind preference can be recorded" in shown["notice"]
        assert "Pick the better reasoning" not in shown["notice"]
        assert [shown[s]["probabilities_label"] for s in ("left", "right")] == [
            "Model 1: probabilities over the candidates",
            "Model 2: probabilities over the candidates",
        ]
    *_, named = list(session.compare_photo(image_id, SMALL, SMALL))
    shown = display_sides(named)
    assert named.preference_refused is None and shown["preference_note"] == ""
    assert [shown[s]["title"] for s in ("left", "right")] == [f"A: {SMALL}", f"B: {SMALL}"]
    assert [shown[s]["probabilities_label"] for s in ("left", "right")] == [
        f"{SMALL} (A): probabilities over the candidates",
        f"{SMALL} (B): probabilities over the candidates",
    ]

    # The guard in record_preference itself (e.g. a trial id from the API): same version, same text.
    label_1, label_2 = model_label(SMALL, "v1@aaa"), model_label(LARGE, "v2@bbb")
    assert preference_refusal([(label_1, "a tabby"), (label_2, "a calico")]) is None
    forged = {
        "same-version": BlindTrial(image_id, "p", ((label_1, "a tabby"), (model_label(twin, "v1@aaa"), "a calico"))),
        "same-text": BlindTrial(image_id, "p", ((label_1, "a tabby "), (label_2, " a tabby"))),
    }
    session._trials.update(forged)
    with pytest.raises(CompareError, match="same model version"):
        session.record_preference("same-version", "1", "alice")
    with pytest.raises(CompareError, match="same text"):
        session.record_preference("same-text", "2", "alice")
    with Session(session.engine) as s:
        assert not list(s.exec(select(Preference)))

    # Rows stored before this guard (or by other tools): chosen == rejected pairs are left out, counted.
    with Session(session.engine) as s:
        for annotator, (out_a, out_b), choice in (
            ("old-1", ("same", "same"), "a"),
            ("old-2", ("same ", "same"), "b"),
            ("ok", ("a tabby", "a calico"), "b"),
            ("tied", ("x", "y"), "tie"),
        ):
            s.add(
                Preference(
                    image_id=image_id,
                    annotator=annotator,
                    model_a=label_1,
                    model_b=label_2,
                    output_a=out_a,
                    output_b=out_b,
                    prompt="p",
                    choice=choice,
                )
            )
        s.commit()
    result = export_preference_pairs(session.engine, tmp_path / "prefs.jsonl")
    assert (result.pairs, result.ties, result.identical, result.superseded) == (1, 1, 2, 0)
    records = [json.loads(line) for line in (tmp_path / "prefs.jsonl").read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in records] == [("a calico", "a tabby")]
    assert all(r["chosen"].strip() != r["rejected"].strip() for r in records)
    assert result.text().startswith("Wrote 1 preference pair to ")
    assert "1 tie left out; 2 pairs with chosen == rejected left out; 0 earlier choices superseded" in result.text()

    # One reviewed photo: singular wording in the job message and the CLI text.
    job = AggregateJob(session)
    assert job.start(SMALL, twin)
    assert job.wait(timeout=300), "aggregate comparison still running after 300 s"
    assert job.state.error is None, job.state.log
    assert job.state.message.startswith("Compared 1 reviewed photo: "), job.state.message
    assert "1 reviewed photo;" in job.result.to_text()
    assert list(job.result.summary_frame().columns) == list(SUMMARY_COLUMNS)
    assert list(job.result.per_breed_frame().columns) == per_breed_columns(SMALL, twin)
    assert per_breed_columns(SMALL, SMALL)[2:] == [f"accuracy A: {SMALL}", f"accuracy B: {SMALL}"]
    assert [plural(n, "pair") for n in (0, 1, 2)] == ["0 pairs", "1 pair", "2 pairs"]


# --------------------------------------------------------------------------- what the tab asks the core


def test_picking_photos_by_id_or_position(session: CompareSession, settings) -> None:
    """Which photo a request means, and the messages when there is none (the tab shows them)."""
    ids = session.photo_ids()
    assert len(ids) == 6 and ids == sorted(ids) and ids == session.reviewed_image_ids()
    assert session.pick_photo(None, 2) == PhotoPick(2, ids[2], 6)
    assert session.pick_photo(0, 99) == PhotoPick(5, ids[5], 6)  # empty id: position, clamped
    assert session.pick_photo(None, -3) == session.pick_photo(None, None) == PhotoPick(0, ids[0], 6)
    assert session.pick_photo(ids[4], 0) == PhotoPick(4, ids[4], 6)  # an id wins over the position
    assert session.pick_photo(float(ids[1])) == PhotoPick(1, ids[1], 6)  # gr.Number may send a float
    with pytest.raises(CompareError, match=r"^No photo with id 99999\.$"):
        session.pick_photo(99999, 0)
    span = f"ids run from {ids[0]} to {ids[-1]}"
    assert session.typed_photo(ids[3]) == PhotoPick(3, ids[3], 6)
    with pytest.raises(CompareError, match=re.escape(f"Type a photo id first ({span}).")):
        session.typed_photo(None)
    with pytest.raises(CompareError, match=re.escape(f"No photo with id 99999 ({span}).")):
        session.typed_photo(99999)
    assert session.first_reviewed_position() == 0
    pick = session.pick_photo(None, 2)
    label = session.human_labels()[pick.image_id]
    assert session.photo_notice(pick) == (
        f"Photo 3 of 6 (id {ids[2]}; 6 reviewed photos in all) · human label: **{label}**. "
        "Press **Compare this photo** to run both models on it."
    )

    empty = CompareSession(settings, ModelRegistry(settings), make_engine(settings.database_url))
    assert empty.photo_ids() == [] and empty.first_reviewed_position() == 0
    with pytest.raises(CompareError, match=r"^No photos yet\.$"):
        empty.pick_photo(None, 0)
    with pytest.raises(CompareError, match=r"^No photo with id 3\.$"):
        empty.pick_photo(3, 0)
    with pytest.raises(CompareError, match=re.escape("Type a photo id first (no photos are imported yet).")):
        empty.typed_photo(None)


def test_first_reviewed_position_skips_unreviewed_and_non_breed_photos(fresh: CompareSession) -> None:
    from catreview.data.reviews import record_review

    ids = fresh.photo_ids()
    with Session(fresh.engine) as s:  # newer reviews: the first two photos are no breed (any more)
        for i, label in ((ids[0], "Not a cat"), (ids[1], "Unsure")):
            record_review(s, i, label, "bob", vocabulary=fresh.vocabulary)
    assert fresh.first_reviewed_position() == 2
    pick = fresh.pick_photo(None, 0)
    assert "Photo 1 of 6" in fresh.photo_notice(pick) and "not reviewed yet" in fresh.photo_notice(pick)
    assert "4 reviewed photos in all" in fresh.photo_notice(pick)


def test_runs_are_refused_while_the_models_are_busy(session: CompareSession) -> None:
    """The guard the tab relies on while the app's background predictions run."""
    busy = [True]
    guarded = CompareSession(session.settings, session.registry, session.engine, busy=lambda: busy[0])
    image_id = guarded.photo_ids()[0]
    runs = guarded.compare_photo(image_id, SMALL, LARGE)
    with pytest.raises(ModelsBusy, match=re.escape(BUSY_PHOTO)):
        next(runs)
    assert isinstance(ModelsBusy("x"), CompareError)
    assert error_notice(ModelsBusy(BUSY_PHOTO)) == BUSY_PHOTO  # a notice, not a warning
    assert error_notice(CompareError("no VLM profile named 'x'")) == "⚠️ no VLM profile named 'x'"

    job = AggregateJob(guarded)
    assert job.try_start(SMALL, LARGE) == BUSY_AGGREGATE
    assert not job.state.running and job._thread is None and job.result is None  # nothing started
    busy[0] = False
    job.state = JobState(running=True, stage="another run")  # as if a run were going on
    assert job.try_start(SMALL, LARGE) == ALREADY_RUNNING and job._thread is None
    job.state = JobState()
    message = job.try_start(SMALL, LARGE)
    assert message not in (BUSY_AGGREGATE, ALREADY_RUNNING) and message.startswith(("Working", "Compared"))
    assert job.wait(timeout=300), "aggregate comparison still running after 300 s"
    assert job.state.error is None, job.state.log
    assert job.result is not None and job.result.metrics.n == 6
    *_, comp = list(guarded.compare_photo(image_id, SMALL, SMALL))  # not busy any more: runs
    assert comp.finished


def test_preference_messages_for_the_tab_and_the_api(fresh: CompareSession) -> None:
    image_id = fresh.photo_ids()[0]
    label_1, label_2 = model_label(SMALL, "v1@aaa"), model_label(LARGE, "v2@bbb")
    fresh._trials.update(
        {
            "real": BlindTrial(image_id, "p", ((label_1, "a tabby"), (label_2, "a calico"))),
            "same-text": BlindTrial(image_id, "p", ((label_1, "a tabby"), (label_2, "a tabby "))),
        }
    )
    saved = fresh.try_record_preference("real", "2", "carol")
    assert saved.saved and saved.error is None and saved.preference.choice == "b"
    pid = saved.preference.id
    assert saved.text() == f"Saved preference #{pid}: Model 2 (photo {image_id}, by carol)."
    assert saved.api_text() == f"saved preference #{pid}"
    tie = fresh.try_record_preference("real", "tie", "dave")
    assert tie.text() == f"Saved preference #{tie.preference.id}: a tie (photo {image_id}, by dave)."

    for trial, choice, who, why in (
        ("same-text", "1", "carol", "no preference recorded: both outputs are the same text"),
        ("real", "1", "  ", "enter your annotator name before choosing"),
        ("real", "a", "carol", "choice must be one of"),
        ("", "1", "carol", "no finished blind comparison to judge"),
    ):
        refused = fresh.try_record_preference(trial, choice, who)
        assert not refused.saved and refused.preference is None
        assert refused.text().startswith(f"⚠️ {why}") and refused.api_text().startswith(f"error: {why}")
    with Session(fresh.engine) as s:
        assert [(r.annotator, r.choice) for r in s.exec(select(Preference).order_by(Preference.id))] == [
            ("carol", "b"),
            ("dave", "tie"),
        ]


# --------------------------------------------------------------------------- adapter versions


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A random (non-identity) LoRA adapter on the language model's q/v projections."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(base_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def test_adapter_versions_of_one_model(session: CompareSession, tiny_models, tmp_path: Path) -> None:
    ad1 = make_adapter(tiny_models[SMALL], tmp_path / "round1" / "adapter", seed=1)
    ad2 = make_adapter(tiny_models[SMALL], tmp_path / "round2" / "adapter", seed=2)
    with pytest.raises(CompareError, match="adapter_config.json"):
        session.add_adapter_pair(SMALL, ad1, tmp_path / "nowhere")
    with pytest.raises(CompareError, match="same adapter"):
        session.add_adapter_pair(SMALL, ad1, ad1)
    with Session(session.engine) as s:  # adapters recorded by training rounds are offered by folder
        s.add(AdapterVersion(base_model=str(tiny_models[SMALL]), path=str(ad2), export_hash="x", active=True))
        s.commit()
    assert [path for _, path in known_adapters(session.engine)] == [str(ad2)]
    name_a, name_b = session.add_adapter_pair(SMALL, ad1, ad2)
    assert name_a.startswith(f"{SMALL}+adapter@") and name_b.startswith(f"{SMALL}+adapter@") and name_a != name_b
    pa, pb = session.profiles()[name_a], session.profiles()[name_b]
    base = session.settings.vlm_profiles[SMALL]
    assert (
        pa.model_dump(exclude={"adapter"}) == pb.model_dump(exclude={"adapter"}) == base.model_dump(exclude={"adapter"})
    )
    assert (pa.adapter, pb.adapter) == (ad1.resolve(), ad2.resolve())

    result = session.run_aggregate(name_a, name_b, one_at_a_time=True)
    assert result.a.model_version != result.b.model_version and "+adapter" in result.a.model_version
    assert result.metrics.n == 6 and (result.a.computed, result.b.computed) == (6, 6)
    probs = [(o.label_a, o.confidence_a) for o in result.photos], [(o.label_b, o.confidence_b) for o in result.photos]
    assert probs[0] != probs[1]  # different adapters, different verdicts
    assert any(f"adapter {ad1.resolve()} is not a version of this database" in n for n in result.notes)
    # The base model without an adapter against one version is a pair too.
    none_name, v1_name = session.add_adapter_pair(SMALL, "", ad1)
    assert none_name == f"{SMALL} (no adapter)" and v1_name == name_a

    # Photos in the train split that ad2's round was trained on are not a fair test of it: left out.
    with Session(session.engine) as s:
        version = s.exec(select(AdapterVersion).where(AdapterVersion.path == str(ad2))).one()
        shas = [o.sha256 for o in s.exec(select(ImageRecord).order_by(ImageRecord.id))][:2]
        s.add_all(
            [
                SplitAssignment(sha256=h, split="train", assigned_at=version.created_at - timedelta(minutes=1))
                for h in shas
            ]
        )
        s.commit()
    again = session.run_aggregate(name_a, name_b, one_at_a_time=True)
    assert again.metrics.n == 4 and (again.a.computed, again.b.computed) == (0, 0)
    assert (
        again.notes[0]
        == "Left out 2 reviewed photos of the train split an adapter was trained on (not a fair test of it)."
    )
    assert again.notes[0] in again.to_text()


def test_an_untrained_builtin_profile_is_refused_not_compared(tmp_path: Path) -> None:
    """The pretrained built-in FastVLMs have a random projector until an adapter is active: the
    Compare tab and the CLI refuse them with the registry's plain line instead of showing
    meaningless verdicts (nothing is built or loaded to say so)."""
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'c.db'}", data_dir=tmp_path / "data", builtin_models="pretrained"
    )
    engine = make_engine(settings.database_url)
    session = CompareSession(settings, ModelRegistry(settings, engine=engine), engine)
    assert session.untrained_reason("smollm2-lite2").startswith("VLM not trained yet: the built-in profile")
    with pytest.raises(CompareError, match="VLM not trained yet: the built-in profile 'smollm2-lite0'"):
        session.run_aggregate("smollm2-lite0", "smollm2-lite2")
    with pytest.raises(CompareError, match="VLM not trained yet"):
        next(session.compare_photo(1, "smollm2-lite0", "smollm2-lite2"))
    with pytest.raises(CompareError, match="no VLM profile named 'gpt'"):
        session.check_trained("gpt")
    job = AggregateJob(session)
    job.start("smollm2-lite0", "smollm2-lite2")
    assert job.wait(60)
    assert job.state.text().startswith("Cannot compare: VLM not trained yet")
