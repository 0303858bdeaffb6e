"""Accounts and roles: who may do what, stored in the database.

Three roles, each including the one before (Label Studio's annotator/reviewer/manager split):

- ``annotator``: see the photos, predictions and reports (``view``), review photos (the Review tab, grid bulk labels, the review API);
- ``reviewer``: also adjudicate disagreements and see everyone's work and agreement figures;
- ``admin``: also train, promote / roll back versions, export, and manage users.

Passwords are stored as argon2id hashes (``argon2-cffi``'s :class:`argon2.PasswordHasher` with
its defaults, RFC 9106's second recommended parameter set); the plain text never reaches the
database or a log. Names are case-sensitive, 1-64 characters without surrounding spaces.
"""

from __future__ import annotations

from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from catreview.data.db import UserAccount
from catreview.errors import CatreviewError

MIN_PASSWORD = 8
"""Shortest accepted password (characters); NIST SP 800-63B's minimum for user-chosen secrets."""
MAX_NAME = 64

_hasher = PasswordHasher()


class Role(StrEnum):
    """A user's role; a higher role can do all a lower one can (:data:`RANK`)."""

    ANNOTATOR = "annotator"
    REVIEWER = "reviewer"
    ADMIN = "admin"


RANK: dict[Role, int] = {Role.ANNOTATOR: 0, Role.REVIEWER: 1, Role.ADMIN: 2}


class Action(StrEnum):
    """Something a user can ask the app to do; :data:`REQUIRED` gives the least role for each."""

    VIEW = "view"
    REVIEW = "review"
    ADJUDICATE = "adjudicate"
    SEE_ALL = "see_all"
    TRAIN = "train"
    PROMOTE = "promote"
    EXPORT = "export"
    MANAGE_USERS = "manage_users"


REQUIRED: dict[Action, Role] = {
    Action.VIEW: Role.ANNOTATOR,
    Action.REVIEW: Role.ANNOTATOR,
    Action.ADJUDICATE: Role.REVIEWER,
    Action.SEE_ALL: Role.REVIEWER,
    Action.TRAIN: Role.ADMIN,
    Action.PROMOTE: Role.ADMIN,
    Action.EXPORT: Role.ADMIN,
    Action.MANAGE_USERS: Role.ADMIN,
}


ACTION_TEXT: dict[Action, str] = {
    Action.VIEW: "see the photos and reports",
    Action.REVIEW: "review photos",
    Action.ADJUDICATE: "adjudicate disputed photos or start overlap rounds",
    Action.SEE_ALL: "see the team's agreement figures",
    Action.TRAIN: "start or cancel training, calibration or comparison runs",
    Action.PROMOTE: "promote or roll back model versions",
    Action.EXPORT: "export datasets",
    Action.MANAGE_USERS: "see the audit log or manage users",
}
"""How a refusal names each action ("ann (annotator) cannot export datasets: ...")."""


class AccountError(CatreviewError, ValueError):
    """A user that cannot be added or changed (bad name, short password, unknown user or role)."""


class PermissionDenied(CatreviewError, PermissionError):
    """The caller's role does not allow the action; the message names the role needed."""


def parse_role(text: str) -> Role:
    """The :class:`Role` named ``text`` (case-insensitive).

    Raises:
        AccountError: not one of annotator, reviewer, admin.
    """
    try:
        return Role(text.strip().lower())
    except ValueError:
        raise AccountError(f"unknown role {text!r}: use one of {', '.join(r.value for r in Role)}") from None


def allowed(role: Role | str, action: Action) -> bool:
    """Whether ``role`` may do ``action`` (:data:`REQUIRED`)."""
    return RANK[Role(role)] >= RANK[REQUIRED[action]]


def require(role: Role | str | None, action: Action, *, who: str = "you") -> None:
    """Raise :class:`PermissionDenied` unless ``role`` may do ``action`` (``None``: not logged in)."""
    if role is None:
        raise PermissionDenied(f"log in to {ACTION_TEXT[action]}")
    if not allowed(role, action):
        need = REQUIRED[action].value
        raise PermissionDenied(
            f"{who} ({Role(role).value}) cannot {ACTION_TEXT[action]}: that needs the {need} role; ask an admin"
        )


def _check_name(name: str) -> str:
    if not name or name != name.strip() or len(name) > MAX_NAME or any(c in name for c in "\r\n\t"):
        raise AccountError(f"user names are 1-{MAX_NAME} characters with no surrounding spaces, tabs or newlines")
    return name


def _check_password(password: str) -> str:
    if len(password) < MIN_PASSWORD:
        raise AccountError(f"passwords need at least {MIN_PASSWORD} characters")
    return password


def add_user(session: Session, name: str, role: Role | str, password: str) -> UserAccount:
    """Create an enabled user and commit.

    Raises:
        AccountError: bad name or role, short password, or the name is taken.
    """
    user = UserAccount(
        name=_check_name(name), role=parse_role(str(role)).value, password_hash=_hasher.hash(_check_password(password))
    )
    session.add(user)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise AccountError(f"user {name!r} already exists") from None
    session.refresh(user)
    return user


def get_user(session: Session, name: str) -> UserAccount:
    """The user named ``name`` (one indexed read).

    Raises:
        AccountError: no such user.
    """
    user = session.exec(select(UserAccount).where(col(UserAccount.name) == name)).first()
    if user is None:
        raise AccountError(f"no user {name!r}")
    return user


def list_users(session: Session) -> list[UserAccount]:
    """All users, by name."""
    return list(session.exec(select(UserAccount).order_by(col(UserAccount.name))))


def any_user(session: Session) -> bool:
    """Whether at least one enabled user exists (login is then required)."""
    return session.exec(select(UserAccount.id).where(col(UserAccount.disabled).is_(False)).limit(1)).first() is not None


def set_role(session: Session, name: str, role: Role | str) -> UserAccount:
    """Change a user's role and commit.

    Raises:
        AccountError: no such user or role.
    """
    user = get_user(session, name)
    user.role = parse_role(str(role)).value
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def set_disabled(session: Session, name: str, disabled: bool = True) -> UserAccount:
    """Disable (or enable again) a user and commit; a disabled user cannot log in.

    Raises:
        AccountError: no such user.
    """
    user = get_user(session, name)
    user.disabled = disabled
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def set_password(session: Session, name: str, password: str) -> UserAccount:
    """Replace a user's password and commit.

    Raises:
        AccountError: no such user, or a short password.
    """
    user = get_user(session, name)
    user.password_hash = _hasher.hash(_check_password(password))
    session.add(user)
    session.commit()
    session.refresh(user)
    return user


def authenticate(session: Session, name: str, password: str) -> UserAccount | None:
    """The enabled user ``name`` if ``password`` is theirs, else ``None`` (unknown user, wrong
    password, disabled). A hash made with older argon2 parameters is upgraded on success."""
    user = session.exec(select(UserAccount).where(col(UserAccount.name) == name)).first()
    if user is None:
        _hasher.hash(password)  # about the same time as a wrong password: names cannot be probed by timing
        return None
    try:
        _hasher.verify(user.password_hash, password)
    except (VerificationError, InvalidHashError):
        return None
    if user.disabled:
        return None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = _hasher.hash(password)
        session.add(user)
        session.commit()
        session.refresh(user)
    return user


__all__ = [
    "REQUIRED",
    "AccountError",
    "Action",
    "PermissionDenied",
    "Role",
    "add_user",
    "allowed",
    "any_user",
    "authenticate",
    "get_user",
    "list_users",
    "parse_role",
    "require",
    "set_disabled",
    "set_password",
    "set_role",
]
