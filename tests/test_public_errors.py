"""What a browser sees of a failure (issue 14): no SQL, no traceback, no server path; the server
log keeps the whole failure under the reference the user is shown."""

from __future__ import annotations

import logging

import gradio as gr
import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from catreview.app.public_errors import public_errors, redact
from catreview.data.db import make_engine
from catreview.errors import CatreviewError


def test_redact_shortens_absolute_paths_and_keeps_the_rest() -> None:
    assert redact("folder /srv/catreview/data/adapters/v3 is missing") == "folder …/v3 is missing"
    assert redact("cannot read '/home/ann/cats/a.jpg' (truncated)") == "cannot read '…/a.jpg' (truncated)"
    assert redact("see https://example.org/docs/x and ratio 1/2") == "see https://example.org/docs/x and ratio 1/2"
    assert redact("no photo with id 4") == "no photo with id 4"


def test_a_database_error_reaches_the_browser_as_a_reference_only(tmp_path, caplog) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db.sqlite'}")
    caplog.set_level(logging.ERROR, logger="catreview.app")
    with pytest.raises(gr.Error) as raised, public_errors("review"), engine.connect() as conn:
        conn.execute(text("SELECT secret_column FROM no_such_table"))  # a real OperationalError with its SQL
    shown = raised.value.message
    assert "SELECT" not in shown and "no_such_table" not in shown and str(tmp_path) not in shown
    ref = shown.split("internal error ", 1)[1].split(":", 1)[0]
    assert len(ref) == 8
    record = next(r for r in caplog.records if ref in r.getMessage())
    assert record.exc_info is not None and isinstance(record.exc_info[1], OperationalError)
    assert "no_such_table" in str(record.exc_info[1])  # the server log has the whole failure


def test_expected_errors_keep_their_message_without_paths_and_gr_errors_pass() -> None:
    with pytest.raises(gr.Error) as raised, public_errors("promote"):
        raise CatreviewError("adapter version #3's folder /srv/data/adapters/v3 is missing")
    assert raised.value.message == "adapter version #3's folder …/v3 is missing"
    with pytest.raises(gr.Error, match="exactly this"), public_errors("x"):
        raise gr.Error("exactly this")
