"""Text of the Train tab (and the train CLI's status line): the form's fields, run status, gate
outcome, notices.

The form parsing (:func:`config_from_form`) is UI glue: it turns the tab's number boxes into a
:class:`~catreview.adapters.train_config.TrainConfig`, naming a bad field by its label.
"""

from __future__ import annotations

import math
from typing import Any

from catreview.adapters.gate import GateDecision, GatePolicy
from catreview.adapters.status import RunStatus
from catreview.adapters.train_config import TrainConfig

#: Labels of the Train tab's hyper-parameter fields (also used in its error messages).
FORM_LABELS = {"epochs": "Epochs", "lr": "Learning rate", "rank": "LoRA rank", "batch_size": "Batch size"}
_WHOLE_FIELDS = ("epochs", "rank", "batch_size")

STARTED = "Run #{run_id} started: exporting the reviews, then training in a separate process."
NO_RUN = "No training run yet."
CANCELLING = "Cancelling the running round."
NOT_RUNNING = "No round is running."
CHOOSE_VERSION = "Choose a version first."
NO_ADAPTER = "No adapter active: the base model predicts alone."
#: Prefix of a stage-1 refit that could not be done (a :class:`~catreview.errors.CatreviewError`).
CLASSIFIER_FAILED = "Classifier not retrained: "
CLASSIFIER_STARTED = (
    "Retraining the classifier: features of photos not cached yet, then the stage-1 head on the reviews."
)
CLASSIFIER_BUSY = "The classifier is already being retrained."


def classifier_message(result: Any) -> str:
    """One finished stage-1 refit for people (a :class:`catreview.heads.refit.RefitResult`): what
    was decided, on how many photos, the test balanced accuracy and the time taken."""
    ba = result.test.get("balanced_accuracy")
    score = f"; test balanced accuracy {100 * ba:.1f}% on {result.n_test} photos" if ba is not None else ""
    return (
        f"{result.message[0].upper()}{result.message[1:]}{score} "
        f"({result.features_computed} photos featurised, {result.features_cached} cached; {result.seconds:.1f} s)."
    )


def classifier_status(state: Any) -> str:
    """The classifier job's line (a :class:`catreview.jobs.JobState`): ``"Retraining the classifier:
    features 120/330"`` while running, the outcome once finished, ``""`` before the first run."""
    if state.error:
        return f"Classifier retraining failed: {state.error}"
    if state.running:
        pct = f" {state.done}/{state.total}" if state.total else ""
        return f"Retraining the classifier: {state.stage}{pct}"
    return state.message


def _form_number(name: str, value: Any) -> float:
    """``value`` of form field ``name`` as a finite float.

    Raises:
        ValueError: ``"<label> is empty"`` (``None``: a cleared number box sends it, or ``""``),
            ``"<label> must be a number"``, ``"<label> must be a finite number"``.
    """
    label = FORM_LABELS[name]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise ValueError(f"{label} is empty")
    if isinstance(value, bool):
        raise ValueError(f"{label} must be a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{label} must be a finite number, got {value!r}")
    return x


def config_from_form(
    epochs: Any, lr: Any, rank: Any, batch_size: Any, train_projector: Any = False, base: TrainConfig | None = None
) -> TrainConfig:
    """The :class:`TrainConfig` of the Train tab's fields (the others from ``base``, default
    :class:`TrainConfig` defaults).

    Args:
        epochs: passes over the training split (whole number >= 1).
        lr: peak learning rate (> 0).
        rank: LoRA rank (whole number >= 1).
        batch_size: photos per micro-batch (whole number >= 1).
        train_projector: also train the projector (``None`` = no).
        base: values of the fields the form does not show.

    Values may be ``int``, ``float`` or numeric strings; ``None`` or ``""`` is an empty field.

    Raises:
        ValueError: with the field's label: ``"Epochs is empty"``, ``"LoRA rank must be a whole
            number, got 2.5"``, ``"Learning rate must be a finite number, ..."``, or
            :class:`TrainConfig`'s own range error (e.g. ``"rank must be >= 1, got 0"``).
    """
    values: dict[str, Any] = {}
    for name, value in (("epochs", epochs), ("lr", lr), ("rank", rank), ("batch_size", batch_size)):
        x = _form_number(name, value)
        if name in _WHOLE_FIELDS:
            if not x.is_integer():
                raise ValueError(f"{FORM_LABELS[name]} must be a whole number, got {value!r}")
            values[name] = int(x)
        else:
            values[name] = x
    return (base or TrainConfig()).replace(**values, train_projector=bool(train_projector))


def run_status_line(st: RunStatus | None) -> str:
    """One line for people (a failed run: the reason its round gave and where its log is, on
    up to 3 lines); :data:`NO_RUN` without a run."""
    if st is None:
        return NO_RUN
    head = f"Run #{st.run_id}: {st.status}"
    if st.status == "running":
        if st.phase != "training":
            return f"{head} ({st.phase})"
        total = f"/{st.total_steps}" if st.total_steps else ""
        loss = f", loss {st.loss:.3f}" if st.loss is not None else ""
        val = (
            f", val balanced accuracy {100 * st.val_balanced_accuracy:.1f}%"
            if st.val_balanced_accuracy is not None
            else ""
        )
        return f"{head}, step {st.step}{total}{loss}{val}"
    if st.status == "succeeded" and st.adapter_id is not None:
        verdict = "activated" if st.activated else "kept inactive by the gate"
        return f"{head}: adapter #{st.adapter_id} {verdict}"
    if st.summary:
        return f"{head}: {st.summary}"
    return head


def gate_markdown(st: RunStatus, decision: GateDecision) -> str:
    """The tab's gate line: ``**Gate vs <reference>: <outcome>** (adapter #N activated|kept
    inactive). <summary>``."""
    verdict = "activated" if st.activated else "kept inactive"
    return f"**Gate vs {decision.reference}: {decision.outcome}** (adapter #{st.adapter_id} {verdict}). {decision.summary()}"


def intro_text(policy: GatePolicy) -> str:
    """The tab's explanation, with the gate rule of ``policy`` (the one new rounds are gated by)."""
    return (
        "Fine-tunes the VLM's LoRA adapter on the reviewed photos (verdict prompt, answer = the reviewed "
        f"breed). The new version is activated only if {policy.describe()}; otherwise it is kept for manual promotion."
    )


def not_started(exc: Exception) -> str:
    """A start refused before any process started (bad field, too few reviews, busy)."""
    return f"Not started: {exc}"


def not_changed(exc: Exception) -> str:
    """A promote / roll back that was refused."""
    return f"Not changed: {exc}"


def activated(adapter_id: int | None) -> str:
    """After a manual promote or roll back to a version."""
    return f"Adapter #{adapter_id} is active; new predictions use it."


def status_unavailable(ref: str) -> str:
    """Shown in the status box when reading the status failed; ``ref`` is the reference of the
    server log's entry (:func:`catreview.app.public_errors.reference`)."""
    return f"Status unavailable (internal error {ref}): the server log has the details; quote {ref} to your admin."


def version_choice(row: dict[str, Any]) -> tuple[str, str]:
    """``(label, id)`` of a versions-table row for the version dropdown."""
    return f"#{row['id']} {row['name']}{' (active)' if row['active'] else ''}", str(row["id"])


__all__ = [
    "CANCELLING",
    "CHOOSE_VERSION",
    "FORM_LABELS",
    "NOT_RUNNING",
    "NO_ADAPTER",
    "NO_RUN",
    "STARTED",
    "activated",
    "config_from_form",
    "gate_markdown",
    "intro_text",
    "not_changed",
    "not_started",
    "run_status_line",
    "status_unavailable",
    "version_choice",
]
