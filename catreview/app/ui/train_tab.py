"""Train tab: retrain the VLM's LoRA adapter on the reviews, watch the round, manage versions.

"Retrain adapter" exports the current reviews and starts a round in a separate process
(:class:`catreview.adapters.jobs.TrainJobs`); a timer refreshes the status, the training-loss and
validation balanced-accuracy plots (from ``progress.jsonl``) and the versions table. A finished
round is registered as a new adapter version and activated only if it passes the gate
(:func:`catreview.adapters.gate.gate`); otherwise the per-breed comparison explains why. Any version,
or "no adapter", can be activated by hand (promote / roll back); predictions use it from their
next call.

"Retrain adapter" is refused at once, with what is missing, when the reviews cannot make a round
(too few breeds, no validation photo). A round that fails shows the reason its training process
reported (the error line of its log) and the log's path in the status box, where the "Run #N
started" message is cleared; the box shows the latest run's status from the first page load on,
also after an app restart.

The handlers are plain functions of the :class:`ReviewApp` (``start``, ``cancel``, ``refresh``,
``promote``, ``no_adapter``, ``status_text``) so they can be tested without a browser; those that
change something take the ``actor`` recorded in the audit log (the caller's name). Each event is
guarded (:class:`catreview.app.auth.Guards`): the status, plots and table for every role
(``view``), starting or cancelling a round or a refit for ``train``, activating a version or "no
adapter" for ``promote`` (admins). The app's :class:`TrainJobs` is :attr:`ReviewApp.train_jobs`
(core); :func:`jobs_for` returns it. Every text shown comes from
:mod:`catreview.app.presenters.train`.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import gradio as gr
import pandas as pd

from catreview.adapters.gate import GateDecision
from catreview.adapters.jobs import TrainJobs
from catreview.app.auth import Caller, Guards
from catreview.app.core import ReviewApp
from catreview.app.presenters import train as text
from catreview.app.presenters.train import FORM_LABELS, STARTED, config_from_form
from catreview.app.public_errors import redact, reference
from catreview.data.accounts import Action
from catreview.errors import CatreviewError

log = logging.getLogger("catreview.app")

REFRESH_SECONDS = 2.0
LOSS_COLUMNS = ["step", "loss"]
VAL_COLUMNS = ["step", "val_balanced_accuracy"]
GATE_COLUMNS = ["breed", "n", "reference", "candidate", "delta", "checked", "blocking"]
VERSION_COLUMNS = [
    "id",
    "active",
    "name",
    "created",
    "val_balanced_accuracy",
    "val_accuracy",
    "val_loss",
    "gate",
    "export",
    "rank",
    "lr",
    "epochs",
]


class _AppJobs:
    """``_JOBS[app]``: a view of :attr:`ReviewApp.train_jobs`, kept for callers that set an app's
    :class:`TrainJobs` by item assignment (``_JOBS[app] = TrainJobs(...)`` assigns
    ``app.train_jobs``). Holds no state of its own; prefer the attribute."""

    def __getitem__(self, app: ReviewApp) -> TrainJobs:
        return app.train_jobs

    def __setitem__(self, app: ReviewApp, jobs: TrainJobs) -> None:
        app.train_jobs = jobs


_JOBS = _AppJobs()


def jobs_for(app: ReviewApp) -> TrainJobs:
    """The app's :class:`TrainJobs`: :attr:`ReviewApp.train_jobs` (created once per app;
    creating it recovers crashed runs)."""
    return app.train_jobs


def base_model(app: ReviewApp) -> str:
    """The active VLM profile's base model (what an adapter is trained for).

    Raises:
        catreview.models.registry.UnknownProfileError: ``active_vlm`` names no configured profile.
    """
    return app.registry.base_model()


_UNSET: Any = object()
"""A :func:`start` argument left out (``None`` is a cleared field)."""


def start(
    app: ReviewApp,
    epochs: float | None = _UNSET,
    lr: float | None = _UNSET,
    rank: float | None = _UNSET,
    batch_size: float | None = _UNSET,
    train_projector: bool | None = _UNSET,
    *,
    actor: str,
) -> str:
    """Start a round with the form's hyper-parameters over :meth:`ReviewApp.round_defaults` (the
    CPU recipe for a built-in VLM), recorded as started by ``actor`` (:meth:`ReviewApp.start_round`);
    returns the message shown under the buttons. An argument left out (Python callers) takes the
    default's value; from the page every field is sent, so a cleared one is refused.

    Refused here, before any process starts, with ``"Not started: <why>"``: a cleared or
    invalid field, named by its label ("Epochs is empty";
    :func:`catreview.app.presenters.train.config_from_form`), and too few reviewed photos or breeds,
    with what is missing (:func:`catreview.adapters.checks.check_reviews_for_training`).
    """
    try:
        base = app.round_defaults()
        form = {"epochs": epochs, "lr": lr, "rank": rank, "batch_size": batch_size}
        values = {k: getattr(base, k) if v is _UNSET else v for k, v in form.items()}
        projector = base.train_projector if train_projector is _UNSET else train_projector
        cfg = config_from_form(**values, train_projector=projector, base=base)
        run_id = app.start_round(cfg, actor=actor)
    except (CatreviewError, ValueError) as exc:  # TrainingBusy, TrainJobError, bad form values
        return text.not_started(exc)
    return STARTED.format(run_id=run_id)


def status_text(app: ReviewApp) -> str:
    """The latest run's status (after an app restart too), or "No training run yet."; a failed
    run shows the reason its round gave and its log's file name (server paths are shortened to
    ``…/<name>``, :func:`catreview.app.public_errors.redact`: the browser gets no server path)."""
    return redact(text.run_status_line(jobs_for(app).status()))


def message_after_refresh(app: ReviewApp, message: str | None) -> str:
    """``message`` unless it announces a run that is no longer running ("Run #1 started ..." under
    a failed or finished run would contradict the status): then ``""``."""
    m = re.match(r"Run #(\d+) started", message or "")
    if m is None:
        return message or ""
    st = jobs_for(app).status(int(m.group(1)))
    return (message or "") if st is not None and st.status == "running" else ""


def cancel(app: ReviewApp, *, actor: str) -> str:
    """Stop the running round (its checkpoint is kept), recorded as cancelled by ``actor``."""
    return text.CANCELLING if app.cancel_round(actor=actor) else text.NOT_RUNNING


def promote(app: ReviewApp, choice: str | None, *, actor: str) -> str:
    """Activate the version chosen in the dropdown (manual promote or rollback; no gate),
    recorded as done by ``actor``."""
    if not choice:
        return text.CHOOSE_VERSION
    try:
        row = app.promote(int(choice), actor=actor)
    except (CatreviewError, ValueError) as exc:  # AdapterError; a choice that is not a number
        return text.not_changed(exc)
    return text.activated(row.id)


def no_adapter(app: ReviewApp, *, actor: str) -> str:
    """Roll back to the base model alone, recorded as done by ``actor``."""
    app.no_adapter(actor=actor)
    return text.NO_ADAPTER


def retrain_classifier(app: ReviewApp, *, actor: str) -> str:
    """Start a stage-1 refit in the background (:meth:`ReviewApp.retrain_classifier`), recorded
    as started by ``actor``; returns the message shown under the buttons."""
    return text.CLASSIFIER_STARTED if app.retrain_classifier(actor=actor) else text.CLASSIFIER_BUSY


def classifier_status(app: ReviewApp) -> str:
    """The stage-1 refit's progress or outcome (``""`` before the first refit of this app), server
    paths shortened (:func:`catreview.app.public_errors.redact`)."""
    from catreview.app.classifier_job import classifier_job

    return redact(text.classifier_status(classifier_job(app).state))


def _frames(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    train = [{"step": r["step"], "loss": r["loss"]} for r in rows if r.get("kind") == "train"]
    evals = [
        {"step": r["step"], "val_balanced_accuracy": r["val_balanced_accuracy"]}
        for r in rows
        if r.get("kind") == "eval"
    ]
    return pd.DataFrame(train, columns=LOSS_COLUMNS), pd.DataFrame(evals, columns=VAL_COLUMNS)


def refresh(
    app: ReviewApp,
) -> tuple[str, pd.DataFrame, pd.DataFrame, str, pd.DataFrame, pd.DataFrame, list[tuple[str, str]]]:
    """Everything the timer updates: status line, loss frame, validation frame, gate summary,
    per-breed comparison, versions table, dropdown choices ``(label, id)``."""
    jobs = jobs_for(app)
    if jobs.running() is not None:
        jobs.reconcile()  # a round started elsewhere (CLI) whose process died, or finished meanwhile
    st = jobs.status()
    rows = jobs.progress(st.run_id) if st else []
    loss, val = _frames(rows)
    gate_text, gate_rows = "", []
    if st is not None and st.gate:
        g = GateDecision.from_dict(st.gate)
        gate_text, gate_rows = text.gate_markdown(st, g), g.rows()
    versions = app.adapter_versions()
    choices = [text.version_choice(v) for v in versions]
    return (
        redact(text.run_status_line(st)),
        loss,
        val,
        gate_text,
        pd.DataFrame(gate_rows, columns=GATE_COLUMNS),
        pd.DataFrame(versions),
        choices,
    )


def _unavailable(exc: Exception) -> str:
    """The status box's text for a failed read: the details go to the server log under a
    reference, the browser gets the reference only (no SQL, no server path)."""
    ref = reference()
    log.error("train tab status failed [%s]: %s: %s", ref, type(exc).__name__, exc)
    return text.status_unavailable(ref)


def build(app: ReviewApp, guards: Guards) -> None:
    """Lay out the Train tab (creating the app's :class:`TrainJobs` recovers crashed rounds);
    every event is guarded by ``guards`` (see the module docstring)."""
    gr.Markdown(text.intro_text(jobs_for(app).policy))
    with gr.Accordion("Hyper-parameters", open=False), gr.Row():
        base = app.round_defaults()  # the CPU recipe for a built-in VLM, else TrainConfig's defaults
        epochs = gr.Number(base.epochs, label=FORM_LABELS["epochs"], precision=0, elem_id="train-epochs")
        lr = gr.Number(base.lr, label=FORM_LABELS["lr"], elem_id="train-lr")
        rank = gr.Number(base.rank, label=FORM_LABELS["rank"], precision=0, elem_id="train-rank")
        batch = gr.Number(base.batch_size, label=FORM_LABELS["batch_size"], precision=0, elem_id="train-batch")
        projector = gr.Checkbox(base.train_projector, label="Also train the projector", elem_id="train-projector")
    with gr.Row():
        retrain = gr.Button("Retrain adapter", variant="primary", elem_id="retrain")
        retrain_clf = gr.Button("Retrain classifier", elem_id="retrain-classifier")
        stop = gr.Button("Cancel training", variant="stop", elem_id="cancel-train")
    # The latest run's status shows from the page load on (also after an app restart), not only from
    # the timer's first tick: computed when the tab is built, and again by a guarded load event.
    status = gr.Textbox(
        _safe_status(app),
        label="Status",
        interactive=False,
        lines=2,
        max_lines=6,
        elem_id="train-status",
    )
    with gr.Row():
        loss_plot = gr.LinePlot(
            pd.DataFrame(columns=LOSS_COLUMNS), x="step", y="loss", title="Training loss", elem_id="train-loss-plot"
        )
        val_plot = gr.LinePlot(
            pd.DataFrame(columns=VAL_COLUMNS),
            x="step",
            y="val_balanced_accuracy",
            y_lim=[0, 1],
            title="Validation balanced accuracy",
            elem_id="train-val-plot",
        )
    gate_md = gr.Markdown(elem_id="gate-summary")
    gate_table = gr.Dataframe(
        headers=GATE_COLUMNS,
        label="Per-breed test accuracy (reference vs new)",
        interactive=False,
        elem_id="gate-comparison",
    )
    versions = gr.Dataframe(
        headers=VERSION_COLUMNS, label="Adapter versions", interactive=False, elem_id="adapters-table"
    )
    with gr.Row():
        choice = gr.Dropdown([], label="Version", elem_id="adapter-choice")
        promote_btn = gr.Button("Activate this version (promote / roll back)", elem_id="promote-adapter")
        none_btn = gr.Button("No adapter", elem_id="no-adapter")
    message = gr.Markdown(elem_id="train-message")
    clf_status = gr.Textbox(
        classifier_status(app),
        label="Classifier (stage 1)",
        interactive=False,
        elem_id="classifier-status",
    )

    outputs = [status, loss_plot, val_plot, gate_md, gate_table, versions, choice]

    def tick(msg: str | None = None) -> list[Any]:
        try:
            *values, choices = refresh(app)
        except Exception as exc:  # noqa: BLE001 -- a failed refresh must not leave the tab silently stale
            return [_unavailable(exc), *[gr.update()] * (len(outputs) - 1), gr.update()]
        return [*values, gr.update(choices=choices), message_after_refresh(app, msg)]

    def do_start(
        epochs_v: float | None,
        lr_v: float | None,
        rank_v: float | None,
        batch_v: float | None,
        projector_v: bool,
        who: Caller,
    ) -> str:
        return start(app, epochs_v, lr_v, rank_v, batch_v, projector_v, actor=who.name)

    ticked = [*outputs, message]
    view_tick = guards(Action.VIEW, tick)
    gr.on(
        None,
        guards(Action.VIEW, lambda: (_safe_status(app), classifier_status(app))),
        outputs=[status, clf_status],
        api_visibility="private",
    )
    gr.Timer(REFRESH_SECONDS).tick(view_tick, inputs=[message], outputs=ticked, api_visibility="private")
    gr.Timer(REFRESH_SECONDS).tick(
        guards(Action.VIEW, lambda: classifier_status(app)), outputs=[clf_status], api_visibility="private"
    )
    retrain_clf.click(
        guards(Action.TRAIN, lambda who: retrain_classifier(app, actor=who.name), with_caller=True),
        outputs=[clf_status],
        api_name="retrain_classifier",
    )
    retrain.click(
        guards(Action.TRAIN, do_start, with_caller=True),
        inputs=[epochs, lr, rank, batch, projector],
        outputs=[message],
        api_name="retrain",
    ).then(view_tick, inputs=[message], outputs=ticked)
    stop.click(
        guards(Action.TRAIN, lambda who: cancel(app, actor=who.name), with_caller=True),
        outputs=[message],
        api_name="cancel_training",
    ).then(view_tick, inputs=[message], outputs=ticked)
    promote_btn.click(
        guards(Action.PROMOTE, lambda c, who: promote(app, c, actor=who.name), with_caller=True),
        inputs=[choice],
        outputs=[message],
        api_name="promote_adapter",
    ).then(view_tick, inputs=[message], outputs=ticked)
    none_btn.click(
        guards(Action.PROMOTE, lambda who: no_adapter(app, actor=who.name), with_caller=True),
        outputs=[message],
        api_name="no_adapter",
    ).then(view_tick, inputs=[message], outputs=ticked)


def _safe_status(app: ReviewApp) -> str:
    try:
        return status_text(app)
    except Exception as exc:  # noqa: BLE001 -- shown in the box instead of an empty one
        return _unavailable(exc)
