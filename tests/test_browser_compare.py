"""A real browser (Debian's Chromium via Playwright) opens the Compare tab, runs a blind
comparison of two tiny LLaVAs of different sizes and records a preference by a click; with only
the demo profile (compared with itself) the tab opens on the first reviewed photo and refuses a
preference."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect
from sqlmodel import Session, select

from catreview.compare.pairs import blind_swapped, split_model_label
from catreview.data.db import Preference
from catreview.query import photos
from tests.conftest import ARTIFACTS_DIR
from tests.test_app import running_app
from tests.test_browser import browser  # noqa: F401  (the Chromium fixture)
from tests.test_compare import LARGE, SMALL, make_settings, tiny_models  # noqa: F401  (fixture)

pytestmark = pytest.mark.browser


def test_blind_preference_with_a_click(demo_dir: Path, tiny_models, cats_dir: Path, tmp_path: Path, browser) -> None:
    root = tmp_path / "photos" / "Bengal"
    root.mkdir(parents=True)
    for p in sorted((cats_dir / "Bengal").glob("*.jpg"))[:2]:
        shutil.copy(p, root / p.name)
    # open mode: every caller acts under the configured name, recorded on the preference
    settings = make_settings(tmp_path / "browser.db", demo_dir, tiny_models).model_copy(
        update={"annotator": "browser-carol"}
    )
    with running_app(settings, [root.parent]) as (app, url):
        page = browser.new_page(viewport={"width": 1500, "height": 1200})
        page.goto(url)
        page.get_by_role("tab", name="Compare").click()
        expect(page.locator("#compare-annotator")).to_have_count(0)  # the caller is the annotator: no name box
        page.locator("#compare-blind input[type=checkbox]").check()
        # Blind mode has renamed the panels (its change event is done).
        expect(page.locator("#compare-left-probs")).to_contain_text(
            "Model 1: probabilities over the candidates", timeout=10000
        )
        page.locator("#compare-run").click()
        prefer_2 = page.locator("#compare-prefer-2")
        page.wait_for_function(
            "() => { const b = document.querySelector('#compare-prefer-2'); return b && !b.disabled; }", timeout=60000
        )

        # Both panels are unnamed: no profile name or model folder anywhere in them.
        panels = page.locator("#compare-left").inner_text() + page.locator("#compare-right").inner_text()
        assert "Model 1" in panels and "Model 2" in panels
        assert "Model 1: probabilities over the candidates" in page.locator("#compare-left-probs").inner_text()
        assert "Model 2: probabilities over the candidates" in page.locator("#compare-right-probs").inner_text()
        for secret in (SMALL, LARGE, *(str(p) for p in tiny_models.values()), *(p.name for p in tiny_models.values())):
            assert secret not in panels
        model_2_reasoning = page.locator("#compare-right-reasoning textarea").input_value()

        prefer_2.click()
        page.locator("#compare-pref-message").get_by_text("Saved preference").wait_for(timeout=30000)

        # Aggregate in the background over the (now) reviewed photos: table, plot and CSV appear.
        for i in photos.page(app.engine):
            app.review(i, "Bengal", "browser-carol")
        page.locator("#compare-aggregate-run").click()
        page.locator("#compare-aggregate-progress").get_by_text("Compared 2 reviewed photos").wait_for(timeout=60000)
        has_text = "([sel, text]) => (document.querySelector(sel)?.innerText || '').includes(text)"
        page.wait_for_function(has_text, arg=["#compare-summary", LARGE], timeout=10000)
        page.wait_for_function(has_text, arg=["#compare-per-breed", "Bengal"], timeout=10000)
        page.locator("#compare-plot canvas, #compare-plot svg").first.wait_for(timeout=10000)
        page.wait_for_function(has_text, arg=["#compare-csv", "compare_summary"], timeout=10000)
        ARTIFACTS_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS_DIR / "compare_tab.png"), full_page=True)
        page.close()

    image_id = photos.page(app.engine)[0]
    with Session(app.engine) as s:
        rows = list(s.exec(select(Preference)))
    assert [(r.image_id, r.annotator, r.choice) for r in rows] == [(image_id, "browser-carol", "b")]
    shown_second = SMALL if blind_swapped(image_id, SMALL, LARGE) else LARGE  # what "Model 2" was
    assert split_model_label(rows[0].model_b)[0] == shown_second
    assert rows[0].output_b == model_2_reasoning and rows[0].output_a and rows[0].output_a != rows[0].output_b


def test_demo_alone_opens_on_a_reviewed_photo_and_refuses_a_preference(
    settings, cats_dir: Path, tmp_path: Path, browser
) -> None:
    root = tmp_path / "photos"
    for breed in ("Persian", "Sphynx"):
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:2]:
            shutil.copy(p, root / breed / p.name)
    with running_app(settings, [root]) as (app, url):
        ids = photos.page(app.engine)
        reviewed = ids[2]
        app.review(reviewed, "Sphynx", "someone")
        page = browser.new_page(viewport={"width": 1500, "height": 1200})
        page.goto(url)
        page.get_by_role("tab", name="Compare").click()

        # Opens on the first reviewed photo (not "0" and no photo), says how to pick another.
        id_box = page.locator("#compare-image-id input")
        page.wait_for_function(
            "(v) => document.querySelector('#compare-image-id input')?.value === v", arg=str(reviewed), timeout=30000
        )
        page.locator("#compare-photo img").first.wait_for(timeout=10000)
        notice = page.locator("#compare-notice")
        notice.get_by_text("Photo 3 of 4").wait_for(timeout=10000)
        assert "human label: Sphynx" in notice.inner_text() and "1 reviewed photo in all" in notice.inner_text()
        assert "press Enter" in page.locator("#compare-image-id").inner_text()
        assert "demo (A): probabilities over the candidates" in page.locator("#compare-left-probs").inner_text()
        assert "demo (B): probabilities over the candidates" in page.locator("#compare-right-probs").inner_text()
        # Empty tables have their real column headers from the start.
        summary_head = page.locator("#compare-summary").inner_text()
        assert all(c in summary_head for c in ("profile", "balanced_accuracy", "p95_latency_ms", "peak_memory_mib"))
        assert "accuracy A: demo" in page.locator("#compare-per-breed").inner_text()

        # An unknown id is refused with a message; typing another id and pressing Enter shows
        # that photo and compares it.
        id_box.fill("999")
        id_box.press("Enter")
        page.get_by_text(f"No photo with id 999 (ids run from {ids[0]} to {ids[-1]})").first.wait_for(timeout=10000)
        id_box.fill(str(ids[0]))
        id_box.press("Enter")
        notice.get_by_text("Both sides use the same profile").wait_for(timeout=60000)
        assert "Photo 1 of 4" not in notice.inner_text()  # the comparison's notes replaced the photo line
        assert id_box.input_value() == str(ids[0])

        # Blind: the same model on both sides cannot give a training pair; the UI says so.
        page.locator("#compare-blind input[type=checkbox]").check()
        expect(page.locator("#compare-left-probs")).to_contain_text(
            "Model 1: probabilities over the candidates", timeout=10000
        )
        page.locator("#compare-run").click()
        message = page.locator("#compare-pref-message")
        message.get_by_text("No preference can be recorded").wait_for(timeout=60000)
        assert "same model version" in message.inner_text()
        for key in ("1", "tie", "2"):
            assert page.locator(f"#compare-prefer-{key}").is_disabled()
        ARTIFACTS_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS_DIR / "compare_tab_demo.png"), full_page=True)
        page.close()
    with Session(app.engine) as s:
        assert not list(s.exec(select(Preference)))
