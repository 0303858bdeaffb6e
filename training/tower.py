"""The vision tower during a round: which modules each architecture names, keeping the frozen
tower frozen (eval mode), caching its outputs once per photo, standardising its output channels
for the projector, and unfreezing it for the last epoch.

Architectures (module names as in transformers 5.24):

* LLaVA family (``llava``, ``llava_next``, ``llava_onevision``, ...): CLIP/SigLIP tower
  ``model.vision_tower``, projector ``model.multi_modal_projector``.
* FastVLM (``fast_vlm``, ``FastVlmForConditionalGeneration``): a timm tower wrapped in
  ``TimmWrapperModel`` at ``model.vision_tower`` (``timm_model`` inside), whose
  ``last_hidden_state`` is channels-first ``(B, C, h, w)``; ``FastVlmModel.get_image_features``
  flattens it to ``(B, h*w, C)`` and applies the projector ``model.multi_modal_projector``
  (``linear_1`` C -> D, GELU, ``linear_2`` D -> D). The tower's output *is* the projector's input,
  so caching it is exact; LLaVA's feature selection (a hidden layer, CLS dropped) is not cached.

Feature standardisation (FastVLM with a trained projector). The tower's output channels have
very different scales (ReLU6 activations of an ImageNet EfficientNet); NOTES (A LLaVA-style VLM
from those parts) measured that training the projector on per-channel standardised features
``z = (x - mu) / sigma`` (mean and standard deviation over the training photos' feature maps)
is what made the round learn fast. It is a reparametrisation, not a change of the model: the
projector's first linear ``W, b`` is replaced by ``W_s = W * sigma``, ``b_s = b + W mu`` acting
on ``z`` (same function at step 0, so the untrained adapter is still the base model), and
before saving it is folded back: ``W = W_s / sigma``, ``b = b_s - W mu``. The saved adapter is
a plain peft adapter (``modules_to_save`` projector) that loads through the app's path.
"""

from __future__ import annotations

import hashlib
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from catreview.adapters.train_config import PROJECTOR_MODULE, TrainConfig
from training.errors import TrainingError

if TYPE_CHECKING:
    import torch

VISION_TOWER_MODULE = "vision_tower"
"""Name of the vision tower attribute in every supported architecture (``model.vision_tower``)."""


@dataclass(frozen=True)
class Architecture:
    """Module names and tower facts of one VLM architecture.

    Attributes:
        model_type: ``config.model_type`` (``"llava"``, ``"fast_vlm"`` ...).
        projector: name of the projector module (peft ``modules_to_save`` entry).
        vision_tower: name of the vision tower module.
        tower_output_is_projector_input: the tower's ``last_hidden_state`` (channels-first for
            timm towers) is exactly what the projector sees, so it can be cached and
            standardised (FastVLM).
    """

    model_type: str
    projector: str = PROJECTOR_MODULE
    vision_tower: str = VISION_TOWER_MODULE
    tower_output_is_projector_input: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    "fast_vlm": Architecture("fast_vlm", tower_output_is_projector_input=True),
}
"""Architectures whose names or tower differ from the LLaVA default."""


def architecture(model: Any) -> Architecture:
    """The :class:`Architecture` of a loaded ``transformers`` VLM (LLaVA names by default)."""
    model_type = str(getattr(model.config, "model_type", ""))
    return ARCHITECTURES.get(model_type, Architecture(model_type))


def _find(model: Any, name: str) -> tuple[str, Any] | None:
    """``(qualified name, module)`` of the first module whose last name component is ``name``."""
    for qual, module in model.named_modules():
        if qual.rsplit(".", 1)[-1] == name:
            return qual, module
    return None


def active_module(model: Any, name: str) -> Any:
    """The module named ``name`` that runs when the adapter is active: peft's trainable copy
    (``ModulesToSaveWrapper.modules_to_save["default"]``) when there is one, else the module.

    Raises:
        TrainingError: no module of that name.
    """
    found = _find(model, name)
    if found is None:
        raise TrainingError(f"this model has no {name!r} module")
    module = found[1]
    copies = getattr(module, "modules_to_save", None)
    if copies is not None and "default" in copies:
        return copies["default"]
    return module


def tower_modules(model: Any, arch: Architecture) -> list[Any]:
    """Every vision-tower module in ``model`` (the base tower and peft's copy when present)."""
    found = _find(model, arch.vision_tower)
    if found is None:
        return []
    module = found[1]
    copies = getattr(module, "modules_to_save", None)
    if copies is None:
        return [module]
    return [module.original_module, *copies.values()]


def keep_towers_in_eval(model: Any, arch: Architecture) -> None:
    """Put every vision tower in eval mode (after ``model.train()``): BatchNorm keeps its
    running statistics (neither used from the batch nor updated, so the frozen base is not
    changed by training and a saved adapter means the same on reload) and dropout is off. Also
    while the tower is unfrozen for the last epoch: its weights train, its normalisation
    statistics stay those of the base model (usual for small batches)."""
    for tower in tower_modules(model, arch):
        tower.eval()


def set_tower_trainable(model: Any, arch: Architecture, trainable: bool) -> list[Any]:
    """``requires_grad`` on peft's trainable tower copy; returns its parameters.

    Raises:
        TrainingError: the model has no trainable tower copy (``modules_to_save``).
    """
    found = _find(model, arch.vision_tower)
    copies = getattr(found[1], "modules_to_save", None) if found else None
    if copies is None or "default" not in copies:
        raise TrainingError("the vision tower is not in the adapter's modules_to_save; it cannot be unfrozen")
    params = list(copies["default"].parameters())
    for p in params:
        p.requires_grad_(trainable)
    return params


# --------------------------------------------------------------------------------------------
# The frozen tower's outputs, once per photo
# --------------------------------------------------------------------------------------------


def pixel_key(pixels: torch.Tensor) -> str:
    """Content key of one photo's preprocessed ``pixels`` ``(3, H, W)``: dtype, shape, sha1 of the bytes."""
    import torch

    t = pixels.detach().to("cpu").contiguous()
    digest = hashlib.sha1(t.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()  # bf16 too
    return f"{t.dtype}/{tuple(t.shape)}/{digest}"


class TowerFeatureCache:
    """Caches a frozen vision tower's ``last_hidden_state`` per photo (keyed by the preprocessed
    pixels' bytes, :func:`pixel_key`), by overriding that tower module's ``forward`` on the
    instance: the model's own forward (training, the app's scorer, DDP) runs unchanged and each
    photo goes through the tower once per round. The processor's transform is deterministic
    (resize, centre crop, normalise), so the same photo always gives the same key.

    Only for towers whose output is the projector's input (:attr:`Architecture.tower_output_is_projector_input`)
    and only while the tower is frozen and in eval mode: :meth:`remove` before unfreezing it.

    Attributes:
        hits, misses: photos served from the cache / computed by the tower.
    """

    def __init__(self, tower: Any) -> None:
        self.tower = tower
        self.store: dict[str, torch.Tensor] = {}
        self.hits = 0
        self.misses = 0
        self._original: Callable[..., Any] = tower.forward
        tower.forward = types.MethodType(self._make_forward(), tower)
        self.installed = True

    def _make_forward(self) -> Callable[..., Any]:
        cache = self

        def cached_forward(tower_self: Any, pixel_values: Any, *args: Any, **kwargs: Any) -> Any:
            return cache.forward(pixel_values, *args, **kwargs)

        return cached_forward

    def forward(self, pixel_values: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The tower's output for ``pixel_values`` ``(B, 3, H, W)``; ``last_hidden_state`` is
        ``(B, C, h, w)`` from the cache where known (computed without gradients otherwise)."""
        import torch

        keys = [pixel_key(p) for p in pixel_values]
        missing = [i for i, k in enumerate(keys) if k not in self.store]
        if missing:
            with torch.no_grad():
                out = self._original(pixel_values[missing], *args, **kwargs)
            for j, i in enumerate(missing):
                self.store[keys[i]] = out.last_hidden_state[j].detach()
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        feats = torch.stack([self.store[k] for k in keys])
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=feats)

    def remove(self) -> None:
        """Restore the tower's own ``forward`` (before it is unfrozen or when the round ends)."""
        if self.installed:
            del self.tower.forward  # the instance attribute; the class's forward is back
            self.installed = False


def tower_features(model: Any, processor: Any, paths: Sequence[Any], batch_size: int, device: Any) -> Iterator[Any]:
    """``(B, C, h, w)`` tower outputs of the photos at ``paths``, ``batch_size`` at a time,
    through the tower module that runs in training (so an installed cache fills)."""
    import torch

    from catreview.data.images import load_rgb

    tower = active_module(model, VISION_TOWER_MODULE)
    dtype = next(tower.parameters()).dtype
    for start in range(0, len(paths), batch_size):
        images = [load_rgb(p) for p in paths[start : start + batch_size]]
        pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            yield tower(pixels.to(device=device, dtype=dtype)).last_hidden_state


# --------------------------------------------------------------------------------------------
# Standardised tower channels, folded into the projector's first linear
# --------------------------------------------------------------------------------------------


def channel_stats(batches: Any, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation of channels-first feature maps.

    Args:
        batches: iterable of ``(B, C, h, w)`` float tensors.
        eps: floor of the standard deviation, relative to the mean standard deviation over the
            channels (dead channels of a ReLU network have ``sigma`` ~ 0; dividing by it would
            blow up rounding noise).

    Returns:
        ``(mu, sigma)``, each ``(C,)`` float64 on the CPU.

    Raises:
        TrainingError: no feature maps.
    """
    import torch

    total, sq, n = None, None, 0
    for f in batches:
        x = f.detach().to("cpu", torch.float64).transpose(0, 1).reshape(f.shape[1], -1)  # (C, B*h*w)
        total = x.sum(dim=1) if total is None else total + x.sum(dim=1)
        sq = (x * x).sum(dim=1) if sq is None else sq + (x * x).sum(dim=1)
        n += x.shape[1]
    if total is None or sq is None or n == 0:
        raise TrainingError("no training photos to compute the vision tower's channel statistics from")
    mu = total / n
    sigma = (sq / n - mu * mu).clamp(min=0).sqrt()
    sigma = sigma.clamp(min=eps * float(sigma.mean()) + 1e-12)
    return mu, sigma


class ProjectorStandardization:
    """Trains the projector's first linear on standardised tower channels (module docstring).

    :meth:`install` rewrites the (trainable copy of the) projector's ``linear_1`` to
    ``W_s = W * sigma``, ``b_s = b + W mu`` and registers a forward pre-hook ``x -> (x - mu) /
    sigma`` on it, so the model computes the same function; :meth:`fold` maps a peft state dict
    (:func:`peft.get_peft_model_state_dict` keys) back to the plain ``W, b`` the saved adapter
    holds. Without a bias only the scale is standardised (``mu = 0``).

    Args:
        linear: the projector's first ``nn.Linear`` (input = tower channels).
        mu, sigma: ``(C,)`` channel statistics (:func:`channel_stats`).
    """

    def __init__(self, linear: Any, mu: torch.Tensor, sigma: torch.Tensor) -> None:
        import torch

        if linear.weight.shape[1] != mu.shape[0]:
            raise TrainingError(f"projector input has {linear.weight.shape[1]} channels, the tower gives {mu.shape[0]}")
        self.linear = linear
        dtype, dev = linear.weight.dtype, linear.weight.device
        if linear.bias is None:
            mu = torch.zeros_like(mu)
        self.mu64, self.sigma64 = mu.to(torch.float64), sigma.to(torch.float64)
        self.mu, self.sigma = mu.to(dev, dtype), sigma.to(dev, dtype)
        self._handle: Any = None

    def install(self) -> None:
        """Reparametrise ``linear`` in place and start standardising its input."""
        import torch

        w = self.linear.weight
        with torch.no_grad():
            w64 = w.to(torch.float64)
            if self.linear.bias is not None:
                self.linear.bias.copy_((self.linear.bias.to(torch.float64) + w64 @ self.mu64.to(w.device)).to(w.dtype))
            w.copy_((w64 * self.sigma64.to(w.device)).to(w.dtype))
        mu, sigma = self.mu, self.sigma

        def standardise(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
            x = args[0]
            return ((x - mu.to(x.dtype)) / sigma.to(x.dtype), *args[1:])

        self._handle = self.linear.register_forward_pre_hook(standardise)

    def fold_tensors(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(W, b)`` acting on raw channels for the standardised ``(W_s, b_s)`` (float64 maths)."""
        import torch

        w = weight.to(torch.float64) / self.sigma64.to(weight.device)
        b = None if bias is None else (bias.to(torch.float64) - w @ self.mu64.to(weight.device)).to(bias.dtype)
        return w.to(weight.dtype), b

    def fold(self, state: dict[str, torch.Tensor], key_prefix: str) -> dict[str, torch.Tensor]:
        """A copy of adapter ``state`` with ``{key_prefix}.weight`` / ``.bias`` folded."""
        out = dict(state)
        wk, bk = f"{key_prefix}.weight", f"{key_prefix}.bias"
        if wk not in out:
            raise TrainingError(f"adapter weights have no {wk!r} to fold the feature standardisation into")
        out[wk], b = self.fold_tensors(out[wk], out.get(bk))
        if b is not None:
            out[bk] = b
        return out

    def remove(self) -> None:
        """Fold the current weights into ``linear`` and drop the hook (same function, plain weights)."""
        import torch

        if self._handle is None:
            return
        with torch.no_grad():
            w, b = self.fold_tensors(self.linear.weight, self.linear.bias)
            self.linear.weight.copy_(w)
            if b is not None:
                self.linear.bias.copy_(b)
        self._handle.remove()
        self._handle = None


def projector_linear_key(model: Any, arch: Architecture) -> tuple[Any, str]:
    """``(linear_1 module of the trainable projector copy, its key prefix in the peft state dict)``.

    Raises:
        TrainingError: the projector is not trained (no ``modules_to_save`` copy) or has no ``linear_1``.
    """
    from peft import get_peft_model_state_dict

    copy = active_module(model, arch.projector)
    linear = getattr(copy, "linear_1", None)
    if linear is None or not hasattr(linear, "weight"):
        raise TrainingError(f"the projector {arch.projector!r} has no linear_1 to standardise")
    keys = [k for k in get_peft_model_state_dict(model) if k.endswith(f"{arch.projector}.linear_1.weight")]
    if len(keys) != 1:
        raise TrainingError(
            "feature standardisation needs the projector in the adapter (train_projector=True); "
            f"found {len(keys)} saved projector weights"
        )
    return linear, keys[0].removesuffix(".weight")


def wants_standardization(cfg: TrainConfig, arch: Architecture) -> bool:
    """Whether a round standardises the tower channels: ``cfg.standardize_tower_features``, a
    trained projector, and a tower whose output is the projector's input (FastVLM)."""
    return cfg.standardize_tower_features and cfg.train_projector and arch.tower_output_is_projector_input


def wants_cache(cfg: TrainConfig, arch: Architecture) -> bool:
    """Whether a round caches the tower's outputs (``cfg.cache_tower_features`` and FastVLM)."""
    return cfg.cache_tower_features and arch.tower_output_is_projector_input


__all__ = [
    "ARCHITECTURES",
    "Architecture",
    "ProjectorStandardization",
    "TowerFeatureCache",
    "active_module",
    "architecture",
    "channel_stats",
    "keep_towers_in_eval",
    "pixel_key",
    "projector_linear_key",
    "set_tower_trainable",
    "tower_features",
    "tower_modules",
    "wants_cache",
    "wants_standardization",
]
