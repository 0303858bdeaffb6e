"""Shared test helpers.

* ``HF_HUB_OFFLINE=1`` is set for the whole test session (tests never download), and
  ``CATREVIEW_BUILTIN_MODELS=random`` (the tiny random built-in models) unless a test asks otherwise.
* :func:`shared_photos_dir` finds the shared cat photos (``../shared/data/cats`` next to the
  repository, or ``$CATREVIEW_SHARED_CATS``). When they are absent, tests that need them are
  skipped with a message -- except under CI (``$CI`` set), where a missing data set is a failure.
* :func:`load_photos` opens photos as PIL images; the path (which contains the breed) is never
  passed to a model.
* ``postgres_server`` (one throwaway PostgreSQL cluster per session, :mod:`tests.postgres`),
  ``postgres_url`` (a fresh database on it per test) and ``db_url`` (parametrized: a fresh SQLite
  file, then a fresh PostgreSQL database) run the database tests on both databases.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, PostgresUnavailable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Tests of mechanics run on the tiny random built-in models (also in the app processes they start);
# tests of the real offline models ask for them with ``builtin_models="pretrained"``.
os.environ.setdefault("CATREVIEW_BUILTIN_MODELS", "random")

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SHARED_CATS = REPO_ROOT.parent / "shared" / "data" / "cats"


def shared_photos_dir() -> Path:
    """Folder of the shared photos (``<Breed>/*.jpg`` + ``labels.csv``); skip or fail if absent."""
    root = Path(os.environ.get("CATREVIEW_SHARED_CATS", DEFAULT_SHARED_CATS))
    if not (root / "labels.csv").is_file():
        message = (
            f"shared cat photos not found at {root} (expected <Breed>/*.jpg and labels.csv); "
            "set CATREVIEW_SHARED_CATS to their folder"
        )
        if os.environ.get("CI"):
            pytest.fail(message + " -- CI is set, so missing test data is an error", pytrace=False)
        pytest.skip(message)
    return root


def photo_paths(breeds: list[str], per_breed: int = 1) -> list[Path]:
    """The first ``per_breed`` photos (sorted by name) of each folder in ``breeds``."""
    root = shared_photos_dir()
    paths: list[Path] = []
    for breed in breeds:
        found = sorted((root / breed).glob("*.jpg"))[:per_breed]
        if len(found) < per_breed:
            pytest.fail(f"{root / breed} has {len(found)} photos, {per_breed} needed", pytrace=False)
        paths += found
    return paths


def load_photos(breeds: list[str], per_breed: int = 1):
    """PIL RGB images (fully loaded, files closed) for :func:`photo_paths`."""
    from catreview.data.images import load_rgb

    return [load_rgb(path) for path in photo_paths(breeds, per_breed)]


ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"


@pytest.fixture(scope="session")
def cats_dir() -> Path:
    """The shared photos folder (skip when absent; fail under CI)."""
    return shared_photos_dir()


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Demo models built once per session through :func:`catreview.models.demo.ensure_demo_models`."""
    from catreview.models.demo import ensure_demo_models

    d = tmp_path_factory.mktemp("demo") / "models"
    ensure_demo_models(d)
    return d


@pytest.fixture
def settings(tmp_path: Path, demo_dir: Path):
    """Settings on a fresh SQLite file with the demo models."""
    from catreview.config import load_settings

    return load_settings(
        database_url=f"sqlite:///{tmp_path / 'test.db'}", demo_dir=demo_dir, data_dir=tmp_path / "data"
    )


# ---------------------------------------------------------------------- PostgreSQL (tests/postgres.py)
@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the whole session (started on first use, stopped and
    deleted at the end, also after failures). Missing binaries fail every test that needs it with
    one line saying to install Debian's ``postgresql`` package (never a silent skip)."""
    problem = None
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as exc:
        problem = str(exc)
    if problem is not None:
        pytest.fail(problem, pytrace=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """URL of a fresh, empty database on :func:`postgres_server` (``postgresql+psycopg://...``), dropped after the test."""
    name = postgres_server.create_database()
    try:
        yield postgres_server.url(name)
    finally:
        postgres_server.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh database URL of each kind: a SQLite file in ``tmp_path``, then a new PostgreSQL database."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'test.db'}"
    return request.getfixturevalue("postgres_url")
