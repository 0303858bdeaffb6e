"""Compare tab: two VLM profiles (or two adapter versions of one) side by side, per photo and in
aggregate over the reviewed photos, with a blind mode that records preferences.

Thin over :mod:`catreview.compare` (tested there); this module only lays out and wires: which
photo a request means, the refusal while background predictions run, and the outcome of a blind
choice come from :class:`~catreview.compare.session.CompareSession` and
:class:`~catreview.app.compare_job.AggregateJob`; every text shown comes from
:mod:`catreview.app.presenters.compare`.

Each event is guarded (:class:`catreview.app.auth.Guards`): showing photos and the aggregate's
progress are ``view``; running a comparison (per photo or aggregate), stopping it, or choosing an
adapter pair load models for everyone and need ``train``; a blind choice is a ``review`` recorded
under the caller's name (no annotator box); exporting the preference pairs is an ``export``
(recorded in the audit log).
"""

from __future__ import annotations

import tempfile
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import gradio as gr

from catreview.app.auth import Caller, Guards
from catreview.app.compare_job import AggregateJob
from catreview.app.core import ReviewApp
from catreview.app.presenters.compare import (
    AGGREGATE_INTRO,
    INTRO,
    NO_PHOTOS,
    STOPPING,
    ComparisonView,
    adapter_pair_message,
    display_sides,
    error_notice,
    pair_note,
    side_names,
)
from catreview.app.public_errors import redact
from catreview.compare.aggregate import SUMMARY_COLUMNS, CompareAggregate, per_breed_columns
from catreview.compare.errors import CompareError
from catreview.compare.pairs import known_adapters
from catreview.data.accounts import Action

SIDES = ("left", "right")


def _panel_values(payload: ComparisonView | None, names: list[tuple[str, str]] | None = None) -> list[Any]:
    """Values of both panels' (title, verdict, probabilities, reasoning, stats) components.

    ``payload`` (from :func:`display_sides`) sets everything, the probability panels' labels
    included; without it the panels are cleared, and headings and labels are set from ``names``
    (:func:`~catreview.app.presenters.compare.side_names`) or left as they are.
    """
    out: list[Any] = []
    for i in range(len(SIDES)):
        if payload:
            p = payload["left"] if i == 0 else payload["right"]
            title, probs = f"### {p['title']}", gr.update(value=p["probabilities"], label=p["probabilities_label"])
            out += [title, p["verdict"], probs, p["reasoning"], p["stats"]]
            continue
        if names:
            title, probs = f"### {names[i][0]}", gr.update(value=None, label=names[i][1])
        else:
            title, probs = gr.skip(), gr.update(value=None)
        out += [title, "", probs, "", ""]
    return out


def _aggregate_values(result: CompareAggregate) -> list[Any]:
    out_dir = tempfile.mkdtemp(prefix="catreview-compare-")
    files = [str(p) for p in result.write_csv(out_dir)]
    bars = result.plot_frame()
    plot = gr.BarPlot(value=bars, sort=list(bars["group"]))  # keep the table's order, not alphabetical
    return [result.summary_frame(), result.per_breed_frame(), plot, files]


def build(app: ReviewApp, guards: Guards) -> None:
    """Lay out the Compare tab and wire its events, each guarded by ``guards`` (see the module docstring)."""
    session = app.compare_session()
    job = AggregateJob(session)
    pair = session.default_pair()
    names = list(session.profiles())

    gr.Markdown(INTRO)
    gr.Markdown(pair_note(pair), elem_id="compare-pair-note")
    with gr.Row():
        prof_a = gr.Dropdown(names, value=pair.a, label="Model A (profile)", elem_id="compare-profile-a")
        prof_b = gr.Dropdown(names, value=pair.b, label="Model B (profile)", elem_id="compare-profile-b")
        one = gr.Checkbox(
            False, label="Load one model at a time (when both do not fit in memory)", elem_id="compare-one-at-a-time"
        )
        blind = gr.Checkbox(False, label="Blind mode", elem_id="compare-blind")
    with gr.Accordion("Adapter version A vs B of one model", open=False):
        adapter_choices = [(label, path) for label, path in known_adapters(app.engine)]
        with gr.Row():
            base = gr.Dropdown(
                list(app.registry.profiles()), value=pair.a, label="Base profile", elem_id="compare-adapter-base"
            )
            ad_a = gr.Dropdown(
                adapter_choices,
                value=None,
                allow_custom_value=True,
                label="Adapter A folder (empty: no adapter)",
                elem_id="compare-adapter-a",
            )
            ad_b = gr.Dropdown(
                adapter_choices,
                value=None,
                allow_custom_value=True,
                label="Adapter B folder (empty: no adapter)",
                elem_id="compare-adapter-b",
            )
        use_adapters = gr.Button("Compare these adapter versions", elem_id="compare-adapter-use")
        adapter_msg = gr.Markdown(elem_id="compare-adapter-message")

    gr.Markdown("## Per photo")
    pos = gr.State(0)
    start_names = side_names(pair.a, pair.b, False)
    with gr.Row():
        with gr.Column(scale=2):
            photo = gr.Image(label="Photo", type="pil", interactive=False, height=320, elem_id="compare-photo")
            image_id = gr.Number(
                label="Image id",
                precision=0,
                interactive=True,
                elem_id="compare-image-id",
                info="Pick a photo: type its id and press Enter, or step with ◀ Previous / Next ▶.",
            )
            with gr.Row():
                prev_btn = gr.Button("◀ Previous", elem_id="compare-prev")
                next_btn = gr.Button("Next ▶", elem_id="compare-next")
            with gr.Row():
                run_btn = gr.Button("Compare this photo", variant="primary", elem_id="compare-run")
                stop_btn = gr.Button("Stop", elem_id="compare-stop")
        with gr.Column(scale=5):
            notice = gr.Markdown(elem_id="compare-notice")
            panels: list[gr.components.Component] = []
            with gr.Row():
                for side, (heading, probs_label) in zip(SIDES, start_names):
                    with gr.Column(elem_id=f"compare-{side}"):
                        panels += [
                            gr.Markdown(f"### {heading}", elem_id=f"compare-{side}-title"),
                            gr.Markdown(elem_id=f"compare-{side}-verdict"),
                            gr.Label(label=probs_label, elem_id=f"compare-{side}-probs"),
                            gr.Textbox(
                                label="Reasoning (streamed)",
                                lines=6,
                                interactive=False,
                                elem_id=f"compare-{side}-reasoning",
                            ),
                            gr.Markdown(elem_id=f"compare-{side}-stats"),
                        ]
            with gr.Row():
                prefer = [
                    gr.Button(text, interactive=False, elem_id=f"compare-prefer-{key}", scale=1)
                    for key, text in (("1", "Model 1 is better"), ("tie", "Tie"), ("2", "Model 2 is better"))
                ]
            pref_msg = gr.Markdown(elem_id="compare-pref-message")
            trial = gr.Textbox(visible="hidden", elem_id="compare-trial")

    gr.Markdown(AGGREGATE_INTRO)
    with gr.Row():
        agg_run = gr.Button("Run on reviewed photos", variant="primary", elem_id="compare-aggregate-run")
        agg_stop = gr.Button("Stop", elem_id="compare-aggregate-stop")
    agg_progress = gr.Markdown(job.state.text(), elem_id="compare-aggregate-progress")
    summary = gr.Dataframe(
        headers=list(SUMMARY_COLUMNS), label="Per model", interactive=False, elem_id="compare-summary"
    )
    per_breed = gr.Dataframe(
        headers=per_breed_columns(pair.a, pair.b),
        label="Per-breed accuracy",
        interactive=False,
        elem_id="compare-per-breed",
    )
    plot = gr.BarPlot(
        x="group",
        y="accuracy",
        color="model",
        y_lim=[0, 1],
        x_label_angle=-40,
        sort=None,
        label="Accuracy (all photos, balanced, per breed)",
        elem_id="compare-plot",
    )
    csv = gr.File(label="CSV", file_count="multiple", interactive=False, height=190, elem_id="compare-csv")
    shown_version = gr.State(0)

    gr.Markdown("## Preference pairs")
    with gr.Row():
        export_btn = gr.Button("Export blind preferences (JSONL, DPO pairs)", elem_id="compare-export-preferences")
        export_file = gr.File(
            label="preferences.jsonl", interactive=False, height=100, elem_id="compare-preferences-file"
        )
    export_msg = gr.Markdown(elem_id="compare-export-message")

    # ------------------------------------------------------------------ handlers
    def show(p: int) -> list[Any]:
        try:
            pick = session.pick_photo(None, p)
        except CompareError:  # no photos
            return [0, None, None, NO_PHOTOS, *_panel_values(None), "", *[gr.update(interactive=False)] * 3]
        return [
            pick.position,
            pick.image_id,
            app.image(pick.image_id),
            session.photo_notice(pick),
            *_panel_values(None),
            "",
            *[gr.update(interactive=False)] * 3,
        ]

    def jump(img_id: float | None) -> list[Any]:
        """Show the photo whose id was typed (an error toast, and no comparison, for an unknown id)."""
        try:
            pick = session.typed_photo(img_id)
        except CompareError as exc:
            raise gr.Error(str(exc)) from exc
        return show(pick.position)

    def reset_sides(a: str, b: str, is_blind: bool) -> list[Any]:
        """Profiles or blind mode changed: clear the panels and name them for the new setting."""
        return [*_panel_values(None, side_names(a, b, bool(is_blind))), "", *idle]

    view_out = [pos, image_id, photo, notice, *panels, trial, *prefer]
    compare_out = [pos, image_id, photo, notice, *panels, trial, *prefer, pref_msg]
    idle = [*[gr.update(interactive=False)] * 3, ""]

    def compare(img_id: float | None, p: int, a: str, b: str, is_blind: bool, one_at_a_time: bool):
        """Stream the comparison of photo ``img_id`` (empty or 0: the photo at position ``p``)."""
        try:
            pick = session.pick_photo(img_id, p)
        except CompareError as exc:  # no such photo: the shown photo stays
            yield [gr.skip(), gr.skip(), gr.skip(), str(exc), *_panel_values(None), "", *idle]
            return
        head = [pick.position, pick.image_id, app.image(pick.image_id)]
        stop = threading.Event()
        try:
            runs = session.compare_photo(
                pick.image_id, a, b, blind=bool(is_blind), one_at_a_time=bool(one_at_a_time), stop=stop
            )
            with closing(runs):  # a cancelled request closes the core generator (and its lock) at once
                for comp in runs:
                    payload = display_sides(comp)
                    yield [
                        *head,
                        payload["notice"],
                        *_panel_values(payload),
                        payload["trial_id"],
                        *[gr.update(interactive=payload["can_prefer"])] * 3,
                        payload["preference_note"],
                    ]
                    head = [gr.skip()] * 3  # send the photo once
        except CompareError as exc:  # refused (ModelsBusy while background predictions run) or failed
            yield [*head, error_notice(exc), *_panel_values(None), "", *idle]
        finally:
            stop.set()  # the page moved on or "Stop" was pressed: end generation

    def record(choice: str):
        def fn(trial_id: str, who: Caller) -> list[Any]:
            result = session.try_record_preference(trial_id, choice, who.name)
            buttons = [gr.update(interactive=False)] * 3 if result.saved else [gr.skip()] * 3
            return [result.text(), *buttons]

        return fn

    def use_adapter_pair(base_name: str, path_a: str | None, path_b: str | None) -> list[Any]:
        try:
            na, nb = session.add_adapter_pair(base_name, path_a, path_b)
        except CompareError as exc:
            return [error_notice(exc), gr.skip(), gr.skip()]
        choices = list(session.profiles())
        return [
            adapter_pair_message(na, nb),
            gr.update(choices=choices, value=na),
            gr.update(choices=choices, value=nb),
        ]

    def start_aggregate(a: str, b: str, one_at_a_time: bool) -> str:
        return job.try_start(a, b, one_at_a_time=bool(one_at_a_time))

    def tick(version: int) -> list[Any]:
        text = job.state.text()
        if job.result is None or job.version == version:
            return [text, *[gr.skip()] * 4, version]
        return [text, *_aggregate_values(job.result), job.version]

    def export(who: Caller) -> list[Any]:
        out = tempfile.mkdtemp(prefix="catreview-preferences-")
        result = app.export_preferences(Path(out) / "preferences.jsonl", actor=who.name)
        return [str(result.path), redact(result.text())]  # the file is served; its folder is not said

    # ------------------------------------------------------------------ wiring
    # On page load: the first reviewed photo (photos may have been imported since the UI was built).
    run = guards(Action.REVIEW, compare)  # the two models on the photo shown, for a preference
    gr.on(
        None,
        guards(Action.VIEW, lambda: show(session.first_reviewed_position())),
        outputs=view_out,
        api_visibility="private",
    )
    nav = [
        prev_btn.click(
            guards(Action.VIEW, lambda p: show(p - 1)), inputs=[pos], outputs=view_out, api_visibility="private"
        ),
        next_btn.click(
            guards(Action.VIEW, lambda p: show(p + 1)), inputs=[pos], outputs=view_out, api_visibility="private"
        ),
    ]
    compare_in = [image_id, pos, prof_a, prof_b, blind, one]
    runs = [run_btn.click(run, inputs=compare_in, outputs=compare_out, api_name="compare_photo")]
    runs += [e.then(run, inputs=compare_in, outputs=compare_out, api_visibility="private") for e in nav]
    runs.append(
        image_id.submit(
            guards(Action.VIEW, jump), inputs=[image_id], outputs=view_out, api_visibility="private"
        ).success(run, inputs=compare_in, outputs=compare_out, api_visibility="private")
    )
    gr.on(
        [prof_a.change, prof_b.change, blind.change],
        guards(Action.VIEW, reset_sides),
        inputs=[prof_a, prof_b, blind],
        outputs=[*panels, trial, *prefer, pref_msg],
        api_visibility="private",
    )
    stop_btn.click(None, cancels=runs, api_visibility="private")
    for btn, key in zip(prefer, ("1", "tie", "2")):
        btn.click(
            guards(Action.REVIEW, record(key), with_caller=True),
            inputs=[trial],
            outputs=[pref_msg, *prefer],
            api_visibility="private",
        )

    def prefer_api(trial_id: str, choice: str, who: Caller) -> str:
        """Record a blind choice as the caller: ``choice`` is "1", "2" or "tie"; returns a message."""
        return session.try_record_preference(trial_id, choice, who.name).api_text()

    gr.api(guards(Action.REVIEW, prefer_api, with_caller=True), api_name="compare_prefer")
    use_adapters.click(
        guards(Action.TRAIN, use_adapter_pair),
        inputs=[base, ad_a, ad_b],
        outputs=[adapter_msg, prof_a, prof_b],
        api_visibility="private",
    )
    agg_run.click(
        guards(Action.TRAIN, start_aggregate),
        inputs=[prof_a, prof_b, one],
        outputs=[agg_progress],
        api_name="compare_aggregate",
    )

    def stop_aggregate() -> str:
        job.stop()
        return STOPPING

    agg_stop.click(guards(Action.TRAIN, stop_aggregate), outputs=[agg_progress], api_visibility="private")
    export_btn.click(
        guards(Action.EXPORT, export, with_caller=True),
        outputs=[export_file, export_msg],
        api_name="compare_export_preferences",
    )
    gr.Timer(1.0).tick(
        guards(Action.VIEW, tick),
        inputs=[shown_version],
        outputs=[agg_progress, summary, per_breed, plot, csv, shown_version],
        api_visibility="private",
    )
