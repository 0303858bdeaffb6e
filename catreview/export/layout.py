"""The files of an export folder besides the images: per-split ``metadata.jsonl`` (imagefolder),
``llava/``, ``messages/`` (TRL) and ``llamafactory/`` JSONL, ``dataset_info.json`` (LLaMA-Factory
registration) and ``manifest.csv``."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from catreview.export.conversations import metadata_row, to_messages
from catreview.export.splits import SPLITS
from catreview.files import write_jsonl


def write_files(
    tmp: Path,
    by_split: Mapping[str, list[dict[str, Any]]],
    photos: Sequence[dict[str, Any]],
    splits: Mapping[str, str],
    sizes: Mapping[str, tuple[int, int]],
    copies: Mapping[str, int],
) -> None:
    """metadata.jsonl per split, the llava/messages/llamafactory JSONL files, dataset_info.json
    (LLaMA-Factory) and manifest.csv.

    Args:
        tmp: the export folder being built; ``tmp/<split>/`` exists (an empty one is removed).
        by_split: records (JSON form) per split, oversampled copies included.
        photos: one record per exported photo (no copies).
        splits: record id -> split of ``photos``.
        sizes: record id -> exported image ``(width, height)`` px.
        copies: sha256 -> extra oversampled copies.
    """
    for s in SPLITS:
        recs = by_split[s]
        if recs:
            write_jsonl((metadata_row(r, Path(r["image"]).name) for r in recs), tmp / s / "metadata.jsonl")
        else:  # an empty split folder makes datasets' imagefolder fail ("corresponds to no data")
            (tmp / s).rmdir()
        write_jsonl(recs, tmp / "llava" / f"{s}.jsonl")
        write_jsonl((to_messages(r, "trl") for r in recs), tmp / "messages" / f"{s}.jsonl")
        write_jsonl((to_messages(r, "llamafactory") for r in recs), tmp / "llamafactory" / f"{s}.jsonl")
    tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    lf_info = {
        f"catreview_{s}": {
            "file_name": f"llamafactory/{s}.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": tags,
        }
        for s in SPLITS
    }
    (tmp / "dataset_info.json").write_text(json.dumps(lf_info, indent=2) + "\n", encoding="utf-8")
    ordered = sorted(photos, key=lambda r: (SPLITS.index(splits[r["id"]]), r["id"]))
    (tmp / "manifest.csv").write_text(_manifest_csv(ordered, splits, sizes, copies), encoding="utf-8")


def _manifest_csv(
    records: Sequence[dict[str, Any]],
    splits: Mapping[str, str],
    sizes: Mapping[str, tuple[int, int]],
    copies: Mapping[str, int],
) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(
        [
            "id",
            "split",
            "file",
            "breed",
            "kind",
            "review",
            "confidence_target",
            "annotator",
            "sha256",
            "width",
            "height",
            "copies",
        ]
    )
    for r in records:
        m = r["metadata"]
        width, height = sizes[r["id"]]
        w.writerow(
            [
                r["id"],
                splits[r["id"]],
                r["image"],
                m["breed"],
                m["kind"] or "",
                m["review"],
                m["confidence_target"],
                m["annotator"],
                m["sha256"],
                width,
                height,
                1 + copies.get(m["sha256"], 0),
            ]
        )
    return buf.getvalue()


__all__ = ["write_files"]
