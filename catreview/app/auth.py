"""Who is calling, and may they: login, trusted-header identity and role checks on every event.

Three ways the app can run (:func:`auth_mode`):

- ``"login"``: users exist in the database (:mod:`catreview.data.accounts`); Gradio's login page
  checks name and password (``launch(auth=...)``, :func:`password_checker`) and every event
  handler reads the caller as ``gr.Request.username``.
- ``"header"``: behind an authenticating reverse proxy; the user name comes from a configured
  request header, honoured only from configured proxy addresses (``launch(auth_dependency=...)``,
  :func:`trusted_header_identity`); the name must be a user in the database.
- ``"open"``: no users and no header configured; allowed on a loopback host, or elsewhere only
  with ``--no-auth``. Every caller then acts as an admin named by the settings' ``annotator``.

:func:`guard` wraps an event handler so that it first resolves the caller (:func:`caller`) and
checks the action's role (:data:`catreview.data.accounts.REQUIRED`), for the visible buttons and
for any HTTP client alike; :func:`unguarded_events` lists handlers that were wired without one
(tests assert it is empty).
"""

from __future__ import annotations

import inspect
import ipaddress
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import wraps
from typing import TYPE_CHECKING, Any, Literal

import gradio as gr
from sqlalchemy.engine import Engine
from sqlmodel import Session

from catreview.app.public_errors import public_errors
from catreview.config import Settings
from catreview.data import accounts
from catreview.data.accounts import Action, PermissionDenied, Role
from catreview.errors import CatreviewError

if TYPE_CHECKING:
    import fastapi

AuthMode = Literal["login", "header", "open"]
GUARD_ATTR = "_catreview_action"
"""Attribute a guarded handler carries: the :class:`Action` it checks."""


@dataclass(frozen=True)
class Caller:
    """The person behind a request: ``name`` (recorded as the annotator) and ``role``."""

    name: str
    role: Role


@dataclass(frozen=True)
class AuthConfig:
    """How callers are identified (see the module docstring).

    Attributes:
        mode: ``"login"``, ``"header"`` or ``"open"``.
        open_name: the name an ``"open"`` caller acts under (the settings' annotator).
        header: request header holding the user name (``"header"`` mode), e.g. ``X-Forwarded-User``.
        proxies: addresses or networks (CIDR) of the proxies whose header is trusted.
    """

    mode: AuthMode
    open_name: str = "annotator"
    header: str | None = None
    proxies: tuple[str, ...] = ()


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) only listens on the loopback interface."""
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AuthSetupError(CatreviewError):
    """The app would listen beyond this machine with nobody required to log in."""


def resolve_auth(engine: Engine, settings: Settings, host: str, *, no_auth: bool = False) -> AuthConfig:
    """The :class:`AuthConfig` the app runs with: ``"header"`` when ``settings.auth_header`` is
    set, else ``"login"`` when an enabled user exists, else ``"open"``.

    Raises:
        AuthSetupError: ``"open"`` on a host that is not loopback without ``no_auth``.
        ValueError: a header without ``trusted_proxies``, or a proxy that is not an address/network.
    """
    if settings.auth_header:
        cfg = AuthConfig("header", settings.annotator, settings.auth_header, tuple(settings.trusted_proxies))
        trusted_header_identity(cfg)  # checks the header and proxies now
        return cfg
    with Session(engine) as s:
        if accounts.any_user(s):
            return AuthConfig("login", settings.annotator)
    if not is_loopback(host) and not no_auth:
        raise AuthSetupError(
            f"refusing to listen on {host} with no accounts: anyone who reaches the port could review, train "
            "and export. Add users first (python -m catreview users add NAME --role admin), "
            "or pass --no-auth to run open anyway"
        )
    return AuthConfig("open", settings.annotator)


def password_checker(engine: Engine) -> Callable[[str, str], bool]:
    """``check(name, password)`` for ``gr.Blocks.launch(auth=...)``: an enabled user whose
    argon2 hash matches (:func:`catreview.data.accounts.authenticate`)."""

    def check(name: str, password: str) -> bool:
        with Session(engine) as s:
            return accounts.authenticate(s, name, password) is not None

    return check


def _trusted(address: str | None, proxies: tuple[str, ...]) -> bool:
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in ipaddress.ip_network(p, strict=False) for p in proxies)


def trusted_header_identity(config: AuthConfig) -> Callable[[fastapi.Request], str | None]:
    """``identity(request)`` for ``gr.Blocks.launch(auth_dependency=...)``: the value of
    ``config.header`` when the direct peer's address is one of ``config.proxies``, else ``None``
    (Gradio then answers 401). The name is checked against the users at each event (:func:`caller`).

    Raises:
        ValueError: no header or no proxy configured, or a proxy that is not an address/network.
    """
    if not config.header or not config.proxies:
        raise ValueError("trusted-header mode needs a header name and at least one proxy address")
    for p in config.proxies:
        ipaddress.ip_network(p, strict=False)  # a typo fails at start, not at the first request
    header = config.header

    def identity(request: fastapi.Request) -> str | None:
        peer = request.client.host if request.client else None
        if not _trusted(peer, config.proxies):
            return None
        name = request.headers.get(header)
        return name.strip() if name and name.strip() else None

    return identity


def caller(engine: Engine, config: AuthConfig, request: gr.Request | None) -> Caller:
    """The :class:`Caller` of ``request``: in ``"open"`` mode an admin named ``open_name``; else
    the logged-in (or proxy-named) user, read from the database on every call, so a role change
    or a disabled account takes effect at the next click.

    Raises:
        PermissionDenied: not logged in, unknown user, or a disabled account.
    """
    if config.mode == "open":
        return Caller(config.open_name, Role.ADMIN)
    name = getattr(request, "username", None) if request is not None else None
    if not name:
        raise PermissionDenied("log in first")
    with Session(engine) as s:
        try:
            user = accounts.get_user(s, name)
        except accounts.AccountError:
            raise PermissionDenied(f"{name} is not a user of this app; ask an admin to add you") from None
    if user.disabled:
        raise PermissionDenied(f"the account {name} is disabled")
    return Caller(user.name, Role(user.role))


def _hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except (NameError, TypeError):
        return {}


def guard(
    engine: Engine,
    config: AuthConfig,
    action: Action,
    fn: Callable[..., Any],
    *,
    with_caller: bool = False,
) -> Callable[..., Any]:
    """``fn`` wrapped so that each call first checks that the caller may do ``action``; a denied
    call raises ``gr.Error`` with the reason (the UI shows it; an API client gets it as the error).

    Args:
        with_caller: pass the :class:`Caller` to ``fn`` as its last positional argument (handlers
            that record who did something, e.g. a review's annotator).

    The wrapper keeps ``fn``'s inputs (and any ``gr.SelectData``/``gr.EventData`` parameter) and
    adds a trailing ``request: gr.Request`` parameter that Gradio fills in
    (``gradio.helpers.special_args``); generator handlers stay generators (streaming). Failures
    reach the browser only as :func:`catreview.app.public_errors.public_errors` allows.
    """
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    if with_caller:
        params = params[:-1]  # the caller is ours to supply
    hints = {k: v for k, v in _hints(fn).items() if k in {p.name for p in params}}
    name = getattr(fn, "__qualname__", repr(fn))

    def check(args: tuple[Any, ...]) -> tuple[list[Any], Caller]:
        *inputs, request = args
        try:
            who = caller(engine, config, request)
            accounts.require(who.role, action, who=who.name)
        except PermissionDenied as exc:
            raise gr.Error(str(exc)) from None
        return ([*inputs, who] if with_caller else list(inputs)), who

    if inspect.isgeneratorfunction(fn):

        @wraps(fn)
        def gen_wrapper(*args: Any) -> Iterator[Any]:
            inputs, _ = check(args)
            with public_errors(name):
                yield from fn(*inputs)

        wrapper: Callable[..., Any] = gen_wrapper
    else:

        @wraps(fn)
        def plain_wrapper(*args: Any) -> Any:
            inputs, _ = check(args)
            with public_errors(name):
                return fn(*inputs)

        wrapper = plain_wrapper
    # Gradio fills a ``gr.Request``-annotated parameter whatever its default; one is needed after
    # parameters that have defaults.
    default = None if any(p.default is not inspect.Parameter.empty for p in params) else inspect.Parameter.empty
    request = inspect.Parameter(
        "request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=gr.Request, default=default
    )
    wrapper.__signature__ = sig.replace(parameters=[*params, request])  # type: ignore[attr-defined]
    wrapper.__annotations__ = {**hints, "request": gr.Request}
    del wrapper.__wrapped__  # type: ignore[attr-defined]  # inspect must read our signature, not fn's
    setattr(wrapper, GUARD_ATTR, action)
    return wrapper


@dataclass(frozen=True)
class Guards:
    """:func:`guard` bound to one engine and :class:`AuthConfig`, as the tabs use it:
    ``guards(Action.REVIEW, fn, with_caller=True)``."""

    engine: Engine
    config: AuthConfig

    def __call__(self, action: Action, fn: Callable[..., Any], *, with_caller: bool = False) -> Callable[..., Any]:
        """``guard(self.engine, self.config, action, fn, with_caller=with_caller)``."""
        return guard(self.engine, self.config, action, fn, with_caller=with_caller)

    def caller(self, request: gr.Request | None) -> Caller:
        """:func:`caller` for this app (for code that is not a whole handler)."""
        return caller(self.engine, self.config, request)


def unguarded_events(demo: gr.Blocks) -> list[str]:
    """Names of the Python event handlers of ``demo`` not wrapped by :func:`guard` (JavaScript-only
    events, which run nothing on the server, are not counted)."""
    found = []
    for block_fn in demo.fns.values():
        fn = block_fn.fn
        if fn is None:
            continue
        if getattr(fn, GUARD_ATTR, None) is None:
            found.append(f"{block_fn.api_name or block_fn.name}")
    return found


__all__ = [
    "AuthConfig",
    "AuthMode",
    "AuthSetupError",
    "Caller",
    "Guards",
    "caller",
    "guard",
    "is_loopback",
    "password_checker",
    "resolve_auth",
    "trusted_header_identity",
    "unguarded_events",
]
