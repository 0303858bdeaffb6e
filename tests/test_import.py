"""Folder imports at scale: the process pool, batches of one transaction each, parallel imports
from many processes, a kill in the middle of a batch, unreadable files and folders.

Real photos (the shared cats, copied or linked into ``tmp_path``), the real CLI in subprocesses,
both databases where the database matters (``db_url``: SQLite, then a throwaway PostgreSQL).
Unreadable files are made unreadable for real: as root (where ``chmod 000`` does not stop reads)
the CLI runs under ``setpriv`` without the two capabilities that let root ignore permissions.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, func, select

from catreview.data import counts
from catreview.data.db import ImageRecord, Review, make_engine
from catreview.data.images import scan_file
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.data.reviews import record_review
from tests.test_postgres import assert_unbroken_chain

VOCAB = BreedVocabulary.default()
REPO_ROOT = Path(__file__).resolve().parents[1]
BREEDS = ["Abyssinian", "Bengal", "Birman", "Bombay", "Persian", "Siamese"]


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    try:
        yield eng
    finally:
        eng.dispose()


def make_tree(root: Path, cats_dir: Path, per_breed: int, *, breeds: list[str] = BREEDS) -> dict[str, int]:
    """Copy ``per_breed`` shared photos of each breed into ``root/<Breed>/``, plus a file that is
    not an image and a copy of the first photo under another name (same folder, same label).
    Returns ``{"files", "photos", "contents"}``: files found, decodable contents, distinct contents."""
    for breed in breeds:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:per_breed]:
            shutil.copy(p, root / breed / p.name)
    first = sorted((root / breeds[0]).glob("*.jpg"))[0]
    shutil.copy(first, root / breeds[0] / "zz_copy.jpg")
    (root / breeds[-1] / "broken.jpg").write_bytes(b"not a jpeg at all")
    n = len(breeds) * per_breed
    return {"files": n + 2, "photos": n, "contents": n + 1}


def stored(engine: Engine) -> dict[str, tuple]:
    """``{file name: (sha256, size, width, height, error)}`` of every image row."""
    with Session(engine) as s:
        return {Path(r.path).name: (r.sha256, r.size, r.width, r.height, r.error) for r in s.exec(select(ImageRecord))}


def check_consistent(engine: Engine) -> Counter:
    """Running totals equal a recount, every chain is unbroken; returns reviews per image id."""
    with Session(engine) as s:
        assert counts.totals(s) == counts.recount(s)
        per_image = Counter(s.exec(select(Review.image_id)).all())
        for image_id in per_image:
            assert_unbroken_chain(s, image_id)
    return per_image


# ---------------------------------------------------------------------- the worker's record
def test_scan_file_reads_hashes_decodes_and_names_what_is_wrong(tmp_path: Path, cats_dir: Path) -> None:
    photo = sorted((cats_dir / "Bengal").glob("*.jpg"))[0]
    good = scan_file(str(photo))
    with Image.open(photo) as img:
        assert (good.width, good.height) == img.size and good.error is None and good.read_error is None
    assert good.size == photo.stat().st_size and len(good.sha256 or "") == 64

    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (tmp_path / "empty.png").write_bytes(b"")
    os.symlink(tmp_path / "gone.jpg", tmp_path / "link.jpg")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it for reading would block without O_NONBLOCK
    (tmp_path / "dir.jpg").mkdir()
    broken = scan_file(str(tmp_path / "broken.jpg"))
    assert broken.sha256 and broken.read_error is None and "not a readable image" in (broken.error or "")
    assert "empty file" in (scan_file(str(tmp_path / "empty.png")).error or "")
    assert "broken symbolic link" in (scan_file(str(tmp_path / "link.jpg")).read_error or "")
    assert "named pipe" in (scan_file(str(tmp_path / "pipe.jpg")).read_error or "")
    assert "disappeared" in (scan_file(str(tmp_path / "never-there.jpg")).read_error or "")
    assert "folder" in (scan_file(str(tmp_path / "dir.jpg")).read_error or "")
    for unread in ("link.jpg", "pipe.jpg", "never-there.jpg"):  # no hash, no size: no row can be made of it
        scan = scan_file(str(tmp_path / unread))
        assert (scan.sha256, scan.size, scan.width, scan.height, scan.error) == (None,) * 5


# ---------------------------------------------------------------------- pool, batches, idempotence
def test_pool_import_in_batches_equals_inline_and_reimport_changes_nothing(
    engine: Engine, tmp_path: Path, cats_dir: Path
) -> None:
    root = tmp_path / "photos"
    n = make_tree(root, cats_dir, per_breed=5)
    calls: list[tuple[int, int]] = []
    pooled = import_folder(
        engine,
        root,
        vocabulary=VOCAB,
        labels_from_folders=True,
        workers=2,
        batch_size=5,  # zz_copy.jpg (6th file) is in the batch after its original's
        progress=lambda d, t: calls.append((d, t)),
    )
    total = n["files"]
    assert calls == [(0, total)] + [(min(d, total), total) for d in range(5, total + 5, 5)]
    assert (pooled.scanned, pooled.added, pooled.added_unreadable) == (total, n["contents"], 1)
    assert [Path(p).name for p, _ in pooled.duplicates] == ["zz_copy.jpg"]
    assert [Path(p).name for p, _ in pooled.failed] == ["broken.jpg"] and pooled.not_stored == 0
    assert pooled.labels_recorded == n["photos"] and pooled.labels_unchanged == 1  # the copy
    assert len(pooled.image_ids) == n["photos"] == len(set(pooled.image_ids))

    inline_engine = make_engine(f"sqlite:///{tmp_path / 'inline.db'}")
    inline = import_folder(inline_engine, root, vocabulary=VOCAB, labels_from_folders=True, workers=1)
    assert stored(inline_engine) == stored(engine)  # the same rows, pool or not
    assert inline.lines() == pooled.lines()

    per_image = check_consistent(engine)
    assert len(per_image) == n["photos"] and set(per_image.values()) == {1}
    with Session(engine) as s:
        ids = list(s.exec(select(ImageRecord.id).order_by(col(ImageRecord.id))))
        names = [Path(s.get(ImageRecord, i).path).relative_to(root).as_posix() for i in ids]
    assert names == sorted(names)  # ids follow the folder order (the review order)

    again = import_folder(engine, root, vocabulary=VOCAB, labels_from_folders=True, workers=2, batch_size=4)
    assert (again.added, again.already_present, again.labels_recorded) == (0, n["contents"], 0)
    assert again.labels_unchanged == n["photos"] + 1 and len(again.duplicates) == 1
    assert check_consistent(engine) == per_image


def test_labels_one_per_photo_per_import_and_a_persons_review_is_kept(
    engine: Engine, tmp_path: Path, cats_dir: Path
) -> None:
    root = tmp_path / "photos"
    make_tree(root, cats_dir, per_breed=3, breeds=["Bengal", "Persian"])
    shutil.copy(sorted((root / "Bengal").glob("*.jpg"))[1], root / "Persian" / "same_as_a_bengal.jpg")
    (root / "Not_A_Breed").mkdir()
    shutil.copy(sorted((cats_dir / "Birman").glob("*.jpg"))[0], root / "Not_A_Breed" / "x.jpg")
    first = import_folder(engine, root, vocabulary=VOCAB, labels_from_folders=True, batch_size=2)
    assert [p for p, _ in first.label_conflicts] == ["Persian/same_as_a_bengal.jpg"]
    assert "'Persian', but its copy Bengal/" in first.label_conflicts[0][1]
    assert first.unknown_labels == [("Not_A_Breed/x.jpg", "Not_A_Breed")]
    assert first.labels_recorded == 6 and "conflicting label" in "\n".join(first.lines())

    bengals = sorted((root / "Bengal").glob("*.jpg"))  # 3 photos, then zz_copy.jpg (a copy of the first)
    with Session(engine) as s:  # a person relabels one photo; the CSV relabels another (an import label changed)
        bengal_id = s.exec(select(ImageRecord.id).where(ImageRecord.path == str(bengals[0]))).one()
        record_review(s, bengal_id, "Bombay", "carol", vocabulary=VOCAB)
    csv = tmp_path / "labels.csv"
    rows = [f"Persian/{p.name},Himalayan" for p in sorted((root / "Persian").glob("*.jpg"))[:1]]
    rows += [f"Bengal/{p.name},Bengal" for p in bengals]
    rows += ["Bengal/missing.jpg,Bengal", rows[-1]]
    csv.write_text("path,breed\n" + "\n".join(rows) + "\n")
    again = import_folder(engine, root, vocabulary=VOCAB, labels_csv=csv, workers=2, batch_size=3)
    assert (again.labels_recorded, again.labels_unchanged, again.labels_kept_human) == (1, 2, 2)  # carol's + copy
    assert again.missing_files == ["Bengal/missing.jpg"] and len(again.duplicate_label_rows) == 1
    per_image = check_consistent(engine)
    assert sorted(per_image.values()) == [1] * 4 + [2, 2]  # carol's review and the Himalayan relabel
    with Session(engine) as s:
        assert s.get(ImageRecord, bengal_id).current_label == "Bombay"


def test_pool_workers_use_the_parents_decoder_limits(tmp_path: Path, cats_dir: Path, monkeypatch) -> None:
    import catreview.data.images as images

    root = tmp_path / "photos"
    make_tree(root, cats_dir, per_breed=2, breeds=["Persian", "Sphynx"])
    Image.new("1", (9000, 9000)).save(root / "Persian" / "big.png")  # 81 MP: refused by default
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    first = import_folder(engine, root, vocabulary=VOCAB, workers=2)
    assert sorted(Path(p).name for p, _ in first.failed) == ["big.png", "broken.jpg"]
    monkeypatch.setattr(images, "MAX_PIXELS", 100_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000_000)
    again = import_folder(engine, root, vocabulary=VOCAB, workers=2, labels_from_folders=True)
    assert again.recovered == ["Persian/big.png"] and [Path(p).name for p, _ in again.failed] == ["broken.jpg"]
    assert stored(engine)["big.png"][2:] == (9000, 9000, None)
    check_consistent(engine)


# ---------------------------------------------------------------------- many processes, kills
def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "catreview", *args],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_eight_parallel_cli_imports_store_each_photo_and_label_once(
    db_url: str, tmp_path: Path, cats_dir: Path
) -> None:
    root = tmp_path / "photos"
    for photo in sorted(cats_dir.glob("*/*.jpg")):  # all shared photos, linked
        (root / photo.parent.name).mkdir(parents=True, exist_ok=True)
        os.symlink(photo, root / photo.parent.name / photo.name)
    (root / "Bengal" / "broken.jpg").write_bytes(b"not a jpeg")
    n_photos = len(list(cats_dir.glob("*/*.jpg")))
    make_engine(db_url).dispose()  # the schema first: creating tables is not what this test races
    flags = [
        "--labels-from-folders",
        "--db",
        db_url,
        "--batch-size",
        "16",
    ]  # small batches: many transactions interleave
    procs = [_cli("import", str(root), *flags, "--workers", str(1 + i % 2)) for i in range(8)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0 and "Traceback" not in err, err[-3000:]
    firsts = [out.splitlines()[0] for out, _ in outs]
    added = [int(line.split(": ")[1].split(" new")[0]) for line in firsts]
    assert sum(added) == n_photos + 1, firsts  # every photo (and the broken file) added by exactly one
    print(f"\nphotos added by each of the 8 imports ({db_url.split(':')[0]}): {added}")
    recorded = [int(out.split("labels recorded as reviews: ")[1].split(";")[0]) for out, _ in outs]
    assert sum(recorded) == n_photos, recorded
    engine = make_engine(db_url)
    try:
        per_image = check_consistent(engine)
        with Session(engine) as s:
            assert s.exec(select(func.count()).select_from(ImageRecord)).one() == n_photos + 1
            assert counts.totals(s) == counts.Totals(n_photos, 1, n_photos)
            assert set(s.exec(select(Review.annotator)).all()) == {"import"}
        assert len(per_image) == n_photos and set(per_image.values()) == {1}  # one import review per photo
    finally:
        engine.dispose()


KILL_SCRIPT = """
import os, signal, sys
from sqlalchemy import event
from catreview.data.db import make_engine
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary

url, root, kill_at, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
engine = make_engine(url)
seen = [0]

@event.listens_for(engine, "before_cursor_execute")
def kill_in_the_middle(conn, cursor, statement, parameters, context, executemany):
    # the batch's image rows are inserted and its photos claimed; its reviews are about to be written
    if statement.lstrip().upper().startswith("INSERT INTO REVIEWS"):
        seen[0] += 1
        if seen[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

import_folder(engine, root, vocabulary=BreedVocabulary.default(), labels_from_folders=True, workers=2, batch_size=batch)
"""


def test_a_kill_inside_a_batch_leaves_whole_batches_and_import_again_finishes(
    db_url: str, tmp_path: Path, cats_dir: Path
) -> None:
    root = tmp_path / "photos"
    for breed in BREEDS[:4]:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:5]:
            shutil.copy(p, root / breed / p.name)
    make_engine(db_url).dispose()
    proc = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, db_url, str(root), "3", "6"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    engine = make_engine(db_url)
    try:
        with Session(engine) as s:
            assert s.exec(select(func.count()).select_from(ImageRecord)).one() == 12  # batches 1 and 2, not 3
            assert s.exec(select(func.count()).select_from(Review)).one() == 12
            assert counts.totals(s) == counts.Totals(12, 0, 12)
        check_consistent(engine)
        again = import_folder(engine, root, vocabulary=VOCAB, labels_from_folders=True, batch_size=6)
        assert (again.added, again.already_present, again.labels_recorded, again.labels_unchanged) == (8, 12, 8, 12)
        per_image = check_consistent(engine)
        assert len(per_image) == 20 and set(per_image.values()) == {1}
    finally:
        engine.dispose()


# ---------------------------------------------------------------------- unreadable files and folders
def _as_unprivileged() -> list[str]:
    """A command prefix under which permission bits apply: none for a normal user; as root,
    ``setpriv`` dropping CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH (still uid 0, so the
    interpreter under /root stays reachable, but a mode-000 file is unreadable)."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("running as root without setpriv (util-linux): cannot make a file unreadable", pytrace=False)
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search", "--"]


def test_cli_reports_unreadable_files_and_folders_and_imports_the_rest(tmp_path: Path, cats_dir: Path) -> None:
    root = tmp_path / "photos"
    n = make_tree(root, cats_dir, per_breed=2, breeds=["Bengal", "Persian"])
    secret = root / "Bengal" / "secret.jpg"
    shutil.copy(sorted((cats_dir / "Bombay").glob("*.jpg"))[0], secret)
    locked = root / "Birman"
    locked.mkdir()
    shutil.copy(sorted((cats_dir / "Birman").glob("*.jpg"))[0], locked / "inside.jpg")
    os.symlink(root / "nowhere.jpg", root / "Persian" / "dangling.jpg")
    os.mkfifo(root / "Persian" / "pipe.jpg")
    secret.chmod(0o000)
    locked.chmod(0o000)
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    cmd = [sys.executable, "-m", "catreview", "import", str(root), "--labels-from-folders", "--db", db]
    try:
        proc = subprocess.run(_as_unprivileged() + cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    finally:
        secret.chmod(0o644)
        locked.chmod(0o755)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    out = proc.stdout
    assert f"scanned {n['files'] + 3} files: {n['contents']} new (1 of them unreadable)" in out
    assert "5 unreadable in all (4 of them could not be read at all and are not stored" in out
    assert "failed: Bengal/secret.jpg: permission denied" in out
    assert "failed: Birman/: folder not imported: permission denied" in out
    assert "failed: Persian/dangling.jpg: broken symbolic link" in out
    assert "failed: Persian/pipe.jpg: not a regular file (a named pipe)" in out
    assert "failed: Persian/broken.jpg: not a readable image" in out
    engine = make_engine(db)
    photos = {p.name for p in [*root.glob("Bengal/*.jpg"), *root.glob("Persian/*.jpg")] if p.is_file()}
    assert set(stored(engine)) == photos - {"secret.jpg", "zz_copy.jpg"}  # zz_copy is stored as its original
    # fixed (permissions back): importing again adds exactly what was missing
    again = import_folder(engine, root, vocabulary=VOCAB, labels_from_folders=True)
    assert again.added == 2 and again.labels_recorded == 2 and again.not_stored == 2  # the link and the pipe
    check_consistent(engine)


def test_app_job_reports_a_missing_folder_and_imports_the_next(settings, tmp_path: Path, cats_dir: Path) -> None:
    from catreview.app.core import ReviewApp

    root = tmp_path / "photos"
    n = make_tree(root, cats_dir, per_breed=1, breeds=["Bengal", "Persian"])
    os.mkfifo(root / "Bengal" / "pipe.jpg")
    app = ReviewApp(settings)
    assert app.start_background([tmp_path / "gone", root], predict=False)
    assert app.wait(timeout=600), "background job still running after 600 s"
    assert app.job.error is None, app.job.log
    log = "\n".join(app.job.log)
    assert f"import of {tmp_path / 'gone'} stopped" in log and "not a folder" in log
    assert "failed: Bengal/pipe.jpg: not a regular file" in log
    assert app.counts() == (0, n["photos"])
