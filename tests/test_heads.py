"""Stage 1 learns from the reviews: linear heads on a frozen backbone (catreview.heads).

Real photos (the shared folder, linked into a temporary folder, never copied into the repo) and
real models: the built-in ImageNet ``tf_efficientnet_lite2`` from its weight package, and the
tiny random ``convnext_atto`` demo checkpoint standing in for a user's own ConvNeXt. Features of
the small photo set are computed once per session (the session fixture's first refit) and shared
through one ``data_dir``; each test gets its own database.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlmodel import Session, select

from catreview.adapters.gate import GatePolicy
from catreview.adapters.versions import training_photo_hashes
from catreview.config import Settings, load_settings
from catreview.data.db import AdapterVersion, ImageRecord, Prediction, make_engine
from catreview.data.images import load_rgb
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.heads.features import ensure_features, features_dir, load_extractor, read_cache
from catreview.heads.fit import fit_head
from catreview.heads.refit import RefitResult, labelled_photos, refit_classifier
from catreview.heads.versions import HeadVersionError, full_checkpoint, load_oof, no_version, promote, rollback
from catreview.models.classifier import ClassifierNotTrainedError, Stage1Classifier
from catreview.models.registry import ModelRegistry
from catreview.models.stage1_builtin import BUILTIN_ARCH, HEAD_CHECKPOINT
from catreview.predict.runner import PredictSummary, run_predictions, run_stage1

BREEDS = ["Bengal", "Persian", "Siamese"]
PER_BREED = 7  # 7 photos of a breed: 5 train, 1 validation, 1 test (assign_splits)
EASY = GatePolicy(min_test_photos=1, min_breed_photos=100)  # gates the 3 test photos


def _link_photos(cats: Path, out: Path, breeds: list[str], per_breed: int, skip: int = 0) -> list[Path]:
    """Symlink ``per_breed`` photos of each breed (after the first ``skip``) into ``out/<Breed>/``."""
    linked = []
    for breed in breeds:
        (out / breed).mkdir(parents=True, exist_ok=True)
        for src in sorted((cats / breed).glob("*.jpg"))[skip : skip + per_breed]:
            dst = out / breed / src.name
            os.symlink(src, dst)
            linked.append(dst)
    return linked


def _import(settings: Settings, folder: Path) -> None:
    engine = make_engine(settings.database_url)
    vocab = BreedVocabulary.from_labels_file(None)
    summary = import_folder(engine, folder, vocabulary=vocab, labels_from_folders=True, workers=1)
    assert not summary.failed


@dataclass
class Lite2Env:
    root: Path
    photos: Path
    data_dir: Path
    demo_dir: Path
    first: RefitResult
    first_seconds: float

    def settings(self, name: str, **kw) -> Settings:
        """Settings on a new database ``name`` sharing this session's data_dir (features cache)."""
        return load_settings(
            database_url=f"sqlite:///{self.root / f'{name}.db'}",
            demo_dir=self.demo_dir,
            data_dir=self.data_dir,
            builtin_models="pretrained",
            **kw,
        )

    def fresh(self, name: str) -> tuple[Settings, ModelRegistry]:
        s = self.settings(name)
        _import(s, self.photos)
        return s, ModelRegistry(s)


@pytest.fixture(scope="session")
def lite2(tmp_path_factory, cats_dir) -> Lite2Env:
    """The built-in Lite2 backbone on 5 breeds x 6 shared photos; the first (cold) refit is done
    here once, so every test reuses its cached features."""
    root = tmp_path_factory.mktemp("heads")
    photos = root / "photos"
    _link_photos(cats_dir, photos, BREEDS, PER_BREED)
    env = Lite2Env(root, photos, root / "data", root / "demo", None, 0.0)  # type: ignore[arg-type]
    s = env.settings("session")
    _import(s, photos)
    t0 = time.perf_counter()
    env.first = refit_classifier(ModelRegistry(s))
    env.first_seconds = time.perf_counter() - t0
    return env


def test_builtin_backbone_without_a_head_has_no_stage1_model_and_predict_says_so(lite2):
    _, registry = lite2.fresh("untrained")
    with pytest.raises(ClassifierNotTrainedError, match="No stage-1 model trained yet"):
        registry.classifier()
    summary = run_predictions(registry.engine, registry)
    assert summary.stage1_skipped is not None and summary.stage1_skipped.startswith("No stage-1 model trained yet")
    assert summary.lines() == [f"{len(BREEDS) * PER_BREED} photos; {summary.stage1_skipped}"]
    with Session(registry.engine) as s:
        assert s.exec(select(Prediction)).first() is None  # the ImageNet head never predicts breeds


def test_features_are_cached_and_a_second_refit_computes_only_new_photos(lite2, cats_dir):
    n = len(BREEDS) * PER_BREED
    assert (lite2.first.features_computed, lite2.first.features_cached) == (n, 0)
    settings, registry = lite2.fresh("reuse")
    again = refit_classifier(registry)
    assert (again.features_computed, again.features_cached) == (0, n)
    # One new photo: only it is computed.
    extra = lite2.root / "extra"
    _link_photos(cats_dir, extra, ["Bengal"], 1, skip=PER_BREED)
    _import(settings, extra)
    third = refit_classifier(registry)
    assert (third.features_computed, third.features_cached) == (1, n)
    # The cache holds the backbone's real pre-logit features (float16 of a direct forward).
    extractor = load_extractor(settings, registry.stage1_backbone())
    cache = read_cache(features_dir(settings, registry.stage1_backbone().key))
    photo = next(p for p in labelled_photos(registry.engine, None) if p.photo.path.startswith(str(extra)))
    pixels = torch.stack([lite2_transform(extractor)(load_rgb(photo.photo.path))])
    direct = extractor.model.forward_head(extractor.model.forward_features(pixels), pre_logits=True)
    np.testing.assert_allclose(
        cache[photo.photo.sha256].astype(np.float32), direct[0].detach().numpy(), atol=2e-2, rtol=1e-2
    )
    assert cache[photo.photo.sha256].dtype == np.float16 and cache[photo.photo.sha256].shape == (1280,)


def lite2_transform(extractor):
    import timm.data

    return timm.data.create_transform(**extractor.data_config)


def test_a_version_loads_through_stage1classifier_load_with_identical_logits(lite2, cats_dir):
    settings = lite2.settings("session")
    registry = ModelRegistry(settings)
    folder = Path(lite2.first.folder)
    loaded = Stage1Classifier.load(BUILTIN_ARCH, checkpoint=folder / HEAD_CHECKPOINT, device="cpu")
    assert loaded.labels == BREEDS
    assert loaded.model.num_classes == len(BREEDS)  # the ImageNet head is gone
    assert loaded.data_config["mean"] == (0.5, 0.5, 0.5) and loaded.data_config["interpolation"] == "bicubic"
    # The registry serves exactly that version (first refit of the built-in backbone: activated).
    assert lite2.first.activated and lite2.first.first_version
    active = registry.classifier()
    assert active.model_version == loaded.model_version
    images = [load_rgb(p) for p in sorted((cats_dir / "Siamese").glob("*.jpg"))[-3:]]
    pixels = torch.stack([loaded.transform(im) for im in images])
    # Save -> load round trip: the in-memory model built from the fitted head gives identical logits.
    feats = loaded.features_batch(pixels).numpy()
    import timm

    from catreview.heads.fit import LinearHead

    rebuilt = timm.create_model(BUILTIN_ARCH, num_classes=len(loaded.labels))
    head = LinearHead(
        loaded.labels,
        loaded.model.get_classifier().weight.detach().numpy().copy(),
        loaded.model.get_classifier().bias.detach().numpy().copy(),
    )
    rebuilt.load_state_dict(full_checkpoint(loaded.model, head))
    rebuilt.eval()
    with torch.inference_mode():
        assert torch.equal(rebuilt(pixels), loaded.forward_batch(pixels))
    np.testing.assert_allclose(head.logits(feats), loaded.forward_batch(pixels).numpy(), rtol=1e-4, atol=1e-4)
    # Its top-k are breeds with probabilities (how good they are: the slow test below).
    tops = loaded.topk(images)
    assert all(name in BREEDS for top in tops for name, _ in top)
    assert all(abs(sum(p for _, p in top) - 1.0) < 1e-5 for top in tops)
    # The evaluation report leaves out what this version was fitted on: its train split, no more.
    from sqlmodel import Session

    from catreview.adapters.versions import training_photo_hashes
    from catreview.heads.versions import stage1_training_hashes

    with Session(registry.engine) as s:
        trained = stage1_training_hashes(s, loaded.model_id, loaded.model_version)
        assert trained and trained == training_photo_hashes(s, str(folder))
        assert stage1_training_hashes(s, loaded.model_id, "0123456789ab-labels01234567") == set()


def test_out_of_fold_probabilities_come_from_heads_that_never_saw_the_photo(lite2):
    oof = load_oof(lite2.first.folder)
    settings = lite2.settings("session")
    registry = ModelRegistry(settings)
    items = labelled_photos(registry.engine, None)
    assert sorted(oof.sha256) == sorted(it.photo.sha256 for it in items)
    assert oof.probabilities.dtype == np.float32 and oof.probabilities.shape == (len(items), len(BREEDS))
    np.testing.assert_allclose(oof.probabilities.sum(axis=1), 1.0, atol=1e-5)
    label_of = {it.photo.sha256: it.label for it in items}
    truth = [label_of[s] for s in oof.sha256]
    # Stratified folds: each breed's photos spread evenly over the folds.
    k = int(oof.folds.max()) + 1
    assert k == 5 and set(oof.folds.tolist()) == set(range(k))
    for breed in set(truth):
        counts = np.bincount(oof.folds[[t == breed for t in truth]], minlength=k)
        assert counts.max() - counts.min() <= 1
    # Each fold's rows are what a head fitted on the OTHER folds gives (refit here independently).
    cache = read_cache(features_dir(settings, registry.stage1_backbone().key))
    x = np.stack([cache[s].astype(np.float32) for s in oof.sha256])
    y = np.array(truth)
    for f in range(k):
        held = oof.folds == f
        head = fit_head(x[~held], y[~held].tolist())
        cols = [oof.label_names.index(n) for n in head.labels]
        np.testing.assert_allclose(oof.probabilities[held][:, cols], head.probabilities(x[held]), atol=1e-4)
    # ...and they differ from in-sample ones: a head that saw every photo is surer of its labels.
    full = fit_head(x, truth)
    true_col = [oof.label_names.index(t) for t in truth]
    in_sample = full.probabilities(x)[np.arange(len(y)), [full.labels.index(t) for t in truth]]
    out_of_fold = oof.probabilities[np.arange(len(y)), true_col]
    assert in_sample.mean() > out_of_fold.mean() + 0.05


def test_gate_promote_rollback_and_no_version(lite2):
    _, registry = lite2.fresh("gate")
    first = refit_classifier(registry, policy=EASY)
    assert first.activated and first.decision is None  # nothing to protect: the first head is active
    v1 = registry.classifier().model_version
    # The photos it was fitted on are the train split, as adapters' evaluations exclude them.
    train = {it.photo.sha256 for it in labelled_photos(registry.engine, None) if it.split == "train"}
    with Session(registry.engine) as s:
        assert training_photo_hashes(s, str(Path(first.folder).resolve())) == train
    assert len(train) == first.n_train == 5 * len(BREEDS) and first.n_test == len(BREEDS)
    # Same reviews, same features: an identical head ties with the active one and is not activated.
    second = refit_classifier(registry, policy=EASY)
    assert second.decision is not None and second.decision.reference == f"head #{first.version_id}"
    assert not second.activated and second.decision.outcome == "blocked"
    assert "tie" in second.decision.summary()
    assert registry.classifier().model_version == v1
    # The same weights are the same model version (the file's digest): cached predictions stay valid.
    assert Stage1Classifier.load(BUILTIN_ARCH, checkpoint=Path(second.folder) / HEAD_CHECKPOINT).model_version == v1
    # Another head (weaker L2), stored without activation; promote by hand, roll back, "no version".
    third = refit_classifier(registry, policy=EASY, c=1.0, auto_activate=False)
    assert not third.activated and registry.classifier().model_version == v1
    base = registry.stage1_backbone().base_model
    promote(registry.engine, third.version_id)
    assert registry.classifier().model_version != v1
    with Session(registry.engine) as s:
        run_stage1(s, registry.classifier(), [s.get(ImageRecord, 1)], PredictSummary())
        rows = s.exec(select(Prediction).where(Prediction.kind == "stage1")).all()
        assert {r.model_version for r in rows} == {registry.classifier().model_version}
    rollback(registry.engine, base, first.version_id)
    assert registry.classifier().model_version == v1
    no_version(registry.engine, base)
    with pytest.raises(ClassifierNotTrainedError):
        registry.classifier()
    with Session(registry.engine) as s:
        assert [r.active for r in s.exec(select(AdapterVersion))] == [False, False, False]
    with pytest.raises(HeadVersionError, match="no stage-1 head version #99"):
        promote(registry.engine, 99)


def test_a_users_own_convnext_checkpoint_is_refitted_on_its_own_pre_logit_features(tmp_path, demo_dir, cats_dir):
    """The demo convnext_atto checkpoint configured as a user's: its own head is the reference."""
    from catreview.models.demo import ensure_demo_models

    demo = ensure_demo_models(demo_dir)
    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'user.db'}",
        demo_dir=demo_dir,
        data_dir=tmp_path / "data",
        classifier={"model": demo.classifier_arch, "checkpoint": demo.classifier_checkpoint, "batch_size": 8},
    )
    photos = tmp_path / "photos"
    _link_photos(cats_dir, photos, ["Bengal", "Siamese", "Sphynx"], 4)
    _import(settings, photos)
    registry = ModelRegistry(settings)
    own = registry.classifier().model_version
    result = refit_classifier(registry, policy=EASY, auto_activate=False)
    assert result.decision is not None and result.decision.reference == "the checkpoint's own head"
    assert result.features_computed == 12 and not result.activated
    assert registry.classifier().model_version == own  # not activated: the checkpoint's own head
    key = registry.stage1_backbone().key
    assert key.startswith("convnext_atto@") and (settings.data_dir / "features" / key).is_dir()
    promote(registry.engine, result.version_id)
    clf = registry.classifier()
    assert clf.model_id == "convnext_atto" and clf.labels == ["Bengal", "Siamese", "Sphynx - Hairless Cat"]
    feats = ensure_features(
        settings,
        load_extractor(settings, registry.stage1_backbone()),
        [it.photo for it in labelled_photos(registry.engine, None)],
    )
    assert feats.computed == 0 and len(feats.features) == 12


def test_cli_train_stage_classifier(lite2, monkeypatch, capsys):
    from catreview.cli.main import main as cli_main

    settings = lite2.settings("cli")
    monkeypatch.setenv("CATREVIEW_BUILTIN_MODELS", "pretrained")
    monkeypatch.setenv("CATREVIEW_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CATREVIEW_DEMO_DIR", str(settings.demo_dir))
    db = ["--db", settings.database_url]
    make_engine(settings.database_url)
    assert cli_main(["train", "--stage", "classifier", *db]) == 2
    assert "error: stage 1 needs reviewed photos of at least 2 breeds" in capsys.readouterr().err
    _import(settings, lite2.photos)
    assert cli_main(["train", "--stage", "classifier", "--export", "x", *db]) == 2
    assert "--export belong to the VLM round" in capsys.readouterr().err
    assert cli_main(["train", "--stage", "classifier", *db]) == 0
    out = capsys.readouterr().out
    assert "stage-1 head #1 trained on" in out and "activated (the first stage-1 model)" in out
    assert "features: 0 computed, 21 cached" in out
    assert cli_main(["train", "--stage", "classifier", "--min-test-photos", "1", "--no-activate", *db]) == 0
    out = capsys.readouterr().out
    assert "stage-1 head #2 kept inactive: gate blocked" in out and "Siamese" in out
    assert cli_main(["adapters", "--stage", "classifier", "rollback", "none", *db]) == 0
    assert "no stage-1 head version active for stage1:tf_efficientnet_lite2@" in capsys.readouterr().out
    assert cli_main(["adapters", "--stage", "classifier", "promote", "2", *db]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert listed[1].split()[:2] == ["2", "*"] and listed[2].split()[0] == "1"
    assert cli_main(["adapters", "--stage", "classifier", "promote", "7", *db]) == 2
    assert "error: no stage-1 head version #7" in capsys.readouterr().err


def test_retrain_classifier_button_runs_in_the_background_and_predicts_the_new_head(settings, cats_dir):
    """Random built-in models (the demo convnext_atto: its head is near chance, a refitted one is
    better and passes a gate on small test splits); activation schedules predictions."""
    from catreview.app.classifier_job import classifier_job
    from catreview.app.core import ReviewApp
    from catreview.app.ui import train_tab

    photos = settings.data_dir.parent / "photos"
    _link_photos(cats_dir, photos, ["Bengal", "Siamese", "Sphynx", "Persian"], 7)
    _import(settings, photos)
    app = ReviewApp(settings)
    job = classifier_job(app)
    job.policy = GatePolicy(min_test_photos=1, min_breed_photos=100, min_p_better=0.5)
    assert train_tab.classifier_status(app) == ""
    assert train_tab.retrain_classifier(app, actor="ada").startswith("Retraining the classifier")
    assert job.wait(300)
    assert job.result is not None, job.state.error
    status = train_tab.classifier_status(app)
    assert status.startswith("Stage-1 head #1 activated: gate passed"), status
    assert job.result.activated
    assert app.wait(300)
    version = app.registry.classifier().model_version
    with Session(app.engine) as s:
        rows = s.exec(select(Prediction).where(Prediction.kind == "stage1")).all()
    assert len({r.image_id for r in rows if r.model_version == version}) == 28


@pytest.mark.slow
def test_lite2_head_on_the_shared_photos_reaches_the_linear_probe(tmp_path, cats_dir, capsys):
    """All shared photos: a cold refit (features included) and a warm one are timed; then a
    stratified 30% is held out, the head fitted on the rest, balanced accuracy asserted.

    Margin: the issue's probe (Lite2, trained on all 330 shared photos, scored on 217 other photos)
    reached 0.725 balanced accuracy. Here the head sees 70% of them (7 photos of the 10-photo
    breeds) and is scored on 99 photos, 3 of each 10-photo breed (a breed's recall moves in steps
    of 1/3), so the estimate's standard error is about 0.05; the bound 0.60 is 0.725 minus about
    2.5 standard errors (less training data lowers the expected value too).
    """
    from sklearn.model_selection import train_test_split

    from catreview.metrics import balanced_accuracy

    settings = load_settings(
        database_url=f"sqlite:///{tmp_path / 'all.db'}",
        demo_dir=tmp_path / "demo",
        data_dir=tmp_path / "data",
        builtin_models="pretrained",
    )
    engine = make_engine(settings.database_url)
    summary = import_folder(
        engine, cats_dir, vocabulary=BreedVocabulary.from_labels_file(None), labels_from_folders=True, workers=1
    )
    registry = ModelRegistry(settings, engine=engine)
    t0 = time.perf_counter()
    cold = refit_classifier(registry)
    cold_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = refit_classifier(registry)
    warm_s = time.perf_counter() - t0
    assert warm.features_computed == 0 and cold.features_computed == warm.features_cached
    items = labelled_photos(engine, None)
    cache = read_cache(features_dir(settings, registry.stage1_backbone().key))
    x = np.stack([cache[it.photo.sha256].astype(np.float32) for it in items])
    y = [it.label for it in items]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, stratify=y, random_state=0)
    head = fit_head(x_tr, y_tr)
    pred = head.predict(x_te)
    top1 = float(np.mean([p == t for p, t in zip(pred, y_te)]))
    ba = balanced_accuracy(y_te, pred)
    with capsys.disabled():
        print(
            f"\nLite2 head: {len(y_tr)} train / {len(y_te)} held-out photos, top-1 {top1:.3f}, balanced accuracy "
            f"{ba:.3f}; refit cold {cold_s:.1f} s ({cold.features_computed} photos featurised), warm {warm_s:.1f} s; "
            f"import {summary.lines()[0]}"
        )
    assert ba >= 0.60
