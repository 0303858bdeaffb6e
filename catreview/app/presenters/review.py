"""Text of the Review tab: counters, the three prediction panels, the current label, notices."""

from __future__ import annotations

import html
from dataclasses import dataclass
from urllib.parse import quote

from catreview.data.db import Review
from catreview.data.overlap import VoteOutcome
from catreview.query.history import NO_DECISION, Decision, HistoryEntry, UndoResult
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


def counter(reviewed: int, total: int, image_id: int | None = None, *, imported: int = 0) -> str:
    """``**R / T reviewed** · I imported, unverified · photo #ID``: ``reviewed`` counts human
    decisions only; the imported part and the id are left out when 0 / ``None``."""
    text = f"**{reviewed} / {total} reviewed**"
    if imported:
        text += f" · {imported} imported, unverified"
    return text if image_id is None else text + f" · photo #{image_id}"


BLIND_STATUS = "Blind mode: the model outputs are hidden until you choose."
"""Status line of a photo shown in blind mode."""

KEYMAP = (
    "**Keys** (not while typing; Esc leaves a text field): **1/2/3** confirm a stage-1 candidate · "
    "**Enter**/**A** accept the fused top-1 · **O**/**X** other breed (search) · **N** Not a cat · "
    "**U** Unsure · **Space** skip · **←/→** previous/next · **Backspace** undo · **/** search · **?** keys"
)
"""The key map shown under the decision controls (and by ``?`` in the page)."""


def queue_empty(title: str) -> str:
    """Notice when queue ``title`` has no open photo left (every photo there has a human decision,
    or its scores are not computed yet)."""
    return f"No open photo left in the queue “{title}” (all decided, or its scores are still being computed)."


def accept_text(view: PhotoView | None) -> str:
    """Value of the "accept" button: the fused top-1 label, or ``"—"`` when there is none."""
    fused = view["fused"] if view is not None else None
    return fused["label"] if fused else "—"


def blind_reveal(label: str, image_id: int, view: PhotoView) -> str:
    """Notice after a blind save: what was saved, then what the models had said (shown now)."""
    parts = []
    if view["stage1"]:
        top = view["stage1"][0]
        parts.append(f"stage 1 {top['label']} {top['probability']:.0%}")
    vv = view["vlm"]
    if vv and not vv.get("skipped"):
        parts.append(f"VLM {vv['label']} {vv['confidence']:.0%}")
    if view["fused"]:
        parts.append(f"fused {view['fused']['label']} {view['fused']['probability']:.0%}")
    said = "; the models said: " + " · ".join(parts) if parts else "; the models had no prediction"
    return f"Saved **{label}** for photo {image_id} (blind){said}."


def undone(result: UndoResult) -> str:
    """Notice after an undo: which decision was undone and the photo's label now."""
    now = (
        "no label (unreviewed again)"
        if result.restored_label is None
        else f"**{result.restored_label}**" + (" (imported, unverified)" if result.restored_source == "import" else "")
    )
    return f"Undid **{result.undone_label}** on photo {result.image_id}: back to {now}."


DECISION_HEADERS = ["photo", "label", "time"]
"""Columns of the recent-decisions table (the photo id first: a click opens it)."""


def decision_rows(decisions: list[Decision]) -> list[list[object]]:
    """Rows of the recent-decisions table (photo id, label, UTC time of day); a decision no longer
    in effect is marked "(undone or changed)", a blind one "(blind)"; a correction shows the label
    it replaced ("Persian ← Birman")."""
    rows: list[list[object]] = []
    for d in decisions:
        label = d.label + (f" ← {d.previous_label}" if d.previous_label else "")
        label += ("" if d.current else " (undone or changed)") + (" (blind)" if d.blind else "")
        rows.append([d.image_id, label, d.time[11:]])
    return rows


HISTORY_HEADERS = ["review", "label", "was", "by", "source", "when (UTC)", "note"]
"""Columns of a photo's review history."""


def history_rows(entries: list[HistoryEntry]) -> list[list[object]]:
    """Rows of a photo's review history, oldest first (an undo back to no label shows "(no label)")."""
    return [
        [
            e.review_id,
            "(no label)" if e.label == NO_DECISION else e.label + (" (blind)" if e.blind else ""),
            e.previous_label or "",
            e.annotator,
            e.source,
            e.time,
            e.note or "",
        ]
        for e in entries
    ]


def prefetch_html(path: str | None) -> str:
    """A hidden ``<img>`` that makes the browser fetch the next photo's display file ahead of
    time (Gradio serves files of ``gr.set_static_paths`` at ``gradio_api/file=PATH``), so moving
    on shows it from the cache. ``""`` when there is no next photo."""
    if not path:
        return ""
    url = "gradio_api/file=" + quote(path)
    return f'<img src="{html.escape(url)}" alt="" width="1" height="1" style="display:none" data-prefetch="1">'


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


def signed_in(name: str, role: str, *, open_mode: bool = False) -> str:
    """The toolbar's "who am I" line (``open_mode``: nobody logs in, everyone acts under ``name``)."""
    if open_mode:
        return f"👤 **{html.escape(name)}** · no login (every caller acts as {html.escape(name)}, {role})"
    return f"👤 **{html.escape(name)}** · {role}"


def conflict(current: Review | None, mine: str, seen: str | None) -> str:
    """The conflict dialog's text: who chose what and when after the photo was opened (with their
    note), what the annotator saw then (``seen``: that label, ``None``: not reviewed) and chose now
    (``mine``)."""
    was = f"**{seen}**" if seen else "not reviewed yet"
    if current is None:
        return (
            f"This photo changed while you were saving (you saw: {was}). Keep what is there now, or replace it "
            f"with your **{mine}**?"
        )
    when = current.created_at.strftime("%Y-%m-%d %H:%M:%S")
    said = f" Their note: “{html.escape(current.note)}”." if current.note else ""
    return (
        f"⚠️ **{html.escape(current.annotator)}** chose **{current.label}** at {when} UTC, after you opened this "
        f"photo (you saw: {was}).{said} **Keep theirs** saves nothing; **Replace with mine** records your "
        f"**{mine}** as a new review after theirs (the photo's history keeps both)."
    )


def kept_theirs_text(annotator: str, label: str, image_id: int) -> str:
    """Notice after "Keep theirs" (``annotator`` chose ``label``; empty: unknown): nothing was stored."""
    if not annotator:
        return f"Kept photo {image_id} as it is; nothing saved."
    return f"Kept {html.escape(annotator)}'s **{label}** for photo {image_id}; nothing saved."


def voted(label: str, image_id: int, vote: VoteOutcome, previous: str | None = None) -> str:
    """Notice after a blind overlap vote (``previous``: the caller's vote it replaced); the others'
    votes are not shown to annotators."""
    changed = f" (changed from {previous})" if previous and previous != label else ""
    if vote.status == "agreed":
        return (
            f"Voted **{label}**{changed} for photo {image_id}: all {vote.k} annotators agreed, so it is now its label."
        )
    if vote.status == "disputed":
        return (
            f"Voted **{label}**{changed} for photo {image_id}: the {vote.k} votes differ; a reviewer will adjudicate."
        )
    return (
        f"Voted **{label}**{changed} for photo {image_id} ({vote.votes} of {vote.k} votes in; the others stay hidden)."
    )


def withdrawn(label: str, image_id: int) -> str:
    """Notice after undoing one's own overlap vote."""
    return f"Withdrew your vote **{label}** on photo {image_id}."


OVERLAP_WHY = "**Overlap round:** {k} annotators label this photo, blind to each other's choice."
"""The "why" line of a photo open in the overlap round."""
YOUR_VOTE = "Your vote: **{label}** (vote again to change it; Undo withdraws it)."
"""Shown under :data:`OVERLAP_WHY` once the caller has voted on the photo."""
