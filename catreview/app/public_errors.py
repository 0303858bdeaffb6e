"""What a browser may see of a failure: one line, no SQL, no traceback, no server path.

Every event handler runs inside :func:`public_errors` (via :func:`catreview.app.auth.guard`):

- ``gr.Error`` raised on purpose passes through;
- a :class:`~catreview.errors.CatreviewError` (an expected failure with a message for the user)
  is shown with absolute paths shortened to ``…/<name>`` (:func:`redact`);
- anything else is a bug: it is logged server-side with its traceback under a short reference,
  and the browser gets only "internal error <ref>", which the user can quote to an admin.

The full message of every failure is in the server log (logger ``catreview.app``), with the same
reference.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import gradio as gr

from catreview.errors import CatreviewError

log = logging.getLogger("catreview.app")

_ABSOLUTE_PATH = re.compile(r"(?<![\w.:/])(?:/[^\s/'\"(),;:]+)+/?")
"""An absolute POSIX path (two or more characters after the first slash), not part of a URL."""


def redact(text: str) -> str:
    """``text`` with each absolute path replaced by ``…/<last part>`` (``/srv/cats/a.jpg`` ->
    ``…/a.jpg``); relative names and URLs are kept."""
    return _ABSOLUTE_PATH.sub(lambda m: "…/" + m.group(0).rstrip("/").rsplit("/", 1)[-1], text)


def reference() -> str:
    """A short random reference for one failure (8 hex characters)."""
    return uuid.uuid4().hex[:8]


@contextmanager
def public_errors(event: str) -> Iterator[None]:
    """Turn failures inside the block into ``gr.Error`` messages fit for a browser (see the
    module docstring); ``event`` names the handler in the log."""
    try:
        yield
    except gr.Error:
        raise
    except CatreviewError as exc:
        ref = reference()
        log.warning("event %s refused [%s]: %s", event, ref, exc)
        raise gr.Error(redact(str(exc))) from None
    except Exception:
        ref = reference()
        log.exception("event %s failed [%s]", event, ref)
        raise gr.Error(f"internal error {ref}: the server log has the details; quote {ref} to your admin") from None


__all__ = ["public_errors", "redact", "reference"]
