"""Chromium logs in to the app: the login form, a wrong password refused, the right one opens the
Review tab under the user's name; an annotator's clicks on the admin-only Train buttons are refused
with the role message, and nothing is started or recorded."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect
from sqlmodel import Session, select

from catreview.app.auth import AuthConfig
from catreview.data import accounts, audit
from catreview.data.db import TrainingRun
from tests.conftest import ARTIFACTS_DIR
from tests.test_auth_http import make_app, serving
from tests.test_browser import browser  # noqa: F401  (the module-scoped Chromium fixture)

pytestmark = pytest.mark.browser

PASSWORD = "correct horse battery"


def login_page(browser: Browser, url: str) -> Page:
    """A fresh browser context (no cookies) on the app's login form."""
    page = browser.new_context(viewport={"width": 1366, "height": 900}).new_page()
    page.goto(url)
    expect(page.locator("input[type=password]")).to_be_visible(timeout=30000)
    return page


def submit(page: Page, name: str, password: str) -> None:
    page.locator("input[data-testid=textbox]").first.fill(name)
    page.locator("input[type=password]").fill(password)
    page.get_by_role("button", name="Login").click()


def test_login_then_the_annotators_train_clicks_are_refused_with_the_role_message(
    tmp_path: Path, demo_dir: Path, cats_dir: Path, browser: Browser
) -> None:
    photos = tmp_path / "photos" / "Bengal"
    photos.mkdir(parents=True)
    for p in sorted((cats_dir / "Bengal").glob("*.jpg"))[:2]:
        shutil.copy(p, photos / p.name)
    app = make_app(f"sqlite:///{tmp_path / 'app.db'}", tmp_path, demo_dir, photos.parent)
    with serving(app, AuthConfig("login")) as (_demo, url):
        page = login_page(browser, url)
        expect(page.locator("#signed-in")).to_have_count(0)  # nothing of the app before a login
        submit(page, "ann", "not her password")
        expect(page.get_by_text("Incorrect Credentials")).to_be_visible(timeout=30000)
        expect(page.locator("#signed-in")).to_have_count(0)

        submit(page, "ann", PASSWORD)
        expect(page.locator("#signed-in")).to_contain_text("ann", timeout=60000)
        expect(page.get_by_role("tab", name="Review")).to_have_attribute("aria-selected", "true")
        expect(page.locator("#counter")).to_contain_text("reviewed", timeout=30000)

        page.get_by_role("tab", name="Train").click()
        page.locator("#retrain").click()
        expect(
            page.get_by_text(
                "ann (annotator) cannot start or cancel training, calibration or comparison runs: that needs the admin role"
            ).first
        ).to_be_visible(timeout=30000)
        page.locator("#no-adapter").click()
        expect(
            page.get_by_text(
                "ann (annotator) cannot promote or roll back model versions: that needs the admin role"
            ).first
        ).to_be_visible(timeout=30000)
        page.screenshot(path=str(ARTIFACTS_DIR / "login_refused.png"), full_page=False)
    with Session(app.engine) as s:
        assert s.exec(select(TrainingRun)).first() is None  # nothing was started
        assert audit.events(s) == []  # and nothing recorded
        assert accounts.get_user(s, "ann").role == "annotator"
