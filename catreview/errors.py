"""The one base class for errors a user should see as one line.

The CLI prints a :class:`CatreviewError` as ``error: <message>`` (exit status 2) and the app
shows it as a notice; any other exception is a bug and keeps its traceback. Each subpackage
derives its own errors from it (e.g. ``ConfigError``, ``ReviewError``, ``VLMError``) and may
also derive from the built-in class the condition matches (``ValueError`` for bad input), so
callers that catch the built-in keep working.
"""

from __future__ import annotations


class CatreviewError(Exception):
    """An expected failure (bad input, missing file, busy resource) with a message for the user.

    The message is one line, names what was wrong and what to do, and holds no SQL, no
    traceback and no server path a browser should not see.
    """


__all__ = ["CatreviewError"]
