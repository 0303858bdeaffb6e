"""A downloadable zip of an export folder."""

from __future__ import annotations

import os
import uuid
import zipfile
from pathlib import Path


def zip_export(out_dir: str | Path, zip_path: str | Path | None = None) -> Path:
    """Zip an export folder for download; returns the zip's path.

    Entries are ``<folder name>/<relative path>``; JPEGs are stored (already compressed), text is
    deflated. Default ``zip_path``: ``<out_dir>.zip`` next to the folder. Written to a temporary
    file and renamed, so a partial zip never appears.

    Raises:
        FileNotFoundError: ``out_dir`` is not a catreview export (no ``export.json``).
    """
    root = Path(out_dir).resolve()
    if not (root / "export.json").is_file():
        raise FileNotFoundError(f"{root} is not a catreview export (no export.json)")
    target = Path(zip_path) if zip_path else root.parent / f"{root.name}.zip"
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for p in sorted(root.rglob("*")):
                if p.is_file():
                    kind = zipfile.ZIP_STORED if p.suffix.lower() in (".jpg", ".jpeg") else zipfile.ZIP_DEFLATED
                    zf.write(p, f"{root.name}/{p.relative_to(root).as_posix()}", compress_type=kind)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


__all__ = ["zip_export"]
