"""The stage-2 prompts, in one place.

Every prediction stored by catreview carries ``PROMPT_VERSION`` (through
:attr:`catreview.models.vlm.postclassifier.VLMPostClassifier.model_version`): changing any text in this module changes
what the VLM is asked, so bump the version with it and old and new predictions stay apart.

Two prompts:

* the **verdict** prompt lists the candidates (stage-1 top-k plus :data:`OTHER_LABEL`) and asks
  for one name. Verdicts are *scored*, not generated: each candidate answer
  (:func:`answer_text`, with its leading space) is appended after the assistant turn opener and
  its log-likelihood measured (see :mod:`catreview.models.vlm.scoring`).
* the **reasoning** prompt asks for the visible traits that decide between the candidates
  (coat, pattern, colour points, eyes, ears, muzzle, body). Its answer is free text, generated.

Chats are always built through the processor's own chat template
(``processor.apply_chat_template``) with the standard messages format, so no per-model prompt
string lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_VERSION = "p1"
"""Version of every text below. A prompt change is a new prediction version."""

OTHER_LABEL = "other"
"""Label added to every candidate list: "none of the stage-1 candidates"."""

OTHER_ANSWER = "other"
"""The answer text the model gives for :data:`OTHER_LABEL` (as named in the verdict prompt)."""

VERDICT_TEMPLATE = (
    "Which cat breed is shown in this photo? "
    "Candidates: {candidates}. "
    'Answer with exactly one candidate name; answer "{other}" if none of them fits.'
)

REASONING_TEMPLATE = (
    "This cat is one of these breeds: {candidates}. "
    "Describe the visible traits that decide between them: coat length and texture, "
    "pattern, colour points, eye colour and shape, ear shape and size, muzzle, and body type. "
    "Then say which candidate the traits support, and why the others fit less well."
)

TRAIT_WORDS = (
    "coat long short medium hair texture pattern tabby spotted marbled ticked solid bicolour "
    "colour points point cream seal blue lilac chocolate silver white black grey orange brown "
    "eyes eye blue green gold copper amber almond round shape ears ear large small folded "
    "curled tufted muzzle short long wedge flat face body cobby muscular slender large "
    "tail fluffy plush dense fine hairless cat breed photo traits candidate support because"
)
"""Vocabulary the reasoning answers use (the tiny demo tokenizers are trained on it)."""


def display_name(label: str) -> str:
    """Human name of a stage-1 label: ``"Maine_Coon"`` -> ``"Maine Coon"``.

    Folder-style labels use underscores; the model reads and answers with spaces.
    """
    return " ".join(label.replace("_", " ").split())


def with_other(candidates: Sequence[str]) -> list[str]:
    """``candidates`` (stage-1 labels, in stage-1 order) plus :data:`OTHER_LABEL` at the end.

    Raises:
        ValueError: empty list, or two labels with the same display name.
    """
    labels = [c for c in candidates if display_name(c).lower() != OTHER_ANSWER.lower()]
    if not labels:
        raise ValueError("at least one stage-1 candidate label is needed")
    names = [display_name(c).lower() for c in labels]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate candidate labels: {list(candidates)}")
    return [*labels, OTHER_LABEL]


def answer_text(label: str) -> str:
    """The answer a candidate corresponds to, with its leading space (``" Maine Coon"``).

    The space belongs to the answer, never to the prompt: a prompt ending in ``"ASSISTANT: "``
    makes the space its own token, which no trained model ever saw before an answer.
    """
    return " " + (OTHER_ANSWER if label == OTHER_LABEL else display_name(label))


def _candidate_list(labels: Sequence[str]) -> str:
    return ", ".join(OTHER_ANSWER if c == OTHER_LABEL else display_name(c) for c in labels)


def verdict_text(labels: Sequence[str]) -> str:
    """User text of the verdict prompt; ``labels`` already include :data:`OTHER_LABEL`."""
    return VERDICT_TEMPLATE.format(candidates=_candidate_list(labels), other=OTHER_ANSWER)


def reasoning_text(labels: Sequence[str]) -> str:
    """User text of the reasoning prompt (``"other"`` is not offered as a breed here)."""
    return REASONING_TEMPLATE.format(candidates=_candidate_list([c for c in labels if c != OTHER_LABEL]))


def user_messages(text: str) -> list[dict[str, Any]]:
    """Standard chat messages: one user turn holding one image and ``text``."""
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]


def build_chat(processor: Any, text: str) -> str:
    """Render ``text`` (with one image) through ``processor``'s chat template.

    Returns the prompt string ending with the assistant turn opener
    (``add_generation_prompt=True``), image placeholders not yet expanded.

    Raises:
        ValueError: the processor has no chat template.
    """
    if not getattr(processor, "chat_template", None):
        raise ValueError(
            f"{type(processor).__name__} has no chat template; catreview needs a chat/instruct "
            "checkpoint whose processor defines one"
        )
    return processor.apply_chat_template(user_messages(text), add_generation_prompt=True, tokenize=False)


def end_of_turn_token(processor: Any) -> str | None:
    """The special token the chat template writes right after an assistant answer.

    ``</s>`` for llava-1.5 and Mistral templates, ``<|im_end|>`` for ChatML (Qwen2-VL,
    LLaVA-OneVision), ``<end_of_utterance>`` for Idefics3/SmolVLM. It can differ from the
    tokenizer's ``eos_token`` (Idefics3-8B-Llama3: ``<|end_of_text|>``), and it is the token the
    model learned to emit after an answer, so answer scoring and training append it.

    Found by rendering a user turn plus an assistant answer and reading the longest special token
    that starts the text after the answer (whitespace skipped).

    Returns:
        The token string, or ``None`` when the template writes no special token there.

    Raises:
        ValueError: the processor has no chat template.
    """
    if not getattr(processor, "chat_template", None):
        raise ValueError(f"{type(processor).__name__} has no chat template")
    answer = "Maine Coon"
    messages = [*user_messages("Which breed?"), {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    rendered = processor.apply_chat_template(messages, tokenize=False)
    at = rendered.rfind(answer)
    if at < 0:
        return None
    suffix = rendered[at + len(answer) :].lstrip()
    matches = [t for t in processor.tokenizer.all_special_tokens if t and suffix.startswith(t)]
    return max(matches, key=len) if matches else None


def verdict_prompt(processor: Any, labels: Sequence[str]) -> str:
    """The verdict chat for ``labels`` (including :data:`OTHER_LABEL`)."""
    return build_chat(processor, verdict_text(labels))


def reasoning_prompt(processor: Any, labels: Sequence[str]) -> str:
    """The reasoning chat for ``labels``."""
    return build_chat(processor, reasoning_text(labels))


def corpus_lines() -> list[str]:
    """Prompt text used to train the tiny demo tokenizers (:mod:`catreview.models.tiny_llava`, ``tests/tiny_vlms.py``)."""
    return [VERDICT_TEMPLATE, REASONING_TEMPLATE, TRAIT_WORDS, OTHER_ANSWER]
