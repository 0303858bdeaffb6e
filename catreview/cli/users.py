"""``python -m catreview users add|list|set-role|disable|enable|password``: accounts in the database
(:mod:`catreview.data.accounts`). Passwords are prompted (twice, not echoed) or, with
``--password-stdin``, read from the first line of standard input, for scripts."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from typing import Any

from sqlmodel import Session

from catreview.cli.common import add_common_options, settings_from_args
from catreview.data import accounts, audit
from catreview.data.audit import AuditAction
from catreview.data.db import make_engine

CLI_ACTOR = "cli"
"""The audit actor of user changes made from the command line (it has the database itself)."""


def add_users_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``users`` sub-command (and its verbs, each taking ``--db``/``--config``) to ``sub``."""
    p = sub.add_parser("users", help="manage the accounts that log in to the app (roles: annotator, reviewer, admin)")
    verbs = p.add_subparsers(dest="verb", required=True)
    add = verbs.add_parser("add", help="add a user (password prompted, or --password-stdin)")
    add.add_argument("name")
    add.add_argument("--role", required=True, choices=[r.value for r in accounts.Role])
    add.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    lst = verbs.add_parser("list", help="list users with their role and state")
    lst.add_argument("--json", action="store_true", help="one JSON array")
    role = verbs.add_parser("set-role", help="change a user's role")
    role.add_argument("name")
    role.add_argument("role", choices=[r.value for r in accounts.Role])
    for verb, text in (("disable", "stop a user from logging in"), ("enable", "let a disabled user log in again")):
        verbs.add_parser(verb, help=text).add_argument("name")
    pw = verbs.add_parser("password", help="set a user's password")
    pw.add_argument("name")
    pw.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    for q in (add, lst, role, pw, *(verbs.choices[v] for v in ("disable", "enable"))):
        add_common_options(q)
    return p


def _password(from_stdin: bool) -> str:
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("Password: ")
    if getpass.getpass("Password again: ") != first:
        raise accounts.AccountError("the two passwords differ")
    return first


def cmd_users(args: argparse.Namespace) -> int:
    """Run one ``users`` verb; exit status 0 (errors are raised as :class:`accounts.AccountError`)."""
    engine = make_engine(settings_from_args(args).database_url)
    with Session(engine) as s:
        if args.verb == "add":
            user = accounts.add_user(s, args.name, args.role, _password(args.password_stdin))
            audit.record(s, CLI_ACTOR, AuditAction.USER_ADD, user.name, role=user.role)
            print(f"added {user.name} ({user.role})")
        elif args.verb == "list":
            rows = [
                {"name": u.name, "role": u.role, "disabled": u.disabled, "created_at": u.created_at.isoformat()}
                for u in accounts.list_users(s)
            ]
            if args.json:
                print(json.dumps(rows))
            else:
                for r in rows:
                    print(f"{r['name']}\t{r['role']}\t{'disabled' if r['disabled'] else 'enabled'}")
        elif args.verb == "set-role":
            user = accounts.set_role(s, args.name, args.role)
            audit.record(s, CLI_ACTOR, AuditAction.USER_ROLE, user.name, role=user.role)
            print(f"{user.name} is now {user.role}")
        elif args.verb in ("disable", "enable"):
            user = accounts.set_disabled(s, args.name, args.verb == "disable")
            action = AuditAction.USER_DISABLE if user.disabled else AuditAction.USER_ENABLE
            audit.record(s, CLI_ACTOR, action, user.name)
            print(f"{user.name} {args.verb}d")
        else:  # password
            user = accounts.set_password(s, args.name, _password(args.password_stdin))
            audit.record(s, CLI_ACTOR, AuditAction.USER_PASSWORD, user.name)
            print(f"password of {user.name} changed")
    return 0


__all__ = ["add_users_parser", "cmd_users"]
