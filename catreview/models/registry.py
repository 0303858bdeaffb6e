"""Which models the settings select, loaded lazily and at most once per process.

With no classifier configured, stage 1 is the built-in ImageNet ``tf_efficientnet_lite2`` with the
active breed head fitted on the reviews (:mod:`catreview.heads`; none trained yet:
:class:`~catreview.models.classifier.ClassifierNotTrainedError`), or with
``builtin_models="random"`` the demo ``convnext_atto``; an active head version of the configured
backbone wins over its own head (:meth:`ModelRegistry.classifier`); with no VLM profiles
configured, the built-in profiles are used: with ``builtin_models="pretrained"`` two FastVLMs built
offline from installed weight packages (:mod:`catreview.models.offline`; untrained until an
adapter is active, :meth:`ModelRegistry.vlm_trained`), with ``"random"`` the profile ``"demo"``,
the tiny demo LLaVA. A profile name that is not
configured (``active_vlm``, ``--vlm``) is a :class:`~catreview.config.ConfigError`, never a silent
switch to the demo. The demo models are built by :func:`catreview.models.demo.ensure_demo_models`
and loaded through the same code as real checkpoints.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.engine import Engine
from sqlmodel import Session

from catreview.config import DEMO_PROFILE, ConfigError, Settings, VLMProfile, builtin_vlm_profiles
from catreview.data.db import active_adapter_version, make_engine
from catreview.models.classifier import ClassifierNotTrainedError, Stage1Classifier
from catreview.models.demo import DemoModels, ensure_demo_models
from catreview.models.stage1_builtin import (
    BUILTIN_ARCH,
    HEAD_CHECKPOINT,
    Stage1Backbone,
    backbone_key,
    ensure_builtin_backbone,
)

if TYPE_CHECKING:  # the VLM module is imported on first use, in ModelRegistry.vlm
    from catreview.models.vlm.postclassifier import VLMPostClassifier


class UnknownProfileError(ConfigError, KeyError):
    """A VLM profile name that is not configured; the message lists the configured ones.

    A :class:`ConfigError` (reported as one line by the CLI and UI) and, for callers that look
    profiles up like a mapping, a :class:`KeyError`.
    """

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelRegistry:
    """Lazily loads the stage-1 classifier and VLM profiles named in ``settings``.

    Thread-safe: the UI's background worker and request handlers may ask at the same time.
    """

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        # Where active LoRA adapter versions are looked up (:func:`active_adapter_path`).
        self.engine = engine if engine is not None else make_engine(settings.database_url)
        self._lock = threading.RLock()
        self._classifier: Stage1Classifier | None = None
        self._classifier_source: tuple[str, Path | None, Path | None] | None = None
        self._backbone: Stage1Backbone | None = None
        self._vlms: dict[str, VLMPostClassifier] = {}
        self._demo: DemoModels | None = None
        self._builtin_vlms: dict[str, Path] | None = None

    @property
    def demo(self) -> DemoModels:
        """The demo models, built on first use (seconds; cached on disk)."""
        with self._lock:
            if self._demo is None:
                self._demo = ensure_demo_models(self.settings.demo_dir)
            return self._demo

    def profiles(self) -> dict[str, VLMProfile]:
        """Configured VLM profiles by name, in configuration order. With none configured, the
        built-in ones: with ``builtin_models="pretrained"`` the FastVLMs ``"smollm2-lite0"`` and
        ``"smollm2-lite2"`` (:mod:`catreview.models.offline`; built on first use, about two
        minutes once, then cached on disk), with ``"random"`` the single profile ``"demo"`` (the
        tiny demo LLaVA, seconds). Built-in profiles are plain folders, loaded like a user's.

        Raises:
            catreview.models.offline.WeightPackageError: a weight package is not installed.
        """
        profiles = dict(self.settings.vlm_profiles)
        if not profiles:
            profiles.update({name: VLMProfile(model=str(path)) for name, path in self.builtin_vlm_dirs().items()})
        return profiles

    def builtin_vlm_dirs(self) -> dict[str, Path]:
        """Folders of the built-in VLM profiles of ``settings.builtin_models`` by name (built on
        first use, see :meth:`profiles`)."""
        with self._lock:
            if self._builtin_vlms is None:
                if self.settings.builtin_models == "random":
                    self._builtin_vlms = {DEMO_PROFILE: Path(self.demo.vlm_dir)}
                else:
                    from catreview.models.offline import builtin_dir, ensure_builtin_vlms

                    self._builtin_vlms = ensure_builtin_vlms(builtin_dir(self.settings.demo_dir))
            return dict(self._builtin_vlms)

    def vlm_trained(self, name: str | None = None) -> bool:
        """Whether profile ``name``'s (default: the active one) verdicts mean something.

        A configured profile (a user's checkpoint) always counts as trained, and so does the
        tiny random ``"demo"`` profile (tests of mechanics rely on its verdicts). A built-in
        pretrained FastVLM has a random projector: it counts as trained only once an adapter
        is active for it (:func:`active_adapter_path`). One indexed query; builds nothing.

        Raises:
            UnknownProfileError: no such profile.
        """
        name = name or self.active_vlm_name
        if name in self.settings.vlm_profiles or self.settings.builtin_models == "random":
            self.profile(name)  # raises for a name that is not there
            return True
        if self.settings.vlm_profiles or name not in builtin_vlm_profiles(self.settings.builtin_models):
            raise UnknownProfileError(self._unknown_message(name))
        from catreview.models.offline import builtin_dir

        # The folder ensure_builtin_vlms builds, named without building it (this runs per click).
        base = str(builtin_dir(self.settings.demo_dir) / name)
        return active_adapter_path(self.engine, base) is not None

    def stage1_untrained_reason(self) -> str | None:
        """``None`` when stage 1 can predict, else the :class:`ClassifierNotTrainedError` line
        (the built-in backbone has no trained head yet). Loads the classifier on first call.

        Raises:
            catreview.models.classifier.ClassifierError: the model cannot be loaded.
        """
        try:
            self.classifier()
        except ClassifierNotTrainedError as exc:
            return str(exc)
        return None

    def untrained_reason(self, name: str | None = None) -> str | None:
        """``None`` when :meth:`vlm_trained`, else the plain status line saying why its verdicts
        are not shown: ``"VLM not trained yet: ..."``."""
        name = name or self.active_vlm_name
        if self.vlm_trained(name):
            return None
        return (
            f"VLM not trained yet: the built-in profile {name!r} has an untrained image projector, so its "
            "verdicts would mean nothing; review some photos and run a training round (Train tab or "
            "`python -m catreview train`)"
        )

    @property
    def active_vlm_name(self) -> str:
        """Name of the profile used when none is given: ``settings.active_vlm``, a built-in
        profile (``"smollm2-lite0"`` or ``"demo"``, see :meth:`profiles`) when none is configured.

        Raises:
            UnknownProfileError: ``active_vlm`` names no configured profile (settings built
                without validation, e.g. with ``model_copy``; :class:`Settings` refuses it).
        """
        name = self.settings.active_vlm
        configured = self.settings.vlm_profiles
        if name in configured or (not configured and name in builtin_vlm_profiles(self.settings.builtin_models)):
            return name
        raise UnknownProfileError(self._unknown_message(name, " (active_vlm)"))

    def _unknown_message(self, name: str, source: str = "") -> str:
        configured = list(self.settings.vlm_profiles) or list(builtin_vlm_profiles(self.settings.builtin_models))
        return f"no VLM profile named {name!r}{source}; configured: {', '.join(map(repr, configured))}"

    def profile(self, name: str | None = None) -> VLMProfile:
        """The configured profile ``name`` (default: the active one), without its active adapter.

        Raises:
            UnknownProfileError: no such profile (the message lists the configured ones).
        """
        name = name or self.active_vlm_name
        profiles = self.profiles()
        if name not in profiles:
            raise UnknownProfileError(self._unknown_message(name))
        return profiles[name]

    def base_model(self, name: str | None = None) -> str:
        """Model id or local folder of profile ``name`` (default: the active one): the base model
        that LoRA adapters are trained for and whose processor checks exports.

        Raises:
            UnknownProfileError: no such profile (the message lists the configured ones).
        """
        return self.profile(name).model

    def stage1_backbone(self) -> Stage1Backbone:
        """The frozen stage-1 backbone whose head :mod:`catreview.heads` refits (computed once):
        ``classifier.model`` + ``classifier.checkpoint`` when configured; else the built-in
        ImageNet ``tf_efficientnet_lite2`` (``builtin_models="pretrained"``, converted on first
        use) or the demo ``convnext_atto`` (``"random"``).

        Raises:
            catreview.models.stage1_builtin.BuiltinWeightsError: the built-in weight package is missing.
        """
        with self._lock:
            if self._backbone is None:
                cfg = self.settings.classifier
                if cfg.model is not None:
                    ckpt = Path(cfg.checkpoint) if cfg.checkpoint else None
                    key = backbone_key(cfg.model, ckpt if ckpt is not None and ckpt.is_file() else None)
                    self._backbone = Stage1Backbone(cfg.model, ckpt, key, False, cfg.labels_file)
                elif self.settings.builtin_models == "random":
                    demo = self.demo
                    ckpt = Path(demo.classifier_checkpoint)
                    self._backbone = Stage1Backbone(
                        demo.classifier_arch, ckpt, backbone_key(demo.classifier_arch, ckpt), False
                    )
                else:
                    weights = ensure_builtin_backbone(self.settings)
                    self._backbone = Stage1Backbone(BUILTIN_ARCH, weights, backbone_key(BUILTIN_ARCH, weights), True)
            return self._backbone

    def classifier(self) -> Stage1Classifier:
        """The stage-1 classifier, reloaded when the active head version changes.

        In order: the active head version of :meth:`stage1_backbone` (a full timm checkpoint
        fitted by :mod:`catreview.heads`, loaded by :meth:`Stage1Classifier.load` like any
        checkpoint); else the configured classifier; else (``builtin_models="random"``) the demo
        ``convnext_atto``; else (the built-in ImageNet backbone without a trained head)
        :class:`ClassifierNotTrainedError`. One indexed query per call finds the active version.

        Raises:
            ClassifierNotTrainedError: the built-in backbone has no trained head version.
            catreview.models.classifier.ClassifierError: the model cannot be loaded.
        """
        with self._lock:
            backbone = self.stage1_backbone()
            with Session(self.engine) as s:
                row = active_adapter_version(s, backbone.base_model)
            cfg = self.settings.classifier
            source: tuple[str, Path | None, Path | None]
            if row is not None:
                source = (backbone.model_id, Path(row.path) / HEAD_CHECKPOINT, None)
            elif backbone.builtin:
                raise ClassifierNotTrainedError(
                    "No stage-1 model trained yet: the built-in ImageNet backbone has no breed head; train one with "
                    "'python -m catreview train --stage classifier' or the Train tab's \"Retrain classifier\" "
                    "(it needs reviewed photos)"
                )
            else:
                source = (backbone.model_id, backbone.weights, backbone.labels_file)
            if self._classifier is None or self._classifier_source != source:
                if row is None and cfg.model is not None:
                    self._classifier = Stage1Classifier.from_config(cfg)
                else:
                    self._classifier = Stage1Classifier.load(
                        source[0], checkpoint=source[1], device=cfg.device, batch_size=cfg.batch_size
                    )
                self._classifier_source = source
            return self._classifier

    def vlm(self, name: str | None = None) -> VLMPostClassifier:
        """The VLM of profile ``name`` (default: the active one), created lazily; its weights
        load on first use and can be freed with ``unload()``.

        Raises:
            UnknownProfileError: no such profile (also a ``KeyError``).
        """
        from catreview.models.vlm.postclassifier import VLMPostClassifier

        name = name or self.active_vlm_name
        with self._lock:
            profile = self._with_active_adapter(self.profile(name))
            current = self._vlms.get(name)
            # A new active adapter (or a rollback) gives a new profile, hence a
            # new VLM object and model_version; the old object is dropped, not unloaded, so a
            # prediction batch still using it finishes (its memory goes with the last reference).
            if current is None or current.profile != profile:
                self._vlms[name] = VLMPostClassifier(profile, name=name)
            return self._vlms[name]

    def _with_active_adapter(self, profile: VLMProfile) -> VLMProfile:
        """``profile`` with the active adapter version of its base model
        (:func:`active_adapter_path`). An adapter set explicitly in the profile's config wins."""
        if profile.adapter is not None:
            return profile
        path = active_adapter_path(self.engine, profile.model)
        return profile if path is None else profile.model_copy(update={"adapter": path})

    def unload_vlms(self, keep: str | None = None) -> None:
        """Free the memory of every loaded VLM except ``keep``."""
        with self._lock:
            for name, vlm in self._vlms.items():
                if name != keep:
                    vlm.unload()


def active_adapter_path(engine: Engine, base_model: str) -> Path | None:
    """Folder of the active LoRA adapter of ``base_model``, or ``None``
    (:func:`catreview.data.db.active_adapter_version`; ``models`` does not import ``adapters``)."""
    with Session(engine) as s:
        row = active_adapter_version(s, base_model)
    return Path(row.path) if row is not None else None
