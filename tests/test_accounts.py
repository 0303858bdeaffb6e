"""Accounts, roles and the audit trail (issue 14), on SQLite and the PostgreSQL server the tests start.

Real argon2 hashing, the real CLI (``python -m catreview users ...`` in a subprocess, password
on standard input) and the real database; nothing is mocked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from sqlmodel import Session, select

from catreview.data import accounts, audit
from catreview.data.accounts import Action, PermissionDenied, Role
from catreview.data.db import AuditEvent, UserAccount, make_engine
from tests.conftest import REPO_ROOT


def test_roles_include_the_lower_ones() -> None:
    assert accounts.allowed(Role.ANNOTATOR, Action.REVIEW)
    assert not accounts.allowed(Role.ANNOTATOR, Action.ADJUDICATE)
    assert accounts.allowed(Role.REVIEWER, Action.ADJUDICATE) and not accounts.allowed(Role.REVIEWER, Action.TRAIN)
    assert all(accounts.allowed(Role.ADMIN, a) for a in Action)
    with pytest.raises(PermissionDenied, match="needs the admin role"):
        accounts.require(Role.REVIEWER, Action.EXPORT, who="bea")
    with pytest.raises(PermissionDenied, match="log in"):
        accounts.require(None, Action.REVIEW)


def test_users_are_stored_with_argon2_hashes_and_checked(db_url: str) -> None:
    engine = make_engine(db_url)
    with Session(engine) as s:
        assert not accounts.any_user(s)
        accounts.add_user(s, "ann", "annotator", "correct horse")
        assert accounts.any_user(s)
        stored = s.exec(select(UserAccount).where(UserAccount.name == "ann")).one()
        assert stored.password_hash.startswith("$argon2id$") and "correct horse" not in stored.password_hash
        assert accounts.authenticate(s, "ann", "correct horse").name == "ann"
        assert accounts.authenticate(s, "ann", "wrong horse!") is None
        assert accounts.authenticate(s, "nobody", "correct horse") is None
        with pytest.raises(accounts.AccountError, match="already exists"):
            accounts.add_user(s, "ann", "admin", "another one")
        with pytest.raises(accounts.AccountError, match="at least 8"):
            accounts.add_user(s, "bob", "admin", "short")
        with pytest.raises(accounts.AccountError, match="unknown role"):
            accounts.add_user(s, "bob", "owner", "long enough")
        with pytest.raises(accounts.AccountError, match="no surrounding spaces"):
            accounts.add_user(s, " bob", "admin", "long enough")
        assert accounts.set_role(s, "ann", "Reviewer").role == "reviewer"
        accounts.set_disabled(s, "ann")
        assert accounts.authenticate(s, "ann", "correct horse") is None  # disabled: no login
        assert not accounts.any_user(s)
        accounts.set_disabled(s, "ann", False)
        accounts.set_password(s, "ann", "battery staple")
        assert accounts.authenticate(s, "ann", "battery staple") is not None
        assert accounts.authenticate(s, "ann", "correct horse") is None
        assert [u.name for u in accounts.list_users(s)] == ["ann"]


def test_audit_events_are_appended_and_paged_newest_first(db_url: str) -> None:
    engine = make_engine(db_url)
    with Session(engine) as s:
        ids = [audit.record(s, "root", "promote", f"adapter #{i}", reason="test").id for i in range(5)]
        page = audit.events(s, limit=3)
        assert [e.id for e in page] == ids[::-1][:3]
        rest = audit.events(s, limit=3, before=page[-1].id)
        assert [e.id for e in rest] == ids[:2][::-1]
        assert json.loads(page[0].detail_json) == {"reason": "test"}
        with pytest.raises(ValueError, match="unknown|not a valid"):
            audit.record(s, "root", "delete_everything")
        with pytest.raises(ValueError, match="limit"):
            audit.events(s, limit=0)


def _cli(db: str, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "catreview", "users", *args, "--db", db],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
        check=False,
    )


def test_users_cli_with_password_on_stdin_and_an_audit_row_per_change(tmp_path) -> None:
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    done = _cli(db, "add", "ada", "--role", "admin", "--password-stdin", stdin="s3cret-pass\n")
    assert done.returncode == 0 and "added ada (admin)" in done.stdout, done.stderr
    assert _cli(db, "add", "ann", "--role", "annotator", "--password-stdin", stdin="another-pass\n").returncode == 0
    again = _cli(db, "add", "ada", "--role", "admin", "--password-stdin", stdin="s3cret-pass\n")
    assert again.returncode == 2 and again.stderr.strip() == "error: user 'ada' already exists"
    short = _cli(db, "add", "bo", "--role", "admin", "--password-stdin", stdin="x\n")
    assert short.returncode == 2 and "at least 8" in short.stderr
    assert _cli(db, "set-role", "ann", "reviewer").returncode == 0
    assert _cli(db, "disable", "ann").returncode == 0
    listed = json.loads(_cli(db, "list", "--json").stdout)
    assert [(u["name"], u["role"], u["disabled"]) for u in listed] == [
        ("ada", "admin", False),
        ("ann", "reviewer", True),
    ]
    missing = _cli(db, "set-role", "zed", "admin")
    assert missing.returncode == 2 and "no user 'zed'" in missing.stderr
    engine = make_engine(db)
    with Session(engine) as s:
        assert accounts.authenticate(s, "ada", "s3cret-pass") is not None
        trail = [(e.actor, e.action, e.target) for e in s.exec(select(AuditEvent).order_by(AuditEvent.id))]
    assert trail == [
        ("cli", "user_add", "ada"),
        ("cli", "user_add", "ann"),
        ("cli", "user_role", "ann"),
        ("cli", "user_disable", "ann"),
    ]
