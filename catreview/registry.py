"""Which models the settings select, loaded lazily and at most once per process.

With no classifier configured, stage 1 is the demo ``convnext_atto``; with no VLM profiles (or
an unknown ``active_vlm``), the profile ``"demo"`` points at the tiny demo LLaVA. Both are built
by :func:`catreview.demo_models.ensure_demo_models` and loaded through the same code as real
checkpoints.
"""

from __future__ import annotations

import threading

from catreview.classifier import Stage1Classifier
from sqlalchemy.engine import Engine

from catreview.config import DEMO_PROFILE, Settings, VLMProfile
from catreview.db import make_engine
from catreview.demo_models import DemoModels, ensure_demo_models


class ModelRegistry:
    """Lazily loads the stage-1 classifier and VLM profiles named in ``settings``.

    Thread-safe: the UI's background worker and request handlers may ask at the same time.
    """

    def __init__(self, settings: Settings, engine: Engine | None = None) -> None:
        self.settings = settings
        # Where active LoRA adapter versions are looked up (catreview.adapters.active_adapter).
        self.engine = engine if engine is not None else make_engine(settings.database_url)
        self._lock = threading.RLock()
        self._classifier: Stage1Classifier | None = None
        self._vlms: dict[str, object] = {}
        self._demo: DemoModels | None = None

    @property
    def demo(self) -> DemoModels:
        """The demo models, built on first use (seconds; cached on disk)."""
        with self._lock:
            if self._demo is None:
                self._demo = ensure_demo_models(self.settings.demo_dir)
            return self._demo

    def profiles(self) -> dict[str, VLMProfile]:
        """Configured VLM profiles, plus ``"demo"`` (the tiny demo LLaVA) when it is selected."""
        profiles = dict(self.settings.vlm_profiles)
        if DEMO_PROFILE not in profiles and (not profiles or self.settings.active_vlm not in profiles):
            profiles[DEMO_PROFILE] = VLMProfile(model=str(self.demo.vlm_dir))
        return profiles

    @property
    def active_vlm_name(self) -> str:
        name = self.settings.active_vlm
        return name if name in self.settings.vlm_profiles else DEMO_PROFILE

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

    def vlm(self, name: str | None = None):  # -> VLMPostClassifier
        """The VLM of profile ``name`` (default: the active one), created lazily; its weights
        load on first use and can be freed with ``unload()``.

        Raises:
            KeyError: no such profile.
        """
        from catreview.vlm import VLMPostClassifier

        name = name or self.active_vlm_name
        with self._lock:
            profiles = self.profiles()
            if name not in profiles:
                raise KeyError(f"no VLM profile named {name!r}; configured: {sorted(profiles)}")
            profile = self._with_active_adapter(profiles[name])
            current = self._vlms.get(name)
            # A new active adapter (or a rollback) gives a new profile, hence a
            # new VLM object and model_version; the old object is dropped, not unloaded, so a
            # prediction batch still using it finishes (its memory goes with the last reference).
            if current is None or current.profile != profile:
                self._vlms[name] = VLMPostClassifier(profile, name=name)
            return self._vlms[name]

    def _with_active_adapter(self, profile: VLMProfile) -> VLMProfile:
        """``profile`` with the active adapter version of its base model
        (catreview.adapters). An adapter set explicitly in the profile's config wins."""
        if profile.adapter is not None:
            return profile
        from catreview.adapters import active_adapter

        path = active_adapter(self.engine, profile.model)
        return profile if path is None else profile.model_copy(update={"adapter": path})

    def unload_vlms(self, keep: str | None = None) -> None:
        """Free the memory of every loaded VLM except ``keep``."""
        with self._lock:
            for name, vlm in self._vlms.items():
                if name != keep:
                    vlm.unload()
