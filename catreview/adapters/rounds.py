"""A finished LoRA round -> an adapter version, gated and maybe activated, in one transaction.

The reference a round's adapter is gated against is the active version -- when the round scored
that very adapter itself (``result.baseline.test_metrics``) -- or, with no active version, the
base model (``result.initial_test_metrics``, scored at step 0: an untrained LoRA adapter is the
identity). Whenever the gate does not pass, the version stays inactive, the per-breed comparison
is stored and returned, and a person may still promote it
(:func:`catreview.adapters.versions.activate`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session

from catreview.adapters.gate import DEFAULT_POLICY, GateDecision, GatePolicy, gate
from catreview.adapters.results import EvalMetrics, RoundResult
from catreview.adapters.runfolder import RESULT_FILE
from catreview.adapters.versions import (
    AdapterError,
    active_version,
    adapters_root,
    flip_active,
    register_version,
    store_adapter_files,
)
from catreview.config import Settings
from catreview.data.db import TrainingRun, utcnow


@dataclass(frozen=True)
class RoundOutcome:
    """What :func:`register_round` did: the new version's id, whether it is now active, and the
    gate decision (with the per-breed comparison)."""

    adapter_id: int
    activated: bool
    decision: GateDecision
    folder: Path


def _reference(session: Session, result: RoundResult) -> tuple[EvalMetrics | None, str, str | None]:
    """``(test metrics, name, reason-if-none)`` of what a round's adapter is gated against: the
    active version when the round evaluated that very adapter (its baseline), else -- no version
    active -- the base model (the round's step-0 evaluation)."""
    current = active_version(session, result.base_model)
    if current is None:
        return result.initial_test_metrics, "no adapter (base model)", None
    baseline = result.baseline
    if baseline is not None and baseline.adapter and Path(baseline.adapter).resolve() == Path(current.path).resolve():
        return baseline.test_metrics, f"adapter #{current.id}", None
    return (
        None,
        f"adapter #{current.id}",
        (
            f"the active adapter #{current.id} was not evaluated on this round's test photos "
            "(it was activated while the round ran); compare and promote by hand"
        ),
    )


def _stored(m: EvalMetrics | None) -> dict | None:
    return None if m is None else m.without_per_photo()


def register_round(
    engine: Engine,
    settings: Settings,
    run_dir: str | Path,
    *,
    run_id: int | None = None,
    policy: GatePolicy = DEFAULT_POLICY,
    auto_activate: bool = True,
) -> RoundOutcome:
    """Turn a finished round (``run_dir/result.json``) into a version, gate it, maybe activate it.

    The adapter files are stored first (:func:`~catreview.adapters.versions.store_adapter_files`);
    then one transaction inserts the version, marks TrainingRun ``run_id`` succeeded and pointing
    at it, and -- when the gate passes and ``auto_activate`` -- flips the active flags. A version
    the gate could not decide on (too few test photos, reference not scored by the round) is never
    activated automatically.

    The version's ``metrics_json``: the selected checkpoint's validation metrics at the top level
    (``balanced_accuracy``, ``accuracy``, ``macro_f1``, ``val_loss``, ``per_breed``, ``n``), then
    ``best_step``, ``initial`` / ``baseline`` (validation metrics of the base model / the active
    adapter), ``test`` (the selected checkpoint on the test split: ``n``, ``balanced_accuracy``,
    ``accuracy``, ``macro_f1``, ``loss``, ``per_breed``), ``reference_test`` (the reference gated
    against, same keys; ``None`` without one), ``n_test``, ``gate``
    (:meth:`GateDecision.to_dict`: ``passed``, ``gated``, ``reasons``, ``reference``,
    ``candidate_balanced_accuracy`` / ``reference_balanced_accuracy`` (test), ``p_better``,
    ``n``, ``split``, ``breeds``), ``gate_policy``, ``run_dir``, ``steps``, ``samples_per_second``.

    Raises:
        AdapterError: no ``result.json`` (the round did not finish) or no best adapter.
        catreview.adapters.results.ResultFileError: ``result.json`` is not a round's result.
    """
    run_dir = Path(run_dir)
    result = RoundResult.read(run_dir)
    if result is None:
        raise AdapterError(f"{run_dir} holds no finished round ({RESULT_FILE} is missing)")
    folder = store_adapter_files(run_dir / result.adapter_dir, adapters_root(settings))
    with Session(engine) as s:
        reference_test, ref_name, why_not = _reference(s, result)
        candidate_test = result.test_metrics
        if why_not is not None:
            decision = GateDecision(
                False,
                [why_not],
                ref_name,
                None,
                candidate_test.balanced_accuracy if candidate_test else None,
                split="test",
                n=candidate_test.n if candidate_test else None,
                gated=False,
            )
        else:
            decision = gate(candidate_test, reference_test, policy, reference_name=ref_name)
        metrics = {
            **(result.metrics.to_dict() if result.metrics else {}),
            "best_step": result.best_step,
            "initial": result.initial_metrics.to_dict() if result.initial_metrics else None,
            "baseline": result.baseline.metrics.to_dict() if result.baseline and result.baseline.metrics else None,
            "test": _stored(candidate_test),
            "reference_test": _stored(reference_test),
            "n_test": result.n_test,
            "gate": decision.to_dict(),
            "gate_policy": policy.model_dump(),
            "run_dir": str(run_dir.resolve()),
            "steps": result.steps,
            "samples_per_second": result.samples_per_second,
        }
        row = register_version(
            s,
            folder,
            base_model=result.base_model,
            export_hash=result.export_hash,
            hyperparams=result.config,
            metrics=metrics,
        )
        activated = decision.passed and auto_activate
        if activated:
            flip_active(s, result.base_model, row.id)
        if run_id is not None:
            run = s.get(TrainingRun, run_id)
            if run is not None:
                run.status, run.adapter_id, run.finished_at = "succeeded", row.id, utcnow()
                s.add(run)
        s.commit()
        return RoundOutcome(int(row.id), activated, decision, folder)  # type: ignore[arg-type]


__all__ = ["RoundOutcome", "register_round"]
