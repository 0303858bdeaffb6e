"""Cold start on the real offline models, checked in a real browser: a labelled folder is imported,
the built-in stage 1 (ImageNet EfficientNet-Lite2) gets its first breed head from those labels in
the background, and an unlabelled Siamese photo it never saw shows Siamese in its top-3."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlmodel import Session, col, func, select

from catreview.app.core import ReviewApp
from catreview.app.ui import build_ui
from catreview.config import load_settings
from catreview.data.db import ImageRecord, Prediction
from tests.conftest import ARTIFACTS_DIR
from tests.test_browser import browser  # noqa: F401  (the module's Chromium fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]

PER_BREED = 10


def test_untrained_stage1_then_siamese_in_top3_after_cold_start(cats_dir: Path, tmp_path: Path, browser) -> None:
    root = tmp_path / "photos"
    breeds = sorted(d.name for d in cats_dir.iterdir() if d.is_dir())
    unseen = sorted((cats_dir / "Siamese").glob("*.jpg"))[-1]  # left out of the labelled photos
    labelled = 0
    for breed in breeds:
        (root / breed).mkdir(parents=True)
        for p in [p for p in sorted((cats_dir / breed).glob("*.jpg")) if p != unseen][:PER_BREED]:
            shutil.copy(p, root / breed / p.name)
            labelled += 1
    shutil.copy(unseen, root / "unlabelled-siamese.jpg")  # top level: no folder name, so no label
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'cold.db'}",
        data_dir=tmp_path / "data",
        builtin_models="pretrained",
        first_vlm_round=False,  # the VLM round (minutes of CPU) is not what this test checks
    )
    app = ReviewApp(settings)
    assert app.registry.stage1_untrained_reason() is not None  # nothing trained before the labels arrive
    app.start_background([root], labels_from_folders=True)
    assert app.wait(timeout=1200), "cold start (import, stage-1 head, predictions) still running after 1200 s"
    assert app.job.error is None, app.job.log
    assert app.registry.stage1_untrained_reason() is None, app.job.log
    with Session(app.engine) as s:
        photo = s.exec(select(ImageRecord).where(col(ImageRecord.path).endswith("unlabelled-siamese.jpg"))).one()
        assert photo.current_review_id is None
        n_stage1 = s.exec(select(func.count()).select_from(Prediction).where(Prediction.kind == "stage1")).one()
    assert n_stage1 == labelled + 1
    demo = build_ui(app)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)  # opens on the first unverified photo (imported labels are unverified too)
        jump = page.locator("#jump textarea, #jump input").first
        jump.wait_for(timeout=60000)
        jump.fill("unlabelled-siamese.jpg")  # jump to it by file name, as a reviewer would
        jump.press("Enter")
        page.locator("#counter").get_by_text(f"photo #{photo.id}").wait_for(timeout=60000)
        page.locator("#demo-banner").get_by_text("Built-in offline models").wait_for(timeout=10000)
        page.wait_for_function(
            "() => [0, 1, 2].some(i => (document.querySelector('#confirm-' + i) || {}).innerText?.trim() === 'Siamese')",
            timeout=60000,
        )
        candidates = [page.locator(f"#confirm-{i}").inner_text().strip() for i in range(3)]
        status = page.locator("#pred-status").inner_text()
        assert "no photo with id" not in status  # the page opened its photo, not a fallback
        assert "VLM not trained yet" in status
        ARTIFACTS_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS_DIR / "cold_start_siamese.png"), full_page=True)
        page.close()
    finally:
        demo.close()
    assert "Siamese" in candidates
