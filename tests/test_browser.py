"""A real browser (Debian's Chromium driven by Playwright from pip) confirms a label by a click."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import expect
from sqlmodel import Session, select

from catreview.data.db import Review
from tests.conftest import ARTIFACTS_DIR
from tests.test_app import running_app

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        msg = f"{CHROMIUM} not found: apt-get install chromium (.ci/run does this)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


def test_confirm_label_with_a_click(settings, cats_dir: Path, tmp_path: Path, browser) -> None:
    settings = settings.model_copy(update={"annotator": "browser-bob"})  # open mode: the caller's name
    root = tmp_path / "photos" / "Russian_Blue"
    root.mkdir(parents=True)
    for p in sorted((cats_dir / "Russian_Blue").glob("*.jpg"))[:2]:
        shutil.copy(p, root / p.name)
    with running_app(settings, [root.parent]) as (app, url):
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(url)
        page.locator("#demo-banner").wait_for()
        button = page.locator("#confirm-0")
        page.wait_for_function(
            "() => { const b = document.querySelector('#confirm-0'); return b && b.innerText.trim() !== '—'; }",
            timeout=30000,
        )
        candidate = button.inner_text().strip()
        expect(page.locator("#signed-in")).to_contain_text("browser-bob")  # who the click is recorded as
        button.click()
        page.locator("#review-message").get_by_text("Saved").wait_for(timeout=30000)
        page.locator("#counter").get_by_text("1 / 2 reviewed").wait_for(timeout=10000)
        ARTIFACTS_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS_DIR / "review_tab.png"), full_page=True)
        page.close()
        with Session(app.engine) as s:
            rows = list(s.exec(select(Review)))
        assert [(r.label, r.annotator, r.source) for r in rows] == [(candidate, "browser-bob", "ui")]
