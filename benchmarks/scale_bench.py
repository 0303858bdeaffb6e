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
process after a random photo (``queue_<kind>_p95_ms``; the query the Review tab's queue
selector runs, without Gradio). One JSON line per N::

    {"photos": N, "db": "sqlite", "show_p50_ms": .., "show_p95_ms": .., "review_p50_ms": ..,
     "review_p95_ms": .., "next_unreviewed_p95_ms": .., "build_s": .., "echo_p50_ms": .., "echo_p95_ms": ..,
     "queue_import_p95_ms": .., "queue_margin_p95_ms": .., ..., "scores_s": ..}

(``echo_*``: an endpoint that only echoes, on a bare Gradio app measured right after: Gradio's
and the client's own cost per call on this machine), then, with two or more sizes, a line with
the p95 ratios largest/smallest (goal: every p95 <= 100 ms at 127,000 photos and within 1.5x of the 1,000-photo p95, measured in the same run). With
``--clients K`` it also runs K concurrent clients x ``--client-saves`` saves on overlapping photos
of the largest database and prints acknowledged saves, review rows stored, client errors and
"database is locked" messages (goal: acknowledged == stored, 0 errors, 0 locked).

``--db`` names an existing PostgreSQL (or SQLite) URL; for PostgreSQL a fresh database
``catreview_bench_<N>_<random>`` is created next to the named one and dropped at the end.
Timings are wall-clock on a noisy machine; compare numbers from one run only.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
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


def measure_queues(url: str, ids: list[int], calls: int, seed: int) -> dict[str, float]:
    """p50/p95 (ms) of :func:`catreview.query.queues.next_in_queue` for every queue kind, after a
    random photo each call, in this process (the query layer the Review tab's queue selector calls)."""
    engine = make_engine(url)
    rng = random.Random(seed)
    out = {}
    try:
        for kind in QUEUE_KINDS:
            times = _timed(lambda k=kind: next_in_queue(engine, k, rng.choice(ids)), calls)
            out[f"queue_{kind}_p50_ms"], out[f"queue_{kind}_p95_ms"] = _p(times, 50), _p(times, 95)
    finally:
        engine.dispose()
    return out


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

    def __init__(self, base: str) -> None:
        import httpx

        self.base = base.rstrip("/") + "/gradio_api/call/"
        self.http = httpx.Client(timeout=60)
        self.session_hash = uuid.uuid4().hex[:11]

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


def _client(base: str, transport: str) -> Any:
    """An API client for ``base``: :class:`HttpApi` (``http``) or ``gradio_client.Client``."""
    if transport == "http":
        return HttpApi(base)
    from gradio_client import Client

    return Client(base, verbose=False, download_files=False)


def _timed(fn: Callable[[], Any], calls: int) -> list[float]:
    for _ in range(10):
        fn()
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


def _p(values: list[float], q: float) -> float:
    return round(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1], 1)


def measure(base: str, ids: list[int], calls: int, seed: int, transport: str) -> dict[str, float]:
    """p50/p95 (ms) of ``/show``, ``/review`` and ``/next_unreviewed`` on random photos."""
    client = _client(base, transport)
    rng = random.Random(seed)
    names = BreedVocabulary.default().names
    show = _timed(lambda: client.predict(rng.choice(ids), api_name="/show"), calls)
    saved = 0

    def review() -> None:
        nonlocal saved
        out = client.predict(rng.choice(ids), rng.choice(names), "bench", "", api_name="/review")
        saved += "Saved" in out[-1]

    rev = _timed(review, calls)
    if saved != calls + 10:
        raise SystemExit(f"error: {calls + 10 - saved} saves were not acknowledged")
    nxt = _timed(lambda: client.predict(rng.choice(ids), api_name="/next_unreviewed"), calls)
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


def concurrency(base: str, url: str, ids: list[int], clients: int, saves: int) -> dict[str, Any]:
    """``clients`` threads, each with its own client, saving ``saves`` labels on overlapping photos."""
    from gradio_client import Client

    names = BreedVocabulary.default().names
    pool = ids[: max(50, len(ids) // 100)]  # overlapping photos: several clients save the same ones
    acked = [0] * clients
    errors: list[str] = []
    locked = [0]
    run = uuid.uuid4().hex[:6]

    def worker(k: int) -> None:
        client = Client(base, verbose=False)  # downloads the photos too, as a browser does
        rng = random.Random(k)
        for _ in range(saves):
            try:
                out = client.predict(rng.choice(pool), rng.choice(names), f"c{k}-{run}", "", api_name="/review")
            except Exception as exc:  # noqa: BLE001  (counted and printed: every client error is a finding)
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                continue
            if "Saved" in out[-1]:
                acked[k] += 1
            elif "locked" in out[-1]:
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
        stored = s.exec(select(func.count()).select_from(Review).where(col(Review.annotator).like(f"%-{run}"))).one()
    engine.dispose()
    return {
        "clients": clients,
        "saves_each": saves,
        "acknowledged": sum(acked),
        "stored": int(stored),
        "client_errors": len(errors),
        "database_locked": locked[0],
        "seconds": round(seconds, 1),
        "errors_sample": errors[:3],
    }


@contextmanager
def database(kind: str, server_url: str | None, n: int, tmp: Path) -> Iterator[str]:
    """A fresh, empty database for ``n`` photos: a SQLite file, or a new database on a PostgreSQL server."""
    if kind == "sqlite":
        yield f"sqlite:///{tmp / f'bench-{n}.db'}"
        return
    assert server_url is not None
    name = f"catreview_bench_{n}_{uuid.uuid4().hex[:6]}"
    admin = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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
    p.add_argument("--demo-dir", type=Path, help="where the demo models are cached (default: the settings' demo_dir)")
    args = p.parse_args(argv)
    server = None
    server_url = args.db
    if args.postgres:
        from tests.postgres import PostgresServer

        server = PostgresServer().start()
        server_url = server.url("postgres")
    kind = "postgresql" if server_url and server_url.startswith("postgresql") else "sqlite"
    if server_url and kind == "sqlite":
        raise SystemExit("error: --db takes a PostgreSQL URL; SQLite databases are made in a temporary folder")
    # What is measured is the database and the query layer, so the predictions stored for every row
    # come from the tiny random built-in models (seconds to build, no training needed).
    settings_kwargs: dict[str, Any] = {"builtin_models": "random"}
    if args.demo_dir:
        settings_kwargs["demo_dir"] = args.demo_dir
    results = []
    try:
        with tempfile.TemporaryDirectory(prefix="scale-bench-") as tmp_s:
            tmp = Path(tmp_s)
            sizes = sorted(args.photos)
            for n in sizes:
                with database(kind, server_url, n, tmp) as url:
                    build_s = build_database(url, n, settings_kwargs)
                    scores_s = build_scores(url, settings_kwargs, seed=n)
                    data_dir = tmp / f"data-{n}"
                    data_dir.mkdir()
                    with running_app(url, data_dir, args.demo_dir) as base:
                        ids = _ids(url)
                        row = {
                            "photos": n,
                            "db": kind,
                            **measure(base, ids, args.calls, seed=n, transport=args.transport),
                            "transport": args.transport,
                            "build_s": round(build_s, 1),
                            **gradio_floor(args.calls, args.transport),
                            **measure_queues(url, ids, args.calls, seed=n),  # the app is idle meanwhile
                            "scores_s": round(scores_s, 1),
                        }
                        print(json.dumps(row), flush=True)
                        results.append(row)
                        if args.clients and n == sizes[-1]:
                            print(
                                json.dumps(
                                    {
                                        "photos": n,
                                        "db": kind,
                                        **concurrency(base, url, ids, args.clients, args.client_saves),
                                    }
                                ),
                                flush=True,
                            )
    finally:
        if server is not None:
            server.stop()
    if len(results) >= 2:
        small, big = results[0], results[-1]
        keys = ("show_p95_ms", "review_p95_ms", "next_unreviewed_p95_ms", *(f"queue_{k}_p95_ms" for k in QUEUE_KINDS))
        ratios = {k.replace("_ms", "_ratio"): round(big[k] / small[k], 2) for k in keys}
        met = all(big[k] <= GOAL_P95_MS for k in keys) and all(v <= GOAL_RATIO for v in ratios.values())
        print(json.dumps({"db": kind, "small": small["photos"], "large": big["photos"], **ratios, "goals_met": met}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
