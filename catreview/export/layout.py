"""The files of an export folder besides the images, written as the photos arrive: per-split
``metadata.jsonl`` (imagefolder), ``llava/``, ``messages/`` (TRL) and ``llamafactory/`` JSONL,
``dataset_info.json`` (LLaMA-Factory registration) and ``manifest.csv``.

:class:`ExportWriter` appends each record to its split's files at once (records arrive in id
order, so every file is in id order), and keeps nothing per record in memory. What needs the whole
export first goes through spool files under ``.spool/`` of the folder being built, removed by
:meth:`ExportWriter.finish`: ``manifest.csv`` (ordered by split, then id, with each photo's copy
count) and, with oversampling, the train records, each followed by its copies.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import IO, Any

from catreview.export.conversations import metadata_row, to_messages
from catreview.export.rows import ReviewedRow
from catreview.export.splits import SPLITS
from catreview.files import jsonl_line, read_jsonl

#: ``make_copy(row, image, k)``: the k-th oversampled copy's record of a photo (k >= 1).
CopyMaker = Callable[[ReviewedRow, str, int], dict[str, Any]]
MANIFEST_COLUMNS = (
    "id", "split", "file", "breed", "kind", "review", "confidence_target", "annotator", "sha256", "width", "height",
    "source", "copies",
)  # fmt: skip
"""Columns of ``manifest.csv``. ``source`` is the label's review source: ``ui`` (and other human
sources), ``import`` (an imported label), ``consensus`` (the overlap round's annotators agreed) or
``adjudication`` (a reviewer decided a disputed overlap photo)."""


class ExportWriter:
    """Streams the record files of an export being built in ``tmp``.

    Args:
        tmp: the export folder being built; ``tmp/<split>/`` exists for every split (an empty
            one is removed by :meth:`finish`).
        spool_train: hold train records back (in a spool file) until :meth:`finish`, which writes
            each one followed by its oversampled copies.

    Use :meth:`add` per exported photo, in id order, then :meth:`finish` once; :meth:`close`
    (also done by :meth:`finish`) closes the files after an error.
    """

    def __init__(self, tmp: Path, *, spool_train: bool = False) -> None:
        self.tmp = tmp
        self.spool = tmp / ".spool"
        self.spool.mkdir()
        self.spool_train = spool_train
        self.rows_per_split = dict.fromkeys(SPLITS, 0)
        self._files: dict[tuple[str, str], IO[bytes]] = {}
        for s in SPLITS:
            if not (spool_train and s == "train"):
                self._open_record_files(s)
            self._open(("manifest", s), self.spool / f"manifest-{s}.jsonl")
        if spool_train:
            self._open(("spool", "train"), self.spool / "train.jsonl")

    def _open_record_files(self, split: str) -> None:
        for folder in ("llava", "messages", "llamafactory"):
            self._open((folder, split), self.tmp / folder / f"{split}.jsonl")

    def _open(self, key: tuple[str, str], path: Path) -> IO[bytes]:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = self._files[key] = open(path, "wb", buffering=1 << 20)  # noqa: SIM115  # closed by close()
        return f

    def _write_record(self, split: str, record: dict[str, Any]) -> None:
        key = ("metadata", split)
        f = self._files.get(key) or self._open(key, self.tmp / split / "metadata.jsonl")
        f.write(jsonl_line(metadata_row(record, Path(record["image"]).name)))
        self._files[("llava", split)].write(jsonl_line(record))
        self._files[("messages", split)].write(jsonl_line(to_messages(record, "trl")))
        self._files[("llamafactory", split)].write(jsonl_line(to_messages(record, "llamafactory")))
        self.rows_per_split[split] += 1

    def add(self, record: dict[str, Any], split: str, size: tuple[int, int], row: ReviewedRow) -> None:
        """One exported photo: its ``record`` (JSON form), ``split``, image ``size`` (W, H px) and
        ``row`` (kept in the spool for its copies when train records are spooled)."""
        m = record["metadata"]
        manifest = [
            record["id"], split, record["image"], m["breed"], m["kind"] or "", m["review"], m["confidence_target"],
            m["annotator"], m["sha256"], size[0], size[1], m["source"],
        ]  # fmt: skip
        self._files[("manifest", split)].write(jsonl_line(manifest))
        if self.spool_train and split == "train":
            self._files[("spool", "train")].write(jsonl_line([record, dataclasses.asdict(row)]))
        else:
            self._write_record(split, record)

    def finish(self, copies: Mapping[str, int], make_copy: CopyMaker) -> dict[str, int]:
        """Write the spooled train records with their copies (``copies``: sha256 -> extra copies),
        ``manifest.csv`` and ``dataset_info.json``; remove the spool and empty split folders.
        Returns the records per split, copies included."""
        if self.spool_train:
            self._files.pop(("spool", "train")).close()
            self._open_record_files("train")
            for _, (record, row_fields) in read_jsonl(self.spool / "train.jsonl"):
                self._write_record("train", record)
                n = copies.get(record["metadata"]["sha256"], 0)
                if n:
                    row = ReviewedRow(**row_fields)
                    for k in range(1, n + 1):
                        self._write_record("train", make_copy(row, record["image"], k))
        self.close()
        for s in SPLITS:
            if not self.rows_per_split[s]:  # an empty split folder makes imagefolder fail ("corresponds to no data")
                (self.tmp / s).rmdir()
        with open(self.tmp / "manifest.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(MANIFEST_COLUMNS)
            for s in SPLITS:
                for _, values in read_jsonl(self.spool / f"manifest-{s}.jsonl"):
                    w.writerow([*values, 1 + copies.get(values[8], 0)])
        (self.tmp / "dataset_info.json").write_text(json.dumps(_llamafactory_info(), indent=2) + "\n", encoding="utf-8")
        shutil.rmtree(self.spool)
        return dict(self.rows_per_split)

    def close(self) -> None:
        """Close every open file (safe to call twice)."""
        for f in self._files.values():
            f.close()


def _llamafactory_info() -> dict[str, Any]:
    """``dataset_info.json``: one LLaMA-Factory sharegpt dataset per split."""
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    return {
        f"catreview_{s}": {
            "file_name": f"llamafactory/{s}.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": tags,
        }
        for s in SPLITS
    }


__all__ = ["MANIFEST_COLUMNS", "CopyMaker", "ExportWriter"]
