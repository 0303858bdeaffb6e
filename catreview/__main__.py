"""``python -m catreview``: see :mod:`catreview.cli.main`."""

from catreview.cli.main import run

run()
