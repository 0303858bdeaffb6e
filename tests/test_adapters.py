"""Adapter versions and the gate (catreview/adapters/), background rounds (catreview/adapters/jobs.py) and the
Train tab: gating rules, activation/rollback taking effect in the app's predictions, and crash
safety of a training process killed with SIGKILL (then cancelled, then resumed to the same
weights as an uninterrupted round). Real processes, real peft adapters, real photos.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from sqlmodel import Session, select

from catreview.adapters.gate import BreedComparison, GateDecision, GatePolicy, gate, paired_bootstrap_p_better
from catreview.adapters.jobs import TrainingBusy, TrainJobs
from catreview.adapters.processes import process_alive
from catreview.adapters.rounds import register_round
from catreview.adapters.runfolder import CHECKPOINT_DIR, LOG_FILE, PROGRESS_FILE, STATE_FILE, read_progress, read_result
from catreview.adapters.train_config import DEFAULT_TARGET_MODULES, TrainConfig
from catreview.adapters.versions import (
    AdapterError,
    activate,
    active_adapter,
    active_version,
    folder_digest,
    register_version,
    rollback,
    store_adapter_files,
    version_metrics,
    version_rows,
)
from catreview.config import REPO_ROOT, Settings
from catreview.data.db import AdapterVersion, TrainingRun, make_engine
from tests.conftest import load_photos, shared_photos_dir
from tests.export_builder import write_export
from tests.test_training import export_rows


@pytest.fixture(scope="module")
def demo_llava(tmp_path_factory) -> Path:
    """The tiny demo LLaVA (0.6M parameters, 224 px), built offline."""
    from catreview.models.tiny_llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("llava-demo"), size="demo")


def held_out(outcomes: dict[str, str], prefix: str = "") -> dict:
    """Test-split metrics as :func:`training.evaluation.evaluate_test` writes them, for a model whose
    prediction for photo ``i`` of a breed is right iff ``outcomes[breed][i] == "1"`` (wrong
    answers say ``"other"``). Photo names are ``<prefix><breed>-<i>.jpg``."""
    from training.evaluation import classification_metrics

    photos, truth, predicted = [], [], []
    for breed, marks in outcomes.items():
        for i, mark in enumerate(marks):
            photos.append(f"{prefix}{breed}-{i}.jpg")
            truth.append(breed)
            predicted.append(breed if mark == "1" else "other")
    return {
        **classification_metrics(truth, predicted),
        "loss": 1.0,
        "photos": photos,
        "truth": truth,
        "predicted": predicted,
    }


# ------------------------------------------------------------------------------ gating rules


REF = {"Bengal": "1111110000", "Siamese": "1111110000", "Bombay": "1111110000", "Korat": "1111110000"}  # 60%, 40 photos


def test_gate_blocks_ties_and_worse_candidates_and_passes_a_truly_better_one():
    """Candidate and reference scored once each on the same 40 test photos (never the best of
    several validation evaluations). A tie does not pass, in either form; nor does a worse
    candidate, nor one that is higher by a photo (the bootstrap is not convinced); a clearly
    better one passes."""
    policy = GatePolicy()
    ref = held_out(REF)
    same = gate(held_out(REF), ref, policy)
    assert not same.passed and same.gated and same.p_better == 0.0 and same.split == "test" and same.n == 40
    assert same.reasons == ["test balanced accuracy did not improve (60.0% both; a tie does not pass)"]
    # equal balanced accuracy, other photos right: still a tie
    shuffled = gate(held_out({b: "0000111111" for b in REF}), ref, policy)
    assert not shuffled.passed and "a tie does not pass" in shuffled.reasons[0]
    assert shuffled.candidate_balanced_accuracy == shuffled.reference_balanced_accuracy == 0.6

    worse = gate(held_out({**REF, "Bengal": "1111100000"}), ref, policy)
    assert not worse.passed and worse.reasons == ["test balanced accuracy fell from 60.0% to 57.5%"]

    # one more photo right: strictly higher (62.5%), but only in resamples that draw that photo
    # (1 - (39/40)^40 = 64% of them), short of 90%
    barely = gate(held_out({**REF, "Bengal": "1111111000"}), ref, policy)
    assert barely.candidate_balanced_accuracy > barely.reference_balanced_accuracy
    assert not barely.passed and 0.55 < barely.p_better < 0.75, barely.p_better
    assert barely.reasons == [
        f"test balanced accuracy rose from 60.0% to 62.5% but was higher in only {100 * barely.p_better:.1f}% of 1000 "
        "bootstrap resamples of the 40 test photos (90.0% needed)"
    ]
    assert gate(
        held_out({**REF, "Bengal": "1111111000"}), ref, GatePolicy(min_p_better=0.6)
    ).passed  # threshold configurable

    better = gate(held_out({b: "1111111110" for b in REF}), ref, policy)  # 90%: the same photos right, and more
    assert better.passed and better.reasons == [] and better.p_better == 1.0
    assert better.summary().startswith(
        "gate passed (test balanced accuracy: candidate 90.0% vs reference 60.0%, 40 photos"
    )
    assert gate(held_out({b: "1111111110" for b in REF}), ref, policy) == better  # seeded: the same decision


def test_gate_per_breed_drop_is_checked_on_test_photos():
    ref = held_out({**REF, "Korat": "10", "Persian": "0000000000"})  # Korat: 2 test photos, too few to judge
    cand = held_out(
        {
            "Bengal": "1111111111",
            "Siamese": "1111111111",
            "Bombay": "1111000000",
            "Korat": "00",
            "Persian": "1111111111",
        }
    )
    d = gate(cand, ref, GatePolicy(min_breed_photos=5, max_breed_drop=0.10))
    assert not d.passed and d.p_better > 0.9 and d.reasons == ["Bombay (10 test photos) fell from 60.0% to 40.0%"]
    assert [r["breed"] for r in d.rows() if r["blocking"]] == ["Bombay"]
    korat = next(b for b in d.breeds if b.breed == "Korat")
    assert korat == BreedComparison("Korat", 2, 0.5, 0.0, checked=False, blocking=False)
    assert gate(cand, ref, GatePolicy(max_breed_drop=0.25)).passed  # margin configurable
    assert gate(cand, ref, GatePolicy(min_breed_photos=11)).passed  # min photos configurable


def test_gate_does_not_decide_without_enough_common_test_photos():
    """Too few test photos (or none, or not the same ones, or no reference scored on them): no
    decision, never a silent pass -- the version is left for promotion by hand."""
    small_ref = held_out({"Bengal": "11000", "Siamese": "11000"})
    small = gate(held_out({"Bengal": "11111", "Siamese": "11111"}), small_ref)  # 10 photos, 20 needed
    assert not small.passed and not small.gated and small.outcome == "not gated" and small.p_better is None
    assert small.reasons == ["not enough test photos to gate; promote by hand (10 test photos, at least 20 needed)"]
    assert small.summary().startswith("gate not applied (test balanced accuracy: candidate 100.0% vs reference 40.0%")
    assert [b.checked for b in small.breeds] == [False, False]
    assert gate(held_out({"Bengal": "11111", "Siamese": "11111"}), small_ref, GatePolicy(min_test_photos=10)).passed

    none = gate(None, None, reference_name="adapter #2")
    assert not none.passed and not none.gated and none.n == 0 and none.reference == "adapter #2"
    assert "not enough test photos to gate; promote by hand (0 test photos" in none.reasons[0]
    other_photos = gate(held_out({b: "1111111110" for b in REF}), held_out(REF, prefix="x"))
    assert (
        not other_photos.passed
        and not other_photos.gated
        and "not scored on the same test photos" in other_photos.reasons[0]
    )
    no_ref = gate(held_out(REF), None)
    assert not no_ref.passed and not no_ref.gated and "reference was not scored on the test photos" in no_ref.reasons[0]


def test_paired_bootstrap_resamples_the_same_photos_for_both():
    truth = ["a"] * 10 + ["b"] * 10
    cand = ["a"] * 10 + ["b"] * 5 + ["x"] * 5
    assert paired_bootstrap_p_better(truth, cand, cand) == 0.0  # identical predictions: never strictly higher
    ref = ["a"] * 10 + ["b"] * 4 + ["x"] * 6  # one photo fewer right
    p = paired_bootstrap_p_better(truth, cand, ref, n_resamples=2000, seed=3)
    assert p == paired_bootstrap_p_better(truth, cand, ref, n_resamples=2000, seed=3)  # seeded
    assert abs(p - (1 - (19 / 20) ** 20)) < 0.04  # higher exactly when the one differing photo is drawn
    assert paired_bootstrap_p_better(truth, ref, cand) == 0.0
    with pytest.raises(ValueError):
        paired_bootstrap_p_better(truth, cand[:-1], ref)


def test_gate_policy_describes_its_own_thresholds():
    assert GatePolicy().describe() == (
        "on at least 20 held-out test photos its balanced accuracy is higher than the active one's in at least 90% of "
        "1000 paired bootstrap resamples (a tie is not higher) and no breed with at least 5 test photos drops by more "
        "than 10 points"
    )
    text = GatePolicy(min_breed_photos=1, max_breed_drop=0.125, min_test_photos=50, min_p_better=0.95).describe(
        "the base model's"
    )
    assert (
        "higher than the base model's" in text
        and "at least 1 test photo drops" in text
        and "more than 12.5 points" in text
    )
    assert "at least 50 held-out test photos" in text and "at least 95% of 1000" in text
    with pytest.raises(ValueError):
        GatePolicy(min_p_better=0.0)
    with pytest.raises(ValueError):
        GatePolicy(min_test_photos=0)


# ------------------------------------------------------------------------------ helpers


def random_adapter(base: str | Path, out: Path, seed: int) -> Path:
    """A real, non-identity LoRA adapter (peft ``init_lora_weights=False``: B is random too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=DEFAULT_TARGET_MODULES, init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(str(out))
    return out


def add_version(engine, settings: Settings, base: str, adapter_dir: Path) -> int:
    from catreview.adapters.versions import adapters_root

    folder = store_adapter_files(adapter_dir, adapters_root(settings))
    with Session(engine) as s:
        row = register_version(s, folder, base_model=base, export_hash="test", hyperparams={}, metrics={})
        s.commit()
        return int(row.id)


def snapshot(engine, settings: Settings) -> dict:
    """Everything a crash must not change: version rows and the adapters folder's files."""
    with Session(engine) as s:
        rows = [
            (v.id, v.path, v.active, v.metrics_json, v.hyperparams_json)
            for v in s.exec(select(AdapterVersion).order_by(AdapterVersion.id))
        ]
    root = Path(settings.data_dir) / "adapters"
    return {"rows": rows, "folders": {p.name: folder_digest(p) for p in sorted(root.iterdir())}}


# ------------------------------------------------------------------------------ activation and rollback


def test_activation_rollback_and_no_adapter_restore_identical_predictions(tmp_path):
    from catreview.app.core import ReviewApp

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'app.db'}", data_dir=tmp_path / "data")
    app = ReviewApp(settings)
    assert app.registry.engine is app.engine
    base = app.registry.profiles()[app.registry.active_vlm_name].model
    photos = load_photos(["Bengal", "Siamese"], per_breed=1)
    cands = [["Bengal", "Siamese", "Persian"]] * 2

    def predict() -> tuple[str, list[list[float]]]:
        vlm = app.registry.vlm()
        return vlm.model_version, [v.probabilities for v in vlm.score_candidates(photos, cands)]

    v0, p0 = predict()
    a = add_version(app.engine, settings, base, random_adapter(base, tmp_path / "a", seed=1))
    b = add_version(app.engine, settings, base, random_adapter(base, tmp_path / "b", seed=2))
    assert predict() == (v0, p0)  # registered versions are inactive

    activate(app.engine, a)
    va, pa = predict()
    assert va != v0 and pa != p0 and active_adapter(app.engine, base).name in va
    activate(app.engine, b)
    vb, pb = predict()
    assert vb not in (v0, va) and pb != pa
    with Session(app.engine) as s:  # at most one active per base model
        assert [v.id for v in s.exec(select(AdapterVersion).where(AdapterVersion.active == True))] == [b]  # noqa: E712

    assert rollback(app.engine, base, a).id == a
    assert predict() == (va, pa)  # identical predictions and cache key as before
    assert rollback(app.engine, base, None) is None
    assert predict() == (v0, p0)
    assert active_version(app.engine, base) is None


def test_incomplete_adapters_are_never_registered_or_activated(tmp_path, demo_llava):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path / "data")
    engine = make_engine(settings.database_url)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "adapter_config.json").write_text("{}")
    with pytest.raises(AdapterError):
        store_adapter_files(partial, tmp_path / "data" / "adapters")
    a = add_version(engine, settings, str(demo_llava), random_adapter(demo_llava, tmp_path / "a", seed=1))
    activate(engine, a)
    b = add_version(engine, settings, str(demo_llava), random_adapter(demo_llava, tmp_path / "b", seed=2))
    with Session(engine) as s:
        path_b = Path(s.get(AdapterVersion, b).path)
    (path_b / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError):
        activate(engine, b)
    assert active_version(engine, str(demo_llava)).id == a  # unchanged
    with pytest.raises(AdapterError):
        rollback(engine, "another/model", a)


def _fake_round(
    run_dir: Path, base: Path, seed: int, *, test: dict | None, initial_test: dict | None, baseline=None
) -> Path:
    """A finished round's folder: a real adapter in ``best/`` and a ``result.json`` with the given
    test-split metrics (validation numbers that would pass any best-of-N comparison)."""
    random_adapter(base, run_dir / "best", seed=seed)
    val = {"n": 12, "balanced_accuracy": 0.99, "accuracy": 0.99, "macro_f1": 0.99, "val_loss": 0.1, "per_breed": {}}
    result = {
        "status": "succeeded",
        "base_model": str(base),
        "export_hash": f"h{seed}",
        "config": TrainConfig().to_dict(),
        "adapter_dir": "best",
        "metrics": val,
        "best_step": 5,
        "initial_metrics": {**val, "balanced_accuracy": 0.3},
        "test_metrics": test,
        "initial_test_metrics": initial_test,
        "baseline": baseline,
        "n_test": test["n"] if test else 0,
        "steps": 5,
        "samples_per_second": 1.0,
    }
    (run_dir / "result.json").write_text(json.dumps(result))
    return run_dir


def test_register_round_gates_on_test_metrics_and_never_activates_without_a_decision(tmp_path, demo_llava):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path / "data")
    engine = make_engine(settings.database_url)
    base = str(demo_llava)
    ref = held_out(REF)

    few = held_out({"Bengal": "11111", "Siamese": "11111"})
    outcome = register_round(
        engine,
        settings,
        _fake_round(
            tmp_path / "few", demo_llava, 1, test=few, initial_test=held_out({"Bengal": "10000", "Siamese": "10000"})
        ),
    )
    assert not outcome.activated and active_version(engine, base) is None  # best-of-N validation 99% does not count
    assert outcome.decision.reasons[0].startswith("not enough test photos to gate; promote by hand")
    none = register_round(engine, settings, _fake_round(tmp_path / "none", demo_llava, 2, test=None, initial_test=None))
    assert not none.activated and not none.decision.gated and active_version(engine, base) is None

    tie = register_round(
        engine, settings, _fake_round(tmp_path / "tie", demo_llava, 3, test=held_out(REF), initial_test=ref)
    )
    assert not tie.activated and tie.decision.gated and "a tie does not pass" in tie.decision.reasons[0]

    good_test = held_out({b: "1111111110" for b in REF})
    good = register_round(
        engine, settings, _fake_round(tmp_path / "good", demo_llava, 4, test=good_test, initial_test=ref)
    )
    assert good.activated and good.decision.passed and good.decision.reference == "no adapter (base model)"
    assert active_version(engine, base).id == good.adapter_id
    stored = version_metrics(engine, good.adapter_id)
    assert stored["balanced_accuracy"] == 0.99  # validation numbers stay at the top level
    assert stored["test"] == {k: v for k, v in good_test.items() if k not in ("photos", "truth", "predicted")}
    assert stored["reference_test"]["balanced_accuracy"] == 0.6 and stored["n_test"] == 40
    assert stored["gate"]["split"] == "test" and stored["gate"]["p_better"] == 1.0 and stored["gate"]["gated"] is True
    assert GateDecision.from_dict(stored["gate"]) == good.decision
    rows = {r["id"]: r for r in version_rows(engine, base)}
    assert rows[good.adapter_id]["test_balanced_accuracy"] == 0.9 and rows[good.adapter_id]["gate"] == "passed"
    assert rows[good.adapter_id]["reference_test_balanced_accuracy"] == 0.6
    assert rows[outcome.adapter_id]["gate"] == "not gated" and rows[tie.adapter_id]["gate"] == "blocked"

    # against the active adapter: the round must have scored that very adapter on its test photos
    with Session(engine) as s:
        good_path = s.get(AdapterVersion, good.adapter_id).path
    same = register_round(
        engine,
        settings,
        _fake_round(
            tmp_path / "same",
            demo_llava,
            5,
            test=good_test,
            initial_test=ref,
            baseline={"adapter": good_path, "metrics": {}, "test_metrics": good_test},
        ),
    )
    assert (
        not same.activated
        and same.decision.reference == f"adapter #{good.adapter_id}"
        and same.decision.p_better == 0.0
    )
    other = register_round(
        engine, settings, _fake_round(tmp_path / "other", demo_llava, 6, test=good_test, initial_test=ref)
    )
    assert (
        not other.activated
        and not other.decision.gated
        and "was not evaluated on this round's test photos" in other.decision.reasons[0]
    )
    assert active_version(engine, base).id == good.adapter_id


# ------------------------------------------------------------------------------ crash safety and resume


def _wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _finished(jobs: TrainJobs, run_id: int, timeout: float) -> str:
    """The status run ``run_id`` ends with; fails saying it timed out if it is still running after
    ``timeout`` s (instead of a confusing ``'running' == 'succeeded'``)."""
    status = jobs.wait(run_id, timeout=timeout)
    if status == "running":
        pytest.fail(f"timed out: run #{run_id} still running after {timeout:.0f} s")
    return status


def _checkpoint_step(run_dir: Path) -> int:
    f = run_dir / CHECKPOINT_DIR / STATE_FILE
    try:
        return json.loads(f.read_text())["state"]["step"]
    except (OSError, json.JSONDecodeError, KeyError):
        return -1  # not written yet, or being replaced right now


@pytest.mark.slow
def test_a_round_whose_cli_was_killed_is_adopted_and_registered_by_the_next_start(tmp_path, demo_llava):
    """The CLI that started a round is SIGKILLed; the round goes on. The next start adopts it:
    with no other call, its result is registered as soon as the round ends (before the fix it
    stayed ``running`` until some later start)."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path / "data")
    engine = make_engine(settings.database_url)
    export = write_export(export_rows({"Bombay": 4, "Abyssinian": 4, "Bengal": 4}, 2), tmp_path / "export")
    env = {**os.environ, "CATREVIEW_DATA_DIR": str(settings.data_dir), "HF_HUB_OFFLINE": "1"}
    flags = ["--max-steps", "12", "--batch-size", "2", "--eval-every", "6", "--candidate-source", "sampled"]
    cmd = [sys.executable, "-m", "catreview", "train", "--db", settings.database_url, "--base", str(demo_llava)]
    driver = subprocess.Popen(
        [*cmd, "--export", str(export), *flags],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def spawned():
            with Session(engine) as s:
                run = s.exec(select(TrainingRun)).first()
            return run if run is not None and run.pid not in (None, driver.pid) else None

        run = _wait_for(spawned, 120, "the training process")
        os.kill(driver.pid, signal.SIGKILL)  # the CLI dies; the round runs on
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert process_alive(run.pid), "the round ended before the CLI was killed; nothing to adopt"
    TrainJobs(engine, settings)  # the next start (app or CLI), then nothing else

    def registered():
        with Session(engine) as s:
            row = s.get(TrainingRun, run.id)
        return row if row.status != "running" else None

    done = _wait_for(registered, 300, "the adopted round to be registered", interval=0.5)
    assert done.status == "succeeded" and done.adapter_id is not None, done.error
    assert "adopted by process" in (Path(run.run_dir) / LOG_FILE).read_text()


@pytest.mark.slow
def test_sigterm_to_the_cli_cancels_its_round(tmp_path, demo_llava):
    """``kill`` (SIGTERM) of ``python -m catreview train`` cancels the round as Ctrl-C does: the
    training process ends and the run is marked cancelled, not left running as an orphan."""
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path / "data")
    engine = make_engine(settings.database_url)
    export = write_export(export_rows({"Bombay": 4, "Abyssinian": 4, "Bengal": 4}, 2), tmp_path / "export")
    env = {**os.environ, "CATREVIEW_DATA_DIR": str(settings.data_dir), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "catreview", "train", "--db", settings.database_url, "--base", str(demo_llava)]
    driver = subprocess.Popen(
        [*cmd, "--export", str(export), "--max-steps", "400", "--batch-size", "2", "--candidate-source", "sampled"],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def spawned():
            with Session(engine) as s:
                run = s.exec(select(TrainingRun)).first()
            return run if run is not None and run.pid not in (None, driver.pid) else None

        run = _wait_for(spawned, 120, "the training process")
        driver.send_signal(signal.SIGTERM)
        _, err = driver.communicate(timeout=90)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 130, err[-2000:]
    _wait_for(lambda: not process_alive(run.pid), 60, "the training process to end")
    with Session(engine) as s:
        assert s.get(TrainingRun, run.id).status == "cancelled"


@pytest.mark.slow
def test_sigkill_mid_round_then_recover_cancel_and_resume_to_the_same_weights(tmp_path, demo_llava, monkeypatch):
    """A round started by the CLI is SIGKILLed (CLI and training process) mid-way: the database,
    the active adapter and every stored version are untouched, a second start is refused while
    it runs, and the next start marks it failed with its log. It is then resumed, cancelled,
    resumed again and finishes with the weights and losses of an uninterrupted round -- bit for
    bit: the uninterrupted round runs the same way (``python -m training``, a process of its own),
    every process on the CPU (``ACCELERATE_USE_CPU``, no CUDA device: bf16 autocast and GPU kernels
    without a deterministic version are not bit-reproducible) with the same thread count
    (``--num-threads``; float sums are split by thread). Dropout's RNG, data order and prompts
    must continue exactly where the killed process stopped."""
    cpu_only = {"ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": ""}
    for name, value in cpu_only.items():  # for the processes TrainJobs starts from this one
        monkeypatch.setenv(name, value)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path / "data")
    engine = make_engine(settings.database_url)
    base = str(demo_llava)
    a = add_version(engine, settings, base, random_adapter(demo_llava, tmp_path / "a", seed=1))
    add_version(engine, settings, base, random_adapter(demo_llava, tmp_path / "b", seed=2))
    activate(engine, a)
    before = snapshot(engine, settings)
    export = write_export(export_rows({"Bombay": 4, "Abyssinian": 4, "Bengal": 4}, 2), tmp_path / "export")
    cfg = TrainConfig(
        max_steps=40,
        epochs=100,
        batch_size=2,
        lr=1e-3,
        eval_every=20,
        save_every=4,
        early_stopping_patience=0,
        candidate_source="sampled",
        other_rate=0.0,
        num_threads=2,
    )
    flags = [
        "--max-steps",
        "40",
        "--epochs",
        "100",
        "--batch-size",
        "2",
        "--lr",
        "1e-3",
        "--eval-every",
        "20",
        "--save-every",
        "4",
        "--early-stopping-patience",
        "0",
        "--candidate-source",
        "sampled",
        "--other-rate",
        "0",
        "--num-threads",
        "2",
    ]
    env = {**os.environ, "CATREVIEW_DATA_DIR": str(settings.data_dir), "HF_HUB_OFFLINE": "1", **cpu_only}
    driver = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "catreview",
            "train",
            "--db",
            settings.database_url,
            "--base",
            base,
            "--export",
            str(export),
            *flags,
        ],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def spawned():
            with Session(engine) as s:
                run = s.exec(select(TrainingRun)).first()
            return run if run is not None and run.pid not in (None, driver.pid) else None

        run = _wait_for(spawned, 120, "the training process")
        run_dir = Path(run.run_dir)
        _wait_for(lambda: _checkpoint_step(run_dir) >= 8, 180, "a checkpoint at step >= 8")
        with pytest.raises(TrainingBusy):  # one round at a time, across processes
            TrainJobs(engine, settings).start(base, cfg, export_dir=export)
        os.kill(driver.pid, signal.SIGKILL)  # the app/CLI dies ...
        driver.wait(30)
        os.kill(run.pid, signal.SIGKILL)  # ... and so does the round, mid-way
        _wait_for(lambda: not process_alive(run.pid), 30, "the killed training process to end")
    finally:
        if driver.poll() is None:
            driver.kill()
    killed_at = _checkpoint_step(run_dir)
    assert 8 <= killed_at < 40 and read_result(run_dir) is None
    assert snapshot(engine, settings) == before  # nothing the app relies on was touched
    with Session(engine) as s:
        assert s.get(TrainingRun, run.id).status == "running"  # nobody was left to close it

    jobs = TrainJobs(engine, settings)  # the next start recovers
    with Session(engine) as s:
        failed = s.get(TrainingRun, run.id)
    assert failed.status == "failed" and "killed or crashed" in failed.error and str(run_dir / LOG_FILE) in failed.error
    assert (run_dir / LOG_FILE).stat().st_size > 0
    assert snapshot(engine, settings) == before

    second = jobs.start(base, resume_run=run.id)
    with pytest.raises(TrainingBusy):
        jobs.start(base, cfg, export_dir=export)
    _wait_for(lambda: _checkpoint_step(run_dir) > killed_at, 180, "the resumed round to checkpoint")
    assert jobs.cancel(second)
    assert _finished(jobs, second, 60) == "cancelled"
    assert snapshot(engine, settings) == before

    third = jobs.start(base, resume_run=second)
    assert _finished(jobs, third, 300) == "succeeded", jobs.status(third).error
    result = read_result(run_dir)
    assert (
        result["steps"] == 40 and len(result["resumed_from_step"]) == 2 and result["resumed_from_step"][0] == killed_at
    )

    uninterrupted = tmp_path / "uninterrupted"
    uninterrupted.mkdir()
    cfg.save(uninterrupted / "train_config.json")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "training",
            "--export",
            str(export),
            "--base",
            base,
            "--out",
            str(uninterrupted),
            "--config-json",
            str(uninterrupted / "train_config.json"),
        ],
        cwd=REPO_ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **cpu_only},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    reference = read_result(uninterrupted)
    assert reference["num_processes"] == 1 and reference["dtype"] == "float32"
    got = load_file(str(run_dir / CHECKPOINT_DIR / "adapter" / "adapter_model.safetensors"))
    want = load_file(str(tmp_path / "uninterrupted" / CHECKPOINT_DIR / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)  # exact: same device, threads and RNG
    losses = [r["loss"] for r in read_progress(run_dir / PROGRESS_FILE) if r["kind"] == "train"]
    ref_losses = [r["loss"] for r in read_progress(uninterrupted / PROGRESS_FILE) if r["kind"] == "train"]
    assert losses == ref_losses and len(losses) == 40
    assert result["metrics"] == {**reference["metrics"], "eval_seconds": result["metrics"]["eval_seconds"]}

    st = jobs.status(third)
    assert st.adapter_id is not None and st.gate["reference"] == f"adapter #{a}"  # gated against the active one
    # the export has no test split: no decision, and the version is not activated (promote by hand)
    assert st.gate["gated"] is False and st.gate["reasons"][0].startswith(
        "not enough test photos to gate; promote by hand"
    )
    assert not st.activated and active_version(engine, base).id == a
    after = snapshot(engine, settings)
    assert after["rows"][: len(before["rows"])] == before["rows"] and len(after["rows"]) == 3
    assert {k: v for k, v in after["folders"].items() if k in before["folders"]} == before["folders"]


@pytest.mark.slow
def test_retrain_exports_the_reviews_trains_in_a_process_and_registers_the_version(tmp_path, demo_llava):
    """The "Retrain adapter" path: current reviews -> catreview.export.dataset -> python -m training ->
    a gated, activated version whose folder is complete before its row exists."""
    import shutil

    from catreview.cli.train import metrics_table
    from catreview.data.importer import import_folder
    from catreview.data.labels import BreedVocabulary

    photos = tmp_path / "photos"
    for folder in ("Bombay", "Siamese"):
        (photos / folder).mkdir(parents=True)
        for f in sorted((shared_photos_dir() / folder).glob("*.jpg")):
            shutil.copy(f, photos / folder / f.name)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path / "data")
    engine = make_engine(settings.database_url)
    import_folder(engine, photos, vocabulary=BreedVocabulary.default(), labels_from_folders=True)
    jobs = TrainJobs(engine, settings)
    run_id = jobs.start(str(demo_llava), TrainConfig(max_steps=2, eval_every=1, batch_size=2))
    assert _finished(jobs, run_id, 300) == "succeeded", jobs.status(run_id).error
    st = jobs.status(run_id)
    meta = json.loads((Path(st.run_dir) / "run.json").read_text())
    assert Path(meta["export_dir"]).is_relative_to(settings.data_dir / "exports")
    assert (Path(meta["export_dir"]) / "export.json").is_file()
    with Session(engine) as s:
        version = s.get(AdapterVersion, st.adapter_id)
        assert version.export_hash == json.loads((Path(meta["export_dir"]) / "export.json").read_text())["content_hash"]
        assert json.loads(version.hyperparams_json)["max_steps"] == 2
        assert set(json.loads(version.metrics_json)["per_breed"]) == {"Bombay", "Siamese"}
    assert st.gate["reference"] == "no adapter (base model)" and st.activated == st.gate["passed"]
    # 10 photos a breed split 8/1/1: 2 test photos are too few to gate, so it is not activated
    assert st.gate["gated"] is False and not st.activated and st.gate["n"] == 2
    assert st.gate["reasons"] == ["not enough test photos to gate; promote by hand (2 test photos, at least 20 needed)"]
    assert json.loads(version.metrics_json)["test"]["n"] == 2
    assert (Path(version.path) / "adapter_model.safetensors").is_file()
    table = metrics_table(st, engine)
    assert "Bombay" in table and "Siamese" in table and f"adapter #{st.adapter_id}" in table


# ------------------------------------------------------------------------------ the tab


def test_train_tab_builds_and_refreshes(tmp_path):
    import gradio as gr

    from catreview.app.auth import AuthConfig, Guards
    from catreview.app.core import ReviewApp
    from catreview.app.ui import train_tab

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'app.db'}", data_dir=tmp_path / "data")
    app = ReviewApp(settings)
    train_tab._JOBS[app] = TrainJobs(app.engine, settings, policy=GatePolicy(min_breed_photos=3, max_breed_drop=0.25))
    with gr.Blocks() as demo:
        train_tab.build(app, Guards(app.engine, AuthConfig("open")))
    texts = [b.value for b in demo.blocks.values() if isinstance(b, gr.Markdown) and isinstance(b.value, str)]
    assert any(
        "held-out test photos" in t and "at least 3 test photos drops by more than 25 points" in t for t in texts
    )  # the policy in use
    ids = {getattr(b, "elem_id", None) for b in demo.blocks.values()}
    assert {"retrain", "cancel-train", "train-loss-plot", "train-val-plot", "adapters-table", "gate-comparison"} <= ids
    status, loss, val, _gate_text, _gate_rows, versions, choices = train_tab.refresh(app)
    assert status == "No training run yet." and loss.empty and val.empty and versions.empty and choices == []
    box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "train-status")
    assert box.value == status  # shown from the page load on, not only after the timer's first tick
    base = train_tab.base_model(app)
    a = add_version(app.engine, settings, base, random_adapter(base, tmp_path / "a", seed=1))
    assert train_tab.promote(app, str(a), actor="ada").startswith(f"Adapter #{a} is active")
    *_, versions, choices = train_tab.refresh(app)
    assert versions["active"].tolist() == [True] and choices[0][1] == str(a)
    assert train_tab.no_adapter(app, actor="ada").startswith("No adapter")
    assert active_version(app.engine, base) is None
    assert train_tab.cancel(app, actor="ada") == "No round is running."


# ------------------------------------------------------------------------------ refusing and explaining failures


def _reviewed(tmp_path: Path, per_breed: dict[str, int]):
    """Settings and engine of a database whose photos (the first ``n`` of each shared folder) are
    labelled by folder."""
    import shutil

    from catreview.data.importer import import_folder
    from catreview.data.labels import BreedVocabulary

    photos = tmp_path / "photos"
    for folder, n in per_breed.items():
        (photos / folder).mkdir(parents=True)
        for f in sorted((shared_photos_dir() / folder).glob("*.jpg"))[:n]:
            shutil.copy(f, photos / folder / f.name)
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'db.sqlite'}", data_dir=tmp_path / "data")
    engine = make_engine(settings.database_url)
    import_folder(engine, photos, vocabulary=BreedVocabulary.default(), labels_from_folders=True)
    return settings, engine


def test_too_few_reviews_are_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    """ "Retrain adapter" with too few reviewed photos says what is missing -- in the tab and the
    CLI -- instead of starting a process that exits with "status 2" (its reason only in the log)."""
    from catreview.adapters.checks import TrainJobError
    from catreview.app.core import ReviewApp
    from catreview.app.ui import train_tab
    from catreview.cli.main import main as cli_main

    settings, engine = _reviewed(tmp_path / "one", {"Bombay": 6})
    with pytest.raises(TrainJobError, match=r"only 1 breed\(s\) \(Bombay 6 photos\).*at least 2 breeds"):
        TrainJobs(engine, settings).start("any/model")
    settings, engine = _reviewed(tmp_path / "two", {"Bombay": 3, "Siamese": 2})  # 3 -> 3/0/0, 2 -> 2/0/0
    with pytest.raises(
        TrainJobError, match="5 training photos but no validation photo.*4th reviewed photo.*Bombay 3, Siamese 2"
    ):
        TrainJobs(engine, settings).start("any/model")
    with Session(engine) as s:
        assert s.exec(select(TrainingRun)).first() is None  # nothing was claimed or started

    app = ReviewApp(settings)
    message = train_tab.start(app, epochs=1, actor="ada")
    assert message.startswith("Not started: Not enough reviewed photos to train") and "no validation photo" in message
    assert train_tab.refresh(app)[0] == "No training run yet."

    monkeypatch.setenv("CATREVIEW_DATA_DIR", str(settings.data_dir))
    assert cli_main(["train", "--db", settings.database_url, "--base", "any/model"]) == 2
    assert "error: Not enough reviewed photos to train" in capsys.readouterr().err

    empty = Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}", data_dir=tmp_path / "empty")
    with pytest.raises(TrainJobError, match="no photo's latest review names a breed"):
        TrainJobs(make_engine(empty.database_url), empty).start("any/model")


def test_hyper_parameter_form_is_validated_with_the_fields_names(tmp_path):
    """A cleared number box sends None: the tab says which field is empty instead of a TypeError."""
    from catreview.app.core import ReviewApp
    from catreview.app.presenters.train import config_from_form
    from catreview.app.ui import train_tab

    cfg = config_from_form(2.0, "1e-3", 8, 4.0, True)
    assert (cfg.epochs, cfg.lr, cfg.rank, cfg.batch_size, cfg.train_projector) == (2, 1e-3, 8, 4, True)
    assert isinstance(cfg.epochs, int) and cfg.eval_every == TrainConfig().eval_every  # the rest: defaults
    assert config_from_form(1, 2e-4, 16, 4, None, base=TrainConfig(max_steps=5)).max_steps == 5
    for args, message in [
        ((None, 2e-4, 16, 4), "Epochs is empty"),
        ((3, None, 16, 4), "Learning rate is empty"),
        ((3, 2e-4, "", 4), "LoRA rank is empty"),
        ((3, 2e-4, 16, None), "Batch size is empty"),
        ((2.5, 2e-4, 16, 4), "Epochs must be a whole number, got 2.5"),
        ((3, float("nan"), 16, 4), "Learning rate must be a finite number"),
        ((3, "fast", 16, 4), "Learning rate must be a number, got 'fast'"),
        ((3, 2e-4, 0, 4), "rank must be >= 1, got 0"),  # TrainConfig's own range check
    ]:
        with pytest.raises(ValueError, match=re.escape(message)):
            config_from_form(*args)

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'app.db'}", data_dir=tmp_path / "data")
    app = ReviewApp(settings)
    assert train_tab.start(app, epochs=None, actor="ada") == "Not started: Epochs is empty"
    assert train_tab.start(app, batch_size=None, actor="ada") == "Not started: Batch size is empty"
    with Session(app.engine) as s:
        assert s.exec(select(TrainingRun)).first() is None  # nothing was claimed


def test_the_app_reads_run_folders_without_importing_the_training_code():
    """The tab and the CLI share the run folder's file names with the round (catreview.adapters.runfolder), and
    importing them does not pull in training.lora or torch."""
    code = (
        "import sys, catreview.adapters.versions, catreview.adapters.rounds, catreview.adapters.jobs, catreview.adapters.runfolder as f\n"
        "assert catreview.adapters.jobs.PROGRESS_FILE == f.PROGRESS_FILE and catreview.adapters.rounds.RESULT_FILE == f.RESULT_FILE\n"
        "print(sorted(m for m in ('training.lora', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[]"


def test_log_error_summary_finds_the_reason_a_round_gave(tmp_path):
    from catreview.adapters.runfolder import log_error_summary

    log = tmp_path / "train.log"
    log.write_text(
        "$ python -m training ...\nLoading weights: 100%\nerror: export /x has no validation photos: a round needs them\n"
    )
    assert log_error_summary(log) == "export /x has no validation photos: a round needs them"
    log.write_text(
        '$ python -m training\nTraceback (most recent call last):\n  File "a.py", line 1, in <module>\n    boom()\n'
        "ValueError: first\n\nDuring handling of the above exception, another exception occurred:\n\n"
        'Traceback (most recent call last):\n  File "b.py", line 2, in <module>\nRuntimeError: out of memory\n'
    )
    assert log_error_summary(log) == "RuntimeError: out of memory"
    log.write_text("$ python -m training\nstep 3/40\n")  # killed: no error in the log
    assert log_error_summary(log) is None and log_error_summary(tmp_path / "absent.log") is None


@pytest.mark.slow
def test_a_failed_round_shows_its_reason_in_the_tab_and_the_cli_also_after_a_restart(
    tmp_path, demo_llava, monkeypatch, capsys
):
    import gradio as gr

    from catreview.app.auth import AuthConfig, Guards
    from catreview.app.core import ReviewApp
    from catreview.app.ui import train_tab
    from catreview.cli.main import main as cli_main

    settings = Settings(database_url=f"sqlite:///{tmp_path / 'app.db'}", data_dir=tmp_path / "data")
    export = write_export(export_rows({"Bombay": 2, "Siamese": 2}, 1), tmp_path / "export")
    (
        export / "validation" / next(p.name for p in (export / "validation").iterdir())
    ).unlink()  # the round will refuse it
    app = ReviewApp(settings)
    run_id = train_tab.jobs_for(app).start(str(demo_llava), TrainConfig(max_steps=1), export_dir=export)
    message = train_tab.STARTED.format(run_id=run_id)
    assert _finished(train_tab.jobs_for(app), run_id, 300) == "failed"
    status = train_tab.refresh(app)[0]
    lines = status.splitlines()
    assert lines[0].startswith(f"Run #{run_id}: failed: ") and "does not exist" in lines[0]  # the round's own words
    # the browser gets the log's name, not its server path (the CLI prints the whole path)
    assert lines[1] == f"training process exited with status 2; log kept at …/{LOG_FILE}"
    assert train_tab.message_after_refresh(app, message) == ""  # "Run #1 started" does not stay under the failure
    assert train_tab.message_after_refresh(app, "Adapter #3 is active; new predictions use it.").startswith(
        "Adapter #3"
    )

    restarted = ReviewApp(settings)  # the app restarts: the box shows the latest run at once
    with gr.Blocks() as demo:
        train_tab.build(restarted, Guards(restarted.engine, AuthConfig("open")))
    box = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "train-status")
    assert box.value == status == train_tab.status_text(restarted)

    monkeypatch.setenv("CATREVIEW_DATA_DIR", str(settings.data_dir))
    rc = cli_main(
        ["train", "--db", settings.database_url, "--base", str(demo_llava), "--export", str(export), "--max-steps", "1"]
    )
    out = capsys.readouterr().out
    assert rc == 1 and ": failed: " in out and "does not exist" in out and "log kept at" in out
