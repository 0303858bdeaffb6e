"""``python -m catreview``: see :mod:`catreview.cli`."""

from catreview.cli import run

run()
