"""User actions and seconds per review in the Review tab, in real Chromium, before and after the
keyboard-first Review tab (issue 13), measured in one run.

    git clone /work/main /work/before            # a clean checkout of the old code (once)
    python benchmarks/review_clicks.py --before /work/before [--photos 12] [--corrections 3]

Each checkout runs in its own process (its own ``catreview``) on the same copied photos, with the
tiny random built-in models (``CATREVIEW_BUILTIN_MODELS=random``) at 1366x768:

- **keyboard reach**: Tab presses from page load until the first confirm button has the focus
  (the old tab's only keyboard route; the new one needs none: ``1`` confirms);
- **confirm**: reviewing photos by confirming stage 1's top candidate, the way each version does
  it fastest (old: a mouse click on the button, plus a scroll when it is below the fold; new: the
  ``1`` key); **correction**: picking a breed that is not a candidate (old: click the search,
  select its text and delete it, type, click the option, click "Set label"; new: ``O``, type,
  ``Enter``). Typed characters count one action each;
- **seconds per review**: wall time from the first action to the next photo shown (the
  counter's ``photo #`` changed), mean over the photos; ``correction_save_seconds`` is the part
  after the last action of a correction (``Enter`` / "Set label"), the rest is typing and the
  breed list filtering.

Prints one line per checkout and the after/before ratios. Nothing is stored in the repository;
screenshots go to ``test-artifacts/`` (ignored by git).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]
BREEDS = ["Sphynx", "Ragdoll", "Persian", "Bengal"]
CORRECTION = "Norwegian Forest Cat"
TYPED = "Norwegian"


def _copy_photos(dest: Path, n: int, cats: Path) -> Path:
    per = -(-n // len(BREEDS))
    for breed in BREEDS:
        (dest / breed).mkdir(parents=True)
        for p in sorted((cats / breed).glob("*.jpg"))[:per]:
            shutil.copy(p, dest / breed / p.name)
    return dest


def _shown(page) -> int:
    m = re.search(r"photo #(\d+)", page.locator("#counter").inner_text())
    if not m:
        raise RuntimeError(f"no photo id in the counter: {page.locator('#counter').inner_text()!r}")
    return int(m.group(1))


def _wait_moved(page, before: int) -> None:
    page.wait_for_function(
        f"() => !/photo #{before}(\\D|$)/.test(document.querySelector('#counter').innerText)", timeout=60000
    )


def _below_fold(page, selector: str) -> bool:
    box = page.locator(selector).first.bounding_box()
    vp = page.viewport_size
    if box is None or vp is None:
        raise RuntimeError(f"{selector} is not on the page")
    return box["y"] < 0 or box["y"] + box["height"] > vp["height"]


def measure(checkout: Path, photos: int, corrections: int, artifacts: Path) -> dict[str, float | int | str]:
    """Run one checkout's app and measure it (called in a fresh process per checkout)."""
    sys.path.insert(0, str(checkout))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ["CATREVIEW_BUILTIN_MODELS"] = "random"
    from playwright.sync_api import sync_playwright

    from catreview.app.core import ReviewApp
    from catreview.app.ui import build_ui
    from catreview.config import load_settings
    from catreview.models.demo import ensure_demo_models

    keyboard = (checkout / "catreview" / "app" / "ui" / "hotkeys.js").is_file()
    tmp = Path(tempfile.mkdtemp(prefix="review-clicks-"))
    cats = Path(os.environ.get("CATREVIEW_SHARED_CATS", REPO.parent / "shared" / "data" / "cats"))
    root = _copy_photos(tmp / "photos", photos + corrections + 1, cats)
    ensure_demo_models(tmp / "demo")
    settings = load_settings(database_url=f"sqlite:///{tmp / 'bench.db'}", demo_dir=tmp / "demo", data_dir=tmp / "data")
    app = ReviewApp(settings)
    app.start_background([root])
    if not app.wait(timeout=600):
        raise RuntimeError("background import + predictions still running after 600 s")
    demo = build_ui(app)
    demo.queue()
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True, quiet=True)
    out: dict[str, float | int | str] = {"checkout": str(checkout), "mode": "keyboard" if keyboard else "mouse"}
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(viewport={"width": 1366, "height": 768})
            page.goto(url)
            page.wait_for_function(
                "() => { const b = document.querySelector('#confirm-0'); return b && b.innerText.trim() !== '—'; }",
                timeout=60000,
            )
            name = page.locator("#annotator textarea, #annotator input").first
            name.fill("bench")
            name.press("Escape" if keyboard else "Tab")
            # keyboard reach: Tab presses until the first confirm button has the focus
            page.locator("body").click(position={"x": 2, "y": 2})
            tabs = 0
            while (
                tabs < 200 and page.evaluate("() => document.activeElement && document.activeElement.id") != "confirm-0"
            ):
                page.keyboard.press("Tab")
                tabs += 1
            out["tabs_to_first_confirm"] = tabs
            page.locator("body").click(position={"x": 2, "y": 2})
            page.evaluate("() => document.activeElement && document.activeElement.blur()")

            actions, seconds = 0, 0.0
            for _ in range(photos):
                pid = _shown(page)
                t0 = time.perf_counter()
                if keyboard:
                    page.keyboard.press("1")
                    actions += 1
                else:
                    actions += 1 + int(_below_fold(page, "#confirm-0"))  # a scroll, then the click
                    page.locator("#confirm-0").click()
                _wait_moved(page, pid)
                seconds += time.perf_counter() - t0
            out["confirm_actions_per_review"] = actions / photos
            out["confirm_seconds_per_review"] = seconds / photos

            actions, seconds, waited = 0, 0.0, 0.0
            for _ in range(corrections):
                pid = _shown(page)
                t0 = time.perf_counter()
                if keyboard:
                    page.keyboard.press("o")
                    page.keyboard.type(TYPED)
                    page.locator("ul[role=listbox] li", has_text=CORRECTION).first.wait_for(timeout=10000)
                    t1 = time.perf_counter()
                    page.keyboard.press("Enter")
                    actions += 1 + len(TYPED) + 1
                else:
                    box = page.locator("#breed-pick input").first
                    actions += int(_below_fold(page, "#breed-pick"))
                    box.click()
                    page.keyboard.press("Control+A")
                    page.keyboard.press("Backspace")  # typing appends to the old value: clear it first
                    page.keyboard.type(TYPED)
                    page.locator("ul[role=listbox] li", has_text=CORRECTION).first.click()
                    t1 = time.perf_counter()
                    page.locator("#set-label").click()
                    actions += 1 + 2 + len(TYPED) + 1 + 1
                _wait_moved(page, pid)
                seconds += time.perf_counter() - t0
                waited += time.perf_counter() - t1
            out["correction_actions_per_review"] = actions / corrections
            out["correction_seconds_per_review"] = seconds / corrections
            out["correction_save_seconds"] = waited / corrections
            artifacts.mkdir(exist_ok=True)
            page.screenshot(path=str(artifacts / f"review_clicks_{out['mode']}.png"))
            browser.close()
    finally:
        demo.close()
        app.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--before", type=Path, required=True, help="a checkout of the old code (git clone)")
    ap.add_argument("--photos", type=int, default=12, help="photos reviewed by confirming (default 12)")
    ap.add_argument("--corrections", type=int, default=3, help="photos corrected to another breed (default 3)")
    ap.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # internal: measure this checkout only
    args = ap.parse_args(argv)
    if args.photos < 1 or args.corrections < 1:
        ap.error("--photos and --corrections must be at least 1")
    artifacts = REPO / "test-artifacts"
    if args.one is not None:
        print(json.dumps(measure(args.one.resolve(), args.photos, args.corrections, artifacts)))
        return 0
    if not (args.before / "catreview").is_dir():
        ap.error(f"{args.before} is not a catreview checkout")
    results = {}
    for label, checkout in (("before", args.before.resolve()), ("after", REPO)):
        cmd = [sys.executable, __file__, "--before", str(args.before), "--one", str(checkout)]
        cmd += ["--photos", str(args.photos), "--corrections", str(args.corrections)]
        done = subprocess.run(cmd, cwd=checkout, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            print(done.stderr[-4000:], file=sys.stderr)
            print(f"error: measuring {checkout} failed (exit {done.returncode})", file=sys.stderr)
            return 1
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
        print(label, json.dumps(results[label]))
    b, a = results["before"], results["after"]
    for key in (
        "tabs_to_first_confirm",
        "confirm_actions_per_review",
        "confirm_seconds_per_review",
        "correction_actions_per_review",
        "correction_seconds_per_review",
        "correction_save_seconds",
    ):
        ratio = f"{float(a[key]) / float(b[key]):.2f}" if float(b[key]) else "n/a"
        print(f"{key}: before {float(b[key]):.2f}, after {float(a[key]):.2f}, after/before {ratio}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
