"""Two annotators, two logged-in Chromium sessions, one photo: the second save is refused with who
chose what, and "Replace with mine" / "Keep theirs" decide; the history keeps both reviews."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect
from sqlmodel import Session, col, select

from catreview.app.auth import AuthConfig, password_checker
from catreview.app.core import ReviewApp
from catreview.app.ui import build_ui
from catreview.data import accounts
from catreview.data.db import ImageRecord, Review
from tests.test_browser import browser  # noqa: F401  (the module-scoped Chromium fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # an app start with predictions (about 1 min)

PASSWORDS = {"ann": "ann-password", "bea": "bea-password"}


@contextmanager
def app_with_login(settings, folder: Path) -> Iterator[tuple[ReviewApp, str]]:
    """The app on a free port, login required (users ann and bea); yields (app, url)."""
    app = ReviewApp(settings)
    with Session(app.engine) as s:
        for name, password in PASSWORDS.items():
            accounts.add_user(s, name, "annotator", password)
    app.start_background([folder])
    assert app.wait(timeout=300), "background import + predictions still running after 300 s"
    assert app.job.error is None, app.job.log
    demo = build_ui(app, AuthConfig("login"))
    demo.queue()
    _, url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=None,
        prevent_thread_lock=True,
        quiet=True,
        auth=password_checker(app.engine),
    )
    try:
        yield app, url
    finally:
        demo.close()


def log_in(browser: Browser, url: str, name: str) -> Page:
    """A fresh browser context (its own cookies) logged in as ``name``, on the Review tab."""
    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.goto(url)
    page.locator("input[data-testid=textbox]").fill(name)
    page.locator("input[type=password]").fill(PASSWORDS[name])
    page.get_by_role("button", name="Login").click()
    expect(page.locator("#signed-in")).to_contain_text(name, timeout=60000)
    page.wait_for_function(
        "() => { const b = document.querySelector('#confirm-1'); return b && b.innerText.trim() !== '—'; }",
        timeout=60000,
    )
    return page


def shown_id(page: Page) -> int:
    m = re.search(r"photo #(\d+)", page.locator("#counter").inner_text())
    assert m, page.locator("#counter").inner_text()
    return int(m.group(1))


def reviews_of(engine, image_id: int) -> list[Review]:
    with Session(engine) as s:
        return list(s.exec(select(Review).where(Review.image_id == image_id).order_by(col(Review.id))))


def test_two_annotators_one_photo_conflict_dialog(settings, cats_dir: Path, tmp_path: Path, browser) -> None:
    folder = tmp_path / "photos" / "Persian"
    folder.mkdir(parents=True)
    for p in sorted((cats_dir / "Persian").glob("*.jpg"))[:3]:
        shutil.copy(p, folder / p.name)
    with app_with_login(settings, folder.parent) as (app, url):
        ann, bea = log_in(browser, url, "ann"), log_in(browser, url, "bea")
        first = shown_id(ann)
        assert shown_id(bea) == first  # both opened the first unreviewed photo
        expect(bea.locator("#review-info")).to_contain_text("Not reviewed yet")
        ann_label = ann.locator("#confirm-0").inner_text().strip()
        bea_label = bea.locator("#confirm-1").inner_text().strip()
        assert ann_label != bea_label

        ann.locator("#confirm-0").click()
        ann.locator("#review-message").get_by_text("Saved").wait_for(timeout=30000)
        bea.locator("#confirm-1").click()  # her page still says "Not reviewed yet"
        dialog = bea.locator("#conflict").first  # (Gradio 6 puts a group's elem_id on two nested divs)
        expect(dialog).to_be_visible(timeout=30000)
        expect(dialog).to_contain_text(f"ann chose {ann_label}")
        expect(dialog).to_contain_text("you saw: not reviewed yet")
        assert [(r.annotator, r.label) for r in reviews_of(app.engine, first)] == [("ann", ann_label)]  # refused
        assert shown_id(bea) == first
        dialog.locator("#replace-mine").click()
        bea.locator("#review-message").get_by_text(f"Saved {bea_label}").wait_for(timeout=30000)
        expect(dialog).to_be_hidden()
        rows = reviews_of(app.engine, first)
        assert [(r.annotator, r.label) for r in rows] == [("ann", ann_label), ("bea", bea_label)]
        assert rows[1].replaces_review_id == rows[0].id  # a new review after hers: the history keeps both

        # Both moved on to the next photo: the same race, and this time bea keeps ann's label.
        second = shown_id(bea)
        assert second != first
        ann.wait_for_function(
            f"() => /photo #{second}(\\D|$)/.test(document.querySelector('#counter').innerText)", timeout=30000
        )
        ann.locator("#confirm-0").click()
        ann.locator("#review-message").get_by_text(f"for photo {second}").wait_for(timeout=30000)
        bea.locator("#confirm-1").click()
        expect(dialog).to_be_visible(timeout=30000)
        dialog.locator("#keep-theirs").click()
        bea.locator("#review-message").get_by_text("Kept ann's").wait_for(timeout=30000)
        assert [r.annotator for r in reviews_of(app.engine, second)] == ["ann"]
        with Session(app.engine) as s:
            assert s.get(ImageRecord, first).current_review_id == rows[1].id
