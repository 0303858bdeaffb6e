"""Alembic migrations of the catreview schema, shipped inside the package.

:mod:`catreview.data.migrate` runs them at every start (``make_engine``) through :mod:`env`
with a programmatic :class:`alembic.config.Config` (no ``alembic.ini`` at run time). Revisions
live in ``versions/`` (``0001_release4``: the schema of release 0.4 as its ``create_all`` made
it; ``0002_scale``: current review per photo, review chain, running totals). Developers write a
new revision from the repository root with the ``alembic.ini`` there (see its comment).
"""
