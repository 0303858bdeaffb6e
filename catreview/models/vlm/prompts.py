"""The stage-2 prompts, in one place.

Every prediction stored by catreview carries ``PROMPT_VERSION`` (through
:attr:`catreview.models.vlm.postclassifier.VLMPostClassifier.model_version`): changing any text in this module changes
what the VLM is asked, so bump the version with it and old and new predictions stay apart.

Two prompts:

* the **verdict** prompt lists the candidates (stage-1 top-k; :data:`OTHER_LABEL` is "a cat of
  another breed") and asks which breed it is. The assistant's answer is prefilled with
  :data:`ANSWER_PREFILL` (``"This is"``) and verdicts are *scored*, not generated: each
  candidate's completion (:func:`answer_text`: ``" a Bengal cat."``, ``" an Abyssinian cat."``,
  with its leading space and its own indefinite article) is appended and its log-likelihood
  measured (see :mod:`catreview.models.vlm.scoring`). The prefill puts every candidate in the
  same sentence, so a small model compares breed names in a context it knows instead of
  guessing the answer's form (measured on a SmolLM2-135M FastVLM: free generation without it is
  poor, ``../shared/NOTES.md``). The prefill is one string shared by every candidate (the
  scorer runs it once), so the article ("a" / "an", :func:`indefinite_article`) belongs to each
  candidate's answer, never to the prefill: training (:mod:`training.data`) and prediction
  both score :func:`answer_text`, so they stay consistent. The export's answers start with the
  same sentence (``"This is an Abyssinian cat."``).
* the **reasoning** prompt asks for the visible traits that decide between the candidates
  (coat, pattern, colour points, eyes, ears, muzzle, body). Its answer is free text, generated.

Chats are always built through the processor's own chat template
(``processor.apply_chat_template``) with the standard messages format, so no per-model prompt
string lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PROMPT_VERSION = "p3"
"""Version of every text below. A prompt change is a new prediction version.
(p3: prefill ``"This is"`` and the article in each answer, ``" an Abyssinian cat."``; p2 prefilled
``"This is a"``, which read "This is a Abyssinian cat".)"""

OTHER_LABEL = "other"
"""Label added to every candidate list: "none of the stage-1 candidates"."""

OTHER_ANSWER = "cat of another breed"
"""The completion scored for :data:`OTHER_LABEL` (after its article: "This is a cat of another breed.")."""

ANSWER_PREFILL = "This is"
"""Start of the assistant's verdict answer, written into the prompt (after the turn opener);
the scored completions continue it (:func:`answer_text`)."""

VERDICT_TEMPLATE = (
    "Which breed is this cat: {candidates}? Answer with one sentence; if it is none of them, say that it is a {other}."
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


_A_BEFORE_VOWEL = ("uni", "use", "usu", "uk", "ura", "ure", "uti", "eu", "ewe", "one", "once")
_AN_BEFORE_H = ("hour", "honest", "honou", "heir")


def indefinite_article(phrase: str) -> str:
    """``"a"`` or ``"an"`` for ``phrase``, by the sound of its first word.

    Vowel letters take "an" except where they sound like "you"/"w" (Ural, Ukrainian, one);
    a silent h takes "an" (an hour).

    >>> [indefinite_article(n) for n in ("Abyssinian", "American Shorthair", "Bengal", "Ocicat")]
    ['an', 'an', 'a', 'an']
    """
    word = phrase.strip().split()[0].lower() if phrase.strip() else ""
    if word.startswith(_AN_BEFORE_H):
        return "an"
    if word.startswith(_A_BEFORE_VOWEL):
        return "a"
    return "an" if word[:1] in ("a", "e", "i", "o", "u") else "a"


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


def candidate_name(label: str) -> str:
    """How a candidate is named in prompts and answers: ``"Maine Coon"``; :data:`OTHER_LABEL` ->
    :data:`OTHER_ANSWER`."""
    return OTHER_ANSWER if label == OTHER_LABEL else display_name(label)


def answer_text(label: str) -> str:
    """The scored completion of :data:`ANSWER_PREFILL` for a candidate, with its leading space
    and its indefinite article (:func:`indefinite_article`): ``" a Maine Coon cat."``,
    ``" an Abyssinian cat."``; a name already ending in "cat" gets no second one
    (``" a Norwegian Forest Cat."``); :data:`OTHER_LABEL` -> ``" a cat of another breed."``.

    The space belongs to the answer, never to the prompt: a prompt ending in a space makes the
    space its own token, which no trained model ever saw before a word.
    """
    name = candidate_name(label)
    if label != OTHER_LABEL and not name.lower().endswith("cat"):
        name += " cat"
    return f" {indefinite_article(name)} {name}."


def _candidate_list(labels: Sequence[str]) -> str:
    """``"A, B or C"`` (breeds only, :data:`OTHER_LABEL` left out)."""
    names = [display_name(c) for c in labels if c != OTHER_LABEL]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


def verdict_text(labels: Sequence[str]) -> str:
    """User text of the verdict prompt; ``labels`` may include :data:`OTHER_LABEL` (offered as
    "a cat of another breed", always)."""
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


def with_prefill(chat: str, prefill: str = ANSWER_PREFILL) -> str:
    """``chat`` (ending with the assistant turn opener) followed by ``prefill``, separated by a
    space unless the opener ends in whitespace (``"ASSISTANT: This is"``,
    ``"<|im_start|>assistant\nThis is"``)."""
    return chat + ("" if chat[-1:].isspace() else " ") + prefill


def verdict_prompt(processor: Any, labels: Sequence[str]) -> str:
    """The verdict chat for ``labels`` (including :data:`OTHER_LABEL`), ending with the
    prefilled start of the answer (:data:`ANSWER_PREFILL`)."""
    return with_prefill(build_chat(processor, verdict_text(labels)))


def reasoning_prompt(processor: Any, labels: Sequence[str]) -> str:
    """The reasoning chat for ``labels``."""
    return build_chat(processor, reasoning_text(labels))


def corpus_lines() -> list[str]:
    """Prompt text used to train the tiny demo tokenizers (:mod:`catreview.models.tiny_llava`, ``tests/tiny_vlms.py``)."""
    return [VERDICT_TEMPLATE, REASONING_TEMPLATE, TRAIT_WORDS, OTHER_ANSWER]
