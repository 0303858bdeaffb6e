"""Text of the Compare tab (and the compare job's messages): panels, notices, titles, summaries.

Made from the typed results of :mod:`catreview.compare`; :mod:`catreview.app.ui.compare_tab`
lays them out. Blind mode: nothing here names a model (titles "Model 1"/"Model 2", no stats,
names, ids and versions redacted from error text).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TypedDict

from catreview.compare.aggregate import CompareAggregate, plural
from catreview.compare.errors import CompareError, ModelsBusy
from catreview.compare.pairs import PairChoice
from catreview.compare.photo import PhotoComparison, SideState

BLIND_TITLES = ("Model 1", "Model 2")
PROBABILITIES_LABEL = "probabilities over the candidates"
"""Label of each side's probability panel, after the side's name (see :func:`side_display`)."""

BUSY_AGGREGATE = "Background predictions are still running; start the comparison when they finish."
"""What :meth:`catreview.app.compare_job.AggregateJob.try_start` says while the background predictions run."""
ALREADY_RUNNING = "A comparison is already running."
"""What :meth:`catreview.app.compare_job.AggregateJob.try_start` says while another aggregate run is going on."""
STOPPING = "Stopping after the current batch…"
"""What the tab says when the aggregate run's Stop is pressed."""

INTRO = (
    "Two VLM profiles on the same photo and candidates: verdict, probabilities, streamed "
    "reasoning, latency and peak memory (weights + working memory; CPU: process RSS growth "
    "sampled every 5 ms, CUDA: `torch.cuda.max_memory_allocated`). Outputs are cached like all "
    "predictions. **Blind mode** hides which model is which (and their latency/memory) and asks "
    "you to pick the better reasoning; choices are stored and exportable as DPO pairs."
)
"""The tab's first paragraph (Markdown)."""
AGGREGATE_INTRO = (
    "## Aggregate over the reviewed photos\n"
    "Photos whose latest review is a breed. A verdict is correct when it equals the human label "
    '("other" never is). Latency: stored seconds per photo (batched work divided evenly). '
    "Runs in the background; a second run reads everything from the cache."
)
"""Heading and paragraph of the tab's aggregate section (Markdown)."""
NO_PHOTOS = "No photos yet: import some first (`python app.py --images DIR`)."
"""The tab's notice when the database holds no photo."""


class SidePanel(TypedDict):
    """What one side's panel shows (:func:`side_display`).

    ``verdict`` and ``stats`` are Markdown; ``probabilities`` is ``{candidate: p}`` (p in [0, 1],
    summing to 1 with ``"other"``) or ``None`` before the verdict.
    """

    title: str
    verdict: str
    probabilities: dict[str, float] | None
    probabilities_label: str
    reasoning: str
    stats: str


class ComparisonView(TypedDict):
    """The UI payload of one comparison state (:func:`display_sides`): both panels in display
    order, the Markdown notice, the blind trial's id (``""`` when none), whether a preference can
    be recorded, and why not (``""`` when it can or nothing is blind)."""

    left: SidePanel
    right: SidePanel
    notice: str
    trial_id: str
    can_prefer: bool
    preference_note: str


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


def side_names(name_a: str, name_b: str, blind: bool) -> list[tuple[str, str]]:
    """``(heading, probability-panel label)`` of the left and right panel before a comparison runs."""
    if blind:
        return [(t, probabilities_label(t)) for t in BLIND_TITLES]
    return [
        (f"{letter}: {name}", probabilities_label(f"{name} ({letter})"))
        for letter, name in (("A", name_a), ("B", name_b))
    ]


def side_display(
    side: SideState, title: str, *, blind: bool, secrets: Sequence[str] = (), letter: str = ""
) -> SidePanel:
    """What one panel shows (:class:`SidePanel`).

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
            f"- memory: {side.memory.text()}"
            if side.memory
            else "- memory: not measured (nothing ran: outputs were cached)"
            if side.status == "done"
            else "- memory: —"
        )
        stats = "\n".join(lines)
    probs = dict(zip(side.verdict["candidates"], side.verdict["probabilities"])) if side.verdict else None
    named = title if blind else f"{side.name} ({letter})" if letter else side.name
    return {
        "title": title,
        "verdict": verdict,
        "probabilities": probs,
        "probabilities_label": probabilities_label(named),
        "reasoning": side.reasoning,
        "stats": stats,
    }


def comparison_notes(comp: PhotoComparison) -> list[str]:
    """Notes on the setting of a comparison: the same profile or model version on both sides
    (identical outputs; no blind preference), and one model loaded at a time."""
    a, b = comp.sides
    notes = []
    if a.name == b.name:
        what = "Both sides use the same profile"
    elif a.model_version == b.model_version:
        what = "Both profiles are the same model version"
    else:
        what = ""
    if what:
        notes.append(
            f"{what}: the outputs are identical" + (", so no blind preference can be recorded." if comp.blind else ".")
        )
    if comp.one_at_a_time:
        notes.append(
            "Loading one model at a time: each side's model is loaded, run, and "
            "unloaded before the other side loads (slower, half the memory)."
        )
    return notes


def display_sides(comp: PhotoComparison) -> ComparisonView:
    """The UI payload of a comparison (:class:`ComparisonView`).

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
    notes = comparison_notes(comp)
    if comp.blind:
        notes.append(
            "Blind mode: sides are unnamed and in a per-photo order; latency and memory are "
            "hidden because they would tell the models apart."
            + ("" if comp.preference_refused else " Pick the better reasoning.")
        )
    if comp.human_label:
        notes.append(f"Human label: **{comp.human_label}**")
    return {
        "left": panels[0],
        "right": panels[1],
        "notice": "\n\n".join(notes),
        "trial_id": comp.trial_id or "",
        "can_prefer": bool(comp.blind and comp.trial_id),
        "preference_note": f"⚠️ No preference can be recorded: {comp.preference_refused}."
        if comp.preference_refused
        else "",
    }


def error_notice(exc: CompareError) -> str:
    """How a refused comparison is shown: ``"⚠️ <message>"``, or the plain message for
    :class:`~catreview.compare.errors.ModelsBusy` (waiting is not an error)."""
    return str(exc) if isinstance(exc, ModelsBusy) else f"⚠️ {exc}"


def pair_note(pair: PairChoice) -> str:
    """The warning above the tab when the configured pair could not be used (``""`` when it could)."""
    return f"⚠️ {pair.note}" if pair.note else ""


def adapter_pair_message(name_a: str, name_b: str) -> str:
    """What the tab says once an adapter pair is chosen."""
    return f"Comparing **{name_a}** (A) with **{name_b}** (B)."


def aggregate_message(result: CompareAggregate) -> str:
    """The finished aggregate job's one line: photos compared, verdicts computed and cached,
    whether it was cancelled, and the notes (photos left out on purpose)."""
    return (
        f"Compared {plural(result.metrics.n, 'reviewed photo')}: "
        f"{plural(result.a.computed + result.b.computed, 'verdict')} computed, "
        f"{result.a.cached + result.b.cached} from the cache"
        + (" (cancelled: partial)" if result.cancelled else "")
        + "."
        + "".join(f" {note}" for note in result.notes)
    )


__all__ = [
    "AGGREGATE_INTRO",
    "ALREADY_RUNNING",
    "BLIND_TITLES",
    "BUSY_AGGREGATE",
    "INTRO",
    "NO_PHOTOS",
    "PROBABILITIES_LABEL",
    "STOPPING",
    "ComparisonView",
    "SidePanel",
    "adapter_pair_message",
    "aggregate_message",
    "comparison_notes",
    "display_sides",
    "error_notice",
    "pair_note",
    "probabilities_label",
    "side_display",
    "side_names",
]
