"""Background LoRA rounds: export the reviews, train in a separate process, register the result.

:class:`TrainJobs` is what the Train tab and ``python -m catreview train`` use:

1. :meth:`TrainJobs.start` first checks that the reviews (or the given export) hold training and
   validation photos of at least two breeds, refusing with a message that says what is missing
   (:func:`check_reviews_for_training`). It then claims the single training slot (a
   ``TrainingRun`` row with status ``running``; a second start raises :class:`TrainingBusy`),
   and a worker thread exports the current reviews (:func:`catreview.export.dataset.export_dataset`,
   unless an export folder is given) and starts ``python -m training ...`` (or ``accelerate launch -m training ...`` with
   ``launcher``) as a **separate process** in its own session, output to ``run_dir/train.log``.
   The app's process never imports torch for training and stays responsive.
2. The round writes only inside its run folder (``settings.data_dir/runs/<id>-<time>``):
   ``progress.jsonl`` (read for live plots), checkpoints, ``best/``, ``result.json`` last. It never
   touches the database or the adapters folder, so killing it at any moment (even SIGKILL) leaves
   the active adapter, the database and every stored version as they were.
3. When the process exits 0 the worker registers the round (:func:`catreview.adapters.versions.register_round`:
   store the adapter, add the version, gate, maybe activate -- one transaction). A non-zero exit
   marks the run ``failed``; its ``error`` starts with the reason the round reported (the last
   ``error:`` line or exception of the log, :func:`log_error_summary`) and the log's path, which
   the Train tab and the CLI show (:attr:`RunStatus.summary`), then the log's tail (the file is kept);
   :meth:`TrainJobs.cancel` terminates the process group and marks it ``cancelled``.
4. **Crash recovery** (:meth:`TrainJobs.reconcile`, run at construction and at every start): a
   ``running`` row whose process is gone is marked ``failed`` (log kept) -- or, when its
   ``result.json`` exists (it finished while the app was down), registered as ``succeeded``.
   A process counts as gone when its pid no longer exists, is a zombie, or now belongs to another
   program (the process start time recorded in ``run.json`` differs, on Linux).
5. :meth:`TrainJobs.start` with ``resume_run=`` restarts a failed/cancelled run in its own folder;
   the round continues from ``checkpoint-last``.

The CLI entry points :func:`add_train_parser` / :func:`cmd_train` (``train``) and
:func:`add_adapters_parser` / :func:`cmd_adapters` (``adapters``) are meant for
:mod:`catreview.cli.main`; ``python -m catreview.adapters.jobs train ...`` runs them stand-alone.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from catreview.adapters.runfolder import (  # light: no training code
    CONFIG_FILE,
    PROGRESS_FILE,
    RESULT_FILE,
    read_progress,
)
from catreview.adapters.train_config import TrainConfig
from catreview.adapters.versions import GateDecision, GatePolicy, active_version, register_round, version_metrics
from catreview.config import REPO_ROOT, Settings
from catreview.data.db import TrainingRun, utcnow
from catreview.errors import CatreviewError
from catreview.files import read_json, write_json

RUNS_DIRNAME = "runs"
EXPORTS_DIRNAME = "exports"
LOG_FILE = "train.log"
RUN_META_FILE = "run.json"
LOCK_FILE = "train.lock"
LOG_TAIL_CHARS = 4000
#: A round learns to tell breeds apart and is gated per breed: fewer reviewed breeds is refused.
MIN_BREEDS = 2

# Process-wide: several TrainJobs objects in one process (the app and a CLI call in tests) share
# them. Keyed by (database URL, run id): run ids are per database, and one process may use several.
RunKey = tuple[str, int]
_WORKERS: dict[RunKey, threading.Thread] = {}
_PROCS: dict[RunKey, subprocess.Popen] = {}
_CANCELLED: set[RunKey] = set()
_STATE_LOCK = threading.RLock()


class TrainingBusy(CatreviewError, RuntimeError):
    """A round is already running; the message names it."""


class TrainJobError(CatreviewError, RuntimeError):
    """A round that cannot be started (no exporter, unknown run to resume ...)."""


# --------------------------------------------------------------------------------------------
# Processes
# --------------------------------------------------------------------------------------------


def process_start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (Linux ``/proc``), ``None`` elsewhere/gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[19])


def process_alive(pid: int | None, start_ticks: int | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, if given, started at ``start_ticks``."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): os.kill said it exists
    if stat[stat.rindex(")") + 2 :].split()[0] in ("Z", "X"):
        return False
    return start_ticks is None or process_start_ticks(pid) == start_ticks


def log_tail(path: Path, chars: int = LOG_TAIL_CHARS) -> str:
    """The last ``chars`` characters of a log file ('' when absent)."""
    if not path.is_file():
        return ""
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        fh.seek(max(0, size - chars))
        return fh.read().decode("utf-8", errors="replace")


_ERROR_LINE = re.compile(r"(?:^|: )error: (.+)$")  # "error: ..." (python -m training), "prog: error: ..." (argparse)


def log_error_summary(path: Path, chars: int = 4 * LOG_TAIL_CHARS) -> str | None:
    """The error a failed round reported, read from the end of its log.

    The last ``error: ...`` line (``python -m training`` reports unusable inputs that way, exit
    status 2; argparse too), else the exception line that ends the last traceback
    (``RuntimeError: ...``); ``None`` when the log shows neither (a killed process, say).
    """
    lines = log_tail(path, chars).splitlines()
    for line in reversed(lines):
        m = _ERROR_LINE.search(line.strip())
        if m:
            return m.group(1).strip()
    starts = [i for i, line in enumerate(lines) if line.startswith("Traceback (most recent call last):")]
    if starts:
        for line in lines[starts[-1] + 1 :]:
            if line.strip() and not line[:1].isspace():
                return line.strip()
    return None


def _failure_text(summary: str, log: Path) -> str:
    """A run's ``error``: summary lines, a blank line, then the log's tail (what the UI shows is
    the part before the blank line, :attr:`RunStatus.summary`)."""
    tail = log_tail(log)
    return f"{summary}\n\n{tail}" if tail else summary


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (``fcntl.flock``) across processes; only a thread lock where
    ``fcntl`` does not exist (Windows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _STATE_LOCK:
        try:
            import fcntl
        except ImportError:  # Windows: one app process per data folder is assumed
            yield
            return
        with open(path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def export_reviews(engine: Engine, out_dir: Path, *, seed: int = 0, image_size: int = 336, processor: str | None = None) -> Path:
    """Export the current reviews with :func:`catreview.export.dataset.export_dataset` into ``out_dir``;
    with ``processor`` (the base model's folder/id) every record is checked against it first.

    Raises:
        TrainJobError: the exporter module is not available.
    """
    try:
        from catreview.export.dataset import export_dataset
    except ModuleNotFoundError as exc:
        if exc.name != "catreview.export.dataset":
            raise
        raise TrainJobError("the dataset exporter (catreview.export.dataset) is not available; pass an export folder") from exc
    export_dataset(engine, out_dir, seed=seed, image_size=image_size, processor=processor)
    return out_dir


def _breed_list(counts: dict[str, int]) -> str:
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = ", ".join(f"{b} {n}" for b, n in ranked[:5])
    return shown + (f" and {len(ranked) - 5} more" if len(ranked) > 5 else "")


def check_training_data(train: dict[str, int], validation: dict[str, int], *, what: str) -> None:
    """Refuse a round that cannot work, with a message saying what to do.

    Args:
        train, validation: photos per breed in the two splits.
        what: what the counts describe, for the message ("the reviews", "export DIR").

    Raises:
        TrainJobError: no training photos, fewer than :data:`MIN_BREEDS` breeds, or no
            validation photos (a round picks its best checkpoint on them; the gate needs test photos,
            without enough of them a new version is left for promotion by hand).
    """
    total = {b: train.get(b, 0) + validation.get(b, 0) for b in {*train, *validation}}
    if not train:
        raise TrainJobError(f"Not enough reviewed photos to train: {what} give no training photos. Review some photos first.")
    if len(total) < MIN_BREEDS:
        raise TrainJobError(
            f"Not enough reviewed breeds to train: {what} name only {len(total)} breed(s) ({_breed_list(total)} "
            f"photos); a round needs photos of at least {MIN_BREEDS} breeds (it learns to tell breeds apart). "
            "Review photos of other breeds too."
        )
    if not validation:
        raise TrainJobError(
            f"Not enough reviewed photos to train: {what} give {sum(train.values())} training photos but no validation "
            "photo, and a round needs validation photos to pick its best checkpoint. Photos are split "
            "80/10/10 per breed, so a breed's first validation photo comes with its 4th reviewed photo; reviewed so "
            f"far: {_breed_list(total)}. Review more photos."
        )


def check_reviews_for_training(engine: Engine, *, seed: int = 0) -> dict[str, dict[str, int]]:
    """The splits an export of the current reviews would have (:func:`catreview.export.dataset.preview_splits`,
    nothing written), checked with :func:`check_training_data`.

    Raises:
        TrainJobError: too few reviewed photos or breeds (the message says what is missing).
    """
    from catreview.export.dataset import ExportError, preview_splits

    try:
        counts = preview_splits(engine, seed=seed)
    except ExportError:
        raise TrainJobError("Nothing to train on: no photo's latest review names a breed yet. Review some photos first.") from None
    check_training_data(counts["train"], counts["validation"], what="the reviews")
    return counts


def check_export_for_training(export_dir: str | Path) -> None:
    """:func:`check_training_data` on an export folder's ``llava/{train,validation}.jsonl``.

    Raises:
        TrainJobError: not an export folder, or too few photos/breeds in it.
    """
    root = Path(export_dir)
    if not (root / "llava" / "train.jsonl").is_file():
        raise TrainJobError(f"{root} is not an export folder: llava/train.jsonl is missing")
    counts: dict[str, dict[str, int]] = {}
    for split in ("train", "validation"):
        c: dict[str, int] = {}
        path = root / "llava" / f"{split}.jsonl"
        for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
            if line.strip():
                try:
                    breed = str(json.loads(line)["metadata"]["breed"])
                except (ValueError, KeyError, TypeError):
                    continue  # the round reports malformed records with file and line
                c[breed] = c.get(breed, 0) + 1
        counts[split] = c
    check_training_data(counts["train"], counts["validation"], what=f"export {root}")


#: Labels of the Train tab's hyper-parameter fields (also used in its error messages).
FORM_LABELS = {"epochs": "Epochs", "lr": "Learning rate", "rank": "LoRA rank", "batch_size": "Batch size"}
_WHOLE_FIELDS = ("epochs", "rank", "batch_size")


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
    values = {}
    for name, value in (("epochs", epochs), ("lr", lr), ("rank", rank), ("batch_size", batch_size)):
        x = _form_number(name, value)
        if name in _WHOLE_FIELDS:
            if not x.is_integer():
                raise ValueError(f"{FORM_LABELS[name]} must be a whole number, got {value!r}")
            values[name] = int(x)
        else:
            values[name] = x
    return replace(base or TrainConfig(), **values, train_projector=bool(train_projector))


# --------------------------------------------------------------------------------------------
# Status
# --------------------------------------------------------------------------------------------


@dataclass
class RunStatus:
    """One run as the UI shows it.

    ``phase``: ``exporting``, ``starting``, ``training``, ``finished``. ``step``/``total_steps``,
    ``loss``: last training row; ``val_*``: last evaluation row; ``gate``: the stored gate decision
    of the run's adapter version (``GateDecision.to_dict()``), ``None`` before it exists.
    """

    run_id: int
    status: str
    phase: str
    base_model: str
    run_dir: str
    pid: int | None
    started_at: datetime
    finished_at: datetime | None
    step: int
    total_steps: int | None
    loss: float | None
    val_loss: float | None
    val_balanced_accuracy: float | None
    adapter_id: int | None
    activated: bool | None
    gate: dict[str, Any] | None
    error: str | None

    def text(self) -> str:
        """One line for people."""
        head = f"Run #{self.run_id}: {self.status}"
        if self.status == "running":
            if self.phase != "training":
                return f"{head} ({self.phase})"
            total = f"/{self.total_steps}" if self.total_steps else ""
            loss = f", loss {self.loss:.3f}" if self.loss is not None else ""
            val = f", val balanced accuracy {100 * self.val_balanced_accuracy:.1f}%" if self.val_balanced_accuracy is not None else ""
            return f"{head}, step {self.step}{total}{loss}{val}"
        if self.status == "succeeded" and self.adapter_id is not None:
            verdict = "activated" if self.activated else "kept inactive by the gate"
            return f"{head}: adapter #{self.adapter_id} {verdict}"
        if self.summary:
            return f"{head}: {self.summary}"
        return head

    @property
    def summary(self) -> str:
        """What went wrong, for people: the ``error`` up to its first blank line (the reason the
        round gave, then where its log is), at most 3 lines; ``""`` without an error."""
        text = (self.error or "").strip()
        if not text:
            return ""
        if "\n\n" not in text:  # rows written before errors had a summary part: their first line
            return text.splitlines()[0]
        return "\n".join(text.split("\n\n", 1)[0].splitlines()[:3])


# --------------------------------------------------------------------------------------------
# Jobs
# --------------------------------------------------------------------------------------------


class TrainJobs:
    """Start, watch, cancel and recover LoRA rounds for one database and data folder.

    Args:
        engine: the app's database.
        settings: for ``data_dir`` (runs, exports, adapters live under it).
        policy: gate thresholds for new versions.
        auto_activate: activate a version that passes the gate (else only register it).
        launcher: command prefix that runs a Python module, default ``[sys.executable]``;
            e.g. ``["accelerate", "launch", "--num_processes", "4"]``.
        reconcile: run :meth:`reconcile` now (the "next start" of crash recovery).
    """

    def __init__(
        self,
        engine: Engine,
        settings: Settings,
        *,
        policy: GatePolicy = GatePolicy(),
        auto_activate: bool = True,
        launcher: Sequence[str] | None = None,
        reconcile: bool = True,
    ) -> None:
        self.engine = engine
        self.settings = settings
        self.policy = policy
        self.auto_activate = auto_activate
        self.launcher = list(launcher) if launcher else [sys.executable]
        self.data_dir = Path(settings.data_dir)
        if reconcile:
            self.reconcile()

    def _key(self, run_id: int) -> RunKey:
        """Key of a run in the process-wide worker/process/cancel tables."""
        return (self.engine.url.render_as_string(hide_password=True), int(run_id))

    # ------------------------------------------------------------------ recovery
    def _is_live(self, run: TrainingRun) -> bool:
        with _STATE_LOCK:
            worker = _WORKERS.get(self._key(run.id))  # type: ignore[arg-type]
            if worker is not None and worker.is_alive():
                return True
        if run.pid is None or run.pid == os.getpid():
            return False  # claimed by this process, whose worker is gone
        ticks = read_json(Path(run.run_dir) / RUN_META_FILE).get("pid_start_ticks")
        return process_alive(run.pid, ticks)

    def reconcile(self) -> list[int]:
        """Close ``running`` rows whose process is gone; returns their ids.

        Finished rounds (``result.json`` present) are registered (``succeeded``); the others are
        marked ``failed`` with the log's tail in ``error`` (the run folder and log are kept).
        """
        with _file_lock(self.data_dir / LOCK_FILE):
            return self._reconcile_locked()

    def _reconcile_locked(self) -> list[int]:
        closed = []
        with Session(self.engine) as s:
            running = list(s.exec(select(TrainingRun).where(TrainingRun.status == "running")))
        for run in running:
            if self._is_live(run):
                continue
            self._close_dead(run)
            closed.append(int(run.id))  # type: ignore[arg-type]
        return closed

    def _close_dead(self, run: TrainingRun) -> None:
        run_dir = Path(run.run_dir)
        if (run_dir / RESULT_FILE).is_file():
            try:
                register_round(self.engine, self.settings, run_dir, run_id=run.id, policy=self.policy, auto_activate=self.auto_activate)
                return
            except (ValueError, OSError, KeyError) as exc:
                self._mark(run.id, "failed", f"finished round could not be registered: {exc!r}")  # type: ignore[arg-type]
                return
        log = run_dir / LOG_FILE
        summary = f"training process {run.pid} ended without finishing (killed or crashed); log kept at {log}"
        reason = log_error_summary(log)
        self._mark(run.id, "failed", _failure_text(f"{reason}\n{summary}" if reason else summary, log))  # type: ignore[arg-type]

    def _mark(self, run_id: int, status: str, error: str | None = None) -> None:
        with Session(self.engine) as s:
            run = s.get(TrainingRun, run_id)
            if run is None:
                return
            run.status, run.error, run.finished_at = status, error, utcnow()
            s.add(run)
            s.commit()

    # ------------------------------------------------------------------ queries
    def running(self) -> TrainingRun | None:
        """The run holding the training slot (after :meth:`reconcile`), or ``None``."""
        with Session(self.engine) as s:
            return s.exec(select(TrainingRun).where(TrainingRun.status == "running").order_by(TrainingRun.id.desc())).first()  # type: ignore[union-attr]

    def runs(self, limit: int = 20) -> list[TrainingRun]:
        """Latest runs, newest first."""
        with Session(self.engine) as s:
            return list(s.exec(select(TrainingRun).order_by(TrainingRun.id.desc()).limit(limit)))  # type: ignore[union-attr]

    def progress(self, run_id: int) -> list[dict[str, Any]]:
        """Rows of the run's ``progress.jsonl`` (``kind`` train/eval/resume)."""
        with Session(self.engine) as s:
            run = s.get(TrainingRun, run_id)
        return read_progress(Path(run.run_dir) / PROGRESS_FILE) if run else []

    def status(self, run_id: int | None = None) -> RunStatus | None:
        """:class:`RunStatus` of ``run_id`` (default: the latest run), ``None`` when there is none."""
        with Session(self.engine) as s:
            if run_id is None:
                run = s.exec(select(TrainingRun).order_by(TrainingRun.id.desc())).first()  # type: ignore[union-attr]
            else:
                run = s.get(TrainingRun, run_id)
        if run is None:
            return None
        run_dir = Path(run.run_dir)
        rows = read_progress(run_dir / PROGRESS_FILE)
        train = [r for r in rows if r.get("kind") == "train"]
        evals = [r for r in rows if r.get("kind") == "eval"]
        meta = read_json(run_dir / RUN_META_FILE)
        phase = "finished" if run.status != "running" else ("training" if rows else meta.get("phase", "starting"))
        gate = activated = None
        if run.adapter_id is not None:
            gate = version_metrics(self.engine, run.adapter_id).get("gate")
            with Session(self.engine) as s:
                from catreview.data.db import AdapterVersion

                v = s.get(AdapterVersion, run.adapter_id)
                activated = bool(v.active) if v else None
        return RunStatus(
            run_id=int(run.id), status=run.status, phase=phase, base_model=run.base_model, run_dir=run.run_dir,  # type: ignore[arg-type]
            pid=run.pid, started_at=run.started_at, finished_at=run.finished_at,
            step=train[-1]["step"] if train else 0, total_steps=train[-1].get("total_steps") if train else None,
            loss=train[-1]["loss"] if train else None,
            val_loss=evals[-1]["val_loss"] if evals else None,
            val_balanced_accuracy=evals[-1]["val_balanced_accuracy"] if evals else None,
            adapter_id=run.adapter_id, activated=activated, gate=gate, error=run.error,
        )

    # ------------------------------------------------------------------ start / cancel / wait
    def start(
        self,
        base_model: str,
        config: TrainConfig | None = None,
        *,
        export_dir: str | Path | None = None,
        resume_run: int | None = None,
        export_image_size: int = 336,
    ) -> int:
        """Claim the training slot and start a round in the background; returns the run id.

        Args:
            base_model: the VLM to adapt (a profile's ``model``: hub id or folder).
            config: hyper-parameters (default :class:`TrainConfig`).
            export_dir: train on this export instead of exporting the current reviews.
            resume_run: continue run ``resume_run`` (its folder, export and config) from its last
                checkpoint; ``base_model``/``config``/``export_dir`` are then taken from that run.
            export_image_size: ``image_size`` passed to the exporter.

        Before anything starts, the training data are checked (:func:`check_reviews_for_training`,
        or :func:`check_export_for_training` for ``export_dir``): a round needs training and
        validation photos of at least :data:`MIN_BREEDS` breeds, and a refused start says what is
        missing instead of failing later in the training process.

        Raises:
            TrainingBusy: another round is running (in this or another process).
            TrainJobError: too few reviewed photos or breeds; ``resume_run`` unknown or without its
                files.
        """
        cfg = config or TrainConfig()
        if resume_run is None:
            if export_dir is None:
                check_reviews_for_training(self.engine, seed=cfg.seed)
            else:
                check_export_for_training(export_dir)
        with _file_lock(self.data_dir / LOCK_FILE):
            self._reconcile_locked()
            busy = self.running()
            if busy is not None:
                raise TrainingBusy(f"training run #{busy.id} is already running (started {busy.started_at:%H:%M:%S}); cancel it or wait")
            resume_dir = None
            if resume_run is not None:
                resume_dir, base_model, cfg, export_dir = self._resume_inputs(resume_run)
            with Session(self.engine) as s:
                run = TrainingRun(base_model=base_model, status="running", pid=os.getpid(), run_dir=str(resume_dir or ""))
                s.add(run)
                s.commit()
                s.refresh(run)
                run_id = int(run.id)  # type: ignore[arg-type]
                if resume_dir is None:
                    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
                    run.run_dir = str(self.data_dir / RUNS_DIRNAME / f"{run_id:04d}-{stamp}")
                    s.add(run)
                    s.commit()
                run_dir = Path(run.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / CONFIG_FILE)
            active = active_version(self.engine, base_model)
            meta = read_json(run_dir / RUN_META_FILE)
            meta.update(run_id=run_id, base_model=base_model, phase="starting",
                        baseline_adapter=active.path if active else None, baseline_adapter_id=active.id if active else None,
                        export_dir=str(export_dir) if export_dir else None, resumed_from=resume_run)
            write_json(run_dir / RUN_META_FILE, meta)
            worker = threading.Thread(
                target=self._work, args=(run_id, run_dir, base_model, export_dir, export_image_size, cfg.seed),
                name=f"catreview-train-{run_id}", daemon=True,
            )
            with _STATE_LOCK:
                _WORKERS[self._key(run_id)] = worker
            worker.start()
        return run_id

    def _resume_inputs(self, run_id: int) -> tuple[Path, str, TrainConfig, str]:
        with Session(self.engine) as s:
            old = s.get(TrainingRun, run_id)
        if old is None:
            raise TrainJobError(f"no training run #{run_id} to resume")
        run_dir = Path(old.run_dir)
        meta = read_json(run_dir / RUN_META_FILE)
        if not meta.get("export_dir") or not (run_dir / CONFIG_FILE).is_file():
            raise TrainJobError(f"run #{run_id} cannot be resumed: its export or config is missing in {run_dir}")
        return run_dir, old.base_model, TrainConfig.load(run_dir / CONFIG_FILE), meta["export_dir"]

    def _command(self, run_dir: Path, base_model: str, export_dir: Path, baseline: str | None) -> list[str]:
        cmd = [*self.launcher, "-m", "training", "--export", str(export_dir), "--base", str(base_model),
               "--out", str(run_dir), "--config-json", str(run_dir / CONFIG_FILE)]
        if baseline:
            cmd += ["--baseline-adapter", baseline]
        return cmd

    def _work(self, run_id: int, run_dir: Path, base_model: str, export_dir: str | Path | None, image_size: int, seed: int) -> None:
        """Worker thread: export, spawn, wait, finalise. Every failure ends in the run's row."""
        try:
            meta = read_json(run_dir / RUN_META_FILE)
            if export_dir is None:
                meta["phase"] = "exporting"
                write_json(run_dir / RUN_META_FILE, meta)
                stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
                export_dir = export_reviews(
                    self.engine, self.data_dir / EXPORTS_DIRNAME / f"run{run_id:04d}-{stamp}", seed=seed,
                    image_size=image_size, processor=base_model,
                )
                meta["export_dir"] = str(export_dir)
            if self._key(run_id) in _CANCELLED:
                self._mark(run_id, "cancelled", "cancelled before training started")
                return
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
            env.setdefault("HF_HUB_OFFLINE", "1")
            env.setdefault("PYTHONUNBUFFERED", "1")
            cmd = self._command(run_dir, base_model, Path(export_dir), meta.get("baseline_adapter"))
            with open(run_dir / LOG_FILE, "ab") as log:
                log.write(f"$ {shlex.join(cmd)}\n".encode())
                log.flush()
                proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            with _STATE_LOCK:
                _PROCS[self._key(run_id)] = proc
            meta.update(phase="training", pid=proc.pid, pid_start_ticks=process_start_ticks(proc.pid), command=cmd)
            write_json(run_dir / RUN_META_FILE, meta)
            with Session(self.engine) as s:
                run = s.get(TrainingRun, run_id)
                run.pid = proc.pid  # type: ignore[union-attr]
                s.add(run)
                s.commit()
            rc = proc.wait()
            self._finalise(run_id, run_dir, rc)
        except Exception as exc:  # recorded in the run's row and log; the thread must not die silently
            text = "".join(traceback.format_exception(exc))
            with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
                log.write(text)
            self._mark(run_id, "failed", f"{type(exc).__name__}: {exc}\nlog kept at {run_dir / LOG_FILE}\n\n{text}")
        finally:
            with _STATE_LOCK:
                _PROCS.pop(self._key(run_id), None)
                _WORKERS.pop(self._key(run_id), None)
                _CANCELLED.discard(self._key(run_id))

    def _finalise(self, run_id: int, run_dir: Path, rc: int) -> None:
        current = self._get(run_id)
        if current is not None and current.status != "running":
            return  # closed meanwhile (cancelled from another process)
        if self._key(run_id) in _CANCELLED:
            self._mark(run_id, "cancelled", f"cancelled by the user (exit status {rc}); checkpoint and log kept in {run_dir}")
        elif rc == 0 and (run_dir / RESULT_FILE).is_file():
            register_round(self.engine, self.settings, run_dir, run_id=run_id, policy=self.policy, auto_activate=self.auto_activate)
        else:
            log = run_dir / LOG_FILE
            summary = f"training process exited with status {rc}; log kept at {log}"
            reason = log_error_summary(log)
            self._mark(run_id, "failed", _failure_text(f"{reason}\n{summary}" if reason else summary, log))

    def cancel(self, run_id: int | None = None) -> bool:
        """Stop the running round (SIGTERM to its process group); ``False`` when none runs.

        The round's folder (checkpoint, log) is kept, so it can be resumed.
        """
        run = self.running() if run_id is None else self._get(run_id)
        if run is None or run.status != "running":
            return False
        rid = int(run.id)  # type: ignore[arg-type]
        with _STATE_LOCK:
            _CANCELLED.add(self._key(rid))
            proc = _PROCS.get(self._key(rid))
            ours = self._key(rid) in _WORKERS
        if proc is not None:
            _terminate_group(proc.pid)
            return True
        if ours:
            return True  # still exporting: the worker stops before spawning
        ticks = read_json(Path(run.run_dir) / RUN_META_FILE).get("pid_start_ticks")
        if process_alive(run.pid, ticks) and run.pid != os.getpid():
            _terminate_group(run.pid)  # type: ignore[arg-type]
        self._mark(rid, "cancelled", "cancelled by the user")
        with _STATE_LOCK:
            _CANCELLED.discard(self._key(rid))  # closed here; no worker of ours will look
        return True

    def _get(self, run_id: int) -> TrainingRun | None:
        with Session(self.engine) as s:
            return s.get(TrainingRun, run_id)

    def wait(self, run_id: int, timeout: float | None = None) -> str:
        """Block until run ``run_id`` leaves ``running`` (or ``timeout`` s); returns its status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with _STATE_LOCK:
                worker = _WORKERS.get(self._key(run_id))
            if worker is not None:
                worker.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            run = self._get(run_id)
            if run is None:
                raise TrainJobError(f"no training run #{run_id}")
            if run.status != "running" or (deadline is not None and time.monotonic() >= deadline):
                return run.status
            if worker is None:  # another process trains it
                time.sleep(0.5)
                self.reconcile()


def _terminate_group(pid: int) -> None:
    """SIGTERM the process group led by ``pid`` (the round and, under accelerate, its workers)."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return  # already gone
    except PermissionError:
        os.kill(pid, signal.SIGTERM)


# --------------------------------------------------------------------------------------------
# Command line (wired into catreview.cli.main by the lead; runnable as python -m catreview.adapters.jobs)
# --------------------------------------------------------------------------------------------


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``train`` to an ``add_subparsers()`` object; returns the sub-parser."""
    from catreview.adapters.train_config import add_config_arguments
    from catreview.cli.common import add_common_options

    p = sub.add_parser("train", help="LoRA round on the reviewed photos: export, train, register, gate, maybe activate")
    add_common_options(p)
    p.add_argument("--vlm", metavar="PROFILE", help="VLM profile whose model is adapted (default: active_vlm)")
    p.add_argument("--base", metavar="MODEL", help="base model id/folder (overrides --vlm)")
    p.add_argument("--export", metavar="DIR", type=Path, help="train on this export folder instead of exporting the reviews")
    p.add_argument("--resume-run", metavar="ID", type=int, help="resume a failed/cancelled run from its last checkpoint")
    p.add_argument("--no-activate", action="store_true", help="register the adapter but never activate it automatically")
    p.add_argument("--min-breed-photos", type=int, default=GatePolicy.min_breed_photos, help="gate: breeds with fewer test photos are not checked for drops")
    p.add_argument("--max-breed-drop", type=float, default=GatePolicy.max_breed_drop, help="gate: largest allowed per-breed test accuracy drop")
    p.add_argument("--min-test-photos", type=int, default=GatePolicy.min_test_photos, help="gate: fewest test photos it decides on (else: not gated, promote by hand)")
    p.add_argument("--min-p-better", type=float, default=GatePolicy.min_p_better, help="gate: share of paired bootstrap resamples in which the new adapter must be better")
    p.add_argument("--launcher", metavar="CMD", help='command that runs a module, default this Python; e.g. "accelerate launch --num_processes 4"')
    add_config_arguments(p)
    return p


def add_adapters_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``adapters`` (list / promote ID / rollback ID|none) to an ``add_subparsers()`` object."""
    from catreview.cli.common import add_common_options

    p = sub.add_parser("adapters", help="list adapter versions, promote one, or roll back (to a version or 'none')")
    add_common_options(p)
    p.add_argument("action", choices=["list", "promote", "rollback"])
    p.add_argument("target", nargs="?", help="version id (promote/rollback) or 'none' (rollback to no adapter)")
    p.add_argument("--vlm", metavar="PROFILE")
    p.add_argument("--base", metavar="MODEL", help="base model id/folder (overrides --vlm)")
    return p


def _settings_and_engine(args: argparse.Namespace) -> tuple[Settings, Engine]:
    from catreview.cli.common import settings_from_args
    from catreview.data.db import make_engine

    settings = settings_from_args(args)
    return settings, make_engine(settings.database_url)


def _base_model(args: argparse.Namespace, settings: Settings) -> str:
    """``--base``, else the base model of profile ``--vlm`` (default: the active one).

    Raises:
        catreview.models.registry.UnknownProfileError: ``--vlm`` (or ``active_vlm``) names no configured
            profile (a ``ConfigError``, and a ``KeyError`` for :func:`main`).
    """
    if args.base:
        return args.base
    from catreview.models.registry import ModelRegistry

    return ModelRegistry(settings).base_model(args.vlm)


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%" if isinstance(x, float) else str(x)


def metrics_table(status: RunStatus, engine: Engine) -> str:
    """Final CLI table: validation metrics, the gate decision and per-breed accuracy on the split it
    decided on (test; reference vs new)."""
    if status.adapter_id is None:
        return status.text()
    m = version_metrics(engine, status.adapter_id)
    lines = [status.text(), f"val balanced accuracy {_fmt(m.get('balanced_accuracy'))}, accuracy {_fmt(m.get('accuracy'))}, "
             f"macro-F1 {_fmt(m.get('macro_f1'))}, val loss {m.get('val_loss', float('nan')):.3f}, best step {m.get('best_step')}"]
    if status.gate:
        decision = GateDecision.from_dict(status.gate)
        lines.append(f"vs {decision.reference}: {decision.summary()}")
        lines.append(f"per-breed {decision.split} accuracy:")
        lines.append(f"{'breed':28s} {'n':>4s} {'before':>8s} {'after':>8s} {'delta':>8s}")
        for b in decision.rows():
            delta = "-" if b["delta"] is None else f"{100 * b['delta']:+.1f}"
            flag = "  BLOCKS" if b["blocking"] else ""
            lines.append(f"{b['breed'][:28]:28s} {b['n']:4d} {_fmt(b['reference']):>8s} {_fmt(b['candidate']):>8s} {delta:>8s}{flag}")
    return "\n".join(lines)


def cmd_train(args: argparse.Namespace) -> int:
    """``train``: run a round in a background process with a progress bar; print the metrics table.

    Ctrl-C cancels the round (its checkpoint is kept; ``--resume-run ID`` continues it).
    Returns 0 when the round succeeded, 1 otherwise.
    """
    from tqdm import tqdm

    from catreview.adapters.train_config import config_from_args

    settings, engine = _settings_and_engine(args)
    policy = GatePolicy(min_breed_photos=args.min_breed_photos, max_breed_drop=args.max_breed_drop,
                        min_test_photos=args.min_test_photos, min_p_better=args.min_p_better)
    jobs = TrainJobs(engine, settings, policy=policy, auto_activate=not args.no_activate,
                     launcher=shlex.split(args.launcher) if args.launcher else None)
    cfg = config_from_args(args)
    base = None if args.resume_run is not None else _base_model(args, settings)
    run_id = jobs.start(base or "", cfg, export_dir=args.export, resume_run=args.resume_run)
    print(f"training run #{run_id} started; log: {Path(jobs._get(run_id).run_dir) / LOG_FILE}", file=sys.stderr)  # type: ignore[union-attr]
    bar = tqdm(desc=f"run #{run_id}", unit="step", file=sys.stderr)
    try:
        while jobs.wait(run_id, timeout=1.0) == "running":
            st = jobs.status(run_id)
            if st and st.total_steps:
                bar.total = st.total_steps
                bar.n = st.step
                post = {"loss": f"{st.loss:.3f}"} if st.loss is not None else {}
                if st.val_balanced_accuracy is not None:
                    post["val balanced accuracy"] = f"{st.val_balanced_accuracy:.3f}"
                bar.set_postfix(post, refresh=False)
                bar.refresh()
    except KeyboardInterrupt:
        jobs.cancel(run_id)
        jobs.wait(run_id, timeout=60)
        print(f"\ncancelled; resume with --resume-run {run_id}", file=sys.stderr)
        return 130
    finally:
        bar.close()
    st = jobs.status(run_id)
    print(metrics_table(st, engine))  # type: ignore[arg-type]
    return 0 if st is not None and st.status == "succeeded" else 1


def cmd_adapters(args: argparse.Namespace) -> int:
    """``adapters list | promote ID | rollback ID|none``.

    Raises:
        ValueError: a missing, extra or malformed version id (the message says what to give).
    """
    from catreview.adapters.versions import activate, rollback, version_rows

    target = args.target.strip() if args.target else None
    if args.action == "list" and target:
        raise ValueError(f"'adapters list' takes no argument (got {target!r})")
    if args.action == "promote" and not (target and target.isdigit()):
        raise ValueError(f"promote needs a version id (a number from 'adapters list'), got {target!r}" if target
                         else "promote needs a version id (a number from 'adapters list')")
    if args.action == "rollback" and not (target and (target.isdigit() or target.lower() == "none")):
        raise ValueError(f"rollback needs a version id or 'none', got {target!r}" if target
                         else "rollback needs a version id (a number from 'adapters list') or 'none'")
    settings, engine = _settings_and_engine(args)
    base = _base_model(args, settings)
    if args.action == "promote":
        activate(engine, int(target))
    elif args.action == "rollback":
        rollback(engine, base, None if target.lower() == "none" else int(target))
    rows = version_rows(engine, base)
    print(f"{'id':>4s} {'active':6s} {'name':28s} {'created':16s} {'val balanced accuracy':>21s} {'gate':8s} export")
    for r in rows:
        print(f"{r['id']:4d} {'*' if r['active'] else '':6s} {r['name']:28s} {r['created']:16s} {_fmt(r['val_balanced_accuracy']):>21s} {r['gate']:8s} {r['export']}")
    if not any(r["active"] for r in rows):
        print("no adapter active: the base model predicts alone")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m catreview.adapters.jobs train|adapters ...`` (same as the catreview CLI commands)."""
    parser = argparse.ArgumentParser(prog="python -m catreview.adapters.jobs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_parser(sub)
    add_adapters_parser(sub)
    args = parser.parse_args(argv)
    try:
        return cmd_train(args) if args.command == "train" else cmd_adapters(args)
    except (TrainingBusy, TrainJobError, ValueError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
