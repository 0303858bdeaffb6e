"""Evaluation: calibration of both stages and of the fused pool, and its stored fits.

:mod:`~catreview.evaluate.temperature` fits temperatures, :mod:`~catreview.evaluate.fusion_weight`
the fusion weight, :mod:`~catreview.evaluate.folds` assigns cross-validation folds,
:mod:`~catreview.evaluate.calibration` runs the whole fit and reports it, and
:mod:`~catreview.evaluate.store` fits on the database and stores the result;
:mod:`~catreview.evaluate.report` scores every stored model version on the held-out reviewed photos. Metrics are
:mod:`catreview.metrics`; applying a temperature is :mod:`catreview.predict.temperature`.
"""
