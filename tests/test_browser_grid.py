"""A real browser (Debian's Chromium, Playwright from pip) filters the Grid tab, selects several
photos by clicking their thumbnails, assigns one label to all of them, and the database has one
review per photo; then a confusion-matrix cell of the Evaluation tab opens its photos in the grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from sqlmodel import Session, col, select

from catreview.app.core import ReviewApp
from catreview.data.db import ImageRecord, PhotoScore, Review
from catreview.data.importer import import_folder
from tests.conftest import ARTIFACTS_DIR
from tests.test_app import running_app
from tests.test_browser import browser  # noqa: F401  (the Chromium fixture)

pytestmark = pytest.mark.browser

BREEDS = ("Bengal", "Persian")
PER_BREED = 3


def _pick(page: Page, elem_id: str, value: str) -> None:
    """Choose ``value`` in the Gradio dropdown ``#elem_id`` (type to filter, click the option)."""
    box = page.locator(f"#{elem_id} input").first
    box.click()
    box.fill(value)
    page.locator(f'#{elem_id} li[role=option][aria-label="{value}"]').click()
    expect(box).to_have_value(value)


def test_filter_select_several_and_bulk_assign(settings, cats_dir: Path, tmp_path: Path, browser) -> None:
    settings = settings.model_copy(update={"annotator": "grid-gina"})  # open mode: the caller's name
    root = tmp_path / "photos"
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:PER_BREED]:
            shutil.copy(p, root / breed / p.name)
    seed = ReviewApp(settings)
    import_folder(seed.engine, root, vocabulary=seed.vocabulary, labels_from_folders=True, workers=1)
    seed.engine.dispose()
    with running_app(settings) as (app, url):
        with Session(app.engine) as s:
            persians = list(
                s.exec(
                    select(ImageRecord.id).where(ImageRecord.current_label == "Persian").order_by(col(ImageRecord.id))
                )
            )
        page = browser.new_page(viewport={"width": 1366, "height": 900})
        page.goto(url)
        page.get_by_role("tab", name="Grid").click()
        _pick(page, "grid-filter-label", "Persian")
        page.locator("#grid-show").click()
        page.locator("#grid-page-line").get_by_text(f"Page 1: {PER_BREED} photos").wait_for(timeout=30000)
        thumbs = page.locator("#grid-gallery button.thumbnail-item")
        expect(thumbs).to_have_count(PER_BREED)
        src = page.locator("#grid-gallery img").first.get_attribute("src") or ""
        assert "thumbs" in src  # served by path from the thumbnail cache
        thumbs.nth(0).click()  # a click selects ...
        page.locator("#grid-selected input[type=checkbox]:checked").first.wait_for(timeout=10000)
        thumbs.nth(2).click()
        expect(page.locator("#grid-selected input[type=checkbox]:checked")).to_have_count(2)
        thumbs.nth(1).click()
        thumbs.nth(1).click()  # ... a second click unselects
        expect(page.locator("#grid-selected input[type=checkbox]:checked")).to_have_count(2)
        _pick(page, "grid-assign-label", "Siamese")
        expect(page.locator("#grid-annotator")).to_have_count(0)  # the caller is the annotator: no name box
        page.locator("#grid-assign").click()
        page.locator("#grid-message").get_by_text("Saved 2 reviews: Siamese").wait_for(timeout=30000)
        # the filter is shown again: the two photos are no longer Persian, the third one still is
        page.locator("#grid-page-line").get_by_text("Page 1: 1 photo (").wait_for(timeout=30000)
        expect(thumbs).to_have_count(1)
        expect(page.locator("#grid-selected input[type=checkbox]:checked")).to_have_count(0)
        ARTIFACTS_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS_DIR / "grid_tab.png"), full_page=True)
        with Session(app.engine) as s:
            rows = list(s.exec(select(Review).where(Review.annotator == "grid-gina").order_by(col(Review.id))))
            labels = dict(s.exec(select(ImageRecord.id, ImageRecord.current_label)).all())
        assert [(r.image_id, r.label, r.source, r.previous_label) for r in rows] == [
            (persians[0], "Siamese", "grid", "Persian"),
            (persians[2], "Siamese", "grid", "Persian"),
        ]
        assert [labels[i] for i in persians] == ["Siamese", "Persian", "Siamese"]

        # Evaluation: a click on a cell of the confusion table opens those photos in the grid.
        page.get_by_role("tab", name="Evaluation").click()
        page.locator("#run-evaluation").click()
        page.locator("#evaluation-header").get_by_text("held-out photos").wait_for(timeout=60000)
        page.wait_for_function(  # the three matplotlib figures arrive as images
            """() => ['confusion', 'per-breed', 'reliability'].every(k => {
                const img = document.querySelector(`#evaluation-${k}-plot img`);
                return img && img.complete && img.naturalWidth > 200; })""",
            timeout=60000,
        )
        page.screenshot(path=str(ARTIFACTS_DIR / "evaluation_plots.png"), full_page=True)
        table = page.locator("#evaluation-confusion")
        table.locator('[data-testid="cell-0-0"]').wait_for(timeout=30000)
        texts = [t.strip() for t in table.locator('[data-testid^="cell-0-"]').all_inner_texts()]
        columns = [t.strip() for t in table.locator("th .header-content").all_inner_texts()]
        assert columns[0] == "true breed" and len(columns) == len(texts)
        breed = texts[0]
        # The true-breed cell: every photo with that current label, whatever the prediction.
        table.locator('[data-testid="cell-0-0"]').click()
        expect(page.locator("#grid-note")).to_contain_text(f"Current label {breed}, any prediction", timeout=30000)
        line = page.locator("#grid-page-line")
        expect(line).to_contain_text(f"(current label {breed});", timeout=30000)
        with Session(app.engine) as s:
            n_breed = len(list(s.exec(select(ImageRecord.id).where(ImageRecord.current_label == breed))))
        assert n_breed > 0
        expect(thumbs).to_have_count(n_breed)
        # The fullest cell of that row that names one label (not "(another breed)").
        page.get_by_role("tab", name="Evaluation").click()
        j = max((k for k in range(1, len(texts)) if not columns[k].startswith("(another")), key=lambda k: int(texts[k]))
        shown = columns[j]
        table.locator(f'[data-testid="cell-0-{j}"]').click()
        expect(page.locator("#grid-note")).to_contain_text(
            f"Current label {breed}, fused prediction {shown}", timeout=30000
        )
        expect(line).to_contain_text(f"(current label {breed}, fused prediction {shown})", timeout=30000)
        with Session(app.engine) as s:
            n = len(list(s.exec(
                select(PhotoScore.image_id).join(ImageRecord, col(ImageRecord.id) == col(PhotoScore.image_id))
                .where(ImageRecord.current_label == breed, PhotoScore.fused_label == shown)
            )))  # fmt: skip
        assert n == int(texts[j])  # every photo is held out here (random models, nothing trained)
        expect(thumbs).to_have_count(n)
        page.screenshot(path=str(ARTIFACTS_DIR / "grid_from_evaluation.png"), full_page=True)
        page.close()
