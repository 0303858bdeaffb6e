"""Generation helpers of stage 2: ``generate`` settings, streaming with cancellation, candidate matching.

Reasoning is *generated* (free text, greedy unless the profile samples); verdicts are scored
(:mod:`catreview.models.vlm.scoring`) except in the benchmark's generate-and-match comparison,
which uses :func:`match_candidate`. Importing this module imports no torch/transformers.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from catreview.config import VLMProfile
from catreview.models.vlm import prompts
from catreview.models.vlm.types import VLMError

if TYPE_CHECKING:
    import torch

DEFAULT_VERDICT_TOKENS = 20
"""``max_new_tokens`` of :meth:`catreview.models.vlm.postclassifier.VLMPostClassifier.generate_verdict`
(benchmark comparison)."""


def generation_kwargs(profile: VLMProfile, pad_id: int, max_new_tokens: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``model.generate`` for ``profile``.

    ``max_new_tokens`` overrides ``profile.max_new_tokens``; sampling settings are passed only
    with ``profile.do_sample`` (greedy otherwise, with the checkpoint's sampling defaults
    cleared).
    """
    kw: dict[str, Any] = {
        "max_new_tokens": max_new_tokens or profile.max_new_tokens,
        "do_sample": profile.do_sample,
        "pad_token_id": pad_id,
    }
    if profile.do_sample:
        kw.update(temperature=profile.temperature, top_p=profile.top_p)
    else:  # silence "temperature is set but do_sample=False" from checkpoint generation configs
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def event_stopping_criteria(events: Sequence[threading.Event]) -> Any:
    """A ``transformers.StoppingCriteria`` that stops every sequence once any of ``events`` is set.

    Built lazily so that importing this module does not import torch/transformers.
    """
    import torch
    from transformers import StoppingCriteria

    class EventStoppingCriteria(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            stop = any(e.is_set() for e in events)
            return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)

    return EventStoppingCriteria()


def stream_generate(
    generate: Callable[..., Any],
    tokenizer: Any,
    *,
    name: str,
    stop_event: threading.Event | None = None,
) -> Iterator[str]:
    """Run ``generate(streamer=..., stopping_criteria=...)`` in a thread, yielding the cumulative text.

    ``generate`` is ``model.generate`` with its inputs and settings bound; it gets a
    ``TextIteratorStreamer`` (prompt and special tokens skipped) and a stopping criterion.
    Setting ``stop_event`` (or closing the iterator) stops generation at the next token; the
    thread (named ``"vlm-stream-<name>"``) is joined before this generator returns.

    Raises:
        VLMError: ``generate`` raised (chained as ``__cause__``); ``name`` is the profile in the message.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    closed = threading.Event()
    events = [closed] if stop_event is None else [closed, stop_event]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            generate(streamer=streamer, stopping_criteria=StoppingCriteriaList([event_stopping_criteria(events)]))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, re-raised below as VLMError
            errors.append(exc)
            streamer.end()

    thread = threading.Thread(target=run, name=f"vlm-stream-{name}", daemon=True)
    thread.start()
    text = ""
    try:
        for chunk in streamer:
            if chunk:
                text += chunk
                yield text
    finally:
        closed.set()
        thread.join()
    if errors:
        raise VLMError(f"generation failed in VLM profile {name!r}: {errors[0]}") from errors[0]


def match_candidate(answer: str, labels: Sequence[str]) -> str:
    """The candidate named in ``answer`` as whole words (case-insensitive, earliest mention,
    longest name on a tie), or :data:`~catreview.models.vlm.prompts.OTHER_LABEL`.

    Whole words: "Another look: a Bengal" names Bengal, not "other"."""
    text = " ".join(answer.lower().replace("_", " ").split())
    best: tuple[int, int, str] | None = None
    for label in labels:
        name = prompts.candidate_name(label).lower()
        found = re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) if name else None
        if found and (best is None or (found.start(), -len(name)) < (best[0], best[1])):
            best = (found.start(), -len(name), label)
    return best[2] if best is not None else prompts.OTHER_LABEL
