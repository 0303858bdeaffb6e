"""Which models the settings select, loaded lazily and at most once per process.

With no classifier configured, stage 1 is the demo ``convnext_atto``; with no VLM profiles
configured, the profile ``"demo"`` points at the tiny demo LLaVA. A profile name that is not
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

from catreview.config import DEMO_PROFILE, ConfigError, Settings, VLMProfile
from catreview.data.db import active_adapter_version, make_engine
from catreview.models.classifier import Stage1Classifier
from catreview.models.demo import DemoModels, ensure_demo_models

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
        self._vlms: dict[str, VLMPostClassifier] = {}
        self._demo: DemoModels | None = None

    @property
    def demo(self) -> DemoModels:
        """The demo models, built on first use (seconds; cached on disk)."""
        with self._lock:
            if self._demo is None:
                self._demo = ensure_demo_models(self.settings.demo_dir)
            return self._demo

    def profiles(self) -> dict[str, VLMProfile]:
        """Configured VLM profiles by name, in configuration order; with none configured, the
        single profile ``"demo"`` (the tiny demo LLaVA, built on first use)."""
        profiles = dict(self.settings.vlm_profiles)
        if not profiles:
            profiles[DEMO_PROFILE] = VLMProfile(model=str(self.demo.vlm_dir))
        return profiles

    @property
    def active_vlm_name(self) -> str:
        """Name of the profile used when none is given: ``settings.active_vlm``, which is
        ``"demo"`` exactly when no profiles are configured.

        Raises:
            UnknownProfileError: ``active_vlm`` names no configured profile (settings built
                without validation, e.g. with ``model_copy``; :class:`Settings` refuses it).
        """
        name = self.settings.active_vlm
        configured = self.settings.vlm_profiles
        if name in configured or (not configured and name == DEMO_PROFILE):
            return name
        raise UnknownProfileError(self._unknown_message(name, " (active_vlm)"))

    def _unknown_message(self, name: str, source: str = "") -> str:
        configured = list(self.settings.vlm_profiles) or [DEMO_PROFILE]
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

    def classifier(self) -> Stage1Classifier:
        """The stage-1 classifier (loaded on first call)."""
        with self._lock:
            if self._classifier is None:
                cfg = self.settings.classifier
                if cfg.model is None:
                    demo = self.demo
                    self._classifier = Stage1Classifier.load(
                        demo.classifier_arch,
                        checkpoint=demo.classifier_checkpoint,
                        device=cfg.device,
                        batch_size=cfg.batch_size,
                    )
                else:
                    self._classifier = Stage1Classifier.from_config(cfg)
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
