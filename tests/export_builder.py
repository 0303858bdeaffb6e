"""A minimal export folder for tests and benchmarks: photos copied as they are, one record each.

The real exporter (:func:`catreview.export.dataset.export_dataset`) reads the database, resizes
and records much more; this writes only what :func:`training.data.read_export` needs, in the
same layout, through the same record contract (:class:`catreview.export.records.ConversationRecord`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from catreview.export.records import IMAGE_TOKEN, ConversationRecord, RecordMetadata, Turn
from catreview.models.vlm import prompts
from training.data import SPLITS


def write_export(
    rows: Sequence[tuple[str | Path, str, str]], out_dir: str | Path, *, content_hash: str | None = None
) -> Path:
    """Write ``rows`` = ``(photo path, canonical breed, split)`` as an export folder in the layout
    of the module docstring (photos are copied as they are; the real exporter
    :func:`catreview.export.dataset.export_dataset` also resizes and records more metadata).

    ``content_hash`` defaults to the sha256 of the photos' bytes, breeds and splits.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    out = Path(out_dir)
    (out / "llava").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[str]] = {s: [] for s in SPLITS}
    h = hashlib.sha256()
    for path, breed, split in rows:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; use one of {SPLITS}")
        data = Path(path).read_bytes()
        rid = hashlib.sha256(data).hexdigest()[:16]
        h.update(f"{rid}/{breed}/{split};".encode())
        rel = f"{split}/{rid}.jpg"
        (out / split).mkdir(exist_ok=True)
        shutil.copyfile(path, out / rel)
        name = prompts.display_name(breed)
        article = "an" if name[:1].lower() in "aeiou" else "a"
        rec = ConversationRecord(
            id=rid,
            image=rel,
            conversations=[
                Turn(from_="human", value=f"{IMAGE_TOKEN}\nWhat cat breed is this?"),
                Turn(from_="gpt", value=f"This is {article} {name} cat."),
            ],
            metadata=RecordMetadata(breed=breed),
        )
        lines[split].append(json.dumps(rec.to_json(), ensure_ascii=False))
    for split, recs in lines.items():
        (out / "llava" / f"{split}.jsonl").write_text("".join(r + "\n" for r in recs), encoding="utf-8")
    (out / "export.json").write_text(json.dumps({"content_hash": content_hash or h.hexdigest()}), encoding="utf-8")
    return out
