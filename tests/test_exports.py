"""Tests for catreview.export (records, conversations, splits, the dataset build, import) on the shared cat photos.

The database is built here from db.py tables (images decoded with load_rgb) and reviews.py;
about a fifth of the photos stay unreviewed at first so the sticky-split test can add them later.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sqlite3
import zipfile
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from PIL import Image
from sqlmodel import Session, select

from catreview.data.db import ExportRecord, ImageRecord, SplitAssignment, make_engine, redact_url
from catreview.data.images import load_rgb
from catreview.data.importer import import_folder
from catreview.data.labels import NOT_A_CAT, UNSURE, BreedVocabulary
from catreview.data.reviews import current_reviews, record_review
from catreview.export.archive import zip_export
from catreview.export.conversations import (
    METADATA_COLUMNS,
    QUESTION_TEMPLATES,
    answer_text,
    build_record,
    indefinite_article,
    record_id,
    to_messages,
)
from catreview.export.dataset import ExportError, export_dataset
from catreview.export.info import export_info
from catreview.export.info import tree_hash as _tree_hash
from catreview.export.llava_import import import_llava_jsonl
from catreview.export.llava_jsonl import write_llava_jsonl
from catreview.export.records import IMAGE_TOKEN, check_record
from catreview.export.rows import ReviewedRow, collect_reviewed_rows
from catreview.export.splits import DB_SPLIT, SPLITS, assign_splits, largest_remainder
from catreview.export.traits import KINDS, load_breed_traits
from catreview.export.validate import (
    ProcessorMismatchError,
    RecordValidator,
    check_processor,
    validate_record_for_processor,
)
from catreview.files import jsonl_line, read_jsonl, sha256_file, write_jsonl

VOCAB = BreedVocabulary.default()
TRAITS = load_breed_traits()
ODD_NOTE = "line one\nline two\u2028after LS\u2029after PS\x85after NEL \u00fcn\u00efc\u00f8de \U0001f63a"
SHARED_FOLDERS = [
    "Abyssinian", "American_Shorthair", "Bengal", "Birman", "Bombay", "British_Shorthair", "Egyptian_Mau",
    "Exotic_Shorthair", "Maine_Coon", "Persian", "Ragdoll", "Russian_Blue", "Scottish_Fold", "Siamese", "Sphynx",
]  # fmt: skip


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------


def _labels(cats_dir: Path) -> dict[str, str]:
    lines = (cats_dir / "labels.csv").read_text(encoding="utf-8").splitlines()[1:]
    return dict(line.rsplit(",", 1) for line in lines if line.strip())


def _snapshot(label: str, predicted: str) -> dict:
    return {
        "stage1": [[predicted, 0.7], [label, 0.2]] if predicted != label else [[label, 0.9]],
        "vlm": {predicted: 0.6, "other": 0.4},
        "fused": {"label": predicted, "probability": 0.66},
        "model_versions": {"stage1": "demo@1", "vlm": "tiny@1"},
    }


def _clone(src_db: Path, dst_db: Path):
    """Copy a SQLite database (WAL-safe, through the backup API) and open it."""
    with sqlite3.connect(src_db) as src, sqlite3.connect(dst_db) as dst:
        src.backup(dst)
    return make_engine(f"sqlite:///{dst_db}")


@pytest.fixture(scope="module")
def base(cats_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A database of all 330 photos; 264 reviewed with a mix of review kinds, 66 held back."""
    tmp = tmp_path_factory.mktemp("exports")
    engine = make_engine(f"sqlite:///{tmp / 'base.db'}")
    labels = _labels(cats_dir)
    held: dict[int, str] = {}
    special: dict[int, str] = {}
    with Session(engine) as s:
        for i, (rel, folder) in enumerate(sorted(labels.items())):
            path = cats_dir / rel
            img = load_rgb(path)
            row = ImageRecord(
                sha256=sha256_file(path), path=str(path), size=path.stat().st_size, width=img.width, height=img.height
            )
            s.add(row)
            s.commit()
            s.refresh(row)
            label = VOCAB.canonical(folder)
            if i % 5 == 4:
                held[row.id] = label
                continue
            if i % 4 == 0:
                record_review(s, row.id, label, "import", vocabulary=VOCAB, source="import")
            elif i % 4 == 1:
                record_review(s, row.id, label, "alice", vocabulary=VOCAB, model_snapshot=_snapshot(label, label))
            elif i % 4 == 2:
                record_review(s, row.id, label, "bob", vocabulary=VOCAB, model_snapshot=_snapshot(label, "Ocicat"))
            else:
                record_review(s, row.id, label, "carol", vocabulary=VOCAB, note=ODD_NOTE if i == 3 else None)
            if i in (1, 6, 11, 21, 26):  # later decided: not a cat
                record_review(s, row.id, NOT_A_CAT, "alice", vocabulary=VOCAB)
                special[row.id] = NOT_A_CAT
            elif i in (31, 36, 41):
                record_review(s, row.id, UNSURE, "bob", vocabulary=VOCAB)
                special[row.id] = UNSURE
    # the same bytes under another name go through the real import path and add nothing
    dup_dir = tmp / "dups"
    dup_dir.mkdir()
    shutil.copy(cats_dir / sorted(labels)[0], dup_dir / "copy_of_first.jpg")
    dup = import_folder(engine, dup_dir, vocabulary=VOCAB)
    assert dup.added == 0 and dup.already_present == 1
    return {"engine": engine, "db": tmp / "base.db", "tmp": tmp, "held": held, "special": special, "labels": labels}


@pytest.fixture(scope="module")
def first(base: dict) -> dict:
    """The first export of the base database (seed 0)."""
    out = base["tmp"] / "export1"
    summary = export_dataset(base["engine"], out, seed=0, vocabulary=VOCAB)
    return {"out": out, "summary": summary}


def _split_records(out: Path, folder: str = "llava") -> dict[str, list[dict]]:
    return {s: [r for _, r in read_jsonl(out / folder / f"{s}.jsonl")] for s in SPLITS}


def _assignments(engine) -> dict[str, str]:
    with Session(engine) as s:
        return {a.sha256: a.split for a in s.exec(select(SplitAssignment))}


# --------------------------------------------------------------------------------------------
# Traits and text
# --------------------------------------------------------------------------------------------


def test_traits_cover_the_67_classes_and_the_shared_breeds():
    assert set(TRAITS.classes) == set(VOCAB.names) and len(TRAITS) == 67
    assert {t.kind for t in TRAITS.classes.values()} == set(KINDS)
    for name in (
        "Calico",
        "Tabby",
        "Tortoiseshell",
        "Tuxedo",
        "Torbie",
        "Dilute Calico",
        "Dilute Tortoiseshell",
        "Tiger",
        "Silver",
        "Chinchilla",
    ):
        assert TRAITS.get(name).kind == "colour_pattern" and "not a" in TRAITS.get(name).traits.lower()
    for name in ("Domestic Short Hair", "Domestic Medium Hair", "Domestic Long Hair"):
        assert TRAITS.get(name).kind == "landrace" and TRAITS.get(name).traits.startswith("Not a breed")
    for folder in SHARED_FOLDERS:
        t = TRAITS.get(folder)
        assert t is not None and t.name == VOCAB.canonical(folder), folder
    assert TRAITS.get("Sphynx").name == "Sphynx - Hairless Cat"
    assert TRAITS.get("maine coon").name == "Maine Coon"


@pytest.mark.parametrize(
    ("name", "article"),
    [("Abyssinian", "an"), ("American Shorthair", "an"), ("Bengal", "a"), ("Egyptian Mau", "an"),
     ("Exotic Shorthair", "an"), ("Ocicat", "an"), ("Oriental Tabby", "an"), ("Extra-Toes (Hemingway Polydactyl)", "an"),
     ("York Chocolate", "a"), ("Himalayan", "a"), ("Ural Rex", "a"), ("Ukrainian Levkoy", "a"), ("hour", "an")],
)  # fmt: skip
def test_indefinite_article(name, article):
    assert indefinite_article(name) == article


def test_answers_read_naturally():
    assert answer_text("Abyssinian", TRAITS.get("Abyssinian"), 0).startswith(
        "This is an Abyssinian cat. Characteristics: Short"
    )
    assert answer_text("Bengal", TRAITS.get("Bengal"), 0).startswith("This is a Bengal cat.")
    assert answer_text("Sphynx - Hairless Cat", TRAITS.get("Sphynx"), 0).startswith("This is a Sphynx cat.")
    assert answer_text("Norwegian Forest Cat", TRAITS.get("Norwegian Forest Cat"), 0).startswith(
        "This is a Norwegian Forest Cat."
    )
    assert answer_text(
        "Extra-Toes Cat - Hemingway Polydactyl", TRAITS.get("Extra-Toes Cat - Hemingway Polydactyl"), 1
    ).startswith("The cat in this photo is an Extra-Toes (Hemingway Polydactyl).")
    assert answer_text("Calico", TRAITS.get("Calico"), 0).startswith(
        "This is a Calico cat. Characteristics: Not a breed"
    )
    assert answer_text("Savannah", None, 0) == "This is a Savannah cat."  # no traits: no characteristics


def _row(i: int, label: str = "Abyssinian", **kw) -> ReviewedRow:
    sha = f"{i:064x}"[::-1]
    return ReviewedRow(
        image_id=i, sha256=sha, path=f"/photos/{i}.jpg", label=label, annotator=kw.pop("annotator", "alice"), **kw
    )


def test_records_schema_ids_templates_and_confidence():
    recs = [build_record(_row(i), f"train/{record_id(_row(i).sha256)}.jpg", traits=TRAITS) for i in range(200)]
    for r in recs:
        assert check_record(r) == []
        first = r["conversations"][0]["value"]
        assert (
            first.startswith(IMAGE_TOKEN + "\n") and sum(t["value"].count(IMAGE_TOKEN) for t in r["conversations"]) == 1
        )
        assert r["id"] == r["metadata"]["sha256"][:16]
    assert len({r["conversations"][0]["value"] for r in recs}) == len(QUESTION_TEMPLATES)
    assert len({r["conversations"][1]["value"].split(".")[0] for r in recs}) >= 3
    again = build_record(_row(7), "x.jpg", traits=TRAITS)
    assert again["conversations"] == recs[7]["conversations"] and again["id"] == recs[7]["id"]
    copy = build_record(_row(7), "x.jpg", traits=TRAITS, copy=2)
    assert copy["id"] == recs[7]["id"] + "-o2"

    def meta(**kw):
        return build_record(_row(1, **kw), "a.jpg", traits=TRAITS, vocabulary=VOCAB)["metadata"]

    assert (meta(snapshot=_snapshot("Abyssinian", "abyssinian"))["review"], meta()["confidence_target"]) == (
        "confirmed",
        1.0,
    )
    assert meta(snapshot=_snapshot("Abyssinian", "Somali"))["review"] == "corrected"
    assert (meta(source="import")["review"], meta(source="import")["confidence_target"]) == ("imported", 0.8)
    assert meta()["review"] == "labelled"
    with pytest.raises(ValueError, match="not a breed"):
        build_record(_row(1, label=NOT_A_CAT), "a.jpg", traits=TRAITS)

    msgs = to_messages(recs[0])
    assert msgs["messages"][0]["content"][0] == {"type": "image"}
    assert IMAGE_TOKEN not in json.dumps(msgs["messages"])
    assert msgs["images"] == [recs[0]["image"]]
    lf = to_messages(recs[0], "llamafactory")
    assert lf["messages"][0]["content"].startswith(IMAGE_TOKEN) and lf["messages"][1]["role"] == "assistant"

    bad = json.loads(json.dumps(recs[0]))
    bad["conversations"][0]["value"] += " " + IMAGE_TOKEN
    assert any("appears 2 times" in e for e in check_record(bad))
    bad["image"] = "../outside.jpg"
    assert any("relative" in e for e in check_record(bad))


# --------------------------------------------------------------------------------------------
# JSONL
# --------------------------------------------------------------------------------------------


def test_jsonl_keeps_one_record_per_line_with_line_separators(tmp_path: Path):
    notes = [ODD_NOTE, "plain", "\u2028", "tab\tcr\r", "lone surrogate \udcff"]
    path = tmp_path / "x.jsonl"
    assert write_jsonl(({"i": i, "note": n} for i, n in enumerate(notes)), path) == len(notes)
    raw = path.read_bytes()
    for sep in ("\u2028", "\u2029", "\x85"):
        assert sep.encode() not in raw
    text = raw.decode("utf-8")
    assert len(text.splitlines()) == len(notes)  # str.splitlines splits on U+2028/2029/0085 too
    assert [json.loads(line)["note"] for line in text.splitlines()] == notes
    assert [r["note"] for _, r in read_jsonl(path)] == notes
    assert "\u00fcn\u00efc\u00f8de \U0001f63a".encode() in raw  # non-ASCII stays readable
    assert jsonl_line({"a": "\u2028"}) == b'{"a": "\\u2028"}\n'


def test_write_llava_jsonl_fast_path(base: dict, tmp_path: Path, cats_dir: Path):
    with Session(base["engine"]) as s:
        rows, skipped = collect_reviewed_rows(s, VOCAB)
    result = write_llava_jsonl(rows, tmp_path / "all.jsonl")
    assert result.n_records == len(rows) == 264 - 8 and skipped == {NOT_A_CAT: 5, UNSURE: 3}
    # the folder as the photos were imported, symlinks on the way kept (the shared folder may be
    # reached through one, e.g. a clone in /tmp with /tmp/shared -> /work/shared)
    assert result.image_root == Path(os.path.abspath(cats_dir))
    recs = [r for _, r in read_jsonl(tmp_path / "all.jsonl")]
    assert all(check_record(r) == [] for r in recs)
    assert all((result.image_root / r["image"]).is_file() for r in recs)
    odd = [r for r in recs if r["metadata"]["note"] == ODD_NOTE]
    assert len(odd) == 1

    # the same photos imported through a symlink to their folder
    link = tmp_path / "link"
    link.symlink_to(cats_dir.resolve(), target_is_directory=True)
    linked = [dataclasses.replace(r, path=str(link / os.path.relpath(r.path, cats_dir))) for r in rows]
    assert write_llava_jsonl(linked, tmp_path / "linked.jsonl").image_root == link  # not resolved
    for root in (link, cats_dir.resolve()):  # an image_root given either way works
        res = write_llava_jsonl(linked, tmp_path / "rooted.jsonl", image_root=root)
        assert res.image_root == root and res.n_records == len(recs)
        assert [r["image"] for _, r in read_jsonl(tmp_path / "rooted.jsonl")] == [r["image"] for r in recs]
    with pytest.raises(ValueError, match="outside image_root"):
        write_llava_jsonl(linked, tmp_path / "bad.jsonl", image_root=tmp_path / "elsewhere")


# --------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------


def test_largest_remainder_and_assign_splits():
    assert largest_remainder(10, (0.8, 0.1, 0.1)) == [8, 1, 1]
    assert largest_remainder(40, (0.8, 0.1, 0.1)) == [32, 4, 4]
    assert largest_remainder(4, (0.8, 0.1, 0.1)) == [3, 1, 0]
    assert largest_remainder(1, (0.8, 0.1, 0.1)) == [1, 0, 0]
    labels = {f"{i:064x}": ("A" if i < 40 else "B") for i in range(50)}
    a = assign_splits(labels, seed=0)
    assert a == assign_splits(labels, seed=0) and a != assign_splits(labels, seed=1)
    per = Counter((labels[s], split) for s, split in a.items())
    assert [per["A", s] for s in SPLITS] == [32, 4, 4] and [per["B", s] for s in SPLITS] == [8, 1, 1]
    existing = {s: "test" for s in list(labels)[:6]}  # 6 of breed A already in test (target 4)
    b = assign_splits(labels, existing, seed=0)
    assert all(b[s] == "test" for s in existing)
    per = Counter((labels[s], split) for s, split in b.items())
    # 34 new photos go where the breed is furthest below target (32/4/4): both gaps shrink to 1
    assert [per["A", s] for s in SPLITS] == [31, 3, 6]


# --------------------------------------------------------------------------------------------
# Curated export
# --------------------------------------------------------------------------------------------


def test_export_layout_schema_stratification_and_no_leakage(base: dict, first: dict, cats_dir: Path):
    out, summary = first["out"], first["summary"]
    for f in ("README.md", "export.json", "manifest.csv", "dataset_info.json"):
        assert (out / f).is_file()
    assert summary.n_photos == 256 and summary.skipped == {NOT_A_CAT: 5, UNSURE: 3} and summary.failed == []
    assert summary.version >= 1 and summary.new_assignments == 256

    recs = _split_records(out)
    meta = {s: [r for _, r in read_jsonl(out / s / "metadata.jsonl")] for s in SPLITS}
    shas = {s: {r["metadata"]["sha256"] for r in recs[s]} for s in SPLITS}
    assert not (shas["train"] & shas["validation"] or shas["train"] & shas["test"] or shas["validation"] & shas["test"])
    dup_sha = sha256_file(cats_dir / sorted(base["labels"])[0])
    assert (
        sum(dup_sha in shas[s] for s in SPLITS) <= 1
        and sum(r["metadata"]["sha256"] == dup_sha for s in SPLITS for r in recs[s]) <= 1
    )

    per_breed: dict[str, Counter] = defaultdict(Counter)
    for s in SPLITS:
        for r in recs[s]:
            per_breed[r["metadata"]["breed"]][s] += 1
    for breed, c in per_breed.items():
        assert [c[s] for s in SPLITS] == largest_remainder(sum(c.values()), (0.8, 0.1, 0.1)), breed
        assert {s: c[s] for s in SPLITS if c[s]} == {
            s: summary.counts[s][breed] for s in SPLITS if breed in summary.counts[s]
        }
    assert len(per_breed) == 15 and "Sphynx - Hairless Cat" in per_breed

    sources = {}
    with Session(base["engine"]) as s:
        for img in s.exec(select(ImageRecord)):
            sources[img.sha256] = img
    for s in SPLITS:
        assert [m["file_name"] for m in meta[s]] == [Path(r["image"]).name for r in recs[s]]
        for r in recs[s]:
            assert check_record(r) == [] and r["image"] == f"{s}/{r['id']}.jpg"
            m = r["metadata"]
            assert r["id"] == record_id(m["sha256"])
            name = TRAITS.get(m["breed"]).display
            assert f" {indefinite_article(name)} {name}" in r["conversations"][1]["value"]
            src = sources[m["sha256"]]
            with Image.open(out / r["image"]) as im:
                w, h = im.size
            assert min(w, h) == min(336, min(src.width, src.height))
            assert abs(w / h - src.width / src.height) < 0.01
            assert m["review"] in ("confirmed", "corrected", "imported", "labelled")
    kinds = Counter(r["metadata"]["review"] for s in SPLITS for r in recs[s])
    assert set(kinds) == {"confirmed", "corrected", "imported", "labelled"}
    odd = [r for s in SPLITS for r in recs[s] if r["metadata"]["note"] == ODD_NOTE]
    assert len(odd) == 1  # the U+2028 note survived, one record per line
    for s in SPLITS:
        assert len((out / "llava" / f"{s}.jsonl").read_text(encoding="utf-8").splitlines()) == len(recs[s])

    info = export_info(out)
    assert info["content_hash"] == summary.content_hash == _tree_hash(out)
    assert info["counts"] == summary.counts and info["version"] == summary.version
    card = (out / "README.md").read_text(encoding="utf-8")
    assert summary.content_hash in card and "| Sphynx - Hairless Cat |" in card and str(base["db"]) in card
    with Session(base["engine"]) as s:
        rec = s.get(ExportRecord, summary.version)
        assert rec.content_hash == summary.content_hash and rec.n_records == 256
    assert set(_assignments(base["engine"]).values()) == set(DB_SPLIT.values())

    names = zipfile.ZipFile(zip_export(out)).namelist()
    assert f"{out.name}/export.json" in names and f"{out.name}/llava/train.jsonl" in names
    assert sum(n.endswith(".jpg") for n in names) == 256


def test_redact_url():
    assert redact_url("postgresql+psycopg://ann:s3cret@db.example/cats?sslpassword=x&app=cr") == (
        "postgresql+psycopg://ann@db.example/cats?app=cr"
    )
    assert redact_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"


def test_second_export_has_the_same_ids_splits_and_hash(base: dict, first: dict):
    # the first export resized in a pool of worker processes, this one in this process: same bytes
    seen: list[tuple[int, int]] = []
    again = export_dataset(
        base["engine"], base["tmp"] / "export2", seed=0, vocabulary=VOCAB, workers=1, progress=lambda *a: seen.append(a)
    )
    assert seen == [(i, 256) for i in range(1, 257)]
    assert again.version == first["summary"].version + 1
    assert again.content_hash == first["summary"].content_hash
    assert again.kept_assignments == 256 and again.new_assignments == again.changed_assignments == 0
    a, b = _split_records(first["out"]), _split_records(base["tmp"] / "export2")
    assert {s: [r["id"] for r in a[s]] for s in SPLITS} == {s: [r["id"] for r in b[s]] for s in SPLITS}


def test_sticky_splits_new_photos_and_resplit(base: dict, first: dict, tmp_path: Path):
    engine = _clone(base["db"], tmp_path / "db.sqlite")
    before = _assignments(engine)
    with Session(engine) as s:
        for image_id, label in base["held"].items():
            record_review(s, image_id, label, "dave", vocabulary=VOCAB)
    grown = export_dataset(engine, tmp_path / "grown", seed=0, vocabulary=VOCAB)
    assert grown.n_photos == 256 + len(base["held"]) and grown.kept_assignments == 256
    assert grown.new_assignments == len(base["held"]) and grown.changed_assignments == 0
    after = _assignments(engine)
    assert all(after[sha] == split for sha, split in before.items())
    for breed in {b for c in grown.counts.values() for b in c}:
        n = [grown.counts[s].get(breed, 0) for s in SPLITS]
        target = largest_remainder(sum(n), (0.8, 0.1, 0.1))
        assert all(abs(x - t) <= 1 for x, t in zip(n, target)), (breed, n, target)

    re = export_dataset(engine, tmp_path / "resplit", seed=7, resplit=True, vocabulary=VOCAB)
    assert re.changed_assignments > 0 and re.kept_assignments + re.changed_assignments == re.n_photos
    changed = _assignments(engine)
    assert sum(changed[sha] != after[sha] for sha in after) == re.changed_assignments
    for breed in {b for c in re.counts.values() for b in c}:
        n = [re.counts[s].get(breed, 0) for s in SPLITS]
        assert n == largest_remainder(sum(n), (0.8, 0.1, 0.1))


def test_cap_and_oversampling_touch_train_only(base: dict, tmp_path: Path):
    engine = _clone(base["db"], tmp_path / "db.sqlite")
    s = export_dataset(
        engine,
        tmp_path / "capped",
        seed=0,
        cap_per_breed=6,
        oversample_train=True,
        image_size=96,
        oversample_max_factor=3,
    )
    photos = Counter()
    for split in SPLITS:
        for breed, n in s.counts[split].items():
            photos[breed] += n
    assert max(photos.values()) == 6 and s.skipped["capped"] == 256 - sum(photos.values())
    recs = _split_records(tmp_path / "capped")
    train_rows = Counter(r["metadata"]["breed"] for r in recs["train"])
    train_photos = {b: s.counts["train"].get(b, 0) for b in photos}
    top = max(train_photos.values())
    for breed, n in train_photos.items():
        assert train_rows[breed] == min(top, 3 * n), breed
    copies = [r for r in recs["train"] if "-o" in r["id"]]
    assert copies and s.oversampled_rows == len(copies)
    assert all((tmp_path / "capped" / r["image"]).is_file() for r in copies)
    for split in ("validation", "test"):
        assert not any("-o" in r["id"] for r in recs[split]) and len(recs[split]) == sum(s.counts[split].values())
    train_meta = [r for _, r in read_jsonl(tmp_path / "capped" / "train" / "metadata.jsonl")]
    assert len(train_meta) == s.rows_per_split["train"] == len(recs["train"])
    with Image.open(tmp_path / "capped" / recs["test"][0]["image"]) as im:
        assert min(im.size) <= 96


def test_failures_are_reported_and_never_corrupt(base: dict, tmp_path: Path):
    engine = _clone(base["db"], tmp_path / "db.sqlite")
    with Session(engine) as s:
        n_exports = len(s.exec(select(ExportRecord)).all())
        imgs = sorted(s.exec(select(ImageRecord)).all(), key=lambda i: i.id)
        reviewed = current_reviews(s)
        victims = [i for i in imgs if i.id in reviewed and reviewed[i.id].label not in (NOT_A_CAT, UNSURE)][:2]
        gone_sha, changed_sha = victims[0].sha256, victims[1].sha256
        moved = tmp_path / "changed.jpg"
        shutil.copy(imgs[-1].path, moved)
        victims[0].path = str(tmp_path / "gone.jpg")  # missing file
        victims[1].path = str(moved)  # other content than its sha256
        s.add_all(victims)
        torn = next(
            r
            for i, r in reviewed.items()
            if r.label not in (NOT_A_CAT, UNSURE) and i not in {v.id for v in victims} and r.model_snapshot_json
        )
        torn.model_snapshot_json = torn.model_snapshot_json[:20]  # a damaged stored snapshot
        s.add(torn)
        s.commit()
        torn_id = torn.image_id
        torn_sha, torn_source = s.get(ImageRecord, torn_id).sha256, torn.source
    summary = export_dataset(engine, tmp_path / "out", vocabulary=VOCAB)
    reasons = dict(summary.failed)
    assert summary.n_photos == 254 and len(reasons) == 2
    # The damaged snapshot's photo is exported without predictions, and the summary says so.
    assert summary.unreadable_snapshots == 1 and "1 reviews have an unreadable stored model snapshot" in "\n".join(
        summary.lines()
    )
    torn_record = next(
        r for s_ in SPLITS for r in _split_records(tmp_path / "out").get(s_, []) if r["id"] == record_id(torn_sha)
    )
    assert torn_source == "ui" and torn_record["metadata"]["review"] == "labelled"  # not confirmed/corrected
    assert "cannot read" in reasons[gone_sha[:12]] and "changed since import" in reasons[changed_sha[:12]]
    files = {p.stem for s in SPLITS for p in (tmp_path / "out" / s).glob("*.jpg")}
    assert len(files) == 254 and record_id(gone_sha) not in files and record_id(changed_sha) not in files

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        export_dataset(engine, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "keep.txt").read_text() == "mine"
    with pytest.raises(FileExistsError):
        export_dataset(engine, tmp_path / "out")
    replaced = export_dataset(engine, tmp_path / "out", overwrite=True, seed=0)
    assert replaced.content_hash == summary.content_hash

    # a stored current label that disagrees with the review it names: refused, nothing written
    with Session(engine) as s:
        img = s.get(ImageRecord, torn_id)
        img.current_label = "Ocicat" if img.current_label != "Ocicat" else "Bengal"
        s.add(img)
        s.commit()
    with pytest.raises(ExportError, match="disagrees with its review"):
        export_dataset(engine, tmp_path / "tampered", vocabulary=VOCAB, workers=2)
    assert not (tmp_path / "tampered").exists()

    empty = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ExportError, match="nothing to export"):
        export_dataset(empty, tmp_path / "none")
    assert not (tmp_path / "none").exists()
    with Session(engine) as s:
        assert len(s.exec(select(ExportRecord)).all()) == n_exports + 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no partial folders left


# --------------------------------------------------------------------------------------------
# Processor / chat template check (tiny llava-1.5 built offline)
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory):
    from transformers import AutoConfig, AutoProcessor

    from catreview.models.tiny_llava import build_tiny_llava

    folder = build_tiny_llava(tmp_path_factory.mktemp("llava") / "tiny", size="demo")
    return folder, AutoProcessor.from_pretrained(folder), AutoConfig.from_pretrained(folder)


def test_template_check_catches_token_count_mismatches(tiny_llava, first: dict):
    import torch
    from transformers import LlavaForConditionalGeneration

    folder, processor, config = tiny_llava
    out = first["out"]
    rec = _split_records(out)["validation"][0]
    image = load_rgb(out / rec["image"])
    good = validate_record_for_processor(rec, processor, image=image, model_config=config)
    assert good.ok and good.image_tokens == good.expected_image_tokens == 256, good.reason
    assert validate_record_for_processor(rec, processor, images_root=out, model_config=config).ok

    two = json.loads(json.dumps(rec))
    two["conversations"][1]["value"] += " <image>"
    assert not validate_record_for_processor(two, processor, image=image, model_config=config).ok

    # llava-1.5's trap: without the CLS slot the processor expands to 255 tokens, the tower gives 256
    bad = _wrong_count_processor(processor)
    check = validate_record_for_processor(rec, bad, image=image, model_config=config)
    assert not check.ok and (check.image_tokens, check.expected_image_tokens) == (255, 256)
    assert "255 image tokens" in check.reason
    with pytest.raises(ProcessorMismatchError, match="255 tokens"):
        check_processor(bad, config)

    # the real model agrees: the validated record runs, the mismatched one is refused
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    msgs = to_messages(rec)["messages"]
    text = processor.apply_chat_template(msgs, tokenize=False)
    with torch.no_grad():
        model(**processor(images=[image], text=[text], return_tensors="pt"))
        with pytest.raises(ValueError, match="do not match"):
            model(**bad(images=[image], text=[text], return_tensors="pt"))

    # the per-image-size cache of bulk exports gives the same verdicts as the full check
    cached = RecordValidator(processor, model_config=config)
    for r in [*[r for recs in _split_records(out).values() for r in recs][:12], two]:
        im = load_rgb(out / r["image"])
        assert cached(r, image=im) == validate_record_for_processor(r, processor, image=im, model_config=config)
    assert cached.cache  # the cached length identity held for every size seen

    short = validate_record_for_processor(rec, processor, image=image, model_config=config, max_length=100)
    assert not short.ok and "cut image tokens" in short.reason
    tight = validate_record_for_processor(
        rec, processor, image=image, model_config=config, max_length=good.n_tokens - 1
    )
    assert not tight.ok and "cut the answer" in tight.reason


def test_export_with_processor_reports_and_skips_failing_records(base: dict, tiny_llava, tmp_path: Path):
    folder, processor, config = tiny_llava
    engine = _clone(base["db"], tmp_path / "db.sqlite")
    with Session(engine) as s:
        rows, _ = collect_reviewed_rows(s, VOCAB)
    probe = RecordValidator(processor, model_config=config)
    blank = Image.new("RGB", (224, 224))
    lengths = sorted(probe(build_record(r, "x.jpg", traits=TRAITS), image=blank).n_tokens for r in rows)
    limit = lengths[len(lengths) // 2]  # about half the records are too long
    summary = export_dataset(
        engine, tmp_path / "out", processor=folder, max_length=limit, vocabulary=VOCAB, image_size=224, cap_per_breed=8
    )
    too_long = [why for _, why in summary.failed]
    assert too_long and all("exceed max_length" in why for why in too_long)
    written = [r for recs in _split_records(tmp_path / "out").values() for r in recs]
    capped = sum(min(8, n) for n in Counter(r.label for r in rows).values())
    assert len(written) == summary.n_photos == capped - len(too_long)
    again = RecordValidator(processor, model_config=config, max_length=limit)
    assert all(again(r, images_root=tmp_path / "out").ok for r in written)
    jpgs = sum(1 for s in SPLITS for _ in (tmp_path / "out" / s).glob("*.jpg"))
    assert jpgs == summary.n_photos  # failing records' images are not left behind

    bad = _wrong_count_processor(processor)
    n_before = len(_assignments(engine))
    with pytest.raises(ProcessorMismatchError):
        export_dataset(engine, tmp_path / "bad", processor=bad, model_config=config)
    assert not (tmp_path / "bad").exists() and len(_assignments(engine)) == n_before


def _wrong_count_processor(processor):
    """The same llava processor with ``num_additional_image_tokens=0`` (255 tokens, not 256)."""
    from transformers import LlavaProcessor

    return LlavaProcessor(
        image_processor=processor.image_processor,
        tokenizer=processor.tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=0,
        chat_template=processor.chat_template,
    )


# --------------------------------------------------------------------------------------------
# Import back, datasets loading
# --------------------------------------------------------------------------------------------


def test_round_trip_through_import_llava_jsonl(first: dict, tmp_path: Path):
    out = first["out"]
    engine = make_engine(f"sqlite:///{tmp_path / 'fresh.db'}")
    exported = {r["id"]: r for recs in _split_records(out).values() for r in recs}
    total = 0
    for s in SPLITS:
        res = import_llava_jsonl(engine, out / "llava" / f"{s}.jsonl", out)
        assert res.errors == [] and res.labels_recorded == res.images_added == len(_split_records(out)[s])
        total += res.labels_recorded
    assert total == len(exported)
    with Session(engine) as s:
        latest = current_reviews(s)
        labels = {Path(img.path).stem: (img, latest[img.id]) for img in s.exec(select(ImageRecord))}
    assert set(labels) == set(exported)
    for rid, (img, rev) in labels.items():
        assert rev.label == exported[rid]["metadata"]["breed"] and rev.annotator == "import" and rev.source == "import"
        assert img.width and img.error is None
    again = import_llava_jsonl(engine, out / "llava" / "train.jsonl", out)
    assert again.labels_recorded == 0 and again.unchanged == again.read

    reexport = export_dataset(engine, tmp_path / "re", vocabulary=VOCAB)
    back = {r["metadata"]["sha256"]: r for recs in _split_records(tmp_path / "re").values() for r in recs}
    with Session(engine) as s:
        by_sha = {img.sha256: Path(img.path).stem for img in s.exec(select(ImageRecord))}
    for sha, r in back.items():
        orig = exported[by_sha[sha]]["metadata"]
        assert r["metadata"]["breed"] == orig["breed"]
        if orig["review"] in ("confirmed", "corrected"):  # the model snapshot travelled along
            assert r["metadata"]["review"] == orig["review"] and r["metadata"]["confidence_target"] == 1.0
            assert r["metadata"]["predictions_at_review"] == orig["predictions_at_review"]
    assert reexport.n_photos == len(exported)

    bad = tmp_path / "bad.jsonl"
    good_line = (out / "llava" / "test.jsonl").read_text(encoding="utf-8").splitlines()[0]
    escaped = json.loads(good_line) | {"image": "../../etc/passwd"}
    unknown = json.loads(good_line)
    unknown["metadata"]["breed"] = "Savannah"
    bad.write_text(
        "\n".join(["{not json", json.dumps(escaped), json.dumps(unknown), good_line]) + "\n", encoding="utf-8"
    )
    res = import_llava_jsonl(make_engine(f"sqlite:///{tmp_path / 'other.db'}"), bad, out)
    assert [n for n, _ in res.errors] == [1, 2, 3] and res.labels_recorded == 1
    assert "must be relative" in res.errors[1][1] and "Savannah" in res.errors[2][1]


def test_export_loads_with_datasets_imagefolder(first: dict, tmp_path: Path):
    import datasets

    out, summary = first["out"], first["summary"]
    ds = datasets.load_dataset("imagefolder", data_dir=str(out), cache_dir=str(tmp_path / "hf"))
    assert {s: ds[s].num_rows for s in SPLITS} == summary.rows_per_split
    assert {"image", "breed", "id", "confidence_target", "review"} <= set(ds["train"].features)
    row = ds["validation"][0]
    with Image.open(out / "validation" / f"{row['id']}.jpg") as im:
        assert row["image"].size == im.size
    assert Counter(ds["test"]["breed"]) == Counter(summary.counts["test"])
    via_card = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "hf2"))
    assert via_card["train"].num_rows == summary.rows_per_split["train"]


def test_a_tiny_collection_with_an_empty_split_still_loads(cats_dir: Path, tmp_path: Path):
    import datasets

    photos = tmp_path / "photos" / "Bombay"
    photos.mkdir(parents=True)
    for p in sorted((cats_dir / "Bombay").glob("*.jpg"))[:3]:
        shutil.copy(p, photos / p.name)
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    assert import_folder(engine, photos.parent, vocabulary=VOCAB, labels_from_folders=True).labels_recorded == 3
    s = export_dataset(engine, tmp_path / "out", vocabulary=VOCAB)
    assert s.rows_per_split == {"train": 3, "validation": 0, "test": 0}
    assert not (tmp_path / "out" / "test").exists() and (tmp_path / "out" / "llava" / "test.jsonl").read_text() == ""
    for kw in ({"path": "imagefolder", "data_dir": str(tmp_path / "out")}, {"path": str(tmp_path / "out")}):
        ds = datasets.load_dataset(**kw, cache_dir=str(tmp_path / "hf"))
        assert list(ds) == ["train"] and ds["train"].num_rows == 3


def test_imported_and_reviewed_labels_mixed_keep_one_schema_in_every_split(cats_dir: Path, tmp_path: Path):
    """Imported labels (source "import", no model snapshot) next to UI reviews (with one), arranged
    so that validation and test hold imported photos only: every metadata.jsonl column has one
    JSON type in every split, never null -- otherwise a split whose rows are all null gets a
    null-typed column and datasets refuses the export ("Metadata files ... have different
    features"). Both ways of loading it work."""
    import datasets

    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    with Session(engine) as s:
        for folder, n, how in (("Bombay", 10, "import"), ("Siamese", 2, "ui")):
            label = VOCAB.canonical(folder)
            for path in sorted((cats_dir / folder).glob("*.jpg"))[:n]:
                img = load_rgb(path)
                row = ImageRecord(
                    sha256=sha256_file(path),
                    path=str(path),
                    size=path.stat().st_size,
                    width=img.width,
                    height=img.height,
                )
                s.add(row)
                s.commit()
                s.refresh(row)
                if how == "import":
                    record_review(s, row.id, label, "import", vocabulary=VOCAB, source="import")
                else:
                    record_review(
                        s, row.id, label, "alice", vocabulary=VOCAB, model_snapshot=_snapshot(label, "Ocicat")
                    )
    out = tmp_path / "out"
    summary = export_dataset(engine, out, vocabulary=VOCAB, image_size=64)
    # 10 Bombay -> 8/1/1, 2 Siamese -> 2/0/0: validation and test are imported photos only
    assert summary.counts == {"train": {"Bombay": 8, "Siamese": 2}, "validation": {"Bombay": 1}, "test": {"Bombay": 1}}

    meta = {s: [r for _, r in read_jsonl(out / s / "metadata.jsonl")] for s in SPLITS}
    columns = set(meta["train"][0])
    types: dict[str, set[type]] = defaultdict(set)
    for s in SPLITS:
        for r in meta[s]:
            assert set(r) == columns, s
            for k, v in r.items():
                types[k].add(type(v))
    assert all(len(t) == 1 and type(None) not in t for t in types.values()), dict(types)
    assert {k: next(iter(t)) for k, t in types.items()} == {"file_name": str, **METADATA_COLUMNS}
    assert {r["predicted_at_review"] for r in meta["train"]} == {"", "Ocicat"}
    assert {r["review"] for s in ("validation", "test") for r in meta[s]} == {"imported"}
    assert {r["predicted_at_review"] for s in ("validation", "test") for r in meta[s]} == {""}

    for i, kw in enumerate(({"path": "imagefolder", "data_dir": str(out)}, {"path": str(out)})):
        ds = datasets.load_dataset(**kw, cache_dir=str(tmp_path / f"hf{i}"))
        assert {s: ds[s].num_rows for s in ds} == summary.rows_per_split
        assert ds["validation"].features == ds["train"].features == ds["test"].features
        features = ds["train"].features
        assert (
            features["predicted_at_review"].dtype == features["kind"].dtype == features["annotator"].dtype == "string"
        )
        assert features["confidence_target"].dtype == "float64"
        assert sorted(set(ds["train"]["predicted_at_review"])) == ["", "Ocicat"]
        assert ds["test"][0]["confidence_target"] == 0.8 and ds["test"][0]["review"] == "imported"


def test_import_llava_command_seeds_a_new_database(first: dict, tmp_path: Path, capsys):
    """``python -m catreview import-llava`` records every record of a split as an import review."""
    from catreview.cli import main as cli

    out = first["out"]
    records = _split_records(out)["validation"]
    url = f"sqlite:///{tmp_path / 'seeded.db'}"
    assert (
        cli.main(["import-llava", str(out / "llava" / "validation.jsonl"), "--images-root", str(out), "--db", url]) == 0
    )
    with Session(make_engine(url)) as s:
        latest = current_reviews(s)
        by_id = {Path(img.path).stem: latest[img.id].label for img in s.exec(select(ImageRecord))}
    assert by_id == {r["id"]: r["metadata"]["breed"] for r in records}  # the exported (resized) photos, by record id
    missing = cli.main(["import-llava", str(tmp_path / "absent.jsonl"), "--images-root", str(out), "--db", url])
    assert missing == 2 and "LLaVA JSONL file not found" in capsys.readouterr().err
    not_records = tmp_path / "not-records.jsonl"
    not_records.write_text('{"id": 1}\n', encoding="utf-8")
    assert cli.main(["import-llava", str(not_records), "--images-root", str(out), "--db", url]) == 1
    assert "1 errors" in capsys.readouterr().out
