"""The dataset card (``README.md``) of an export: a YAML header ``datasets`` reads, and the
export's numbers for people. Its text is data of the export (hashed out of the content hash,
see :data:`catreview.export.info.UNHASHED_FILES`), not UI text."""

from __future__ import annotations

from typing import Any

from catreview.export.splits import SPLITS


def dataset_card(info: dict[str, Any]) -> str:
    """The card for an ``export.json`` content ``info`` (with ``version``)."""
    counts: dict[str, dict[str, int]] = info["counts"]
    breeds = sorted({b for c in counts.values() for b in c})
    table = ["| Breed | train | validation | test | total |", "|---|---:|---:|---:|---:|"]
    for b in breeds:
        n = [counts[s].get(b, 0) for s in SPLITS]
        table.append(f"| {b} | {n[0]} | {n[1]} | {n[2]} | {sum(n)} |")
    tot = [sum(counts[s].values()) for s in SPLITS]
    table.append(f"| **all** | {tot[0]} | {tot[1]} | {tot[2]} | {sum(tot)} |")
    rows = info["rows_per_split"]
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(info["skipped"].items())) or "none"
    yaml = "\n".join(
        [
            "---",
            "pretty_name: catreview cat breeds",
            "task_categories:",
            "- image-classification",
            "- visual-question-answering",
            "configs:",
            "- config_name: default",
            "  data_files:",
        ]
        + [f"  - split: {s}\n    path: {s}/*" for s in SPLITS if info["rows_per_split"][s]]
        + ["---"]
    )
    o = info["options"]
    return f"""{yaml}
# catreview dataset, export version {info["version"]}

Reviewed cat photos exported by catreview on {info["created_at"]}.

- Source database: `{info["source_db"]}`
- Content hash (sha256 over every file except README.md and export.json): `{info["content_hash"]}`
- Seed {o["seed"]}; image size {o["image_size"]} (shortest side, never enlarged);
  cap per breed: {o["cap_per_breed"]}; oversampled train: {o["oversample_train"]}; resplit: {o["resplit"]}
- Photos: {info["n_photos"]}; records per split (with oversampled copies):
  train {rows["train"]}, validation {rows["validation"]}, test {rows["test"]}
- Reviewed photos left out: {skipped}; failed: {len(info["failed"])}

## Photos per breed and split

{chr(10).join(table)}

## Files

- `{{train,validation,test}}/<id>.jpg` + `metadata.jsonl`:
  `datasets.load_dataset("imagefolder", data_dir=...)` (columns `image`, `id`, `breed`, `kind`,
  `confidence_target`, `review`, `annotator`, `sha256`, `predicted_at_review`; a missing text value is
  an empty string, never null: `predicted_at_review` is "" for imported labels, which had no model prediction).
- `llava/<split>.jsonl`: LLaVA `conversations` records (`<image>` once, at the start of the first
  human turn); this folder is the image folder.
- `messages/<split>.jsonl`: TRL `messages` (typed content) + `images`;
  `llamafactory/<split>.jsonl` + `dataset_info.json`: LLaMA-Factory sharegpt.
- `manifest.csv`: one row per photo, with its label's `source` (`adjudication`: a reviewer decided between
  disagreeing annotators; `consensus`: the overlap round's annotators agreed; `import`; `ui`);
  `export.json`: machine-readable summary of this version.

Ids are the first 16 hex digits of the photo's sha256 (oversampled copies add `-o<k>`), stable across exports.
Each photo content is in exactly one split, and keeps it across exports unless an export is made with resplit.

`confidence_target` is 1.0 for labels a person decided in catreview (`review` = confirmed / corrected / labelled)
and {o["imported_confidence"]} for labels imported from a labelled collection and never reviewed (`review` = imported).

Some classes are coat colours or patterns (Calico, Tabby, Tortoiseshell, Tuxedo...) or random-bred types
(Domestic Short/Medium/Long Hair), not breeds; their answers say so.
"""


__all__ = ["dataset_card"]
