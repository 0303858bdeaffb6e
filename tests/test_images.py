"""The one decoding function and the folder import on every bad-image kind, built with Pillow."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlmodel import Session, select

from catreview.data.db import ImageRecord, make_engine
from catreview.data.images import ImageDecodeError, load_rgb
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.data.reviews import record_review


def _jpeg_bytes(path: Path) -> bytes:
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path, "JPEG")
    return path.read_bytes()


def test_real_photo_decodes_to_rgb8(cats_dir: Path) -> None:
    img = load_rgb(cats_dir / "Bengal" / "Bengal_1.jpg")
    assert img.mode == "RGB" and min(img.size) > 32


def test_exif_orientation_applied(tmp_path: Path) -> None:
    # A 40x20 image, left half red, right half blue, tagged "rotate 90 CW" (orientation 6).
    arr = np.zeros((20, 40, 3), np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(arr).save(tmp_path / "rot.jpg", exif=exif.tobytes(), quality=95)
    img = load_rgb(tmp_path / "rot.jpg")
    assert img.size == (20, 40)  # width and height swapped
    top, bottom = np.asarray(img)[2, 10], np.asarray(img)[37, 10]
    assert top[0] > 200 and top[2] < 60  # red moved to the top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    "mode,value,expected",
    [
        ("L", 128, (128, 128, 128)),
        ("1", 1, (255, 255, 255)),
        ("P", None, (10, 20, 30)),
        ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
        ("RGBA", (0, 0, 0, 0), (255, 255, 255)),  # fully transparent -> white
        ("LA", (0, 128), (128, 128, 128)),  # black at half alpha over white
    ],
)
def test_modes_convert_to_rgb8(tmp_path: Path, mode: str, value, expected) -> None:
    if mode == "P":
        img = Image.new("RGB", (8, 8), (10, 20, 30)).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        img = Image.new(mode, (8, 8), value)
    ext = "tiff" if mode == "CMYK" else "png"
    img.save(tmp_path / f"x.{ext}")
    out = load_rgb(tmp_path / f"x.{ext}")
    assert out.mode == "RGB"
    assert np.allclose(np.asarray(out)[4, 4], expected, atol=2)


def test_16bit_grayscale_scaled_not_clipped(tmp_path: Path) -> None:
    arr = np.full((8, 8), 32768, np.uint16)  # mid-grey in 16 bits
    Image.fromarray(arr).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    out = np.asarray(load_rgb(tmp_path / "g16.png"))
    assert out.dtype == np.uint8 and abs(int(out[0, 0, 0]) - 128) <= 1


def _bad_files(d: Path) -> dict[str, str]:
    """Create each bad kind; returns {file name: expected words in the reason}."""
    (d / "empty.jpg").write_bytes(b"")
    full = _jpeg_bytes(d / "tmp.jpg")
    (d / "tmp.jpg").unlink()
    (d / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (d / "notes.jpg").write_text("this is not a photo")
    (d / "phone.heic").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64)
    Image.new("1", (9000, 9000)).save(d / "bomb.png")  # 81 MP, tiny file
    return {
        "empty.jpg": "empty",
        "truncated.jpg": "truncated",
        "notes.jpg": "not a readable image",
        "phone.heic": "HEIC",
        "bomb.png": "too large",
    }


def test_bad_files_raise_clear_errors(tmp_path: Path) -> None:
    for name, words in _bad_files(tmp_path).items():
        with pytest.raises(ImageDecodeError, match=words):
            load_rgb(tmp_path / name)
    with pytest.raises(ImageDecodeError, match="not found"):
        load_rgb(tmp_path / "missing.jpg")


def test_import_records_failures_and_is_idempotent(tmp_path: Path, cats_dir: Path) -> None:
    root = tmp_path / "photos"
    (root / "bad").mkdir(parents=True)
    expected = _bad_files(root / "bad")
    good = sorted((cats_dir / "Persian").glob("*.jpg"))[:3]
    (root / "Persian").mkdir()
    for p in good:
        shutil.copy(p, root / "Persian" / p.name)
    shutil.copy(good[0], root / "Persian" / "copy_of_first.jpg")  # same content, other name
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    vocab = BreedVocabulary.default()

    s1 = import_folder(engine, root, vocabulary=vocab, labels_from_folders=True)
    assert s1.scanned == 9 and s1.added == 8  # 5 bad + 3 good; the copy is the same content
    assert (s1.added_unreadable, s1.already_present) == (5, 0)
    assert s1.lines()[0] == (
        "scanned 9 files: 8 new (5 of them unreadable), 0 already in the database, "
        "1 copies of another file here; 5 unreadable in all"
    )
    assert {Path(p).name for p, _ in s1.failed} == set(expected)
    assert [Path(p).name for p, _ in s1.duplicates] == ["copy_of_first.jpg"]
    for path, reason in s1.failed:
        assert expected[Path(path).name].lower() in reason.lower()
    assert s1.labels_recorded == 3  # "bad" is not a breed: reported, not recorded
    assert len(s1.unknown_labels) == 0  # failed photos get no label row at all

    s2 = import_folder(engine, root, vocabulary=vocab, labels_from_folders=True)
    assert (
        s2.added == 0 and s2.already_present == 8 and s2.labels_recorded == 0 and s2.labels_unchanged == 4
    )  # the copy's label too
    assert len(s2.duplicates) == 1  # the copy is counted once, as a copy

    # A person's review is never overridden by a later import, and the summary says so.
    with Session(engine) as s:
        first = s.exec(select(ImageRecord).where(ImageRecord.error.is_(None)).order_by(ImageRecord.id)).first()
        record_review(s, first.id, "Himalayan", "carol", vocabulary=vocab)
    s3 = import_folder(engine, root, vocabulary=vocab, labels_from_folders=True)
    assert (s3.labels_recorded, s3.labels_unchanged, s3.labels_kept_human) == (0, 2, 2)  # first + its copy
    assert "left alone because a person reviewed the photo: 2" in "\n".join(s3.lines())
    with Session(engine) as s:
        rows = list(s.exec(select(ImageRecord)))
    assert len(rows) == 8
    assert sum(r.error is not None for r in rows) == 5
    assert all(r.width and r.height for r in rows if r.error is None)


def test_reimport_recovers_failed_photos_and_follows_moved_ones(tmp_path: Path, cats_dir: Path, monkeypatch) -> None:
    import catreview.data.images as images

    root = tmp_path / "photos"
    (root / "Persian").mkdir(parents=True)
    shutil.copy(sorted((cats_dir / "Persian").glob("*.jpg"))[0], root / "Persian" / "p.jpg")
    Image.new("1", (9000, 9000)).save(root / "Persian" / "big.png")  # 81 MP: refused by default
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    vocab = BreedVocabulary.default()
    first = import_folder(engine, root, vocabulary=vocab, labels_from_folders=True)
    assert [Path(p).name for p, _ in first.failed] == ["big.png"]

    # The decoder's limit is raised (as installing a plugin would fix HEIC): same bytes, now readable.
    monkeypatch.setattr(images, "MAX_PIXELS", 100_000_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 200_000_000)
    moved = tmp_path / "moved"
    shutil.move(root, moved)  # and the folder moved
    again = import_folder(engine, moved, vocabulary=vocab, labels_from_folders=True)
    assert again.recovered == ["Persian/big.png"] and again.moved == ["Persian/p.jpg"] and not again.failed
    assert again.labels_recorded == 1 and again.labels_unchanged == 1  # big.png gets its folder label now
    with Session(engine) as s:
        rows = {Path(r.path).name: r for r in s.exec(select(ImageRecord))}
    assert rows["big.png"].error is None and (rows["big.png"].width, rows["big.png"].height) == (9000, 9000)
    assert all(Path(r.path).parent.parent == moved for r in rows.values())
    assert "readable now" in "\n".join(again.lines()) and "new path" in "\n".join(again.lines())
