"""Every endpoint of the running app, called over HTTP by each role, is allowed or refused exactly
as :func:`catreview.data.accounts.allowed` says for the action its handler is guarded with; the
login page, wrong passwords and the trusted-header mode; the upload size limit; audit rows with
the right actor for promotions, exports and training starts from the UI's API and from the CLI.

Real app (demo models), real accounts (argon2) on SQLite and PostgreSQL, real HTTP (``httpx``, the
queue protocol the browser speaks: ``POST /gradio_api/queue/join`` with the event's ``fn_index``,
then its server-sent events), so unnamed (``api_visibility="private"``) events are called too.
"""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import gradio as gr
import httpx
import pytest
from sqlmodel import Session

from catreview.app.auth import GUARD_ATTR, AuthConfig, password_checker, trusted_header_identity, unguarded_events
from catreview.app.classifier_job import classifier_job
from catreview.app.core import ReviewApp
from catreview.app.ui import build_ui
from catreview.config import load_settings
from catreview.data import accounts, audit
from catreview.data.accounts import Action, Role
from catreview.data.audit import AuditAction
from catreview.data.importer import import_folder

PASSWORD = "correct horse battery"
USERS = {"ann": Role.ANNOTATOR, "rita": Role.REVIEWER, "ada": Role.ADMIN}
BREEDS = ("Bengal", "Persian")
TIMEOUT = httpx.Timeout(120.0)
DENIED = "cannot "  # accounts.require: "<who> (<role>) cannot <action>: that needs the <role> role; ask an admin"


# ------------------------------------------------------------------ app, HTTP sessions
@pytest.fixture
def photos(tmp_path: Path, cats_dir: Path) -> Path:
    """4 shared photos of 2 breeds, in breed folders."""
    root = tmp_path / "photos"
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:2]:
            shutil.copy(p, root / breed / p.name)
    return root


def make_app(db_url: str, tmp_path: Path, demo_dir: Path, photos: Path, **settings: Any) -> ReviewApp:
    """An app on ``db_url`` with the demo models, ``photos`` imported with their folder labels
    (no predictions run), and the three :data:`USERS`."""
    app = ReviewApp(load_settings(database_url=db_url, demo_dir=demo_dir, data_dir=tmp_path / "data", **settings))
    import_folder(app.engine, photos, vocabulary=app.vocabulary, labels_from_folders=True, workers=1)
    with Session(app.engine) as s:
        for name, role in USERS.items():
            accounts.add_user(s, name, role, PASSWORD)
    return app


@contextmanager
def serving(app: ReviewApp, auth: AuthConfig, **launch: Any) -> Iterator[tuple[gr.Blocks, str]]:
    """The app's UI for ``auth`` on a free local port, launched as ``app.py`` launches it
    (``show_error=False``, the upload limit); yields ``(demo, url)``."""
    demo = build_ui(app, auth)
    demo.queue(default_concurrency_limit=4)
    if auth.mode == "login":
        launch["auth"] = password_checker(app.engine)
    elif auth.mode == "header":
        launch["auth_dependency"] = trusted_header_identity(auth)
    _, url, _ = demo.launch(
        server_name="127.0.0.1",
        server_port=None,
        prevent_thread_lock=True,
        quiet=True,
        show_error=False,
        max_file_size=f"{app.settings.max_upload_mb}mb",
        **launch,
    )
    try:
        yield demo, url
    finally:
        demo.close()
        app.stop()


class Browserless:
    """One HTTP client session (its own cookies and Gradio session hash), calling events the way
    the page does: ``POST gradio_api/queue/join`` then reading ``gradio_api/queue/data``."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.http = httpx.Client(base_url=url, timeout=TIMEOUT, headers=headers or {})
        self.session_hash = uuid.uuid4().hex[:11]

    def login(self, name: str, password: str) -> httpx.Response:
        """``POST /login`` (Gradio's login form); a success sets the session cookie."""
        return self.http.post("login", data={"username": name, "password": password})

    def call(self, fn_index: int, data: list[Any], event_data: Any = None) -> tuple[bool, Any]:
        """Run event ``fn_index`` with ``data``; ``(success, output data)`` or ``(False, error message)``.

        Raises:
            httpx.HTTPStatusError: the join was refused (e.g. 401 without a login).
        """
        join = self.http.post(
            "gradio_api/queue/join",
            json={
                "data": data,
                "fn_index": fn_index,
                "session_hash": self.session_hash,
                "event_data": event_data,
                "trigger_id": None,
            },
        )
        join.raise_for_status()
        event_id = join.json()["event_id"]
        with self.http.stream("GET", "gradio_api/queue/data", params={"session_hash": self.session_hash}) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith("data:"):
                    continue
                msg = json.loads(line[5:])
                if msg.get("event_id") != event_id or msg.get("msg") != "process_completed":
                    continue
                out = msg.get("output") or {}
                if msg.get("success"):
                    return True, out.get("data")
                return False, out.get("error")
        raise AssertionError(f"event {fn_index}: the stream ended without process_completed")

    def close(self) -> None:
        self.http.close()


def initial_inputs(demo: gr.Blocks) -> dict[int, Any]:
    """``{component id: the value the page starts with}`` (what a browser would send first)."""
    return {c["id"]: c.get("props", {}).get("value") for c in demo.config["components"]}


def event_inputs(block_fn: Any, values: dict[int, Any]) -> list[Any]:
    """The data of one call of ``block_fn``: each input's page value (``None`` for a ``gr.State``,
    which lives on the server; ``""`` for an empty text box, as the page sends it)."""
    data = []
    for b in block_fn.inputs:
        value = None if isinstance(b, gr.State) else values.get(b._id)
        data.append("" if value is None and isinstance(b, gr.Textbox) else value)
    return data


def guarded_action(block_fn: Any) -> Action:
    """The :class:`Action` the event's handler checks (set by :func:`catreview.app.auth.guard`)."""
    action = getattr(block_fn.fn, GUARD_ATTR, None)
    assert action is not None, f"{block_fn.api_name or block_fn.name} is not guarded"
    return Action(action)


# Events whose handler changes what the other events see (an overlap round): called last in each
# user's pass.
SIDE_EFFECTS = ("team_start_round",)


# ------------------------------------------------------------------ the done-when test
def test_every_endpoint_checks_the_callers_role_over_http(
    db_url: str, tmp_path: Path, demo_dir: Path, photos: Path
) -> None:
    app = make_app(db_url, tmp_path, demo_dir, photos)
    with serving(app, AuthConfig("login")) as (demo, url):
        assert unguarded_events(demo) == []
        values = initial_inputs(demo)
        fns = [(i, f) for i, f in demo.fns.items() if f.fn is not None]
        assert len(fns) > 60  # every tab's events, named and unnamed
        fns.sort(key=lambda item: item[1].api_name in SIDE_EFFECTS)
        outcomes: dict[tuple[str, str], tuple[bool, bool, Any]] = {}
        for name, role in USERS.items():
            client = Browserless(url)
            try:
                assert client.login(name, PASSWORD).status_code == 200
                for i, block_fn in fns:
                    action = guarded_action(block_fn)
                    ok, out = client.call(i, event_inputs(block_fn, values), event_data={"index": 0, "value": None})
                    denied = not ok and isinstance(out, str) and out.startswith(f"{name} ({role.value}) {DENIED}")
                    outcomes[(name, f"{i}:{block_fn.api_name or block_fn.name}")] = (
                        accounts.allowed(role, action),
                        denied,
                        out if not ok else None,
                    )
            finally:
                client.close()
        assert classifier_job(app).wait(120)  # the admin's "Retrain classifier" ran in the background
    wrong = {k: v for k, v in outcomes.items() if v[0] == v[1]}  # allowed and denied, or refused and not denied
    assert wrong == {}, f"{len(wrong)} of {len(outcomes)} calls against the role table: {list(wrong.items())[:5]}"
    # the refused calls named the role the action needs
    refused = [v[2] for v in outcomes.values() if v[1]]
    assert refused and all("that needs the " in m for m in refused)
    assert len({k[1] for k in outcomes}) == len(fns)
    refused_by = {name: sum(v[1] for k, v in outcomes.items() if k[0] == name) for name in USERS}
    assert refused_by["ann"] > refused_by["rita"] > refused_by["ada"] == 0, refused_by
    # an allowed call ran: it succeeded or said why not in words, never an internal error
    failed = {k: v[2] for k, v in outcomes.items() if v[0] and v[2] is not None}
    assert not [m for m in failed.values() if "internal error" in str(m)], failed
    # what the admin's calls changed is in the audit log under the admin's name, nobody else's
    with Session(app.engine) as s:
        rows = audit.events(s, limit=1000)
    admin_only = {a.value for a in (AuditAction.TRAIN_START, AuditAction.NO_VERSION, AuditAction.EXPORT)}
    assert admin_only <= {r.action for r in rows if r.actor == "ada"}
    assert {r.actor for r in rows if r.action in admin_only} == {"ada"}


def api_index(demo: gr.Blocks, api_name: str) -> int:
    """The ``fn_index`` of the event named ``api_name``."""
    found = [i for i, f in demo.fns.items() if f.api_name == api_name]
    assert len(found) == 1, f"{api_name}: {len(found)} events"
    return found[0]


def call_named(client: Browserless, demo: gr.Blocks, api_name: str) -> tuple[bool, Any]:
    """Call the event named ``api_name`` with the page's initial input values."""
    i = api_index(demo, api_name)
    return client.call(i, event_inputs(demo.fns[i], initial_inputs(demo)))


def test_no_data_without_a_login_and_a_wrong_password_fails(tmp_path: Path, demo_dir: Path, photos: Path) -> None:
    app = make_app(f"sqlite:///{tmp_path / 'app.db'}", tmp_path, demo_dir, photos)
    with serving(app, AuthConfig("login")) as (demo, url):
        show = api_index(demo, "show")
        show_inputs = event_inputs(demo.fns[show], initial_inputs(demo))
        anonymous = Browserless(url)
        try:
            # The page shell shows the login form: no components, no photos, no names. (Gradio embeds
            # its API description in it even before a login: endpoint names, parameter labels and
            # the dropdowns' choices, such as the breed list; no stored data.)
            page = anonymous.http.get("").text.replace(" ", "")
            assert '"auth_required":true' in page and '"components":[]' in page
            assert not [p.name for p in photos.rglob("*.jpg") if p.name in page]
            assert '"ann"' not in page and '"ada"' not in page
            for path in ("config", "gradio_api/info", f"gradio_api/file={photos / 'Bengal'}"):
                assert anonymous.http.get(path).status_code == 401, path
            with pytest.raises(httpx.HTTPStatusError) as exc:
                anonymous.call(show, show_inputs)
            assert exc.value.response.status_code == 401
            assert anonymous.http.post("gradio_api/call/show", json={"data": []}).status_code == 401
            upload = anonymous.http.post("gradio_api/upload", files={"files": ("a.jpg", b"x" * 10)})
            assert upload.status_code == 401
            wrong = anonymous.login("ann", "wrong password!")
            assert wrong.status_code == 400 and "Incorrect credentials" in wrong.text
            assert anonymous.login("nobody", PASSWORD).status_code == 400
            assert anonymous.http.get("config").status_code == 401  # still nobody
            assert anonymous.login("ann", PASSWORD).status_code == 200
            assert anonymous.http.get("config").status_code == 200
            ok, out = anonymous.call(show, show_inputs)
            assert ok and out
        finally:
            anonymous.close()
        with Session(app.engine) as s:
            accounts.set_disabled(s, "ann")
        disabled = Browserless(url)
        try:
            assert disabled.login("ann", PASSWORD).status_code == 400  # a disabled account cannot log in
        finally:
            disabled.close()


def test_uploads_over_the_limit_are_refused_with_a_clear_message(tmp_path: Path, demo_dir: Path, photos: Path) -> None:
    app = make_app(f"sqlite:///{tmp_path / 'app.db'}", tmp_path, demo_dir, photos, max_upload_mb=1)
    with serving(app, AuthConfig("login")) as (_demo, url):
        client = Browserless(url)
        try:
            assert client.login("ann", PASSWORD).status_code == 200
            small = (photos / "Bengal").glob("*.jpg").__next__().read_bytes()
            assert len(small) < 1024 * 1024
            ok = client.http.post("gradio_api/upload", files={"files": ("cat.jpg", small)})
            assert ok.status_code == 200 and len(ok.json()) == 1
            big = client.http.post("gradio_api/upload", files={"files": ("big.jpg", b"\xff" * (1024 * 1024 + 1))})
            assert big.status_code == 413
            assert big.text == "File size exceeded maximum allowed size of 1048576 bytes."
        finally:
            client.close()


def test_trusted_header_mode_honours_the_header_only_from_the_configured_proxies(
    tmp_path: Path, demo_dir: Path, photos: Path
) -> None:
    from catreview.app.auth import resolve_auth

    header = "X-Forwarded-User"
    for proxies, honoured in ((["127.0.0.1"], True), (["10.0.0.0/8"], False)):
        app = make_app(
            f"sqlite:///{tmp_path / f'app-{honoured}.db'}",
            tmp_path / str(honoured),
            demo_dir,
            photos,
            auth_header=header,
            trusted_proxies=proxies,
        )
        auth = resolve_auth(app.engine, app.settings, "0.0.0.0")  # header mode, even on a public host
        assert auth.mode == "header" and auth.proxies == tuple(proxies)
        with serving(app, auth) as (demo, url):
            clients = {name: Browserless(url, headers={header: name}) for name in ("ann", "ada", "mallory")}
            anonymous = Browserless(url)
            try:
                if not honoured:  # the test client is 127.0.0.1, not a configured proxy
                    for c in clients.values():
                        assert c.http.get("config").status_code == 401
                        with pytest.raises(httpx.HTTPStatusError) as exc:
                            call_named(c, demo, "show")
                        assert exc.value.response.status_code == 401
                    continue
                assert anonymous.http.get("config").status_code == 401  # no header: nobody
                assert clients["ann"].http.get("config").status_code == 200
                ok, out = call_named(clients["ann"], demo, "show")
                assert ok and out
                ok, out = call_named(clients["ann"], demo, "no_adapter")
                assert not ok and out.startswith("ann (annotator) cannot promote or roll back")
                ok, out = call_named(clients["ada"], demo, "no_adapter")
                assert ok and "No adapter" in out[0]
                ok, out = call_named(clients["mallory"], demo, "show")  # named by the proxy, not a user
                assert not ok and out == "mallory is not a user of this app; ask an admin to add you"
            finally:
                for c in [*clients.values(), anonymous]:
                    c.close()
        if honoured:
            with Session(app.engine) as s:
                assert [(r.actor, r.action) for r in audit.events(s)] == [("ada", AuditAction.NO_VERSION.value)]


# ------------------------------------------------------------------ audit rows from the UI's API and the CLI
def labelled_photos(tmp_path: Path, cats_dir: Path, per_breed: int = 6) -> Path:
    """``per_breed`` shared photos of each of :data:`BREEDS` (enough for a round's splits)."""
    root = tmp_path / "labelled"
    for breed in BREEDS:
        (root / breed).mkdir(parents=True)
        for p in sorted((cats_dir / breed).glob("*.jpg"))[:per_breed]:
            shutil.copy(p, root / breed / p.name)
    return root


def audit_rows(app_or_engine: Any) -> list[tuple[str, str, str]]:
    """``(actor, action, target)`` of every audit event, oldest first."""
    engine = getattr(app_or_engine, "engine", app_or_engine)
    with Session(engine) as s:
        return [(r.actor, r.action, r.target) for r in reversed(audit.events(s, limit=1000))]


@pytest.mark.slow  # a real training round is started (a process) and cancelled; two random LoRA adapters
def test_promote_export_and_training_from_the_ui_api_are_audited_under_the_callers_name(
    tmp_path: Path, demo_dir: Path, cats_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    from catreview.app.presenters.train import CANCELLING, CLASSIFIER_STARTED, NO_ADAPTER
    from tests.test_adapters import add_version, random_adapter

    monkeypatch.setenv("CATREVIEW_FUSION__CALIBRATION_MIN_REVIEWS", "4")  # 12 photos suffice to calibrate
    app = make_app(f"sqlite:///{tmp_path / 'app.db'}", tmp_path, demo_dir, labelled_photos(tmp_path, cats_dir))
    app.start_background([])  # predictions (the calibration fits on them)
    assert app.wait(300) and app.job.error is None, app.job.log
    base = app.registry.base_model()
    v1, v2 = (
        add_version(app.engine, app.settings, base, random_adapter(base, tmp_path / f"lora{k}", k)) for k in (1, 2)
    )
    with serving(app, AuthConfig("login")) as (demo, url):
        # the Train tab's refresh (as its timer runs it) fills this session's version dropdown
        refresh = next(f.api_name for f in demo.fns.values() if f.name == "tick" and f.api_visibility == "public")
        annotator = Client(url, auth=("ann", PASSWORD), verbose=False)
        annotator.predict("", api_name=f"/{refresh}")
        with pytest.raises(
            AppError, match=r"ann \(annotator\) cannot promote or roll back model versions: that needs the admin role"
        ):
            annotator.predict(str(v2), api_name="/promote_adapter")
        with pytest.raises(AppError, match=r"ann \(annotator\) cannot export"):
            annotator.predict(0, 64, 0, False, False, api_name="/export")
        admin = Client(url, auth=("ada", PASSWORD), verbose=False)
        admin.predict("", api_name=f"/{refresh}")
        assert admin.predict(str(v2), api_name="/promote_adapter").startswith(f"Adapter #{v2} is active")
        assert admin.predict(str(v1), api_name="/promote_adapter").startswith(f"Adapter #{v1} is active")  # older
        assert admin.predict(api_name="/no_adapter") == NO_ADAPTER
        summary, archive = admin.predict(0, 64, 0, False, False, api_name="/export")
        assert archive.endswith(".zip") and "12 photos" in summary, summary
        started = admin.predict(1, 2e-4, 4, 2, False, api_name="/retrain")
        assert started.startswith("Run #"), started
        run_id = int(started.split()[1].lstrip("#").rstrip(":"))
        assert admin.predict(api_name="/cancel_training") == CANCELLING
        assert app.train_jobs.wait(run_id, timeout=120) != "running"
        assert admin.predict(api_name="/retrain_classifier") == CLASSIFIER_STARTED
        assert classifier_job(app).wait(120)
        report, *_ = admin.predict(api_name="/calibrate")
        assert "calibration #1" in report, report
    export_name = Path(archive).stem
    assert audit_rows(app) == [
        ("ada", "promote", f"adapter #{v2}"),
        ("ada", "rollback", f"adapter #{v1}"),
        ("ada", "no_version", "no adapter"),
        ("ada", "export", export_name),
        ("ada", "train_start", f"run #{run_id}"),
        ("ada", "train_cancel", f"run #{run_id}"),
        ("ada", "train_start", "classifier"),
        ("ada", "calibrate", "calibration #1"),
    ]


@pytest.mark.slow  # a VLM round process starts (and fails at once); a stage-1 refit; random LoRA adapters
def test_training_promotion_rollback_and_export_from_the_cli_are_audited_as_cli(
    tmp_path: Path, demo_dir: Path, cats_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from catreview.cli.main import main as cli_main
    from catreview.cli.users import CLI_ACTOR
    from tests.export_builder import write_export
    from tests.test_adapters import add_version, random_adapter
    from tests.test_training import export_rows

    monkeypatch.setenv("CATREVIEW_FUSION__CALIBRATION_MIN_REVIEWS", "4")
    app = make_app(f"sqlite:///{tmp_path / 'app.db'}", tmp_path, demo_dir, labelled_photos(tmp_path, cats_dir))
    app.start_background([])  # predictions (the calibration fits on them)
    assert app.wait(300) and app.job.error is None, app.job.log
    monkeypatch.setenv("CATREVIEW_DATA_DIR", str(app.settings.data_dir))
    monkeypatch.setenv("CATREVIEW_DEMO_DIR", str(demo_dir))
    db = ["--db", app.settings.database_url]
    base = app.registry.base_model()
    v1, v2 = (
        add_version(app.engine, app.settings, base, random_adapter(base, tmp_path / f"lora{k}", k)) for k in (1, 2)
    )
    for argv in (["promote", str(v2)], ["rollback", str(v1)], ["rollback", "none"]):
        assert cli_main(["adapters", *argv, "--base", base, *db]) == 0
    assert cli_main(["export", "--out", str(tmp_path / "exports" / "v1"), "--no-check", *db]) == 0
    assert cli_main(["train", "--stage", "classifier", *db]) == 0
    assert cli_main(["calibrate", *db]) == 0
    broken = write_export(export_rows({"Bengal": 2, "Persian": 2}, 1), tmp_path / "round-export")
    (broken / "validation" / next(p.name for p in (broken / "validation").iterdir())).unlink()  # the round fails
    assert cli_main(["train", "--base", base, "--export", str(broken), "--max-steps", "1", *db]) == 1
    rows = audit_rows(app)
    assert {actor for actor, *_ in rows} == {CLI_ACTOR}
    assert [(action, target) for _, action, target in rows] == [
        ("promote", f"vlm #{v2}"),
        ("rollback", f"vlm #{v1}"),
        ("no_version", "no vlm version"),
        ("export", "v1"),
        ("train_start", "classifier"),
        ("calibrate", "calibration #1"),
        ("train_start", "run #1"),
    ]


# ------------------------------------------------------------------ app.py: who may start it open
def test_app_refuses_to_listen_open_beyond_loopback_and_bad_header_settings(
    tmp_path: Path, demo_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import app as app_main

    monkeypatch.setenv("CATREVIEW_DEMO_DIR", str(demo_dir))
    monkeypatch.setenv("CATREVIEW_DATA_DIR", str(tmp_path / "data"))
    db = ["--db", f"sqlite:///{tmp_path / 'a.db'}", "--no-predict"]
    assert app_main.main(["--host", "0.0.0.0", *db]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: refusing to listen on 0.0.0.0 with no accounts") and "--no-auth" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    cfg = tmp_path / "header.toml"
    cfg.write_text('auth_header = "X-Forwarded-User"\n')  # and no trusted_proxies
    assert app_main.main(["--config", str(cfg), *db]) == 2
    err = capsys.readouterr().err
    assert err == "error: trusted-header mode needs a header name and at least one proxy address\n"


@pytest.mark.slow  # app.py in a child process: imports, model checks, launch (13 s quiet, 45 s busy)
def test_no_auth_starts_open_on_a_public_host_with_a_warning(tmp_path: Path, demo_dir: Path) -> None:
    import os
    import socket
    import subprocess
    import sys
    import time

    from catreview.config import REPO_ROOT

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "CATREVIEW_DEMO_DIR": str(demo_dir), "CATREVIEW_DATA_DIR": str(tmp_path / "data")}
    cmd = [sys.executable, str(REPO_ROOT / "app.py"), "--db", f"sqlite:///{tmp_path / 'a.db'}", "--no-predict"]
    log = tmp_path / "app.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--host", "0.0.0.0", "--port", str(port), "--no-auth"], env=env, stderr=out, stdout=out
        )
    try:
        deadline = time.monotonic() + 120
        while True:  # the page answers on the port, open: no login
            assert proc.poll() is None, log.read_text(errors="replace")[-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/config", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the app did not answer within 120 s"
            time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    warning = [line for line in log.read_text(errors="replace").splitlines() if line.startswith("warning: --no-auth")]
    assert len(warning) == 1 and "anyone who can reach the port can review, train" in warning[0]
    assert "export" in warning[0]
