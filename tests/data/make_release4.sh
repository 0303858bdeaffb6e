#!/usr/bin/env bash
# Regenerate tests/data/release4.sql: a database made by the previous release (commit 21d1755,
# before Alembic) through that release's own code. Run from the repository root:
#     bash tests/data/make_release4.sh [SHARED_CATS_DIR]
# It needs the shared photos (default ../shared/data/cats) and the installed requirements; the
# previous release builds its demo models once under /tmp/release4/.cache (seconds).
set -euo pipefail
CATS="$(cd "${1:-../shared/data/cats}" && pwd)"
OUT="$(pwd)/tests/data/release4.sql"
rm -rf /tmp/release4 /tmp/r4photos /tmp/r4 && mkdir -p /tmp/release4 /tmp/r4
git archive 21d1755 | tar -x -C /tmp/release4
# 3 photos each of 3 breeds (labelled by folder), 1 photo at the top (no label), 1 file that is not an image
for b in Bengal Persian Siamese; do
  mkdir -p "/tmp/r4photos/$b"
  for f in $(ls "$CATS/$b"/*.jpg | sort | head -3); do ln -s "$f" "/tmp/r4photos/$b/"; done
done
ln -s "$(ls "$CATS/Birman"/*.jpg | sort | head -1)" /tmp/r4photos/
echo "not an image" > /tmp/r4photos/Bengal/broken.jpg
DB=sqlite:////tmp/r4/release4.db
cd /tmp/release4
python -m catreview import /tmp/r4photos --labels-from-folders --db "$DB"
python -m catreview predict --no-reasoning --db "$DB"
python - "$DB" <<'PY'
import sys

from sqlmodel import Session, select

from catreview.app.core import ReviewApp
from catreview.config import load_settings
from catreview.data.db import CalibrationRecord, ImageRecord, Prediction

app = ReviewApp(load_settings(database_url=sys.argv[1]))
with Session(app.engine) as s:
    ids = {i.path.rsplit("/", 1)[-1]: i.id for i in s.exec(select(ImageRecord))}
    s1 = s.exec(select(Prediction.model_version).where(Prediction.kind == "stage1")).first()
    vlm = s.exec(select(Prediction.model_version).where(Prediction.kind == "vlm")).first()
    s.add(CalibrationRecord(stage1_version=s1, vlm_version=vlm, temperature_stage1=1.4, temperature_vlm=0.9,
                            weight=0.55, n_reviews=30, temperature_fused=1.1, report_json='{"note": "fixture"}'))
    s.commit()
app.review(ids["Bengal_1.jpg"], "Maine Coon", "alice", note="ears look wrong")  # changes the import label
app.review(ids["Bengal_1.jpg"], "Bengal", "bob")  # and back: a chain of three reviews
app.review(ids["Persian_106.jpg"], "Unsure", "alice")
app.review(ids["Siamese_108.jpg"], "Not a cat", "carol")
# the top-level Birman photo stays unreviewed, Bengal/broken.jpg failed to decode
PY
python -m catreview export --out /tmp/r4/export --db "$DB"
python -m catreview predictions --json --db "$DB" > /tmp/r4/predictions.jsonl
python - /tmp/r4/release4.db "$CATS" "$OUT" <<'PY'
import sqlite3
import sys

db, cats, out = sys.argv[1:]
with sqlite3.connect(db) as conn, open(out, "w", encoding="utf-8") as f:
    f.write("-- made by tests/data/make_release4.sh (commit 21d1755's code); photo paths start with @PHOTOS@\n")
    for line in conn.iterdump():
        f.write(line.replace("/tmp/r4photos", "@PHOTOS@").replace(cats, "@PHOTOS@") + "\n")
PY
wc -c "$OUT"
