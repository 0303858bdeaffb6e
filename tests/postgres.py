"""A throwaway PostgreSQL server for the tests (Debian's ``postgresql`` package, no Docker).

:class:`PostgresServer` runs ``initdb`` into a fresh temporary folder (``--auth=trust``, superuser
``postgres``, UTF8, locale C) and ``pg_ctl start -w`` with the server listening only on
127.0.0.1 on a free port, its Unix socket inside the same folder and durability off (``fsync``,
``synchronous_commit``, ``full_page_writes``: a crash loses the throwaway data, never anything
else). :meth:`PostgresServer.stop` stops it and deletes the folder. Each test gets its own
database from :meth:`PostgresServer.create_database` (``t_<uuid>``), dropped after it.

The server refuses to run as root, so when the tests run as root every server command runs as
the ``postgres`` user (``runuser -u postgres --``, the account the Debian package creates) and the
folder is given to that user. The fixtures are in ``tests/conftest.py``: ``postgres_server``
(session), ``postgres_url`` and ``db_url`` (each test).
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

INSTALL_HINT = (
    "PostgreSQL server binaries (initdb, pg_ctl) not found on PATH or in /usr/lib/postgresql/*/bin; "
    "install Debian's server package: apt-get install -y postgresql (.ci/run does it)"
)

SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",  # durability off: the cluster is deleted at the end of the session
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_connections": "200",  # several engines (app + test threads) per test, pools of 5 + 10 overflow
}


class PostgresUnavailable(RuntimeError):
    """The server binaries are missing, or the server could not be set up or started (the message says which)."""


def find_bindir() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl``: from PATH, else the newest
    ``/usr/lib/postgresql/<major>/bin`` (where Debian installs them, off PATH).

    Raises:
        PostgresUnavailable: neither has both programs (:data:`INSTALL_HINT`).
    """
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    found = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/pg_ctl")]
    found = [d for d in found if (d / "initdb").is_file() and d.parent.name.isdigit()]
    if not found:
        raise PostgresUnavailable(INSTALL_HINT)
    return max(found, key=lambda d: int(d.parent.name))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in a temporary folder, reachable at ``127.0.0.1:port`` as ``postgres``
    without a password. Use :meth:`start` (returns the started server) and :meth:`stop`.

    Attributes:
        port: the TCP port (set by :meth:`start`).
        startup_seconds: wall time of ``initdb`` + ``pg_ctl start`` (s).
    """

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="catreview-pg-"))
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = 0
        self.startup_seconds = 0.0
        self._as_postgres = os.geteuid() == 0

    # ------------------------------------------------------------------ running programs
    def _run(self, program: str, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / program), *args]
        if self._as_postgres:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    def _check(self, what: str, proc: subprocess.CompletedProcess[str]) -> None:
        if proc.returncode != 0:
            log = self.log.read_text(errors="replace")[-2000:] if self.log.is_file() else ""
            raise PostgresUnavailable(
                f"{what} failed (exit {proc.returncode}): {(proc.stderr or proc.stdout).strip()[-1000:]}\n{log}"
            )

    # ------------------------------------------------------------------ lifetime
    def start(self, attempts: int = 3) -> PostgresServer:
        """``initdb`` then ``pg_ctl start -w`` on a free port (retried on another port if it was
        taken meanwhile). On any failure the folder is removed before the error is raised.

        Raises:
            PostgresUnavailable: no ``postgres`` user while running as root, or initdb/pg_ctl failed
                (the message carries their output and the server log's tail).
        """
        t0 = time.perf_counter()
        try:
            if self._as_postgres:
                try:
                    shutil.chown(self.root, user="postgres", group="postgres")
                except LookupError as exc:
                    raise PostgresUnavailable(
                        f"running as root but there is no 'postgres' user ({exc}); {INSTALL_HINT}"
                    ) from None
            self.sockets.mkdir()
            if self._as_postgres:
                shutil.chown(self.sockets, user="postgres", group="postgres")
            init = self._run(
                "initdb",
                "-D",
                str(self.data),
                "--auth=trust",
                "-U",
                "postgres",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            )
            self._check("initdb", init)
            for attempt in range(attempts):
                self.port = free_port()
                options = " ".join(
                    [f"-c port={self.port}", f"-c unix_socket_directories={self.sockets}"]
                    + [f"-c {k}={v}" for k, v in SERVER_SETTINGS.items()]
                )
                proc = self._run(
                    "pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "-o", options, "start"
                )
                if proc.returncode == 0:
                    break
                taken = self.log.is_file() and "could not bind" in self.log.read_text(errors="replace")
                if not taken or attempt == attempts - 1:
                    self._check("pg_ctl start", proc)
            self.startup_seconds = time.perf_counter() - t0
            return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server (fast shutdown: connections are closed) if it runs, and delete its folder."""
        try:
            if (self.data / "postmaster.pid").is_file():
                self._check("pg_ctl stop", self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop"))
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    # ------------------------------------------------------------------ databases
    def url(self, database: str = "postgres") -> str:
        """SQLAlchemy URL of ``database`` (driver psycopg 3)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _admin(self):
        import psycopg

        return psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres", autocommit=True)

    def create_database(self) -> str:
        """Create an empty database ``t_<uuid hex>``; returns its name."""
        from psycopg import sql

        name = f"t_{uuid.uuid4().hex}"
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return name

    def drop_database(self, name: str) -> None:
        """Drop ``name``, terminating its open connections first (``WITH (FORCE)``, PostgreSQL >= 13)."""
        from psycopg import sql

        with self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
