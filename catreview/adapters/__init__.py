"""Adapters: LoRA adapter versions and the gate, training jobs, the training config and the run-folder contract.

* :mod:`~catreview.adapters.train_config` -- :class:`TrainConfig`, one round's hyper-parameters (pydantic).
* :mod:`~catreview.adapters.runfolder` -- the run folder's file names and readers (progress, log, result).
* :mod:`~catreview.adapters.results` -- :class:`RoundResult` / :class:`EvalMetrics`, what a round hands over.
* :mod:`~catreview.adapters.gate` -- :class:`GatePolicy` and :func:`gate` (paired bootstrap on test photos).
* :mod:`~catreview.adapters.versions` -- store, activate, roll back and list adapter versions.
* :mod:`~catreview.adapters.rounds` -- a finished round -> a gated version (one transaction).
* :mod:`~catreview.adapters.checks` -- refuse a round the reviews cannot make, saying why.
* :mod:`~catreview.adapters.processes` -- training-process liveness (psutil) and stopping it.
* :mod:`~catreview.adapters.status` -- :class:`RunStatus`, one run as the UI and CLI show it.
* :mod:`~catreview.adapters.jobs` -- :class:`TrainJobs`, rounds in a background process.
"""
