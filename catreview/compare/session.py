"""Two VLM profiles side by side: per photo, in aggregate over the reviewed photos, and blind.

No Gradio here: :mod:`catreview.app.ui.compare_tab` and ``python -m catreview compare`` are thin
layers over this module. Which photo a request means (:meth:`CompareSession.pick_photo`), the
refusal while the app's background predictions hold the models (``busy``, :class:`ModelsBusy`)
and the messages after a blind choice (:meth:`CompareSession.try_record_preference`) are decided
here, so the tab only lays out and wires.

What is compared (two *profiles* of :attr:`Settings.vlm_profiles`, or two adapter versions of
one profile built by :func:`adapter_variant`):

* **Per photo** (:meth:`CompareSession.compare_photo`): stage-1 candidates, then for each side its
  verdict (probabilities over the candidates + ``"other"``), its streamed reasoning, latency and
  peak memory. Verdicts and reasoning go through the prediction cache of
  :mod:`catreview.predict.runner`, exactly like the rest of the tool: a cached output is shown at once
  with the latency measured when it was computed.
* **In aggregate** (:meth:`CompareSession.run_aggregate`, or :class:`AggregateJob` in the
  background): over photos whose latest review is a breed, accuracy and balanced accuracy of each
  side against the human label, per-breed accuracy, agreement between the two, mean and p95
  verdict latency. A verdict is correct when its label (canonicalised) equals the human label;
  ``"other"`` is never correct here (unlike :func:`catreview.evaluate.calibration.calibrate`, which
  counts ``"other"`` as right when the human label is outside the candidates).
  Routing is off: every reviewed photo gets both verdicts.
* **Blind** (:func:`blind_swapped`, :meth:`CompareSession.record_preference`): the sides are
  shown as "Model 1"/"Model 2" in a per-photo order derived deterministically from
  ``(seed, image id, the two profile names)``; names, model ids, versions, latency and memory
  are left out of the blind display (:func:`display_sides`) because each identifies a model.
  The annotator's choice is stored in ``preferences`` with both outputs in display order
  (``model_a`` = what was shown as Model 1) and exported as DPO pairs by
  :func:`export_preference_pairs`. No preference is recorded when both sides are the same model
  version or their outputs are the same text (:func:`preference_refusal`): such a pair would
  teach nothing, and the export leaves out any stored pair whose chosen and rejected texts match.

Memory figures (:class:`MemoryReading`): *peak* = the model's parameter + buffer bytes (weights
resident during inference) + *working* memory, the largest increase during inference over the
level just before it:

* CUDA: ``torch.cuda.max_memory_allocated(device)`` after ``reset_peak_memory_stats`` minus
  ``memory_allocated`` before (tensors allocated by PyTorch on that device);
* CPU: the process's resident set size (``psutil``), sampled every 5 ms in a thread, minus the
  RSS before. It is process-wide (other threads' allocations count) and allocator caching can
  hide growth that an earlier call already caused, so read it as an estimate.

Loading is timed separately and kept out of the memory meter, so weights are not counted twice.
With ``one_at_a_time`` only the side being run is resident: every other VLM (the registry's and
this session's) is unloaded before a side loads.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from catreview.config import DEMO_PROFILE, Settings, VLMProfile
from catreview.data.db import AdapterVersion, ImageRecord, Preference, get_image
from catreview.data.labels import BreedVocabulary, is_breed
from catreview.data.reviews import current_reviews
from catreview.errors import CatreviewError
from catreview.jobs import JobState
from catreview.models.vlm import prompts
from catreview.predict.runner import (
    PredictSummary,
    cached_predictions,
    candidates_key,
    run_stage1,
    run_vlm,
    store_reasoning,
)

if TYPE_CHECKING:
    import pandas as pd

    from catreview.models.registry import ModelRegistry
    from catreview.models.vlm.postclassifier import VLMPostClassifier

log = logging.getLogger(__name__)

BLIND_TITLES = ("Model 1", "Model 2")
PROBABILITIES_LABEL = "probabilities over the candidates"
"""Label of each side's probability panel, after the side's name (see :func:`side_display`)."""
SUMMARY_COLUMNS = ("side", "profile", "model_version", "photos", "accuracy", "balanced_accuracy", "agreement",
                   "mean_latency_ms", "p95_latency_ms", "computed", "cached", "peak_memory_mib")
"""Columns of :meth:`CompareAggregate.summary_frame`."""
CHOICES = ("1", "2", "tie")
"""Choices offered in blind mode: displayed Model 1, Model 2, or a tie."""

MEMORY_SAMPLE_S = 0.005
"""RSS sampling interval of :class:`MemoryMeter` on CPU (seconds)."""

Progress = Callable[[str, int, int], None]  # (stage, done, total)


def plural(n: int, word: str, many: str | None = None) -> str:
    """``"1 photo"``, ``"2 photos"``: ``n`` and ``word`` (``many``, default ``word + "s"``, unless 1)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def per_breed_columns(name_a: str, name_b: str) -> list[str]:
    """Columns of :meth:`CompareAggregate.per_breed_frame` for sides named ``name_a``/``name_b``
    (``"accuracy A: <name>"`` and ``"accuracy B: <name>"`` when both sides have the same name)."""
    if name_a == name_b:
        return ["breed", "photos", f"accuracy A: {name_a}", f"accuracy B: {name_b}"]
    return ["breed", "photos", f"accuracy {name_a}", f"accuracy {name_b}"]


class CompareError(CatreviewError, ValueError):
    """A comparison that cannot run as asked (unknown profile, bad adapter folder, no reviewed
    photos, unknown blind trial); the message says what to change."""


class ModelsBusy(CompareError):
    """Another job (the app's background predictions) is using the models; the message says to
    try again when it finishes. Shown as a plain notice, not a warning (:func:`error_notice`)."""


BUSY_PHOTO = "Background predictions are still running; compare when they finish."
"""Message of :class:`ModelsBusy` from :meth:`CompareSession.compare_photo`."""
BUSY_AGGREGATE = "Background predictions are still running; start the comparison when they finish."
"""What :meth:`AggregateJob.try_start` says while the background predictions run."""
ALREADY_RUNNING = "A comparison is already running."
"""What :meth:`AggregateJob.try_start` says while another aggregate run is going on."""


def error_notice(exc: CompareError) -> str:
    """How a refused comparison is shown: ``"⚠️ <message>"``, or the plain message for
    :class:`ModelsBusy` (waiting is not an error)."""
    return str(exc) if isinstance(exc, ModelsBusy) else f"⚠️ {exc}"


# --------------------------------------------------------------------------------------------
# Choosing the two profiles
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairChoice:
    """The default pair of profiles and, when the configured pair could not be used, why."""

    a: str
    b: str
    note: str = ""


def default_pair(preferred: Sequence[str], available: Sequence[str]) -> PairChoice:
    """The two profiles to compare by default.

    Args:
        preferred: ``Settings.compare_profiles`` (e.g. ``("7B", "13B")``).
        available: profile names in configuration order (``ModelRegistry.profiles()``).

    Returns:
        ``preferred`` when both are available and differ; else the first two available, with a
        note; with a single profile (the demo), that profile on both sides and a note saying so.

    Raises:
        CompareError: no profile at all.
    """
    names = list(available)
    a, b = preferred
    if a in names and b in names and a != b:
        return PairChoice(a, b)
    if len(names) >= 2:
        return PairChoice(
            names[0], names[1],
            f"compare_profiles {tuple(preferred)} are not both configured; comparing the first two "
            f"profiles, {names[0]!r} and {names[1]!r}.",
        )
    if names:
        only = names[0]
        what = "the demo profile (tiny random-weight LLaVA)" if only == DEMO_PROFILE else f"one profile ({only!r})"
        return PairChoice(
            only, only,
            f"Only {what} is available, so it is compared with itself. Configure two VLM profiles "
            "([vlm_profiles.7B] and [vlm_profiles.13B] in the TOML, see assets/example_config.toml) "
            "or build an adapter pair to compare two models.",
        )
    raise CompareError("no VLM profile is configured")


def adapter_variant(base_name: str, base: VLMProfile, adapter: str | Path | None) -> tuple[str, VLMProfile]:
    """A profile equal to ``base`` except for its LoRA ``adapter`` folder (``None``: no adapter).

    Returns:
        ``(name, profile)``; the name is ``"<base>+<folder name>@<8 hex of the adapter's files>"``
        (``"<base> (no adapter)"`` without one), so two folders with the same name differ.

    Raises:
        CompareError: the folder has no ``adapter_config.json``.
    """
    from catreview.models.vlm.postclassifier import VLMError, adapter_identity

    if adapter is None or str(adapter).strip() == "":
        return f"{base_name} (no adapter)", base.model_copy(update={"adapter": None})
    path = Path(adapter).expanduser().resolve()
    try:
        digest = adapter_identity(path)[:8]
    except VLMError as exc:
        raise CompareError(str(exc)) from exc
    return f"{base_name}+{path.name}@{digest}", base.model_copy(update={"adapter": path})


def known_adapters(engine: Engine) -> list[tuple[str, str]]:
    """``(label, folder)`` of the adapters recorded in the ``adapters`` table, newest first."""
    with Session(engine) as s:
        rows = s.exec(select(AdapterVersion).order_by(AdapterVersion.id.desc())).all()  # type: ignore[union-attr]
    return [(f"#{r.id} {Path(r.path).name}{' (active)' if r.active else ''} — {r.base_model}", r.path) for r in rows]


def blind_swapped(image_id: int, name_a: str, name_b: str, seed: int = 0) -> bool:
    """Whether side B is shown as "Model 1" for this photo (deterministic, ~50 % of photos).

    Derived from sha256 of ``(seed, image_id, name_a, name_b)``, so a reload shows the same order
    and the order is recorded with each preference anyway.
    """
    digest = hashlib.sha256(json.dumps([seed, image_id, name_a, name_b]).encode()).digest()
    return bool(digest[0] & 1)


def model_label(name: str, model_version: str) -> str:
    """How a model is named in ``preferences.model_a/model_b``: ``"<profile>|<model_version>"``."""
    return f"{name}|{model_version}"


def split_model_label(label: str) -> tuple[str, str]:
    """Inverse of :func:`model_label`: ``(profile name, model_version)``."""
    name, _, version = label.rpartition("|")
    return name, version


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def model_bytes(model: Any) -> int:
    """Bytes of a model's parameters and buffers (tied/shared tensors counted once)."""
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@dataclass(frozen=True)
class MemoryReading:
    """Peak memory of one model's inference, in bytes (see the module docstring).

    Attributes:
        device: ``"cpu"`` or ``"cuda:N"``.
        weights_bytes: parameters + buffers of the model (:func:`model_bytes`).
        working_bytes: largest increase above the level before inference (>= 0).
        method: how ``working_bytes`` was measured, in words.
    """

    device: str
    weights_bytes: int
    working_bytes: int
    method: str

    @property
    def peak_bytes(self) -> int:
        return self.weights_bytes + self.working_bytes

    def text(self) -> str:
        mb = 1024 * 1024
        return (
            f"peak {self.peak_bytes / mb:.1f} MiB = weights {self.weights_bytes / mb:.1f} MiB + "
            f"working {self.working_bytes / mb:.1f} MiB ({self.method})"
        )


class MemoryMeter:
    """Context manager measuring the working-memory increase of the code inside it.

    CUDA: resets the device's peak statistics on entry and reads
    ``max_memory_allocated - memory_allocated(before)`` on exit. CPU: samples the process RSS
    every :data:`MEMORY_SAMPLE_S` seconds in a daemon thread. Use :meth:`reading` after the block.
    """

    def __init__(self, device: Any) -> None:
        import torch

        self.device = torch.device(device)
        self._before = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def method(self) -> str:
        if self.device.type == "cuda":
            return "CUDA: torch.cuda.max_memory_allocated over inference"
        return f"CPU: process RSS growth over inference, sampled every {MEMORY_SAMPLE_S * 1000:.0f} ms"

    def __enter__(self) -> MemoryMeter:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self._before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            import psutil

            proc = psutil.Process()
            self._before = self._peak = proc.memory_info().rss

            def sample() -> None:
                while not self._stop.wait(MEMORY_SAMPLE_S):
                    self._peak = max(self._peak, proc.memory_info().rss)

            self._thread = threading.Thread(target=sample, name="catreview-rss-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
            self._peak = torch.cuda.max_memory_allocated(self.device)
        else:
            import psutil

            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self._peak = max(self._peak, psutil.Process().memory_info().rss)

    @property
    def working_bytes(self) -> int:
        """Largest increase over the level at entry (>= 0), valid after the block."""
        return max(0, self._peak - self._before)

    def reading(self, model: Any) -> MemoryReading:
        """The reading for ``model`` (its weights are added to the working memory)."""
        return MemoryReading(str(self.device), model_bytes(model), self.working_bytes, self.method)


# --------------------------------------------------------------------------------------------
# Per-photo comparison
# --------------------------------------------------------------------------------------------


@dataclass
class SideState:
    """One side of a per-photo comparison, updated while it runs.

    Seconds are wall time; for cached outputs they are those stored when the output was computed.
    ``status``: ``waiting``, ``loading``, ``scoring``, ``reasoning``, ``done``, ``stopped`` or
    ``error``.
    """

    name: str
    model_id: str
    model_version: str
    status: str = "waiting"
    verdict: dict[str, Any] | None = None
    verdict_seconds: float | None = None
    verdict_cached: bool = False
    reasoning: str = ""
    reasoning_seconds: float | None = None
    reasoning_cached: bool = False
    load_seconds: float | None = None
    memory: MemoryReading | None = None
    error: str | None = None

    @property
    def label(self) -> str:
        return model_label(self.name, self.model_version)


@dataclass
class PhotoComparison:
    """The state of one photo's comparison (what the UI renders after each update).

    ``sides`` holds side A then side B as chosen; ``swapped`` says whether B is displayed as
    "Model 1" in blind mode. ``trial_id`` is set once both sides finished (the key for
    :meth:`CompareSession.record_preference`), unless :func:`preference_refusal` finds nothing to
    judge: then ``preference_refused`` says why and ``trial_id`` stays ``None``.
    """

    image_id: int
    candidates: list[str]
    prompt: str
    sides: tuple[SideState, SideState]
    blind: bool
    swapped: bool
    one_at_a_time: bool
    human_label: str | None = None
    notes: list[str] = field(default_factory=list)
    trial_id: str | None = None
    preference_refused: str | None = None  # blind, finished, but nothing to judge (preference_refusal)

    def displayed(self) -> tuple[SideState, SideState]:
        """The sides in display order (blind order when ``blind``)."""
        a, b = self.sides
        return (b, a) if self.blind and self.swapped else (a, b)

    @property
    def finished(self) -> bool:
        return all(s.status == "done" for s in self.sides)


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _redact(text: str, secrets: Sequence[str], replacement: str) -> str:
    for s in sorted({s for s in secrets if s}, key=len, reverse=True):
        text = text.replace(s, replacement)
    return text


def probabilities_label(name: str) -> str:
    """``"<name>: probabilities over the candidates"`` (the label of a side's probability panel)."""
    return f"{name}: {PROBABILITIES_LABEL}"


def side_display(side: SideState, title: str, *, blind: bool, secrets: Sequence[str] = (),
                 letter: str = "") -> dict[str, Any]:
    """What one panel shows: ``{"title", "verdict", "probabilities", "probabilities_label",
    "reasoning", "stats"}``.

    ``verdict`` and ``stats`` are Markdown; ``probabilities`` is ``{candidate: p}`` or ``None``;
    ``probabilities_label`` names the side (``title`` when blind, else the profile name and
    ``letter``, "A" or "B"). Blind: ``stats`` (latency, memory, model) is left out and
    ``secrets`` (both sides' names, ids and versions) are replaced by ``title`` in any error text.
    """
    if side.error:
        err = _redact(side.error, secrets, title) if blind else side.error
        verdict = f"⚠️ {err}"
    elif side.verdict is None:
        verdict = f"*{side.status}…*"
    else:
        verdict = f"Verdict: **{side.verdict['label']}** ({side.verdict['confidence']:.1%})"
    stats = ""
    if not blind:
        cached = lambda c: " (cached; time measured when computed)" if c else ""  # noqa: E731
        lines = [
            f"`{side.name}` · {side.model_version}",
            f"- verdict latency: {_fmt_s(side.verdict_seconds)}{cached(side.verdict_cached)}",
            f"- reasoning latency: {_fmt_s(side.reasoning_seconds)}{cached(side.reasoning_cached)}",
        ]
        if side.load_seconds is not None:
            lines.append(f"- load: {_fmt_s(side.load_seconds)} (loaded for this run: its first call includes warm-up)")
        lines.append(
            f"- memory: {side.memory.text()}" if side.memory
            else "- memory: not measured (nothing ran: outputs were cached)" if side.status == "done"
            else "- memory: —"
        )
        stats = "\n".join(lines)
    probs = dict(zip(side.verdict["candidates"], side.verdict["probabilities"])) if side.verdict else None
    named = title if blind else f"{side.name} ({letter})" if letter else side.name
    return {"title": title, "verdict": verdict, "probabilities": probs, "probabilities_label": probabilities_label(named),
            "reasoning": side.reasoning, "stats": stats}


def display_sides(comp: PhotoComparison) -> dict[str, Any]:
    """The UI payload of a comparison: ``{"left", "right", "notice", "trial_id", "can_prefer",
    "preference_note"}``.

    Blind mode: titles "Model 1"/"Model 2", no stats, nothing that names a model.
    ``preference_note``: why no preference can be recorded for a finished blind comparison
    (both sides the same model, or the same text), else ``""``.
    """
    secrets = [v for s in comp.sides for v in (s.name, s.model_id, s.model_version, s.label, Path(s.model_id).name)]
    panels = []
    for i, side in enumerate(comp.displayed()):
        letter = "A" if side is comp.sides[0] else "B"  # identity: equal states of one profile are two sides
        title = BLIND_TITLES[i] if comp.blind else f"{letter}: {side.name}"
        panels.append(side_display(side, title, blind=comp.blind, secrets=secrets, letter=letter))
    notes = list(comp.notes)
    if comp.blind:
        notes.append("Blind mode: sides are unnamed and in a per-photo order; latency and memory are "
                     "hidden because they would tell the models apart."
                     + ("" if comp.preference_refused else " Pick the better reasoning."))
    if comp.human_label:
        notes.append(f"Human label: **{comp.human_label}**")
    return {
        "left": panels[0],
        "right": panels[1],
        "notice": "\n\n".join(notes),
        "trial_id": comp.trial_id or "",
        "can_prefer": bool(comp.blind and comp.trial_id),
        "preference_note": f"⚠️ No preference can be recorded: {comp.preference_refused}." if comp.preference_refused else "",
    }


@dataclass(frozen=True)
class BlindTrial:
    """A finished blind comparison awaiting the annotator's choice (kept server-side)."""

    image_id: int
    prompt: str
    shown: tuple[tuple[str, str], tuple[str, str]]  # ((model label, reasoning), ...) in display order


def preference_refusal(shown: Sequence[tuple[str, str]]) -> str | None:
    """Why a blind choice between ``shown`` (``(model label, output)`` of Model 1 and Model 2)
    would be a useless training pair, or ``None`` when it is a real choice.

    Refused: both sides are the same model version (:func:`model_label`; two profile names for
    the same checkpoint count as the same), or both outputs are the same text (ignoring
    surrounding whitespace), since chosen would equal rejected.
    """
    (label_1, out_1), (label_2, out_2) = shown
    if split_model_label(label_1)[1] == split_model_label(label_2)[1]:
        return ("both sides are the same model version, so there is nothing to choose between; "
                "pick two different profiles (or two adapter versions) to record preferences")
    if (out_1 or "").strip() == (out_2 or "").strip():
        return "both outputs are the same text, so a chosen/rejected pair would teach nothing"
    return None


@dataclass(frozen=True)
class PreferenceResult:
    """Outcome of :meth:`CompareSession.try_record_preference`: the stored row, or why not.

    Exactly one of ``preference`` and ``error`` is set.
    """

    preference: Preference | None = None
    error: str | None = None

    @property
    def saved(self) -> bool:
        """Whether a preference was stored."""
        return self.preference is not None

    def text(self) -> str:
        """The tab's message: ``"Saved preference #7: Model 2 (photo 3, by alice)."`` (``a tie``
        for a tie), or ``"⚠️ <why not>"``."""
        pref = self.preference
        if pref is None:
            return f"⚠️ {self.error}"
        said = {"a": "Model 1", "b": "Model 2", "tie": "a tie"}[pref.choice]
        return f"Saved preference #{pref.id}: {said} (photo {pref.image_id}, by {pref.annotator})."

    def api_text(self) -> str:
        """The API's answer: ``"saved preference #7"`` or ``"error: <why not>"``."""
        return f"saved preference #{self.preference.id}" if self.preference is not None else f"error: {self.error}"


@dataclass(frozen=True)
class PhotoPick:
    """A photo chosen for comparison (:meth:`CompareSession.pick_photo`).

    Attributes:
        position: its index in :meth:`CompareSession.photo_ids` (0-based).
        image_id: its database id.
        total: how many decodable photos there are (>= 1).
    """

    position: int
    image_id: int
    total: int


# --------------------------------------------------------------------------------------------
# Aggregate over reviewed photos
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PhotoOutcome:
    """Both verdicts for one reviewed photo. Labels are canonical class names or ``"other"``."""

    image_id: int
    path: str
    human: str
    candidates: list[str]
    label_a: str
    confidence_a: float
    seconds_a: float
    label_b: str
    confidence_b: float
    seconds_b: float

    @property
    def correct_a(self) -> bool:
        return self.label_a == self.human

    @property
    def correct_b(self) -> bool:
        return self.label_b == self.human

    @property
    def agree(self) -> bool:
        return self.label_a == self.label_b


@dataclass(frozen=True)
class SideRun:
    """One side of an aggregate run: identity, cache use, time and memory.

    ``computed``/``cached``: verdicts computed now / read from the cache. ``seconds``: scoring
    wall time of this run (0 when all cached). ``memory``: ``None`` when nothing was computed.
    """

    name: str
    model_id: str
    model_version: str
    computed: int = 0
    cached: int = 0
    seconds: float = 0.0
    load_seconds: float | None = None
    memory: MemoryReading | None = None


@dataclass(frozen=True)
class AggregateMetrics:
    """Metrics over ``n`` photos; pairs are (side A, side B).

    Accuracies in [0, 1]; latencies in seconds per photo (stored verdict seconds: batched work
    divided evenly over its photos); p95 by linear interpolation (``numpy.percentile``).
    ``per_breed``: ``{breed: (photos, accuracy A, accuracy B)}``, breeds sorted.
    """

    n: int
    accuracy: tuple[float, float]
    balanced_accuracy: tuple[float, float]
    agreement: float
    mean_latency_s: tuple[float, float]
    p95_latency_s: tuple[float, float]
    per_breed: dict[str, tuple[int, float, float]]


def aggregate_metrics(photos: Sequence[PhotoOutcome]) -> AggregateMetrics:
    """Accuracy, balanced accuracy, per-breed accuracy, agreement and latency of both sides.

    Raises:
        CompareError: no photos.
    """
    import numpy as np

    from catreview.evaluate.calibration import balanced_accuracy, per_class_accuracy

    if not photos:
        raise CompareError("no reviewed photo with a breed label has verdicts from both models")
    human = [p.human for p in photos]
    pred_a, pred_b = [p.label_a for p in photos], [p.label_b for p in photos]
    per_a, per_b = per_class_accuracy(human, pred_a), per_class_accuracy(human, pred_b)
    lat_a = np.array([p.seconds_a for p in photos])
    lat_b = np.array([p.seconds_b for p in photos])
    return AggregateMetrics(
        n=len(photos),
        accuracy=(float(np.mean([p.correct_a for p in photos])), float(np.mean([p.correct_b for p in photos]))),
        balanced_accuracy=(balanced_accuracy(human, pred_a), balanced_accuracy(human, pred_b)),
        agreement=float(np.mean([p.agree for p in photos])),
        mean_latency_s=(float(lat_a.mean()), float(lat_b.mean())),
        p95_latency_s=(float(np.percentile(lat_a, 95)), float(np.percentile(lat_b, 95))),
        per_breed={str(c): (per_a[c][1], per_a[c][2], per_b[c][2]) for c in per_a},
    )


ACCURACY_NOTE = ("Accuracy here: a verdict is right only when it names the reviewed breed; 'other' never counts "
                 "(calibrate counts 'other' as right when the breed is not a stage-1 candidate, so its VLM "
                 "accuracy is higher on the same photos).")


@dataclass(frozen=True)
class CompareAggregate:
    """Result of an aggregate run: both sides, per-photo outcomes, metrics, what was skipped."""

    a: SideRun
    b: SideRun
    photos: list[PhotoOutcome]
    metrics: AggregateMetrics
    skipped: list[tuple[int, str]] = field(default_factory=list)  # (image id, reason)
    cancelled: bool = False
    notes: list[str] = field(default_factory=list)  # photos left out on purpose, and why

    def summary_frame(self) -> pd.DataFrame:
        """One row per side: profile, version, photos, accuracy, balanced accuracy, agreement,
        mean/p95 latency (ms), verdicts computed/cached in this run, peak memory (MiB)."""
        import pandas as pd

        m = self.metrics
        rows = []
        for i, side in enumerate((self.a, self.b)):
            rows.append({
                "side": "AB"[i], "profile": side.name, "model_version": side.model_version, "photos": m.n,
                "accuracy": round(m.accuracy[i], 4), "balanced_accuracy": round(m.balanced_accuracy[i], 4),
                "agreement": round(m.agreement, 4),
                "mean_latency_ms": round(m.mean_latency_s[i] * 1000, 1),
                "p95_latency_ms": round(m.p95_latency_s[i] * 1000, 1),
                "computed": side.computed, "cached": side.cached,
                "peak_memory_mib": round(side.memory.peak_bytes / 2**20, 1) if side.memory else None,
            })
        return pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))

    def per_breed_frame(self) -> pd.DataFrame:
        """``breed, photos, accuracy <A>, accuracy <B>``."""
        import pandas as pd

        cols = per_breed_columns(self.a.name, self.b.name)
        return pd.DataFrame([[b, n, round(x, 4), round(y, 4)] for b, (n, x, y) in self.metrics.per_breed.items()],
                            columns=cols)

    def photos_frame(self) -> pd.DataFrame:
        """One row per photo: id, path, human label, candidates, both verdicts, correctness,
        seconds, agreement."""
        import pandas as pd

        return pd.DataFrame([
            {
                "image_id": p.image_id, "path": p.path, "human_label": p.human, "candidates": " | ".join(p.candidates),
                "label_a": p.label_a, "confidence_a": round(p.confidence_a, 6), "correct_a": p.correct_a,
                "seconds_a": round(p.seconds_a, 6),
                "label_b": p.label_b, "confidence_b": round(p.confidence_b, 6), "correct_b": p.correct_b,
                "seconds_b": round(p.seconds_b, 6), "agree": p.agree,
            }
            for p in self.photos
        ])

    def plot_frame(self) -> pd.DataFrame:
        """Long table for a bar plot: ``group`` ("accuracy", "balanced accuracy", then each breed
        with the side), ``accuracy``, ``model``. One row per bar, so bars never stack."""
        import pandas as pd

        m = self.metrics
        rows = []
        for i, side in enumerate((self.a, self.b)):
            tag = f"{'AB'[i]}: {side.name}"
            rows.append({"group": f"all · {'AB'[i]}", "accuracy": m.accuracy[i], "model": tag})
            rows.append({"group": f"balanced · {'AB'[i]}", "accuracy": m.balanced_accuracy[i], "model": tag})
        for breed, (_, x, y) in m.per_breed.items():
            rows.append({"group": f"{breed} · A", "accuracy": x, "model": f"A: {self.a.name}"})
            rows.append({"group": f"{breed} · B", "accuracy": y, "model": f"B: {self.b.name}"})
        order = {"all": 0, "balanced": 1}
        rows.sort(key=lambda r: (order.get(r["group"].split(" · ")[0], 2), r["group"]))
        return pd.DataFrame(rows)

    def write_csv(self, out_dir: str | Path) -> list[Path]:
        """Write ``compare_summary.csv``, ``compare_per_breed.csv`` and ``compare_photos.csv``
        into ``out_dir`` (created); returns the paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = []
        for stem, frame in (("summary", self.summary_frame()), ("per_breed", self.per_breed_frame()),
                            ("photos", self.photos_frame())):
            path = out / f"compare_{stem}.csv"
            frame.to_csv(path, index=False)
            paths.append(path)
        return paths

    def to_text(self) -> str:
        """The aggregate as plain-text tables (the CLI output)."""
        lines = [f"A = {self.a.name} ({self.a.model_version}), B = {self.b.name} ({self.b.model_version})",
                 f"{plural(self.metrics.n, 'reviewed photo')}; agreement A vs B: {self.metrics.agreement:.1%}",
                 ACCURACY_NOTE]
        lines += self.notes
        if self.skipped:
            lines.append(f"{plural(len(self.skipped), 'reviewed photo')} skipped (no verdict): "
                         + ", ".join(f"#{i} {r}" for i, r in self.skipped[:5]))
        if self.cancelled:
            lines.append("cancelled before the end: metrics cover the photos done so far")
        cols = ["side", "profile", "photos", "accuracy", "balanced_accuracy", "mean_latency_ms",
                "p95_latency_ms", "computed", "cached", "peak_memory_mib"]
        lines += ["", self.summary_frame()[cols].to_string(index=False), "",
                  self.per_breed_frame().to_string(index=False)]
        return "\n".join(lines)


def photo_outcomes(
    images: Sequence[ImageRecord],
    human: dict[int, str],
    topk: dict[int, list[tuple[str, float]]],
    preds_a: dict[int, Any],
    preds_b: dict[int, Any],
    canonical: Callable[[str], str],
) -> tuple[list[PhotoOutcome], list[tuple[int, str]]]:
    """Join stored verdicts (``Prediction`` rows) with human labels.

    Returns ``(outcomes, skipped)``; a photo without stage 1 or either verdict is skipped with a
    reason. Verdict labels go through ``canonical`` (folder-style stage-1 names).
    """
    outcomes, skipped = [], []
    for rec in images:
        rid: int = rec.id  # type: ignore[assignment]
        missing = [what for what, ok in (("stage 1", rid in topk), ("verdict A", rid in preds_a),
                                         ("verdict B", rid in preds_b)) if not ok]
        if missing:
            skipped.append((rid, "no " + ", ".join(missing)))
            continue
        pa, pb = preds_a[rid].payload, preds_b[rid].payload
        outcomes.append(PhotoOutcome(
            image_id=rid, path=rec.path, human=human[rid], candidates=[lab for lab, _ in topk[rid]],
            label_a=canonical(pa["label"]), confidence_a=float(pa["confidence"]), seconds_a=float(preds_a[rid].seconds),
            label_b=canonical(pb["label"]), confidence_b=float(pb["confidence"]), seconds_b=float(preds_b[rid].seconds),
        ))
    return outcomes, skipped


# --------------------------------------------------------------------------------------------
# Preference export
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PreferenceExport:
    """What :func:`export_preference_pairs` wrote: pairs, ties left out, superseded choices, and
    pairs left out because chosen == rejected (``identical``)."""

    path: Path
    pairs: int
    ties: int
    superseded: int
    identical: int = 0

    def text(self) -> str:
        return (f"Wrote {plural(self.pairs, 'preference pair')} to {self.path}; {plural(self.ties, 'tie')} left out; "
                f"{plural(self.identical, 'pair')} with chosen == rejected left out; "
                f"{plural(self.superseded, 'earlier choice')} superseded by a later one of the same annotator.")


def latest_preferences(session: Session) -> tuple[list[Preference], int]:
    """The newest preference per (photo, annotator, unordered model pair); returns ``(rows,
    superseded)`` with rows by id."""
    newest: dict[tuple[int, str, frozenset[str]], Preference] = {}
    rows = session.exec(select(Preference).order_by(Preference.id)).all()  # type: ignore[arg-type]
    for r in rows:
        newest[(r.image_id, r.annotator, frozenset((r.model_a, r.model_b)))] = r
    kept = sorted(newest.values(), key=lambda r: r.id or 0)
    return kept, len(rows) - len(kept)


def preference_pair(pref: Preference, image: ImageRecord) -> dict[str, Any] | None:
    """One DPO record (TRL's prompt/chosen/rejected, plus ``image`` and ``metadata``), or
    ``None`` for a tie.

    ``metadata``: preference id, image id and sha256, annotator, chosen/rejected model labels
    (``"<profile>|<model_version>"``), the display order (``model_1``, ``model_2``), time.
    """
    if pref.choice == "tie":
        return None
    if pref.choice not in ("a", "b"):
        raise ValueError(f"preference #{pref.id} has choice {pref.choice!r}; expected a, b or tie")
    a_wins = pref.choice == "a"
    return {
        "prompt": pref.prompt,
        "chosen": pref.output_a if a_wins else pref.output_b,
        "rejected": pref.output_b if a_wins else pref.output_a,
        "image": image.path,
        "metadata": {
            "preference_id": pref.id, "image_id": pref.image_id, "sha256": image.sha256,
            "annotator": pref.annotator,
            "chosen_model": pref.model_a if a_wins else pref.model_b,
            "rejected_model": pref.model_b if a_wins else pref.model_a,
            "model_1": pref.model_a, "model_2": pref.model_b,
            "created_at": pref.created_at.isoformat() if isinstance(pref.created_at, datetime) else str(pref.created_at),
        },
    }


def export_preference_pairs(engine: Engine, path: str | Path) -> PreferenceExport:
    """Write the blind preferences as JSONL, one DPO pair per line.

    Only the newest choice of an annotator for a photo and model pair is exported. Ties and pairs
    whose chosen and rejected texts are equal (ignoring surrounding whitespace; e.g. a model
    compared with itself) are left out and counted.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    pairs = ties = identical = 0
    with Session(engine) as s:
        prefs, superseded = latest_preferences(s)
        with out.open("w", encoding="utf-8") as fh:
            for pref in prefs:
                record = preference_pair(pref, get_image(s, pref.image_id))
                if record is None:
                    ties += 1
                    continue
                if (record["chosen"] or "").strip() == (record["rejected"] or "").strip():
                    identical += 1
                    continue
                fh.write(json.dumps(record, ensure_ascii=False) + "\n")
                pairs += 1
    return PreferenceExport(out, pairs, ties, superseded, identical)


# --------------------------------------------------------------------------------------------
# The session: models, per-photo runs, aggregate runs, preferences
# --------------------------------------------------------------------------------------------


class CompareSession:
    """Everything the Compare tab and the CLI do, over one database and model registry.

    Models of configured profiles are the registry's instances (shared with the Review tab);
    adapter variants (:meth:`add_adapter_pair`) get their own. A lock lets one comparison run
    models at a time (per-photo or aggregate).

    Args:
        settings: the loaded settings (``compare_profiles``, ``classifier.top_k``).
        registry: the :class:`~catreview.models.registry.ModelRegistry`.
        engine: database engine.
        vocabulary: canonicalises verdict labels before they are compared with human labels.
        blind_seed: seed of :func:`blind_swapped`.
        busy: called before a run; ``True`` while another job (the app's background predictions)
            uses the models, and runs are then refused (:class:`ModelsBusy`,
            :meth:`AggregateJob.try_start`). ``None``: never busy (the CLI).
    """

    def __init__(
        self,
        settings: Settings,
        registry: ModelRegistry,
        engine: Engine,
        vocabulary: BreedVocabulary | None = None,
        *,
        blind_seed: int = 0,
        busy: Callable[[], bool] | None = None,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.engine = engine
        self.vocabulary = vocabulary or BreedVocabulary.default()
        self.blind_seed = blind_seed
        self.busy: Callable[[], bool] = busy or (lambda: False)
        self.run_lock = threading.Lock()
        self._extra: dict[str, VLMProfile] = {}
        self._own: dict[str, VLMPostClassifier] = {}
        self._trials: dict[str, BlindTrial] = {}
        self._lock = threading.Lock()

    # ---- profiles and models ---------------------------------------------------------------

    def profiles(self) -> dict[str, VLMProfile]:
        """Configured profiles (registry order), then adapter variants added here."""
        return {**self.registry.profiles(), **self._extra}

    def default_pair(self) -> PairChoice:
        """:func:`default_pair` over :meth:`profiles`."""
        return default_pair(self.settings.compare_profiles, list(self.profiles()))

    def add_adapter_pair(self, base_name: str, adapter_a: str | Path | None, adapter_b: str | Path | None) -> tuple[str, str]:
        """Register two variants of profile ``base_name`` differing only by adapter folder.

        Returns:
            Their profile names (see :func:`adapter_variant`).

        Raises:
            CompareError: unknown base profile, bad adapter folder, or both sides identical.
        """
        base = self.registry.profiles().get(base_name)
        if base is None:
            raise CompareError(f"no VLM profile named {base_name!r}; configured: {sorted(self.registry.profiles())}")
        (na, pa), (nb, pb) = adapter_variant(base_name, base, adapter_a), adapter_variant(base_name, base, adapter_b)
        if na == nb:
            raise CompareError("both sides would use the same adapter; choose two different adapter versions")
        with self._lock:
            self._extra[na], self._extra[nb] = pa, pb
        return na, nb

    def vlm(self, name: str) -> VLMPostClassifier:
        """The VLM of profile ``name`` (lazily loaded).

        Raises:
            CompareError: no such profile.
        """
        from catreview.models.vlm.postclassifier import VLMPostClassifier

        if name in self._extra:
            with self._lock:
                if name not in self._own:
                    self._own[name] = VLMPostClassifier(self._extra[name], name=name)
                return self._own[name]
        try:
            return self.registry.vlm(name)
        except KeyError as exc:
            raise CompareError(f"no VLM profile named {name!r}; available: {list(self.profiles())}") from exc

    def keep_only_resident(self, name: str) -> None:
        """Unload every VLM except ``name``'s: the registry's and this session's own."""
        self.registry.unload_vlms(keep=name)
        for other, vlm in list(self._own.items()):
            if other != name:
                vlm.unload()

    def _prepare_model(self, name: str, one_at_a_time: bool) -> tuple[VLMPostClassifier, float | None]:
        """The loaded VLM and its load time (``None`` when it was already loaded)."""
        vlm = self.vlm(name)
        if one_at_a_time:
            self.keep_only_resident(name)
        if vlm.loaded:
            return vlm, None
        t0 = time.perf_counter()
        vlm.load()
        return vlm, time.perf_counter() - t0

    # ---- photos ----------------------------------------------------------------------------

    def _human_labels(self, session: Session) -> dict[int, str]:
        return {i: r.label for i, r in current_reviews(session).items() if is_breed(r.label)}

    def human_labels(self) -> dict[int, str]:
        """``{image id: breed}`` of photos whose latest review is a breed."""
        with Session(self.engine) as s:
            return self._human_labels(s)

    @staticmethod
    def _photo_ids(session: Session) -> list[int]:
        q = select(ImageRecord.id).where(ImageRecord.error.is_(None)).order_by(ImageRecord.id)  # type: ignore[union-attr, arg-type]
        return list(session.exec(q))

    def photo_ids(self) -> list[int]:
        """Ids of the decodable photos, in import order (the positions the tab steps through;
        the same list as :meth:`catreview.app.core.ReviewApp.image_ids`)."""
        with Session(self.engine) as s:
            return self._photo_ids(s)

    def reviewed_image_ids(self) -> list[int]:
        """Decodable photos whose latest review is a breed, by id."""
        with Session(self.engine) as s:
            human = self._human_labels(s)
            return [i for i in self._photo_ids(s) if i in human]

    def pick_photo(self, image_id: float | None, position: int | None = 0) -> PhotoPick:
        """The photo a request means: ``image_id`` when given (not ``None`` or 0), else the photo
        at ``position`` (clamped to the photo list; ``None`` counts as 0).

        Raises:
            CompareError: no photos yet (``"No photos yet."``), or no decodable photo with
                ``image_id`` (``"No photo with id 7."``).
        """
        ids = self.photo_ids()
        if not image_id:
            if not ids:
                raise CompareError("No photos yet.")
            pos = max(0, min(int(position or 0), len(ids) - 1))
            return PhotoPick(pos, ids[pos], len(ids))
        if int(image_id) not in ids:
            raise CompareError(f"No photo with id {int(image_id)}.")
        return PhotoPick(ids.index(int(image_id)), int(image_id), len(ids))

    def typed_photo(self, image_id: float | None) -> PhotoPick:
        """The photo whose id was typed (no fallback to a position).

        Raises:
            CompareError: no id (``"Type a photo id first (ids run from 1 to 9)."``) or an
                unknown one (``"No photo with id 99 (ids run from 1 to 9)."``; "no photos are
                imported yet" instead of the range when there are none).
        """
        ids = self.photo_ids()
        span = f"ids run from {ids[0]} to {ids[-1]}" if ids else "no photos are imported yet"
        if image_id is None:
            raise CompareError(f"Type a photo id first ({span}).")
        if int(image_id) not in ids:
            raise CompareError(f"No photo with id {int(image_id)} ({span}).")
        return PhotoPick(ids.index(int(image_id)), int(image_id), len(ids))

    def first_reviewed_position(self) -> int:
        """Position (in :meth:`photo_ids`) of the first photo whose latest review is a breed;
        0 when none is."""
        with Session(self.engine) as s:
            human = self._human_labels(s)
            ids = self._photo_ids(s)
        return next((p for p, i in enumerate(ids) if i in human), 0)

    def photo_notice(self, pick: PhotoPick) -> str:
        """Markdown under a photo before it is compared: where it is, its human label, what to do.

        E.g. ``"Photo 3 of 4 (id 7; 1 reviewed photo in all) · human label: **Sphynx**. Press
        **Compare this photo** to run both models on it."``
        """
        human = self.human_labels()
        label = human.get(pick.image_id)
        return (f"Photo {pick.position + 1} of {pick.total} (id {pick.image_id}; {plural(len(human), 'reviewed photo')} in all) · "
                + (f"human label: **{label}**" if label else "not reviewed yet")
                + ". Press **Compare this photo** to run both models on it.")

    def canonical(self, label: str) -> str:
        """``label`` as a canonical class name when the vocabulary knows it, else unchanged."""
        return self.vocabulary.canonical(label) if label != prompts.OTHER_LABEL and label in self.vocabulary else label

    def _stage1(self, session: Session, rec: ImageRecord) -> list[tuple[str, float]]:
        """Stage-1 top-k of one photo (cached or computed and stored)."""
        topk = run_stage1(session, self.registry.classifier(), [rec], PredictSummary(),
                          top_k=self.settings.classifier.top_k)
        if rec.id not in topk:
            raise CompareError(f"stage 1 could not run on photo #{rec.id} ({rec.path})")
        return topk[rec.id]  # type: ignore[index]

    # ---- per photo -------------------------------------------------------------------------

    def compare_photo(
        self,
        image_id: int,
        name_a: str,
        name_b: str,
        *,
        blind: bool = False,
        one_at_a_time: bool = False,
        stop: threading.Event | None = None,
    ) -> Iterator[PhotoComparison]:
        """Compare the two profiles on one photo, yielding the state after every change.

        Sides run one after the other (A then B; in blind mode in display order), so their
        latencies do not compete for the same cores. Cached verdicts and reasoning are reused;
        new ones are stored. Errors of one side (e.g. out of memory) are shown on that side.
        ``stop`` ends the running generation; a stopped reasoning is not stored.

        Raises:
            ModelsBusy: ``busy()`` is true (nothing is run; raised on the first ``next``).
            CompareError: unknown profile or photo, or stage 1 failed on the photo.
        """
        if self.busy():
            raise ModelsBusy(BUSY_PHOTO)
        stop = stop or threading.Event()
        with Session(self.engine) as s:
            try:
                rec = get_image(s, image_id)
            except KeyError as exc:
                raise CompareError(str(exc)) from exc
            if rec.error is not None:
                raise CompareError(f"photo #{image_id} could not be decoded: {rec.error}")
            topk = self._stage1(s, rec)
            human = self._human_labels(s).get(image_id)
        candidates = [lab for lab, _ in topk]
        vlms = (self.vlm(name_a), self.vlm(name_b))
        comp = PhotoComparison(
            image_id=image_id, candidates=candidates, prompt=prompts.reasoning_text(prompts.with_other(candidates)),
            sides=tuple(SideState(n, v.model_id, v.model_version) for n, v in zip((name_a, name_b), vlms)),  # type: ignore[arg-type]
            blind=blind, swapped=blind_swapped(image_id, name_a, name_b, self.blind_seed),
            one_at_a_time=one_at_a_time, human_label=human,
        )
        if name_a == name_b:
            comp.notes.append("Both sides use the same profile: the outputs are identical"
                              + (", so no blind preference can be recorded." if blind else "."))
        elif vlms[0].model_version == vlms[1].model_version:
            comp.notes.append("Both profiles are the same model version: the outputs are identical"
                              + (", so no blind preference can be recorded." if blind else "."))
        if one_at_a_time:
            comp.notes.append("Loading one model at a time: each side's model is loaded, run, and "
                              "unloaded before the other side loads (slower, half the memory).")
        yield comp
        for side in comp.displayed():
            if stop.is_set():
                side.status = "stopped"
                continue
            yield from self._run_side(rec, topk, comp, side, one_at_a_time, stop)
        if comp.blind and comp.finished:
            comp.preference_refused = preference_refusal([(s.label, s.reasoning) for s in comp.displayed()])
            if comp.preference_refused is None:
                comp.trial_id = self._new_trial(comp)
        yield comp

    def _run_side(self, rec: ImageRecord, topk: list[tuple[str, float]], comp: PhotoComparison, side: SideState,
                  one_at_a_time: bool, stop: threading.Event) -> Iterator[PhotoComparison]:
        """Verdict, then reasoning, of one side (cached where possible), under the run lock."""
        vlm = self.vlm(side.name)
        key = candidates_key(comp.candidates)
        if not self.run_lock.acquire(blocking=False):
            side.status = "waiting for another comparison to finish"
            yield comp
            self.run_lock.acquire()
        try:
            try:
                with Session(self.engine) as s:
                    verdict = cached_predictions(s, "vlm", vlm.model_id, vlm.model_version, [rec.id]).get((rec.id, key))  # type: ignore[list-item]
                    reasoning = cached_predictions(s, "reasoning", vlm.model_id, vlm.model_version, [rec.id]).get((rec.id, key))  # type: ignore[list-item]
                if verdict is not None:
                    side.verdict, side.verdict_seconds, side.verdict_cached = verdict.payload, verdict.seconds, True
                if reasoning is not None:
                    side.reasoning, side.reasoning_seconds, side.reasoning_cached = reasoning.payload["text"], reasoning.seconds, True
                if verdict is None or reasoning is None:
                    side.status = "loading"
                    yield comp
                    vlm, side.load_seconds = self._prepare_model(side.name, one_at_a_time)
                    with MemoryMeter(vlm.device) as meter:
                        if verdict is None:
                            side.status = "scoring"
                            yield comp
                            side.verdict, side.verdict_seconds = self._score(rec, topk, vlm)
                        if reasoning is None:
                            side.status = "reasoning"
                            yield from self._stream(rec, comp, side, vlm, stop)
                    side.memory = meter.reading(vlm.model)
                side.status = "stopped" if stop.is_set() and not side.reasoning_cached else "done"
            except Exception as exc:  # one side's failure (OOM, bad adapter) is shown on that side and logged
                side.status, side.error = "error", f"{type(exc).__name__}: {exc}"
                log.exception("comparison side %r failed on photo %s", side.name, rec.id)
        finally:
            self.run_lock.release()
        yield comp

    def _score(self, rec: ImageRecord, topk: list[tuple[str, float]], vlm: VLMPostClassifier) -> tuple[dict[str, Any], float]:
        """Verdict via :func:`catreview.predict.runner.run_vlm` (stored in the cache); ``(payload, s)``."""
        with Session(self.engine) as s:
            pred = run_vlm(s, vlm, [rec], {rec.id: topk}, PredictSummary(), routing_threshold=None)[rec.id]  # type: ignore[dict-item, index]
            return pred.payload, pred.seconds

    def _stream(self, rec: ImageRecord, comp: PhotoComparison, side: SideState, vlm: VLMPostClassifier,
                stop: threading.Event) -> Iterator[PhotoComparison]:
        from catreview.data.images import load_rgb

        t0 = time.perf_counter()
        for text in vlm.stream_reasoning(load_rgb(rec.path), comp.candidates, stop_event=stop):
            side.reasoning = text
            yield comp
        side.reasoning_seconds = time.perf_counter() - t0
        if not stop.is_set():
            with Session(self.engine) as s:
                store_reasoning(s, vlm, rec.id, comp.candidates, side.reasoning, side.reasoning_seconds)  # type: ignore[arg-type]

    # ---- blind preferences -----------------------------------------------------------------

    def _new_trial(self, comp: PhotoComparison) -> str:
        shown = tuple((s.label, s.reasoning) for s in comp.displayed())
        trial_id = uuid.uuid4().hex
        with self._lock:
            if len(self._trials) > 10_000:  # bounded: drop the oldest
                self._trials.pop(next(iter(self._trials)))
            self._trials[trial_id] = BlindTrial(comp.image_id, comp.prompt, shown)  # type: ignore[arg-type]
        return trial_id

    def record_preference(self, trial_id: str, choice: str, annotator: str) -> Preference:
        """Store the annotator's choice for a finished blind comparison.

        Args:
            trial_id: :attr:`PhotoComparison.trial_id`.
            choice: ``"1"`` (Model 1 better), ``"2"``, or ``"tie"``.
            annotator: who chose (non-empty).

        Returns:
            The stored :class:`~catreview.data.db.Preference` (``model_a`` = shown as Model 1,
            ``choice`` a/b/tie).

        Raises:
            CompareError: unknown trial (none finished in blind mode), bad choice, no annotator,
                or a pair with nothing to choose between (:func:`preference_refusal`).
        """
        annotator = (annotator or "").strip()
        if not annotator:
            raise CompareError("enter your annotator name before choosing")
        if choice not in CHOICES:
            raise CompareError(f"choice must be one of {CHOICES}, not {choice!r}")
        trial = self._trials.get(trial_id or "")
        if trial is None:
            raise CompareError("no finished blind comparison to judge: tick 'Blind mode' and run the comparison first")
        refused = preference_refusal(trial.shown)
        if refused:
            raise CompareError(f"no preference recorded: {refused}")
        (model_1, out_1), (model_2, out_2) = trial.shown
        pref = Preference(
            image_id=trial.image_id, annotator=annotator, model_a=model_1, model_b=model_2,
            output_a=out_1, output_b=out_2, prompt=trial.prompt, choice={"1": "a", "2": "b", "tie": "tie"}[choice],
        )
        with Session(self.engine) as s:
            s.add(pref)
            s.commit()
            s.refresh(pref)
        return pref

    def try_record_preference(self, trial_id: str, choice: str, annotator: str) -> PreferenceResult:
        """:meth:`record_preference`, with a refusal returned instead of raised (what the tab's
        buttons and the ``compare_prefer`` API show: :meth:`PreferenceResult.text`,
        :meth:`PreferenceResult.api_text`)."""
        try:
            return PreferenceResult(preference=self.record_preference(trial_id, choice, annotator))
        except CompareError as exc:
            return PreferenceResult(error=str(exc))

    # ---- aggregate -------------------------------------------------------------------------

    def _missing_verdicts(self, session: Session, vlm: VLMPostClassifier, images: Sequence[ImageRecord],
                          topk: dict[int, list[tuple[str, float]]]) -> int:
        have = cached_predictions(session, "vlm", vlm.model_id, vlm.model_version, [i.id for i in images])  # type: ignore[misc]
        return sum(1 for r in images if r.id in topk and (r.id, candidates_key([c for c, _ in topk[r.id]])) not in have)  # type: ignore[index]

    def _aggregate_side(self, session: Session, name: str, images: Sequence[ImageRecord],
                        topk: dict[int, list[tuple[str, float]]], one_at_a_time: bool,
                        progress: Progress | None, stop: threading.Event | None) -> tuple[SideRun, dict[int, Any], bool]:
        vlm = self.vlm(name)
        summary = PredictSummary()
        load_s = memory = None
        if self._missing_verdicts(session, vlm, images, topk):
            vlm, load_s = self._prepare_model(name, one_at_a_time)
            with MemoryMeter(vlm.device) as meter:
                preds = run_vlm(session, vlm, images, topk, summary, routing_threshold=None, progress=progress, stop=stop)
            memory = meter.reading(vlm.model)
        else:
            preds = run_vlm(session, vlm, images, topk, summary, routing_threshold=None)
        run = SideRun(name, vlm.model_id, vlm.model_version, summary.vlm_computed, summary.vlm_cached,
                      summary.vlm_seconds, load_s, memory)
        return run, preds, summary.cancelled

    def run_aggregate(
        self,
        name_a: str,
        name_b: str,
        *,
        one_at_a_time: bool = False,
        progress: Progress | None = None,
        stop: threading.Event | None = None,
    ) -> CompareAggregate:
        """Both profiles' verdicts on every reviewed photo (breed labels), and their metrics.

        Stage 1 and verdicts come from the prediction cache when present and are stored when
        computed, so a second run computes nothing. ``progress(stage, done, total)`` is called
        per batch; ``stop`` ends the run after the current batch (metrics then cover the photos
        done, ``cancelled`` is set).

        Raises:
            CompareError: unknown profile, or no reviewed photo has both verdicts.
        """
        for n in (name_a, name_b):
            self.vlm(n)  # unknown names fail before any work
        with self.run_lock, Session(self.engine) as s:
            human = self._human_labels(s)
            q = select(ImageRecord).where(ImageRecord.error.is_(None)).order_by(ImageRecord.id)  # type: ignore[union-attr, arg-type]
            images = [r for r in s.exec(q) if r.id in human]
            images, notes = self._leave_out_trained(s, images, (name_a, name_b))
            if not images:
                raise CompareError("no reviewed photos with a breed label yet: review some photos (or import labels) first"
                                   + (f" ({' '.join(notes)})" if notes else ""))
            summary = PredictSummary()
            topk = run_stage1(s, self.registry.classifier(), images, summary, top_k=self.settings.classifier.top_k,
                              progress=progress, stop=stop)
            side_progress = lambda tag: (lambda _st, d, t: progress(f"VLM {tag}", d, t)) if progress else None  # noqa: E731
            run_a, preds_a, cancel_a = self._aggregate_side(s, name_a, images, topk, one_at_a_time, side_progress(f"A ({name_a})"), stop)
            run_b, preds_b, cancel_b = self._aggregate_side(s, name_b, images, topk, one_at_a_time, side_progress(f"B ({name_b})"), stop)
            outcomes, skipped = photo_outcomes(images, human, topk, preds_a, preds_b, self.canonical)
        cancelled = summary.cancelled or cancel_a or cancel_b
        return CompareAggregate(run_a, run_b, outcomes, aggregate_metrics(outcomes), skipped, cancelled, notes)

    def _leave_out_trained(
        self, session: Session, images: list[ImageRecord], names: Sequence[str]
    ) -> tuple[list[ImageRecord], list[str]]:
        """``images`` without the photos either side's adapter was trained on
        (:func:`catreview.adapters.versions.training_photo_hashes`), and notes saying what was left out."""
        from catreview.adapters.versions import training_photo_hashes

        trained: set[str] = set()
        notes = []
        for name in names:
            adapter = self.vlm(name).profile.adapter
            hashes = training_photo_hashes(session, adapter)
            if hashes is None:
                notes.append(f"{name}: adapter {adapter} is not a version of this database; the photos it was "
                             "trained on cannot be left out, so its numbers may be optimistic.")
            else:
                trained |= hashes
        kept = [r for r in images if r.sha256 not in trained]
        if len(kept) < len(images):
            notes.insert(0, f"Left out {plural(len(images) - len(kept), 'reviewed photo')} of the train split an adapter "
                            "was trained on (not a fair test of it).")
        return kept, notes


# --------------------------------------------------------------------------------------------
# Background job for the UI
# --------------------------------------------------------------------------------------------


class AggregateJob:
    """:meth:`CompareSession.run_aggregate` in a daemon thread with progress for a UI timer.

    ``state`` is a :class:`catreview.jobs.JobState`; ``result`` the last finished aggregate
    and ``version`` counts finished runs (the UI redraws when it changes).
    """

    def __init__(self, session: CompareSession) -> None:
        self.session = session
        self.state = JobState()
        self.result: CompareAggregate | None = None
        self.version = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def start(self, name_a: str, name_b: str, *, one_at_a_time: bool = False) -> bool:
        """Start a run; ``False`` (nothing started) when one is already running."""
        with self._lock:
            if self.state.running:
                return False
            self.state = JobState(running=True, stage="waiting for the models")
            self._stop.clear()
            self._thread = threading.Thread(target=self._work, args=(name_a, name_b, one_at_a_time),
                                            name="catreview-compare", daemon=True)
            self._thread.start()
            return True

    def try_start(self, name_a: str, name_b: str, *, one_at_a_time: bool = False) -> str:
        """Start a run unless the models are busy (the session's ``busy``) or a run is going on;
        returns what to show: :data:`BUSY_AGGREGATE`, :data:`ALREADY_RUNNING`, or the progress
        line of the started run."""
        if self.session.busy():
            return BUSY_AGGREGATE
        if not self.start(name_a, name_b, one_at_a_time=one_at_a_time):
            return ALREADY_RUNNING
        return self.state.text()

    def _progress(self, stage: str, done: int, total: int) -> None:
        self.state.stage, self.state.done, self.state.total = stage, done, total

    def _work(self, name_a: str, name_b: str, one_at_a_time: bool) -> None:
        try:
            result = self.session.run_aggregate(name_a, name_b, one_at_a_time=one_at_a_time,
                                                progress=self._progress, stop=self._stop)
            self.result = result
            self.version += 1
            self.state.message = (
                f"Compared {plural(result.metrics.n, 'reviewed photo')}: "
                f"{plural(result.a.computed + result.b.computed, 'verdict')} computed, "
                f"{result.a.cached + result.b.cached} from the cache"
                + (" (cancelled: partial)" if result.cancelled else "") + "."
                + "".join(f" {note}" for note in result.notes)
            )
        except CompareError as exc:
            self.state.message = f"Cannot compare: {exc}"
        except Exception as exc:  # surfaced in the UI; the thread must not die silently
            self.state.error = f"{type(exc).__name__}: {exc}"
            self.state.log.append(traceback.format_exc())
        finally:
            self.state.running = False

    def stop(self) -> None:
        """Ask the run to stop after the current batch."""
        self._stop.set()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the run ends (tests, CLI)."""
        if self._thread is not None:
            self._thread.join(timeout)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_compare_parser(sub: Any) -> argparse.ArgumentParser:
    """Add the ``compare`` sub-command to ``sub`` (the CLI's ``add_subparsers()`` object)."""
    from catreview.cli.common import add_common_options

    p = sub.add_parser("compare", help="compare two VLM profiles on the reviewed photos (cached)")
    add_common_options(p)
    p.add_argument("--a", metavar="PROFILE", help="side A (default: compare_profiles[0] or the first profile)")
    p.add_argument("--b", metavar="PROFILE", help="side B (default: compare_profiles[1] or the second profile)")
    p.add_argument("--base", metavar="PROFILE", help="compare adapter versions of this profile (with --adapter-a/-b)")
    p.add_argument("--adapter-a", metavar="DIR", help="adapter folder of side A ('' or omitted: no adapter)")
    p.add_argument("--adapter-b", metavar="DIR", help="adapter folder of side B ('' or omitted: no adapter)")
    p.add_argument("--one-at-a-time", action="store_true", help="keep only one model in memory (load/unload in turn)")
    p.add_argument("--csv", metavar="DIR", help="also write compare_{summary,per_breed,photos}.csv into DIR")
    p.add_argument("--preferences-out", metavar="FILE.jsonl", help="also export blind preferences as DPO pairs")
    return p


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``compare``: print the aggregate tables; returns the exit status (0).

    Raises:
        CompareError / ConfigError (both ``ValueError``): bad profiles, adapters or config, or a
            model that cannot be loaded.
    """
    from catreview.cli.common import progress_bar, settings_from_args
    from catreview.data.db import make_engine
    from catreview.models.registry import ModelRegistry
    from catreview.models.vlm.postclassifier import VLMError

    settings = settings_from_args(args)
    engine = make_engine(settings.database_url)
    vocabulary = BreedVocabulary.from_labels_file(settings.classifier.labels_file)
    session = CompareSession(settings, ModelRegistry(settings), engine, vocabulary)
    if args.base:
        if args.a or args.b:
            raise CompareError("give either --a/--b or --base with --adapter-a/--adapter-b, not both")
        name_a, name_b = session.add_adapter_pair(args.base, args.adapter_a, args.adapter_b)
    else:
        pair = session.default_pair()
        name_a, name_b = args.a or pair.a, args.b or pair.b
        if pair.note and not (args.a and args.b):
            print(f"note: {pair.note}")
    update, close = progress_bar()
    try:
        result = session.run_aggregate(name_a, name_b, one_at_a_time=args.one_at_a_time, progress=update)
    except VLMError as exc:  # model folder missing, out of memory...: one line, exit status 2
        raise CompareError(str(exc)) from exc
    finally:
        close()
    print(result.to_text())
    if args.csv:
        print("wrote " + ", ".join(str(p) for p in result.write_csv(args.csv)))
    if args.preferences_out:
        print(export_preference_pairs(engine, args.preferences_out).text())
    return 0


__all__ = [
    "ALREADY_RUNNING", "BUSY_AGGREGATE", "BUSY_PHOTO",
    "AggregateJob", "AggregateMetrics", "BlindTrial", "CompareAggregate", "CompareError", "CompareSession",
    "MemoryMeter", "MemoryReading", "ModelsBusy", "PairChoice", "PhotoComparison", "PhotoOutcome", "PhotoPick",
    "PreferenceExport", "PreferenceResult", "SideRun",
    "SideState", "adapter_variant", "add_compare_parser", "aggregate_metrics", "blind_swapped", "cmd_compare",
    "default_pair", "display_sides", "error_notice", "export_preference_pairs", "known_adapters", "latest_preferences",
    "model_bytes", "model_label", "per_breed_columns", "photo_outcomes", "plural", "preference_pair",
    "preference_refusal", "probabilities_label", "side_display", "split_model_label",
]
