"""Benchmark: the Review tab's endpoints at collection scale, over HTTP, on SQLite and PostgreSQL.

Usage::

    python benchmarks/scale_bench.py --photos 1000 127000                 # SQLite files in a temp folder
    python benchmarks/scale_bench.py --photos 1000 127000 --postgres      # a throwaway local PostgreSQL server
    python benchmarks/scale_bench.py --photos 20000 --db postgresql+psycopg://me@host/scratch
    python benchmarks/scale_bench.py --photos 2000 --clients 8 --client-saves 200   # concurrency only

For each N it builds a database through the project's own code: image rows written in batches
by ``insert_ignoring_conflicts`` + :func:`catreview.data.counts.bump` (as the importer does), one
real shared photo backing every row (distinct content hashes), stage-1 and VLM predictions
computed once on that photo by the demo models (:func:`catreview.predict.runner.run_predictions`)
and stored for every row with :func:`catreview.predict.runner.insert_predictions`, and 90% of
the photos reviewed through :func:`catreview.data.reviews.append_first_reviews` (as an import
of existing labels does). It then starts
``app.py --no-predict`` on that database in a separate process and calls the Review tab's API
with ``gradio_client``, as a script or a browser's page would: ``/show`` (open a photo),
``/review`` (save a label, which also renders the next photo) and ``/next_unreviewed``, each
``--calls`` times on random photos (after 10 warm-up calls). The review queues' scores are
written by :func:`catreview.query.queues.refresh_scores` (plus label-issue scores for a random
10%), and :func:`catreview.query.queues.next_in_queue` of every queue kind is timed in this
process after a random photo (``queue_<kind>_p50_ms``/``_p95_ms``; the query the Review tab's
queue selector runs, without Gradio), then a grid page of every filter
(``grid_<filter>_p50_ms``/``_p95_ms``, :func:`grid_bench.grid_timings`). On PostgreSQL the
planner's statistics are refreshed first (``ANALYZE``, as autovacuum does after a bulk load).
``--queries-only`` skips the app and its endpoints (queues and grid only) and times every size
interleaved call by call once all are built (:func:`bench_common.interleaved`: load on the shared
machine hits every size alike, so the ratios measure the sizes). One JSON line per N::

    {"photos": N, "db": "sqlite", "show_p50_ms": .., "show_p95_ms": .., "review_p50_ms": ..,
     "review_p95_ms": .., "next_unreviewed_p95_ms": .., "build_s": .., "echo_p50_ms": .., "echo_p95_ms": ..,
     "queue_import_p95_ms": .., "queue_margin_p95_ms": .., ..., "grid_all_p95_ms": .., ..., "scores_s": ..}

(``echo_*``: an endpoint that only echoes, on a bare Gradio app measured right after: Gradio's
and the client's own cost per call on this machine), then, with two or more sizes, a line with
the p95 and p50 ratios largest/smallest (goal: every p95 <= 100 ms at 127,000 photos and within
1.5x of the 1,000-photo p95, measured in the same run), and a line with the query-plan findings
of every queue kind and grid filter at the largest size (:func:`bench_common.plan_flags`: a
scan of a growing table not along an index, a sort; empty lists are clean). With
``--clients K`` it also runs K concurrent clients x ``--client-saves`` saves on overlapping photos
of the largest database and prints acknowledged saves, review rows stored, client errors and
"database is locked" messages (goal: acknowledged == stored, 0 errors, 0 locked). With
``--login`` annotator accounts are created first, so the app requires a login (as a team's does):
the timed client and each concurrent client log in with their own account, and the concurrency
line also counts the rows stored under the saving client's account (goal: == stored).

``--db`` names an existing PostgreSQL (or SQLite) URL; for PostgreSQL a fresh database
``catreview_bench_<N>_<random>`` is created next to the named one and dropped at the end.
Timings are wall-clock on a noisy machine; compare numbers from one run only. Note that every
photo here carries the same predictions (one template), so every queue key is tied and every
photo has the same predicted label: the worst case for ties, a degenerate one for the grid's
prediction filters (``grid_bench.py`` standalone builds realistic distributions).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_common import analyze, interleaved, percentile, plan_flags, postgres_server, scratch_database  # noqa: E402
from grid_bench import grid_calls, grid_plans  # noqa: E402
from sqlalchemy import create_engine  # noqa: E402
from sqlalchemy.engine import Engine  # noqa: E402
from sqlmodel import Session, col, func, select  # noqa: E402

from catreview.config import load_settings  # noqa: E402
from catreview.data import counts  # noqa: E402
from catreview.data.db import ImageRecord, Prediction, Review, insert_ignoring_conflicts, make_engine  # noqa: E402
from catreview.data.images import load_rgb  # noqa: E402
from catreview.data.labels import BreedVocabulary  # noqa: E402
from catreview.data.reviews import append_first_reviews  # noqa: E402
from catreview.models.registry import ModelRegistry  # noqa: E402
from catreview.predict.runner import insert_predictions, run_predictions  # noqa: E402
from catreview.query.queues import QUEUE_KINDS, next_in_queue, refresh_scores, store_label_issues  # noqa: E402

SHARED_PHOTO = REPO.parent / "shared" / "data" / "cats" / "Abyssinian"
BATCH = 2000
REVIEWED_SHARE = 0.9
GOAL_P95_MS = 100.0
GOAL_RATIO = 1.5


def _photo() -> Path:
    found = sorted(SHARED_PHOTO.glob("*.jpg"))
    if not found:
        raise SystemExit(f"error: no shared photo under {SHARED_PHOTO}")
    return found[0]


def build_database(url: str, n: int, settings_kwargs: dict[str, Any], seed: int = 0) -> float:
    """Fill the empty database at ``url`` with ``n`` photos, predictions and reviews; returns seconds."""
    t0 = time.perf_counter()
    engine = make_engine(url)
    photo = _photo()
    img = load_rgb(photo)
    size = photo.stat().st_size
    with Session(engine) as s:
        for start in range(0, n, BATCH):
            rows = [
                {
                    "sha256": hashlib.sha256(f"bench-{i}".encode()).hexdigest(),
                    "path": str(photo),
                    "size": size,
                    "width": img.width,
                    "height": img.height,
                }
                for i in range(start, min(n, start + BATCH))
            ]
            s.exec(insert_ignoring_conflicts(s, ImageRecord, ["sha256"]), params=rows)
            counts.bump(s, photos=len(rows))
            s.commit()
        first = s.exec(select(ImageRecord.id).order_by(col(ImageRecord.id)).limit(1)).one()
    settings = load_settings(None, database_url=url, **settings_kwargs)
    registry = ModelRegistry(settings, engine=engine)
    run_predictions(engine, registry, image_ids=[first], num_workers=0)
    with Session(engine) as s:
        template = [
            p.model_dump(exclude={"id"}) for p in s.exec(select(Prediction).where(Prediction.image_id == first))
        ]
        last = first
        while True:
            ids = list(
                s.exec(
                    select(ImageRecord.id).where(col(ImageRecord.id) > last).order_by(col(ImageRecord.id)).limit(BATCH)
                )
            )
            if not ids:
                break
            insert_predictions(s, [{**row, "image_id": i} for i in ids for row in template])
            last = ids[-1]
    rng = random.Random(seed)
    names = BreedVocabulary.default().names
    with Session(engine) as s:
        last = 0
        while True:
            ids = list(
                s.exec(
                    select(ImageRecord.id).where(col(ImageRecord.id) > last).order_by(col(ImageRecord.id)).limit(BATCH)
                )
            )
            if not ids:
                break
            chosen = [(i, rng.choice(names)) for i in ids if rng.random() < REVIEWED_SHARE]
            append_first_reviews(s, dict(chosen), "import", source="import")
            s.commit()
            last = ids[-1]
    engine.dispose()
    return time.perf_counter() - t0


def build_scores(url: str, settings_kwargs: dict[str, Any], seed: int = 0) -> float:
    """Write the queue scores (:func:`catreview.query.queues.refresh_scores`, the app's own pass
    over the stored predictions) and label-issue scores for a random 10% of the photos (as
    ``label-errors`` stores them); returns seconds."""
    t0 = time.perf_counter()
    engine = make_engine(url)
    settings = load_settings(None, database_url=url, **settings_kwargs)
    refresh_scores(engine, ModelRegistry(settings, engine=engine))
    rng = random.Random(seed)
    ids = _ids(url)
    with Session(engine) as s:
        store_label_issues(s, [(i, rng.random(), "bench") for i in ids if rng.random() < 0.1])
    engine.dispose()
    return time.perf_counter() - t0


def query_calls(engine: Engine, ids: list[int], seed: int) -> dict[str, Callable[[], Any]]:
    """``{"queue_<kind>": call, ..., "grid_<filter>": call, ...}``: each call is one
    :func:`catreview.query.queues.next_in_queue` of that kind after a random photo of ``ids`` (the
    query the Review tab's queue selector runs, without Gradio), or one grid page of that filter
    (:func:`grid_bench.grid_calls`)."""
    rng = random.Random(seed)

    def after_random(kind: str) -> Callable[[], Any]:
        return lambda: next_in_queue(engine, kind, rng.choice(ids))

    out = {f"queue_{kind}": after_random(kind) for kind in QUEUE_KINDS}
    out.update(grid_calls(engine, seed=seed))
    return out


def measure_queries(url: str, ids: list[int], calls: int, seed: int) -> dict[str, float]:
    """p50/p95 (ms) of every call of :func:`query_calls` on the database at ``url``, in this process."""
    engine = make_engine(url)
    try:
        return interleaved({0: query_calls(engine, ids, seed)}, calls)[0]
    finally:
        engine.dispose()


def query_plans(url: str, ids: list[int]) -> dict[str, list[str]]:
    """Flagged plan lines (:func:`bench_common.plan_flags`) of ``next_in_queue`` from the middle
    photo for every queue kind (``queue_<kind>``) and of a grid page for every filter (``grid_<name>``)."""
    engine = make_engine(url)
    middle = sorted(ids)[len(ids) // 2]
    try:
        out = {
            f"queue_{kind}": plan_flags(engine, functools.partial(next_in_queue, engine, kind, middle))["flags"]
            for kind in QUEUE_KINDS
        }
        out.update({f"grid_{name}": flags for name, flags in grid_plans(engine).items()})
        return out
    finally:
        engine.dispose()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running_app(url: str, data_dir: Path, demo_dir: Path | None) -> Iterator[str]:
    """``app.py --no-predict`` on ``url`` in a child process; yields its base URL."""
    port = _free_port()
    env = {
        **os.environ,
        "CATREVIEW_DATA_DIR": str(data_dir),
        "CATREVIEW_BUILTIN_MODELS": "random",  # the stored predictions come from the tiny random models
        "GRADIO_ANALYTICS_ENABLED": "False",
    }
    if demo_dir is not None:
        env["CATREVIEW_DEMO_DIR"] = str(demo_dir)
    log = open(data_dir / "app.log", "wb")  # noqa: SIM115  (closed below)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "app.py"), "--db", url, "--port", str(port), "--no-predict"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                log.flush()
                tail = (data_dir / "app.log").read_text(errors="replace")[-1500:]
                raise SystemExit(f"error: the app exited with {proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(base, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(
                        f"error: the app did not answer within 180 s; see {data_dir / 'app.log'}"
                    ) from None
                time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def _ids(url: str) -> list[int]:
    engine = create_engine(url)
    with Session(engine) as s:
        ids = [int(i) for i in s.exec(select(ImageRecord.id))]
    engine.dispose()
    return ids


class HttpApi:
    """Gradio's documented REST API (``POST /gradio_api/call/<name>``, then the event's SSE stream),
    through one keep-alive ``httpx`` connection and one session hash, as one browser tab (or one
    ``gradio_client.Client``) keeps: the same queue and endpoints ``gradio_client`` uses, without
    the client's 50 ms polling sleeps (``gradio_client/utils.py``, ``time.sleep(0.05)`` while
    waiting for the next SSE message), which alone cost it ~150 ms per call here. (Without a
    session hash Gradio builds a fresh session state, the config of every component of the app,
    on each call.)

    Raises:
        RuntimeError: the endpoint answered with an ``error`` event.
    """

    def __init__(self, base: str, auth: tuple[str, str] | None = None) -> None:
        import httpx

        self.base = base.rstrip("/") + "/gradio_api/call/"
        self.http = httpx.Client(timeout=60)
        self.session_hash = uuid.uuid4().hex[:11]
        if auth is not None:  # Gradio's login form: the session cookie rides on every later call
            name, password = auth
            self.http.post(
                base.rstrip("/") + "/login", data={"username": name, "password": password}
            ).raise_for_status()

    def predict(self, *args: Any, api_name: str) -> Any:
        name = api_name.lstrip("/")
        event_id = (
            self.http.post(self.base + name, json={"data": list(args), "session_hash": self.session_hash})
            .raise_for_status()
            .json()["event_id"]
        )
        event = None
        with self.http.stream("GET", f"{self.base}{name}/{event_id}") as r:
            for line in r.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event in ("complete", "error"):
                    if event == "error":
                        raise RuntimeError(f"{api_name}: {line[6:]}")
                    out = json.loads(line[6:])
                    return out[0] if len(out) == 1 else out
        raise RuntimeError(f"{api_name}: the event stream ended without a result")


def _client(base: str, transport: str, auth: tuple[str, str] | None = None) -> Any:
    """An API client for ``base``: :class:`HttpApi` (``http``) or ``gradio_client.Client``,
    logged in as ``auth`` = ``(name, password)`` when given."""
    if transport == "http":
        return HttpApi(base, auth)
    from gradio_client import Client

    return Client(base, verbose=False, download_files=False, auth=auth)


LOGIN_PASSWORD = "bench-password"
"""Password of the accounts ``--login`` creates (:func:`create_accounts`)."""


def create_accounts(url: str, names: list[str]) -> None:
    """Add an annotator account per name (password :data:`LOGIN_PASSWORD`): the app then requires
    a login (:func:`catreview.app.auth.resolve_auth`), as a team's app does."""
    from catreview.data import accounts

    engine = create_engine(url)
    with Session(engine) as s:
        for name in names:
            accounts.add_user(s, name, "annotator", LOGIN_PASSWORD)
    engine.dispose()


def _timed(fn: Callable[[], Any], calls: int) -> list[float]:
    for _ in range(10):
        fn()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


_p = percentile


def _saved(outputs: Any) -> bool:
    """Whether a ``/review`` answer acknowledges the save (its message line says "Saved ..."; the
    REST API also returns the outputs of ``gr.State``, which ``gradio_client`` leaves out, so the
    line is found by its text, not its position)."""
    return any(isinstance(o, str) and o.startswith("Saved ") for o in outputs)


def measure(
    base: str, ids: list[int], calls: int, seed: int, transport: str, auth: tuple[str, str] | None = None
) -> dict[str, float]:
    """p50/p95 (ms) of ``/show``, ``/review`` and ``/next_unreviewed`` on random photos (logged in
    as ``auth`` when given). A save names no shown review (``None``: after whatever is there)."""
    client = _client(base, transport, auth)
    rng = random.Random(seed)
    names = BreedVocabulary.default().names
    show = _timed(lambda: client.predict(rng.choice(ids), False, api_name="/show"), calls)
    saved = 0

    def review() -> None:
        nonlocal saved
        out = client.predict(rng.choice(ids), rng.choice(names), "bench", False, "import", None, api_name="/review")
        saved += _saved(out)

    rev = _timed(review, calls)
    if saved != calls + 10:
        raise SystemExit(f"error: {calls + 10 - saved} saves were not acknowledged")
    nxt = _timed(lambda: client.predict(rng.choice(ids), False, "import", api_name="/next_unreviewed"), calls)
    return {
        "show_p50_ms": _p(show, 50),
        "show_p95_ms": _p(show, 95),
        "review_p50_ms": _p(rev, 50),
        "review_p95_ms": _p(rev, 95),
        "next_unreviewed_p95_ms": _p(nxt, 95),
    }


def gradio_floor(calls: int, transport: str) -> dict[str, float]:
    """p50/p95 (ms) of an endpoint that only echoes its input, on a bare Gradio app in this
    process: what Gradio and its client cost per call on this machine, whatever the app does."""
    import gradio as gr

    from catreview.app.ui import ANALYTICS_SUMMARY_EVERY

    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(ANALYTICS_SUMMARY_EVERY))  # as the app sets it
    with gr.Blocks() as demo:
        box, out = gr.Textbox(), gr.Textbox()
        box.submit(lambda x: x, box, out, api_name="echo")
    demo.queue(default_concurrency_limit=4)
    _, base, _ = demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
    try:
        client = _client(base, transport)
        echo = _timed(lambda: client.predict("x", api_name="/echo"), calls)
    finally:
        demo.close()
    return {"echo_p50_ms": _p(echo, 50), "echo_p95_ms": _p(echo, 95)}


def concurrency(
    base: str, url: str, ids: list[int], clients: int, saves: int, logins: list[str] | None = None
) -> dict[str, Any]:
    """``clients`` threads, each with its own client (logged in as ``logins[k]`` when given, each
    its own account), saving ``saves`` labels on overlapping photos; a save names no shown review
    (after whatever is there), so every save is meant to be acknowledged."""
    from gradio_client import Client

    names = BreedVocabulary.default().names
    pool = ids[: max(50, len(ids) // 100)]  # overlapping photos: several clients save the same ones
    acked = [0] * clients
    errors: list[str] = []
    locked = [0]
    run = uuid.uuid4().hex[:6]

    def worker(k: int) -> None:
        auth = (logins[k], LOGIN_PASSWORD) if logins else None
        client = Client(base, verbose=False, auth=auth)  # downloads the photos too, as a browser does
        rng = random.Random(k)
        for _ in range(saves):
            try:
                pid = rng.choice(pool)
                out = client.predict(pid, rng.choice(names), f"c{k}-{run}", False, "import", None, api_name="/review")
            except Exception as exc:  # noqa: BLE001  (counted and printed: every client error is a finding)
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            if _saved(out):
                acked[k] += 1
            elif any("locked" in o for o in out if isinstance(o, str)):
                locked[0] += 1

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    engine = create_engine(url)
    with Session(engine) as s:
        stored = s.exec(select(func.count()).select_from(Review).where(col(Review.note).like(f"c%-{run}"))).one()
        # with logins: the rows each client saved are under its own account
        own = (
            sum(
                s.exec(
                    select(func.count())
                    .select_from(Review)
                    .where(col(Review.note) == f"c{k}-{run}", col(Review.annotator) == logins[k])
                ).one()
                for k in range(clients)
            )
            if logins
            else None
        )
    engine.dispose()
    return {
        "clients": clients,
        "saves_each": saves,
        "login": bool(logins),
        "acknowledged": sum(acked),
        "stored": int(stored),
        "stored_under_own_account": own,
        "client_errors": len(errors),
        "database_locked": locked[0],
        "seconds": round(seconds, 1),
        "errors_sample": errors[:3],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--photos", type=int, nargs="+", default=[1000, 20000], help="collection sizes N (default 1000 20000)"
    )
    p.add_argument("--db", help="a PostgreSQL URL to create scratch databases next to (default: SQLite files)")
    p.add_argument(
        "--postgres", action="store_true", help="start a throwaway local PostgreSQL server (tests/postgres.py)"
    )
    p.add_argument("--calls", type=int, default=200, help="timed calls per endpoint (default 200)")
    p.add_argument(
        "--transport",
        choices=("http", "gradio_client"),
        default="http",
        help="how the timed calls reach the app: Gradio's REST API over one keep-alive connection (default), "
        "or gradio_client, whose SSE reader sleeps 50 ms between polls (~150 ms a call)",
    )
    p.add_argument("--clients", type=int, default=0, help="concurrent clients for the concurrency run (0: none)")
    p.add_argument("--client-saves", type=int, default=200, help="saves per concurrent client (default 200)")
    p.add_argument(
        "--login",
        action="store_true",
        help="create annotator accounts first, so the app requires a login: every client (the timed one and "
        "each concurrent one) logs in with its own account",
    )
    p.add_argument("--demo-dir", type=Path, help="where the demo models are cached (default: the settings' demo_dir)")
    p.add_argument(
        "--queries-only",
        action="store_true",
        help="time the queue and grid queries only (no app, no endpoints, no Gradio floor)",
    )
    args = p.parse_args(argv)
    if args.db and not args.db.startswith("postgresql"):
        raise SystemExit("error: --db takes a PostgreSQL URL; SQLite databases are made in a temporary folder")
    if args.queries_only and args.clients:
        raise SystemExit("error: --clients needs the app; drop --queries-only")
    # What is measured is the database and the query layer, so the predictions stored for every row
    # come from the tiny random built-in models (seconds to build, no training needed).
    settings_kwargs: dict[str, Any] = {"builtin_models": "random"}
    if args.demo_dir:
        settings_kwargs["demo_dir"] = args.demo_dir
    results = []
    with (
        postgres_server(args.postgres) as started,
        tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp_s,
        ExitStack() as stack,
    ):
        server_url = started or args.db
        kind = "postgresql" if server_url else "sqlite"
        tmp = Path(tmp_s)
        sizes = sorted(args.photos)
        urls: dict[int, str] = {}
        for n in sizes:
            url = urls[n] = stack.enter_context(scratch_database(server_url, n, tmp))
            build_s = build_database(url, n, settings_kwargs)
            scores_s = build_scores(url, settings_kwargs, seed=n)
            engine = make_engine(url)
            analyze(engine)
            engine.dispose()
            ids = _ids(url)
            row: dict[str, Any] = {
                "photos": n,
                "db": kind,
                "build_s": round(build_s, 1),
                "scores_s": round(scores_s, 1),
            }
            if not args.queries_only:
                data_dir = tmp / f"data-{n}"
                data_dir.mkdir()
                logins = [f"bench-{k}" for k in range(max(args.clients, 1))] if args.login else []
                if logins:
                    create_accounts(url, logins)
                with running_app(url, data_dir, args.demo_dir) as base:
                    auth = (logins[0], LOGIN_PASSWORD) if logins else None
                    row.update(measure(base, ids, args.calls, seed=n, transport=args.transport, auth=auth))
                    row["transport"] = args.transport
                    row["login"] = bool(logins)
                    row.update(gradio_floor(args.calls, args.transport))
                    row.update(measure_queries(url, ids, args.calls, seed=n))  # the app is idle meanwhile
                    if args.clients and n == sizes[-1]:
                        found = concurrency(base, url, ids, args.clients, args.client_saves, logins or None)
                        print(json.dumps({"photos": n, "db": kind, **found}), flush=True)
                print(json.dumps(row), flush=True)
            results.append(row)
        if args.queries_only:  # every size is still there: time them together
            engines = {n: make_engine(urls[n]) for n in sizes}
            try:
                timed = interleaved({n: query_calls(engines[n], _ids(urls[n]), seed=n) for n in sizes}, args.calls)
            finally:
                for e in engines.values():
                    e.dispose()
            for row in results:
                row.update(timed[row["photos"]])
                print(json.dumps(row), flush=True)
        largest = urls[sizes[-1]]
        print(
            json.dumps({"photos": sizes[-1], "db": kind, "plan_flags": query_plans(largest, _ids(largest))}), flush=True
        )
    if len(results) >= 2:
        small, big = results[0], results[-1]
        keys = [k for k in big if k.endswith("_p95_ms") and not k.startswith("echo") and k in small]
        ratios = {k.replace("_ms", "_ratio"): round(big[k] / max(small[k], 0.1), 2) for k in keys}
        medians = [k.replace("_p95_", "_p50_") for k in keys]
        ratios.update(
            {
                k.replace("_ms", "_ratio"): round(big[k] / max(small[k], 0.1), 2)
                for k in medians
                if k in big and k in small
            }
        )
        met = all(big[k] <= GOAL_P95_MS for k in keys) and all(
            v <= GOAL_RATIO for k, v in ratios.items() if "_p95_" in k
        )
        print(json.dumps({"db": kind, "small": small["photos"], "large": big["photos"], **ratios, "goals_met": met}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
