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
``promote``, ``no_adapter``, ``status_text``) so they can be tested without a browser. The app's
:class:`TrainJobs` is :attr:`ReviewApp.train_jobs` (core); :func:`jobs_for` returns it. Every
text shown comes from :mod:`catreview.app.presenters.train`.
"""

from __future__ import annotations

import re
from typing import Any

import gradio as gr
import pandas as pd

from catreview.adapters.gate import GateDecision
from catreview.adapters.jobs import TrainJobs
from catreview.app.core import ReviewApp
from catreview.app.presenters import train as text
from catreview.app.presenters.train import FORM_LABELS, STARTED, config_from_form
from catreview.errors import CatreviewError

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


def start(
    app: ReviewApp,
    epochs: float | None = 3,
    lr: float | None = 2e-4,
    rank: float | None = 16,
    batch_size: float | None = 4,
    train_projector: bool = False,
) -> str:
    """Start a round with these hyper-parameters (the rest: ``TrainConfig`` defaults); returns
    the message shown under the buttons.

    Refused here, before any process starts, with ``"Not started: <why>"``: a cleared or
    invalid field, named by its label ("Epochs is empty";
    :func:`catreview.app.presenters.train.config_from_form`), and too few reviewed photos or breeds,
    with what is missing (:func:`catreview.adapters.checks.check_reviews_for_training`).
    """
    try:
        cfg = config_from_form(epochs, lr, rank, batch_size, train_projector)
        run_id = jobs_for(app).start(base_model(app), cfg)
    except (CatreviewError, ValueError) as exc:  # TrainingBusy, TrainJobError, bad form values
        return text.not_started(exc)
    return STARTED.format(run_id=run_id)


def status_text(app: ReviewApp) -> str:
    """The latest run's status (after an app restart too), or "No training run yet."; a failed
    run shows the reason its round gave and where its log is."""
    return text.run_status_line(jobs_for(app).status())


def message_after_refresh(app: ReviewApp, message: str | None) -> str:
    """``message`` unless it announces a run that is no longer running ("Run #1 started ..." under
    a failed or finished run would contradict the status): then ``""``."""
    m = re.match(r"Run #(\d+) started", message or "")
    if m is None:
        return message or ""
    st = jobs_for(app).status(int(m.group(1)))
    return (message or "") if st is not None and st.status == "running" else ""


def cancel(app: ReviewApp) -> str:
    """Stop the running round (its checkpoint is kept)."""
    return text.CANCELLING if jobs_for(app).cancel() else text.NOT_RUNNING


def promote(app: ReviewApp, choice: str | None) -> str:
    """Activate the version chosen in the dropdown (manual promote or rollback; no gate)."""
    if not choice:
        return text.CHOOSE_VERSION
    try:
        row = app.promote(int(choice))
    except (CatreviewError, ValueError) as exc:  # AdapterError; a choice that is not a number
        return text.not_changed(exc)
    return text.activated(row.id)


def no_adapter(app: ReviewApp) -> str:
    """Roll back to the base model alone."""
    app.no_adapter()
    return text.NO_ADAPTER


def retrain_classifier(app: ReviewApp) -> str:
    """Start a stage-1 refit in the background (:class:`catreview.app.classifier_job.ClassifierJob`);
    returns the message shown under the buttons."""
    from catreview.app.classifier_job import classifier_job

    return text.CLASSIFIER_STARTED if classifier_job(app).start() else text.CLASSIFIER_BUSY


def classifier_status(app: ReviewApp) -> str:
    """The stage-1 refit's progress or outcome (``""`` before the first refit of this app)."""
    from catreview.app.classifier_job import classifier_job

    return text.classifier_status(classifier_job(app).state)


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
        text.run_status_line(st),
        loss,
        val,
        gate_text,
        pd.DataFrame(gate_rows, columns=GATE_COLUMNS),
        pd.DataFrame(versions),
        choices,
    )


def build(app: ReviewApp) -> None:
    """Lay out the Train tab (creating the app's :class:`TrainJobs` recovers crashed rounds)."""
    gr.Markdown(text.intro_text(jobs_for(app).policy))
    with gr.Accordion("Hyper-parameters", open=False), gr.Row():
        epochs = gr.Number(3, label=FORM_LABELS["epochs"], precision=0, elem_id="train-epochs")
        lr = gr.Number(2e-4, label=FORM_LABELS["lr"], elem_id="train-lr")
        rank = gr.Number(16, label=FORM_LABELS["rank"], precision=0, elem_id="train-rank")
        batch = gr.Number(4, label=FORM_LABELS["batch_size"], precision=0, elem_id="train-batch")
        projector = gr.Checkbox(False, label="Also train the projector", elem_id="train-projector")
    with gr.Row():
        retrain = gr.Button("Retrain adapter", variant="primary", elem_id="retrain")
        retrain_clf = gr.Button("Retrain classifier", elem_id="retrain-classifier")
        stop = gr.Button("Cancel training", variant="stop", elem_id="cancel-train")
    # A callable value is computed on every page load: the latest run's status shows at once (also
    # after an app restart), not only from the timer's first tick.
    status = gr.Textbox(
        lambda: _safe_status(app), label="Status", interactive=False, lines=2, max_lines=6, elem_id="train-status"
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
        lambda: classifier_status(app), label="Classifier (stage 1)", interactive=False, elem_id="classifier-status"
    )

    outputs = [status, loss_plot, val_plot, gate_md, gate_table, versions, choice]

    def tick(msg: str | None = None) -> list[Any]:
        try:
            *values, choices = refresh(app)
        except Exception as exc:  # noqa: BLE001 -- a failed refresh must not leave the tab silently stale
            return [text.status_unavailable(exc), *[gr.update()] * (len(outputs) - 1), gr.update()]
        return [*values, gr.update(choices=choices), message_after_refresh(app, msg)]

    ticked = [*outputs, message]
    gr.Timer(REFRESH_SECONDS).tick(tick, inputs=[message], outputs=ticked, api_visibility="private")
    gr.Timer(REFRESH_SECONDS).tick(lambda: classifier_status(app), outputs=[clf_status], api_visibility="private")
    retrain_clf.click(lambda: retrain_classifier(app), outputs=[clf_status], api_name="retrain_classifier")
    retrain.click(
        lambda *a: start(app, *a), inputs=[epochs, lr, rank, batch, projector], outputs=[message], api_name="retrain"
    ).then(tick, inputs=[message], outputs=ticked)
    stop.click(lambda: cancel(app), outputs=[message], api_name="cancel_training").then(
        tick, inputs=[message], outputs=ticked
    )
    promote_btn.click(lambda c: promote(app, c), inputs=[choice], outputs=[message], api_name="promote_adapter").then(
        tick, inputs=[message], outputs=ticked
    )
    none_btn.click(lambda: no_adapter(app), outputs=[message], api_name="no_adapter").then(
        tick, inputs=[message], outputs=ticked
    )


def _safe_status(app: ReviewApp) -> str:
    try:
        return status_text(app)
    except Exception as exc:  # noqa: BLE001 -- shown in the box instead of an empty one
        return text.status_unavailable(exc)
