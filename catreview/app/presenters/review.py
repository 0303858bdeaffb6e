"""Text of the Review tab: counters, the three prediction panels, the current label, notices."""

from __future__ import annotations

from dataclasses import dataclass

from catreview.query.photos import PhotoView

NO_PHOTOS = "No photos yet. Start with `python app.py --images DIR` or add photos below."
NOTHING_TO_LABEL = "Nothing to label: pick a photo and a label first."
ALL_REVIEWED = "Every photo is reviewed. 🎉"
STAGE1_PENDING = "Prediction not ready yet: the background job has not reached this photo. Press Refresh in a moment."
VLM_PENDING = "VLM verdict not ready yet (stage 1 shown). Press Refresh in a moment."


def demo_banner(demo_classifier: bool, demo_vlm: bool) -> str:
    """The warning shown while a built-in tiny model (random weights) stands in for a real one.

    Raises:
        KeyError: neither stage is a demo model (no banner is due).
    """
    which = {
        (True, True): "No classifier and no VLM are configured, so the built-in tiny models are",
        (True, False): "No classifier is configured, so the built-in tiny stage-1 model is",
        (False, True): "No VLM is configured, so the built-in tiny VLM is",
    }[(demo_classifier, demo_vlm)]
    return (
        f"**Demo models in use.** {which} running (random weights): their predictions are meaningless. "
        "Configure real models with `--config FILE` (see `assets/example_config.toml`)."
    )


def builtin_banner(builtin_classifier: bool, builtin_vlm: bool) -> str:
    """The note shown while the built-in offline models (real ImageNet weights, trained on this
    collection's reviews) stand in for the team's own models.

    Raises:
        KeyError: neither stage is built in (no banner is due).
    """
    which = {
        (True, True): "stage 1 is an ImageNet EfficientNet-Lite2 with a breed head fitted on your reviews, and "
        "the VLM is built from EfficientNet-Lite0 + SmolLM2-135M-Instruct and trained by LoRA rounds on them",
        (True, False): "stage 1 is an ImageNet EfficientNet-Lite2 with a breed head fitted on your reviews",
        (False, True): "the VLM is built from EfficientNet-Lite0 + SmolLM2-135M-Instruct and trained by LoRA "
        "rounds on your reviews",
    }[(builtin_classifier, builtin_vlm)]
    return (
        f"**Built-in offline models.** Nothing else is configured, so {which}. Until a stage is trained it "
        "shows nothing (the status line says so). Configure your own models with `--config FILE` "
        "(see `assets/example_config.toml`)."
    )


def reasoning_label(uses_demo_models: bool) -> str:
    """Label of the streamed-reasoning box (says when the text comes from random weights)."""
    return "VLM reasoning (streamed)" + (
        " — demo model: random weights, so this text is noise" if uses_demo_models else ""
    )


def counter(reviewed: int, total: int, image_id: int | None = None) -> str:
    """``**R / T reviewed** · photo #ID`` (the id left out when ``None``)."""
    text = f"**{reviewed} / {total} reviewed**"
    return text if image_id is None else text + f" · photo #{image_id}"


@dataclass(frozen=True)
class PredictionPanels:
    """What the three ``gr.Label`` panels and the lines around them show for one photo.

    The distributions map a label to a probability in [0, 1] (``None``: the panel is empty).
    """

    status: str
    stage1: dict[str, float] | None
    vlm: dict[str, float] | None
    vlm_info: str
    fused: dict[str, float] | None


def prediction_panels(
    view: PhotoView, vlm_untrained: str | None = None, stage1_untrained: str | None = None
) -> PredictionPanels:
    """Stage-1 top-k, the VLM over the candidates (or why it is missing) and the fused prediction.

    ``vlm_untrained`` / ``stage1_untrained``: the registry's "... not trained yet: ..." lines
    (:meth:`catreview.models.registry.ModelRegistry.untrained_reason`,
    :meth:`~catreview.models.registry.ModelRegistry.stage1_untrained_reason`), shown instead of
    "not ready yet" while that stage has no predictions because it is not trained.
    """
    if view["stage1"] is None:
        return PredictionPanels(stage1_untrained + "." if stage1_untrained else STAGE1_PENDING, None, None, "", None)
    stage1 = {d["label"]: d["probability"] for d in view["stage1"]} or None
    fused = dict(view["fused"]["probabilities"]) if view["fused"] else None
    vv = view["vlm"]
    if vv is None:
        return PredictionPanels(
            vlm_untrained + " (stage 1 shown)." if vlm_untrained else VLM_PENDING, stage1, None, "", fused
        )
    if vv.get("skipped"):
        return PredictionPanels("", stage1, None, f"VLM skipped: {vv['reason']}.", fused)
    info = f"VLM verdict: **{vv['label']}** with confidence {vv['confidence']:.1%}"
    return PredictionPanels("", stage1, dict(vv["probabilities"]) or None, info, fused)


def review_info(view: PhotoView) -> str:
    """The photo's current label, who chose it and when (UTC), or "Not reviewed yet."."""
    rv = view["review"]
    if rv is None:
        return "Not reviewed yet."
    return f"Current label: **{rv['label']}** (by {rv['annotator']}, {rv['time'][:19]} UTC)"


def saved(label: str, image_id: int) -> str:
    """Notice after a saved review."""
    return f"Saved **{label}** for photo {image_id}."


def refused(error: Exception) -> str:
    """Notice for a review that was not recorded (the error's one-line message)."""
    return f"⚠️ {error}"
