"""LoRA rounds on FastVLM (the built-in VLMs' architecture): a timm tower whose output is cached
once per photo and standardised for the projector, the "This is" prefill, the adapter loading
back through the app's path, and the round's options (tower unfrozen for the last epoch, focal
loss).

Models: :func:`catreview.models.fastvlm.build_tiny_fastvlm` (the shared builder: random
``tf_efficientnet_lite0`` tower at 224 px, 49 image tokens, ChatML template; ~3.5M parameters; its
tower's outputs are ~1e-21 after transformers' weight init, so it is used where the photos'
content does not matter) and :func:`tests.tiny_vlms.build_tiny_fastvlm` (timm's
``test_efficientnet`` with timm's own init, O(1e-3) features, 0.1M tower parameters, 128 px,
llava-1.5 template) where the tower's output or its training matters. Nothing is mocked:
rounds run peft + accelerate on the shared photos and are scored with the app's scorer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import torch

from catreview.adapters.runfolder import BEST_DIR, PROGRESS_FILE, read_progress
from catreview.adapters.train_config import TrainConfig, builtin_first_round
from catreview.adapters.validation import InvalidConfigError
from catreview.cli.train_flags import add_config_arguments, config_from_args
from catreview.config import VLMProfile
from catreview.models.vlm import prompts
from catreview.models.vlm.loading import load_processor_and_model
from tests.conftest import shared_photos_dir
from tests.export_builder import write_export
from tests.test_training import export_rows
from training.checkpoint import save_adapter_weights, trainable_state
from training.data import Collator, Sample, model_inputs
from training.evaluation import evaluate_adapter
from training.lora import train_round
from training.loss import answer_loss
from training.model import add_lora, load_base_model, lora_module_names
from training.tower import (
    ProjectorStandardization,
    TowerFeatureCache,
    active_module,
    architecture,
    channel_stats,
    projector_linear_key,
    tower_features,
)


@pytest.fixture(scope="session")
def fastvlm(tmp_path_factory) -> Path:
    from catreview.models.fastvlm import build_tiny_fastvlm

    return build_tiny_fastvlm(tmp_path_factory.mktemp("fastvlm-tiny"))


@pytest.fixture(scope="session")
def fastvlm_test_tower(tmp_path_factory) -> Path:
    from tests.tiny_vlms import build_tiny_fastvlm

    return build_tiny_fastvlm(tmp_path_factory.mktemp("fastvlm-test-tower"))


@pytest.fixture(scope="session")
def three_breeds(tmp_path_factory) -> Path:
    return write_export(export_rows({"Bombay": 4, "Abyssinian": 4, "Bengal": 4}, 1), tmp_path_factory.mktemp("exp3"))


def _cfg(**changes) -> TrainConfig:
    base = dict(
        batch_size=4,
        lr=5e-3,
        warmup_ratio=0.0,
        train_projector=True,
        early_stopping_patience=0,
        other_rate=0.0,
        candidate_source="sampled",
        eval_batch_size=4,
        seed=0,
    )
    return TrainConfig(**{**base, **changes})


def _photo_batch(processor, n: int = 3) -> dict[str, torch.Tensor]:
    photos = sorted((shared_photos_dir() / "Bengal").glob("*.jpg"))[:n]
    samples = [Sample(p, "Bengal", "verdict", ("Bengal", "Bombay", prompts.OTHER_LABEL), "Bengal") for p in photos]
    return Collator(processor)(samples)


# ------------------------------------------------------------------------------ configuration


def test_builtin_recipe_is_a_valid_config_and_flags_override_it():
    """The built-in FastVLM's CPU recipe (a starting point the CLI's flags override), while the
    TrainConfig defaults stay those of a 7B LLaVA on a GPU."""
    cfg = builtin_first_round()
    assert (cfg.train_projector, cfg.lr, cfg.rank, cfg.batch_size) == (True, 2e-4, 8, 8)
    assert (TrainConfig().train_projector, TrainConfig().rank, TrainConfig().batch_size) == (False, 16, 4)
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    got = config_from_args(parser.parse_args(["--lr", "5e-4", "--max-steps", "30"]), base=cfg)
    assert (got.lr, got.max_steps, got.rank, got.train_projector) == (5e-4, 30, 8, True)
    with pytest.raises(InvalidConfigError, match="tower_lr_scale"):
        builtin_first_round(tower_lr_scale=0)


def test_new_options_are_config_fields_and_flags_off_by_default():
    cfg = TrainConfig()
    assert (cfg.unfreeze_tower_last_epoch, cfg.loss, cfg.focal_gamma) == (False, "cross_entropy", 2.0)
    assert cfg.tower_lr_scale == 0.1
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        ["--unfreeze-tower-last-epoch", "--loss", "focal", "--focal-gamma", "0.5", "--no-cache-tower-features"]
    )
    got = config_from_args(args)
    assert (got.unfreeze_tower_last_epoch, got.loss, got.focal_gamma, got.cache_tower_features) == (
        True,
        "focal",
        0.5,
        False,
    )
    assert TrainConfig.from_dict(got.to_dict()) == got
    with pytest.raises(InvalidConfigError, match="focal_gamma"):
        TrainConfig(focal_gamma=-1)
    with pytest.raises(SystemExit):
        parser.parse_args(["--loss", "hinge"])


# ------------------------------------------------------------------------------ focal loss


def test_focal_loss_is_cross_entropy_at_gamma_0_and_down_weights_easy_tokens():
    """Lin et al. 2017, eq. 4 (no alpha): FL(p_t) = -(1 - p_t)^gamma log p_t per answer token."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g) * 3
    labels = torch.full((3, 7), -100)
    labels[0, 4:] = torch.tensor([1, 2, 3])
    labels[1, 5:] = torch.tensor([4, 5])
    labels[2, 6:] = torch.tensor([6])
    weights = torch.tensor([1.0, 2.0, 0.5])
    ce, ce_rows = answer_loss(logits, labels, weights)
    f0, f0_rows = answer_loss(logits, labels, weights, focal_gamma=0.0)
    assert torch.equal(ce, f0) and torch.equal(ce_rows, f0_rows)

    x = logits.clone().requires_grad_(True)
    f2, f2_rows = answer_loss(x, labels, weights, focal_gamma=2.0)
    f2.backward()
    assert torch.isfinite(x.grad).all()
    # row 2 has one answer token: its focal value is (1 - p)^2 * CE
    p = torch.softmax(logits[2, -2], dim=-1)[6]
    assert f2_rows[2].item() == pytest.approx(((1 - p) ** 2 * -torch.log(p)).item(), rel=1e-5)
    assert (f2_rows < ce_rows).all()  # every token has p_t > 0, so each is down-weighted
    # gamma < 1 has an infinite derivative at p_t = 1 (the ignored positions): still finite
    y = logits.clone().requires_grad_(True)
    answer_loss(y, labels, weights, focal_gamma=0.5)[0].backward()
    assert torch.isfinite(y.grad).all()


# ------------------------------------------------------------------------------ architecture, cache, standardisation


def test_fastvlm_lora_targets_the_language_model_and_saves_the_projector(fastvlm):
    _, model = load_base_model(fastvlm, torch.float32, torch.device("cpu"))
    arch = architecture(model)
    assert (arch.model_type, arch.projector, arch.vision_tower, arch.tower_output_is_projector_input) == (
        "fast_vlm",
        "multi_modal_projector",
        "vision_tower",
        True,
    )
    peft_model = add_lora(model, _cfg())
    names = lora_module_names(peft_model)
    assert names and all(".language_model." in n and n.endswith(("q_proj", "v_proj")) for n in names)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any("multi_modal_projector.modules_to_save" in n for n in trainable)
    assert not any("vision_tower" in n for n in trainable)


def test_tower_cache_is_exact_and_runs_each_photo_once(fastvlm_test_tower):
    processor, model = load_base_model(fastvlm_test_tower, torch.float32, torch.device("cpu"))
    model.eval()
    batch = _photo_batch(processor)
    with torch.no_grad():
        plain = model(**model_inputs(batch)).logits
        cache = TowerFeatureCache(active_module(model, "vision_tower"))
        first = model(**model_inputs(batch)).logits
        second = model(**model_inputs(batch)).logits
    assert (cache.misses, cache.hits) == (3, 3)
    assert torch.equal(plain, first) and torch.equal(plain, second)
    cache.remove()
    assert "forward" not in vars(active_module(model, "vision_tower"))


def test_standardisation_keeps_the_function_and_folds_into_a_plain_adapter(fastvlm_test_tower, three_breeds, tmp_path):
    """Installing it changes no logit; after training-like changes of the standardised weights,
    the folded adapter loaded through the app's path gives the logits of the hooked model (float
    rounding only: the fold is exact in real arithmetic, computed in float64)."""
    processor, model = load_base_model(fastvlm_test_tower, torch.float32, torch.device("cpu"))
    model = add_lora(model, _cfg())
    model.eval()
    arch = architecture(model)
    batch = _photo_batch(processor)
    with torch.no_grad():
        before = model(**model_inputs(batch)).logits
    photos = sorted(three_breeds.glob("train/*.jpg"))
    mu, sigma = channel_stats(tower_features(model, processor, photos, 4, torch.device("cpu")))
    assert mu.shape == sigma.shape == (256,) and (sigma > 0).all()
    linear, key = projector_linear_key(model, arch)
    std = ProjectorStandardization(linear, mu, sigma)
    std.install()
    with torch.no_grad():
        assert torch.allclose(model(**model_inputs(batch)).logits, before, atol=1e-4, rtol=1e-4)
        g = torch.Generator().manual_seed(1)
        linear.weight.add_(torch.randn(linear.weight.shape, generator=g) * 0.05)  # "trained" W_s
        hooked = model(**model_inputs(batch)).logits
    assert not torch.allclose(hooked, before, atol=1e-3)
    save_adapter_weights(model, std.fold(trainable_state(model), key), tmp_path / "adapter")
    _, app_model, _, _ = load_processor_and_model(
        VLMProfile(model=str(fastvlm_test_tower), adapter=tmp_path / "adapter")
    )
    with torch.no_grad():
        reloaded = app_model(**model_inputs(batch)).logits
    assert torch.allclose(reloaded, hooked, atol=1e-4, rtol=1e-4), (reloaded - hooked).abs().max()


# ------------------------------------------------------------------------------ rounds


@pytest.mark.slow
def test_round_learns_a_fixed_answer_and_the_adapter_reloads_in_the_app(fastvlm, tmp_path):
    """One breed, the conversation target ("This is a Bengal cat." + end of turn, the prefill's
        sentence): 12 steps must cut the training loss at least 3-fold (from ~7.8 nats/token, the
    random model's ~log(vocabulary)). The folded adapter loaded
        through the app's path (``VLMProfile(adapter=best/)``) scores the validation photos exactly
        like the in-training model did (same verdicts, same loss to float rounding)."""
    export = write_export(export_rows({"Bengal": 8}, 2), tmp_path / "export")
    cfg = _cfg(target="conversation", max_steps=12, epochs=100, eval_every=12, lr=1e-2)
    result = train_round(export, fastvlm, tmp_path / "run", cfg)
    rows = read_progress(tmp_path / "run" / PROGRESS_FILE)
    losses = [r["loss"] for r in rows if r["kind"] == "train"]
    tower_row = next(r for r in rows if r["kind"] == "tower")
    assert tower_row["cached"] and tower_row["standardized"] and tower_row["photos"] == 8
    assert len(losses) == 12 and losses[-1] * 3 < losses[0], losses
    app = evaluate_adapter(fastvlm, tmp_path / "run" / BEST_DIR, export, cfg)
    assert app["balanced_accuracy"] == pytest.approx(result["metrics"]["balanced_accuracy"])
    assert app["val_loss"] == pytest.approx(result["metrics"]["val_loss"], rel=1e-4)
    assert result["best_step"] == 12 and result["metrics"]["val_loss"] < result["initial_metrics"]["val_loss"]


def test_prefill_prompt_and_answer_tokens_are_what_the_round_learns(fastvlm):
    """Labels: -100 on the prompt (image tokens and the "This is" prefill included), then the
    completion " a Bengal cat." (its article is part of the answer) and the end-of-turn token."""
    processor, _ = load_base_model(fastvlm, torch.float32, torch.device("cpu"))
    batch = _photo_batch(processor, 1)
    start = int(batch["answer_start"][0])
    prompt_ids = batch["input_ids"][0, :start]
    assert int((prompt_ids == processor.tokenizer.convert_tokens_to_ids("<image>")).sum()) == 49
    assert processor.tokenizer.decode(prompt_ids).rstrip().endswith(prompts.ANSWER_PREFILL)
    assert (batch["labels"][0, :start] == -100).all()
    learned = batch["labels"][0][batch["labels"][0] != -100].tolist()
    assert processor.tokenizer.decode(learned[:-1]) == " a Bengal cat."
    assert learned[-1] == processor.tokenizer.convert_tokens_to_ids(prompts.end_of_turn_token(processor))


def test_tower_gets_gradients_only_in_the_last_epoch(fastvlm_test_tower, three_breeds, tmp_path):
    """2 epochs of 3 steps: the tower copy has no gradient in epoch 0 and a non-zero one in
    epoch 1; BatchNorm statistics of the base tower never change (eval mode throughout)."""
    cfg = _cfg(epochs=2, eval_every=100, unfreeze_tower_last_epoch=True, balance="none")
    _, base = load_base_model(fastvlm_test_tower, torch.float32, torch.device("cpu"))
    base_stats = {k: v.clone() for k, v in base.state_dict().items() if "running_" in k}
    result = train_round(three_breeds, fastvlm_test_tower, tmp_path / "run", cfg)
    rows = [r for r in read_progress(tmp_path / "run" / PROGRESS_FILE) if r["kind"] == "train"]
    assert [(r["epoch"], r["tower_trainable"]) for r in rows] == [(0, False)] * 3 + [(1, True)] * 3
    assert all(r["tower_grad_norm"] == 0.0 for r in rows[:3]) and all(r["tower_grad_norm"] > 0 for r in rows[3:])
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / BEST_DIR / "adapter_model.safetensors"))
    tower_keys = [k for k in saved if "vision_tower" in k]
    assert tower_keys, "the tower copy is part of the adapter"
    stats = {k: v for k, v in saved.items() if "running_" in k}
    assert stats and all(torch.equal(v, base_stats[k.replace("base_model.model.", "", 1)]) for k, v in stats.items())
    assert result["steps"] == 6
    # the tower copy is an AdamW parameter group of its own at lr * tower_lr_scale (default 0.1)
    groups = torch.load(tmp_path / "run" / "checkpoint-last" / "optimizer.pt", weights_only=True)["param_groups"]
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(cfg.tower_lr_scale * groups[0]["lr"])
    assert groups[1]["initial_lr"] == pytest.approx(0.1 * cfg.lr)


def test_focal_round_at_gamma_0_is_the_cross_entropy_round_and_gamma_2_lowers_the_loss(
    fastvlm_test_tower, three_breeds, tmp_path
):
    def first_loss(name: str, **changes) -> tuple[float, dict[str, torch.Tensor]]:
        cfg = _cfg(max_steps=1, epochs=1, eval_every=100, max_val_examples=1, **changes)
        train_round(three_breeds, fastvlm_test_tower, tmp_path / name, cfg)
        row = next(r for r in read_progress(tmp_path / name / PROGRESS_FILE) if r["kind"] == "train")
        from safetensors.torch import load_file

        return row["loss"], load_file(
            str(tmp_path / name / "checkpoint-last" / "adapter" / "adapter_model.safetensors")
        )

    ce, ce_w = first_loss("ce")
    f0, f0_w = first_loss("f0", loss="focal", focal_gamma=0.0)
    f2, f2_w = first_loss("f2", loss="focal", focal_gamma=2.0)
    assert ce == f0 and all(torch.equal(ce_w[k], f0_w[k]) for k in ce_w)
    assert f2 < ce and any(not torch.equal(ce_w[k], f2_w[k]) for k in ce_w)


def test_cached_round_equals_the_uncached_round(fastvlm_test_tower, three_breeds, tmp_path):
    """The cache is exact: the same round with and without it gives the same losses."""
    out = {}
    for cached in (True, False):
        cfg = _cfg(max_steps=2, epochs=1, eval_every=100, max_val_examples=1, cache_tower_features=cached)
        train_round(three_breeds, fastvlm_test_tower, tmp_path / str(cached), cfg)
        out[cached] = [r["loss"] for r in read_progress(tmp_path / str(cached) / PROGRESS_FILE) if r["kind"] == "train"]
    assert out[True] == pytest.approx(out[False], rel=1e-5)
    # every photo went through the frozen tower once (12 training photos, 1 validation photo);
    # the 2 training steps of 4 photos and the last evaluation were served from the cache
    end = [r for r in read_progress(tmp_path / "True" / PROGRESS_FILE) if r["kind"] == "tower"][-1]
    assert (end["cache_misses"], end["cache_hits"]) == (13, 2 * 4 + 1)


def test_projector_lr_gives_the_projector_its_own_rate_on_the_same_schedule(fastvlm_test_tower, three_breeds, tmp_path):
    """``projector_lr`` (the built-in recipe's 1e-3): an AdamW group of its own holding exactly the
    trained projector copy, the LoRA weights at ``lr``; the optimizer state saved in the checkpoint
    says so."""
    cfg = _cfg(max_steps=1, epochs=1, eval_every=100, max_val_examples=1, train_projector=True, projector_lr=1e-3)
    train_round(three_breeds, fastvlm_test_tower, tmp_path / "run", cfg)
    state = torch.load(tmp_path / "run" / "checkpoint-last" / "optimizer.pt", weights_only=True)
    groups = state["param_groups"]
    assert [g["initial_lr"] for g in groups] == [cfg.lr, 1e-3]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "run" / "checkpoint-last" / "adapter" / "adapter_model.safetensors"))
    n_projector = sum(1 for k in saved if "multi_modal_projector" in k)
    assert len(groups[1]["params"]) == n_projector > 0  # the projector copy's weights and biases
    assert len(groups[0]["params"]) == len(saved) - n_projector  # every LoRA matrix
