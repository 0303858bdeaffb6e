"""The Review tab in real Chromium: 20 photos reviewed with the keyboard only (the database checked
after every key), undo, the layout at 1366x768, blind mode, history, jump and queues."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect
from sqlmodel import Session, col, select

from catreview.data.db import ImageRecord, Review, make_engine
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from tests.conftest import ARTIFACTS_DIR
from tests.test_app import running_app
from tests.test_browser import browser  # noqa: F401  (the module-scoped Chromium fixture)

pytestmark = [pytest.mark.browser, pytest.mark.slow]  # an app start + predictions each (1.5-5 min)

LABELLED = ["Persian", "Birman", "Bengal", "Siamese"]  # 3 photos each, imported with folder labels
UNLABELLED = ["Sphynx", "Ragdoll", "Russian_Blue", "Maine_Coon"]  # 3 photos each, no label


@pytest.fixture
def collection(tmp_path: Path, cats_dir: Path) -> tuple[Path, Path]:
    labelled, unlabelled = tmp_path / "labelled", tmp_path / "unlabelled"
    for root, breeds in ((labelled, LABELLED), (unlabelled, UNLABELLED)):
        for breed in breeds:
            (root / breed).mkdir(parents=True)
            for p in sorted((cats_dir / breed).glob("*.jpg"))[:3]:
                shutil.copy(p, root / breed / p.name)
    return labelled, unlabelled


def _import_labels(settings, labelled: Path) -> None:
    vocab = BreedVocabulary.from_labels_file(settings.classifier.labels_file)
    import_folder(make_engine(settings.database_url), labelled, vocabulary=vocab, labels_from_folders=True)


def shown_id(page: Page) -> int:
    m = re.search(r"photo #(\d+)", page.locator("#counter").inner_text())
    assert m, page.locator("#counter").inner_text()
    return int(m.group(1))


def wait_ready(page: Page) -> None:
    """The page has shown a photo with stage-1 candidates (the hotkey script runs on load)."""
    page.locator("#counter").get_by_text("photo #").wait_for(timeout=60000)
    page.wait_for_function(
        "() => { const b = document.querySelector('#confirm-0'); return b && b.innerText.trim() !== '—'; }",
        timeout=60000,
    )


def wait_moved(page: Page, before: int, message: str | None = None) -> int:
    page.wait_for_function(
        f"() => !/photo #{before}(\\D|$)/.test(document.querySelector('#counter').innerText)", timeout=30000
    )
    if message:
        page.locator("#review-message").get_by_text(message).wait_for(timeout=30000)
    return shown_id(page)


def text_of(page: Page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text().strip()


def reviews(engine) -> list[Review]:
    with Session(engine) as s:
        return list(s.exec(select(Review).order_by(col(Review.id))))


def image(engine, image_id: int) -> ImageRecord:
    with Session(engine) as s:
        img = s.get(ImageRecord, image_id)
        assert img is not None
        return img


def test_twenty_photos_by_keyboard_then_undo(settings, collection, browser) -> None:
    settings = settings.model_copy(update={"annotator": "kim"})  # open mode: every caller acts as kim
    labelled, unlabelled = collection
    _import_labels(settings, labelled)
    with running_app(settings, [unlabelled, labelled]) as (app, url):
        engine = app.engine
        n_import = len(reviews(engine))
        assert n_import == 12 and all(r.source == "import" for r in reviews(engine))
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.goto(url)
        wait_ready(page)
        expect(page.locator("#signed-in")).to_contain_text("kim")
        # keys in turn; "o" = other breed: search, type, Enter picks and saves
        plan = ["1", "2", "3", "Enter", "a", "n", "u", "o", "1", "Enter"] * 2
        expected_rows = n_import
        saved: list[tuple[int, str]] = []
        for step, key in enumerate(plan):
            pid = shown_id(page)
            before = image(engine, pid)
            if key in "123":
                label = text_of(page, f"confirm-{int(key) - 1}")
                page.keyboard.press(key)
            elif key in ("Enter", "a"):
                label = text_of(page, "accept")
                page.keyboard.press(key)
            elif key == "n":
                label = "Not a cat"
                page.keyboard.press(key)
            elif key == "u":
                label = "Unsure"
                page.keyboard.press(key)
            else:
                label = "Norwegian Forest Cat"
                page.keyboard.press("o")
                expect(page.locator("#breed-pick input")).to_be_focused()
                page.keyboard.type("Norwegian")
                page.locator("ul[role=listbox] li", has_text="Norwegian Forest Cat").first.wait_for(timeout=10000)
                page.keyboard.press("Enter")
            try:
                new = wait_moved(page, pid, "Saved")
            except Exception as exc:  # keep what the page showed, then fail with the step
                ARTIFACTS_DIR.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS_DIR / "review_keys_failure.png"))
                raise AssertionError(f"step {step}, key {key!r}: the page did not move on after a save") from exc
            expected_rows += 1
            rows = reviews(engine)
            assert len(rows) == expected_rows, (step, key)
            last = rows[-1]
            assert (last.image_id, last.label, last.annotator, last.source, last.blind) == (
                pid,
                label,
                "kim",
                "ui",
                False,
            ), (step, key)
            assert last.previous_label == before.current_label and last.replaces_review_id == before.current_review_id
            img = image(engine, pid)
            assert (img.current_label, img.current_source, img.current_review_id) == (label, "ui", last.id)
            assert new != pid
            saved.append((pid, label))
            # after a save nothing keeps the focus: Enter cannot confirm the next photo blindly
            assert page.evaluate("() => document.activeElement.tagName") == "BODY", (step, key)
            assert page.locator("#breed-pick input").input_value() == ""
        assert len({pid for pid, _ in saved}) == 20  # 20 different photos, each reviewed once
        ARTIFACTS_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS_DIR / "review_keys_after_20.png"))

        # the note: typed letters are text, not keys; the note goes with the next save, then clears
        pid = shown_id(page)
        page.locator("#note textarea, #note input").first.click()
        page.keyboard.type("nu1 ears")
        page.keyboard.press("Escape")
        assert len(reviews(engine)) == expected_rows  # "n", "u", "1" typed in the note saved nothing
        label = text_of(page, "confirm-0")
        page.keyboard.press("1")
        wait_moved(page, pid, "Saved")
        expected_rows += 1
        last = reviews(engine)[-1]
        assert (last.image_id, last.label, last.note) == (pid, label, "nu1 ears")
        assert page.locator("#note textarea, #note input").first.input_value() == ""

        # Backspace: the last decision is undone by a new review restoring the previous label
        before = image(engine, pid)
        current = shown_id(page)
        page.keyboard.press("Backspace")
        page.locator("#review-message").get_by_text("Undid").wait_for(timeout=30000)
        assert shown_id(page) == pid and current != pid  # the undone photo is reopened
        rows = reviews(engine)
        assert len(rows) == expected_rows + 1
        undo = rows[-1]
        assert undo.replaces_review_id == before.current_review_id and undo.annotator == "kim"
        assert undo.previous_label == label
        undone = rows[-2]
        img = image(engine, pid)
        if undone.replaces_review_id is None:  # an unlabelled photo: unreviewed again
            assert (undo.source, img.current_review_id, img.current_label) == ("undo", None, None)
        else:  # the imported label is back, unverified
            imported = next(r for r in rows if r.id == undone.replaces_review_id)
            assert (undo.source, undo.label, img.current_label, img.current_source) == (
                imported.source,
                imported.label,
                imported.label,
                imported.source,
            )
        page.screenshot(path=str(ARTIFACTS_DIR / "review_keys_after_undo.png"))

        # the history beside the photo: a click reopens an older decision
        first_pid, first_label = saved[-3]  # the list holds the last 10 decisions
        cell = page.locator("#recent").get_by_text(str(first_pid), exact=True).first
        cell.click()
        page.wait_for_function(
            f"() => /photo #{first_pid}(\\D|$)/.test(document.querySelector('#counter').innerText)", timeout=30000
        )
        assert first_label in text_of(page, "review-info")
        # jump by file name
        target = image(engine, saved[5][0])
        box = page.locator("#jump textarea, #jump input").first
        box.fill(Path(target.path).name)
        box.press("Enter")
        page.wait_for_function(
            f"() => /photo #{target.id}(\\D|$)/.test(document.querySelector('#counter').innerText)", timeout=30000
        )
        # "?" shows the key map
        page.locator("body").click(position={"x": 5, "y": 5})
        page.keyboard.press("?")
        expect(page.locator("#keymap")).to_be_visible()
        page.screenshot(path=str(ARTIFACTS_DIR / "review_keymap.png"))
        page.keyboard.press("Escape")
        expect(page.locator("#keymap")).to_be_hidden()
        page.close()


VISIBLE = [
    "signed-in",
    "photo",
    "stage1",
    "vlm",
    "fused",
    "confirm-0",
    "confirm-1",
    "confirm-2",
    "accept",
    "breed-pick",
    "set-label",
    "not-a-cat",
    "unsure",
    "skip",
    "undo",
    "prev",
    "next",
    "note",
    "queue",
    "recent",
]


def test_layout_fits_1366x768_and_blind_mode(settings, collection, browser) -> None:
    settings = settings.model_copy(update={"annotator": "lee"})
    _, unlabelled = collection
    with running_app(settings, [unlabelled]) as (app, url):
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.goto(url)
        wait_ready(page)
        for elem_id in VISIBLE:
            box = page.locator(f"#{elem_id}").first.bounding_box()
            assert box is not None, elem_id
            assert box["x"] >= 0 and box["y"] >= 0, (elem_id, box)
            assert box["x"] + box["width"] <= 1366 and box["y"] + box["height"] <= 768, (elem_id, box)
        assert page.evaluate("() => window.scrollY") == 0
        ARTIFACTS_DIR.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS_DIR / "review_1366x768.png"))
        # the next photo is prefetched
        nxt = app.next_in_queue("import", shown_id(page))
        assert nxt is not None
        src = page.locator("#prefetch img").get_attribute("src")
        assert src and src.endswith(Path(app.display_path(nxt.image_id)).name)

        # the queue selector: a queue's photos come with their "why it is here" line
        page.locator("#queue input").first.click()
        page.locator("ul[role=listbox] li", has_text="Random sample").first.click()
        page.locator("#why").get_by_text("Why it is here").wait_for(timeout=30000)
        first_random = app.next_in_queue("random", None)
        assert first_random is not None and shown_id(page) == first_random.image_id
        assert first_random.reason in text_of(page, "why")

        # blind mode: no model output until the choice, the review says it was blind
        page.locator("#blind input").check()
        page.locator("#pred-status").get_by_text("Blind mode").wait_for(timeout=30000)
        for elem_id in ("confirm-0", "confirm-1", "confirm-2", "accept"):  # no candidate shown
            expect(page.locator(f"#{elem_id}")).to_have_text("—")
            expect(page.locator(f"#{elem_id}")).to_be_disabled()
        assert page.locator("#stage1 .confidence-set, #stage1 [data-testid='label-output-value']").count() == 0
        page.screenshot(path=str(ARTIFACTS_DIR / "review_blind.png"))
        pid = shown_id(page)
        page.keyboard.press("u")
        page.locator("#review-message").get_by_text("the models said").wait_for(timeout=30000)
        last = reviews(app.engine)[-1]
        assert (last.image_id, last.label, last.annotator, last.blind) == (pid, "Unsure", "lee", True)
        # blind mode survives a reload (browser storage)
        page.reload()
        page.locator("#counter").get_by_text("photo #").wait_for(timeout=60000)
        expect(page.locator("#blind input")).to_be_checked()
        page.locator("#pred-status").get_by_text("Blind mode").wait_for(timeout=30000)
        page.close()
