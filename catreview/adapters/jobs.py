"""Background LoRA rounds: export the reviews, train in a separate process, register the result.

:class:`TrainJobs` is what the Train tab and ``python -m catreview train`` use:

1. :meth:`TrainJobs.start` first checks that the reviews (or the given export) hold training and
   validation photos of at least two breeds, refusing with a message that says what is missing
   (:func:`catreview.adapters.checks.check_reviews_for_training`). It then claims the single
   training slot (a ``TrainingRun`` row with status ``running``; a second start raises
   :class:`TrainingBusy`), and a worker thread exports the current reviews
   (:func:`catreview.export.dataset.export_dataset`, unless an export folder is given) and starts
   ``python -m training ...`` (or ``accelerate launch -m training ...`` with ``launcher``) as a
   **separate process** in its own session, with the repository as working directory, output to
   ``run_dir/train.log``. The app's process never imports torch for training and stays responsive.
2. The round writes only inside its run folder (``settings.data_dir/runs/<id>-<time>``,
   :mod:`catreview.adapters.runfolder`): ``progress.jsonl`` (read for live plots), checkpoints,
   ``best/``, ``result.json`` last. It never touches the database or the adapters folder, so
   killing it at any moment (even SIGKILL) leaves the active adapter, the database and every
   stored version as they were.
3. When the process exits 0 the worker registers the round
   (:func:`catreview.adapters.rounds.register_round`: store the adapter, add the version, gate,
   maybe activate -- one transaction). A non-zero exit marks the run ``failed``; its ``error``
   starts with the reason the round reported (the last ``error:`` line or exception of the log,
   :func:`catreview.adapters.runfolder.log_error_summary`) and the log's path, which the Train tab
   and the CLI show (:attr:`catreview.adapters.status.RunStatus.summary`), then the log's tail (the
   file is kept); :meth:`TrainJobs.cancel` terminates the process group and marks it ``cancelled``.
4. **Crash recovery** (:meth:`TrainJobs.reconcile`, run at construction and at every start): a
   ``running`` row whose process is gone is marked ``failed`` (log kept) -- or, when its
   ``result.json`` exists (it finished while the app was down), registered as ``succeeded``.
   A process counts as gone when its pid no longer exists, is a zombie, or now belongs to another
   program (the process start time recorded in ``run.json`` differs;
   :func:`catreview.adapters.processes.process_alive`). A round still running whose starting
   process (app or CLI) has died is **adopted**: this process watches it and registers it as soon
   as it ends (the round keeps its progress; a new round is refused until then, as before).
5. :meth:`TrainJobs.start` with ``resume_run=`` restarts a failed/cancelled run in its own folder;
   the round continues from ``checkpoint-last``.

Starting and recovering are serialised across processes by a lock file in the data folder
(``filelock.FileLock``) and, inside one process, by a thread lock.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from filelock import FileLock
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from catreview.adapters.checks import TrainJobError, check_export_for_training, check_reviews_for_training
from catreview.adapters.gate import DEFAULT_POLICY, GatePolicy
from catreview.adapters.processes import process_alive, process_create_time, terminate_group
from catreview.adapters.rounds import RoundOutcome, register_round
from catreview.adapters.runfolder import (
    CONFIG_FILE,
    LOG_FILE,
    PROGRESS_FILE,
    RESULT_FILE,
    RUN_META_FILE,
    failure_text,
    log_error_summary,
    read_progress,
)
from catreview.adapters.status import RunStatus
from catreview.adapters.train_config import TrainConfig
from catreview.adapters.versions import active_version, version_metrics
from catreview.config import REPO_ROOT, Settings
from catreview.data.db import AdapterVersion, TrainingRun, utcnow
from catreview.errors import CatreviewError
from catreview.files import read_json, write_json

RUNS_DIRNAME = "runs"
EXPORTS_DIRNAME = "exports"
LOCK_FILE = "train.lock"

# Process-wide: several TrainJobs objects in one process (the app and a CLI call in tests) share
# them. Keyed by (database URL, run id): run ids are per database, and one process may use several.
RunKey = tuple[str, int]
_WORKERS: dict[RunKey, threading.Thread] = {}
_PROCS: dict[RunKey, subprocess.Popen] = {}
_CANCELLED: set[RunKey] = set()
_ADOPTERS: dict[RunKey, threading.Thread] = {}
_STATE_LOCK = threading.RLock()
ADOPT_POLL_S = 2.0
"""Seconds between two liveness checks of an adopted round's process."""


class TrainingBusy(CatreviewError, RuntimeError):
    """A round is already running; the message names it."""


@contextmanager
def _data_dir_lock(path: Path) -> Iterator[None]:
    """Exclusive lock across processes (``filelock.FileLock`` on ``path``) and threads (the
    process-wide thread lock: two lock objects of one process on one file would block each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with _STATE_LOCK, FileLock(path):
        yield


def export_reviews(
    engine: Engine, out_dir: Path, *, seed: int = 0, image_size: int = 336, processor: str | None = None
) -> Path:
    """Export the current reviews with :func:`catreview.export.dataset.export_dataset` into ``out_dir``;
    with ``processor`` (the base model's folder/id) every record is checked against it first.
    Returns ``out_dir``."""
    from catreview.export.dataset import export_dataset  # images and processors: only when a round starts

    export_dataset(engine, out_dir, seed=seed, image_size=image_size, processor=processor)
    return out_dir


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
        policy: GatePolicy = DEFAULT_POLICY,
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
        #: Called with the :class:`~catreview.adapters.rounds.RoundOutcome` of every round this
        #: object registers (the app re-predicts when it activated a version). A hook that raises
        #: is logged in the run's log; the registered version stays.
        self.on_registered: list[Callable[[RoundOutcome], None]] = []
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
        started = read_json(Path(run.run_dir) / RUN_META_FILE).get("pid_create_time")
        return process_alive(run.pid, started)

    def reconcile(self) -> list[int]:
        """Close ``running`` rows whose process is gone; returns their ids.

        Finished rounds (``result.json`` present) are registered (``succeeded``); the others are
        marked ``failed`` with the log's tail in ``error`` (the run folder and log are kept).
        """
        with _data_dir_lock(self.data_dir / LOCK_FILE):
            return self._reconcile_locked()

    def _reconcile_locked(self) -> list[int]:
        closed = []
        with Session(self.engine) as s:
            running = list(s.exec(select(TrainingRun).where(TrainingRun.status == "running")))
        for run in running:
            if self._is_live(run):
                self._adopt_if_orphaned(run)
                continue
            self._close_dead(run)
            closed.append(int(run.id))  # type: ignore[arg-type]
        return closed

    def _adopt_if_orphaned(self, run: TrainingRun) -> None:
        """Adopt a live round whose starting process (app or CLI) has died: a daemon thread of
        this process checks every :data:`ADOPT_POLL_S` seconds whether the round's process still
        runs and, once it has ended, registers it (:meth:`reconcile`), so its result does not
        wait for the next start. A round whose starter still runs is left to that starter."""
        key = self._key(run.id)  # type: ignore[arg-type]
        meta = read_json(Path(run.run_dir) / RUN_META_FILE)
        owner, owner_started = meta.get("owner_pid"), meta.get("owner_create_time")
        if owner is None or owner == os.getpid() or process_alive(owner, owner_started):
            return
        started = meta.get("pid_create_time")
        with _STATE_LOCK:
            adopter = _ADOPTERS.get(key)
            if adopter is not None and adopter.is_alive():
                return

            def watch() -> None:
                while process_alive(run.pid, started):
                    time.sleep(ADOPT_POLL_S)
                with _STATE_LOCK:
                    _ADOPTERS.pop(key, None)
                self.reconcile()

            adopter = threading.Thread(target=watch, name=f"catreview-adopt-{run.id}", daemon=True)
            _ADOPTERS[key] = adopter
        with open(Path(run.run_dir) / LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"adopted by process {os.getpid()}: the starting process {owner} has ended\n")
        adopter.start()

    def _close_dead(self, run: TrainingRun) -> None:
        run_dir = Path(run.run_dir)
        if (run_dir / RESULT_FILE).is_file():
            try:
                outcome = register_round(
                    self.engine,
                    self.settings,
                    run_dir,
                    run_id=run.id,
                    policy=self.policy,
                    auto_activate=self.auto_activate,
                )
                self._registered(outcome, run_dir)
                return
            except (ValueError, OSError, KeyError) as exc:  # AdapterError, ResultFileError are ValueErrors
                self._mark(run.id, "failed", f"finished round could not be registered: {exc!r}")  # type: ignore[arg-type]
                return
        log = run_dir / LOG_FILE
        summary = f"training process {run.pid} ended without finishing (killed or crashed); log kept at {log}"
        reason = log_error_summary(log)
        self._mark(run.id, "failed", failure_text(f"{reason}\n{summary}" if reason else summary, log))  # type: ignore[arg-type]

    def _registered(self, outcome: RoundOutcome, run_dir: Path) -> None:
        """Run the :attr:`on_registered` hooks; a failing hook's traceback goes to the run's log."""
        for hook in list(self.on_registered):
            try:
                hook(outcome)
            except Exception:  # noqa: BLE001 -- logged; the version is registered and must stay so
                with open(run_dir / LOG_FILE, "a", encoding="utf-8") as log:
                    log.write(f"after registering: hook {hook!r} failed\n{traceback.format_exc()}")

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
            q = select(TrainingRun).where(TrainingRun.status == "running").order_by(col(TrainingRun.id).desc())
            return s.exec(q).first()

    def runs(self, limit: int = 20) -> list[TrainingRun]:
        """Latest runs, newest first."""
        with Session(self.engine) as s:
            return list(s.exec(select(TrainingRun).order_by(col(TrainingRun.id).desc()).limit(limit)))

    def progress(self, run_id: int) -> list[dict[str, Any]]:
        """Rows of the run's ``progress.jsonl`` (``kind`` train/eval/resume)."""
        with Session(self.engine) as s:
            run = s.get(TrainingRun, run_id)
        return read_progress(Path(run.run_dir) / PROGRESS_FILE) if run else []

    def status(self, run_id: int | None = None) -> RunStatus | None:
        """:class:`RunStatus` of ``run_id`` (default: the latest run), ``None`` when there is none."""
        with Session(self.engine) as s:
            if run_id is None:
                run = s.exec(select(TrainingRun).order_by(col(TrainingRun.id).desc())).first()
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
                v = s.get(AdapterVersion, run.adapter_id)
                activated = bool(v.active) if v else None
        return RunStatus(
            run_id=int(run.id),  # type: ignore[arg-type]  # a stored row has an id
            status=run.status,
            phase=phase,
            base_model=run.base_model,
            run_dir=run.run_dir,
            pid=run.pid,
            started_at=run.started_at,
            finished_at=run.finished_at,
            step=train[-1]["step"] if train else 0,
            total_steps=train[-1].get("total_steps") if train else None,
            loss=train[-1]["loss"] if train else None,
            val_loss=evals[-1]["val_loss"] if evals else None,
            val_balanced_accuracy=evals[-1]["val_balanced_accuracy"] if evals else None,
            adapter_id=run.adapter_id,
            activated=activated,
            gate=gate,
            error=run.error,
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

        Before anything starts, the training data are checked
        (:func:`~catreview.adapters.checks.check_reviews_for_training`, or
        :func:`~catreview.adapters.checks.check_export_for_training` for ``export_dir``): a round
        needs training and validation photos of at least
        :data:`~catreview.adapters.checks.MIN_BREEDS` breeds, and a refused start says what is
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
        with _data_dir_lock(self.data_dir / LOCK_FILE):
            self._reconcile_locked()
            busy = self.running()
            if busy is not None:
                raise TrainingBusy(
                    f"training run #{busy.id} is already running (started {busy.started_at:%H:%M:%S}); cancel it or wait"
                )
            resume_dir = None
            if resume_run is not None:
                resume_dir, base_model, cfg, export_dir = self._resume_inputs(resume_run)
            with Session(self.engine) as s:
                run = TrainingRun(
                    base_model=base_model, status="running", pid=os.getpid(), run_dir=str(resume_dir or "")
                )
                s.add(run)
                s.commit()
                s.refresh(run)
                run_id = int(run.id)  # type: ignore[arg-type]
                if resume_dir is None:
                    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
                    run.run_dir = str(self.data_dir / RUNS_DIRNAME / f"{run_id:04d}-{stamp}")
                    s.add(run)
                    s.commit()
                run_dir = Path(run.run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(run_dir / CONFIG_FILE)
            active = active_version(self.engine, base_model)
            meta = read_json(run_dir / RUN_META_FILE)
            meta.update(
                run_id=run_id,
                base_model=base_model,
                phase="starting",
                baseline_adapter=active.path if active else None,
                baseline_adapter_id=active.id if active else None,
                export_dir=str(export_dir) if export_dir else None,
                resumed_from=resume_run,
            )
            write_json(run_dir / RUN_META_FILE, meta)
            worker = threading.Thread(
                target=self._work,
                args=(run_id, run_dir, base_model, export_dir, export_image_size, cfg.seed),
                name=f"catreview-train-{run_id}",
                daemon=True,
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
        cmd = [
            *self.launcher,
            "-m",
            "training",
            "--export",
            str(export_dir),
            "--base",
            str(base_model),
            "--out",
            str(run_dir),
            "--config-json",
            str(run_dir / CONFIG_FILE),
        ]
        if baseline:
            cmd += ["--baseline-adapter", baseline]
        return cmd

    def _work(
        self, run_id: int, run_dir: Path, base_model: str, export_dir: str | Path | None, image_size: int, seed: int
    ) -> None:
        """Worker thread: export, spawn, wait, finalise. Every failure ends in the run's row."""
        try:
            meta = read_json(run_dir / RUN_META_FILE)
            if export_dir is None:
                meta["phase"] = "exporting"
                write_json(run_dir / RUN_META_FILE, meta)
                stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
                export_dir = export_reviews(
                    self.engine,
                    self.data_dir / EXPORTS_DIRNAME / f"run{run_id:04d}-{stamp}",
                    seed=seed,
                    image_size=image_size,
                    processor=base_model,
                )
                meta["export_dir"] = str(export_dir)
            if self._key(run_id) in _CANCELLED:
                self._mark(run_id, "cancelled", "cancelled before training started")
                return
            env = dict(os.environ)
            env.setdefault("HF_HUB_OFFLINE", "1")
            env.setdefault("PYTHONUNBUFFERED", "1")
            cmd = self._command(run_dir, base_model, Path(export_dir), meta.get("baseline_adapter"))
            with open(run_dir / LOG_FILE, "ab") as log:
                log.write(f"$ {shlex.join(cmd)}\n".encode())
                log.flush()
                # cwd = the repository: ``python -m`` puts it first on sys.path, so ``training``
                # imports without an install or a PYTHONPATH (accelerate's workers inherit it).
                proc = subprocess.Popen(
                    cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            with _STATE_LOCK:
                _PROCS[self._key(run_id)] = proc
            meta.update(
                phase="training",
                pid=proc.pid,
                pid_create_time=process_create_time(proc.pid),
                owner_pid=os.getpid(),  # who registers it; if this process dies, the next start adopts it
                owner_create_time=process_create_time(os.getpid()),
                command=cmd,
            )
            write_json(run_dir / RUN_META_FILE, meta)
            with Session(self.engine) as s:
                run = s.get(TrainingRun, run_id)
                run.pid = proc.pid  # type: ignore[union-attr]
                s.add(run)
                s.commit()
            rc = proc.wait()
            self._finalise(run_id, run_dir, rc)
        except Exception as exc:  # noqa: BLE001 -- recorded in the run's row and log; the thread must not die silently
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
            self._mark(
                run_id, "cancelled", f"cancelled by the user (exit status {rc}); checkpoint and log kept in {run_dir}"
            )
        elif rc == 0 and (run_dir / RESULT_FILE).is_file():
            outcome = register_round(
                self.engine, self.settings, run_dir, run_id=run_id, policy=self.policy, auto_activate=self.auto_activate
            )
            self._registered(outcome, run_dir)
        else:
            log = run_dir / LOG_FILE
            summary = f"training process exited with status {rc}; log kept at {log}"
            reason = log_error_summary(log)
            self._mark(run_id, "failed", failure_text(f"{reason}\n{summary}" if reason else summary, log))

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
            terminate_group(proc.pid)
            return True
        if ours:
            return True  # still exporting: the worker stops before spawning
        started = read_json(Path(run.run_dir) / RUN_META_FILE).get("pid_create_time")
        if process_alive(run.pid, started) and run.pid != os.getpid():
            terminate_group(run.pid)  # type: ignore[arg-type]
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


__all__ = ["EXPORTS_DIRNAME", "LOCK_FILE", "RUNS_DIRNAME", "TrainJobs", "TrainingBusy", "export_reviews"]
