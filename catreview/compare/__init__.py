"""Compare: two VLM profiles or adapter versions side by side, aggregates and blind preferences.

Modules, in the order they build on each other: :mod:`~catreview.compare.errors`,
:mod:`~catreview.compare.pairs` (which two models, their labels, the blind order),
:mod:`~catreview.compare.memory` (peak memory of an inference), :mod:`~catreview.compare.photo`
(per-photo state), :mod:`~catreview.compare.blind` (blind trials and choices),
:mod:`~catreview.compare.aggregate` (outcomes, metrics, tables) and
:mod:`~catreview.compare.session` (:class:`~catreview.compare.session.CompareSession`: model
lifetime, per-photo and aggregate runs, preferences). Text for users is in
:mod:`catreview.app.presenters.compare`; the DPO export in :mod:`catreview.export.preferences`.
"""
