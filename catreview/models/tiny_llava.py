"""The tiny llava-1.5 behind the built-in demo VLM: randomly initialised, built offline in seconds.

:func:`build_tiny_llava` creates the same classes a hub checkpoint uses (``CLIPVisionModel`` +
``LlamaForCausalLM`` -> ``LlavaForConditionalGeneration``, ``LlavaProcessor`` with the
``USER: <image>\\n... ASSISTANT:`` chat template), saves them with ``save_pretrained`` and returns
the folder, so ``AutoProcessor.from_pretrained(folder)`` and
``AutoModelForImageTextToText.from_pretrained(folder)`` load it through exactly the path used for
``llava-hf/llava-1.5-7b-hf``. The weights are random: predictions are meaningless, shapes,
tokenisation, chat templates, caching and generation are real. ``size="demo"``: ~0.6M parameters,
224 px, 256 image tokens (:mod:`catreview.models.demo`). ``size="14m"``: ~14M parameters, 336 px,
576 image tokens (llava-1.5's real image geometry; benchmarks and training tests).

Builds are deterministic for a ``seed``; the seed and size are stored in the saved config as
``catreview_build`` so two seeds give two model versions.

Tokenizers are byte-level BPE models trained locally with ``tokenizers`` on the 67 breed names
(``assets/breeds67.txt``), the shared photos' breed folders, and the prompt vocabulary of
:mod:`catreview.models.vlm.prompts`, wrapped in ``PreTrainedTokenizerFast``. Image placeholder tokens are
added as special tokens (otherwise BPE splits ``<image>`` and the processor's image token id is
wrong).

The tokenizer, size and config helpers here are public because the test-only builders of five
more families (llava-next, Qwen2-VL, Idefics3, LLaVA-OneVision, Pixtral; ``tests/tiny_vlms.py``)
reuse them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from catreview.data.labels import BREEDS67_FILE
from catreview.models.vlm import prompts

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + eos_token }}{% endgeneration %}{% endfor %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""llava-1.5 template (as in ``llava-hf/llava-1.5-7b-hf``): ``USER: <image>\\n<text> ASSISTANT:``."""

SHARED_PHOTO_BREEDS = (
    "Abyssinian", "American_Shorthair", "Bengal", "Birman", "Bombay", "British_Shorthair",
    "Egyptian_Mau", "Exotic_Shorthair", "Maine_Coon", "Persian", "Ragdoll", "Russian_Blue",
    "Scottish_Fold", "Siamese", "Sphynx",
)  # fmt: skip
"""Breed folders of the shared photos (``../shared/data/cats``). Fixed here, not listed from
disk, so a build is identical whether or not the photos are present."""


def breed_names() -> list[str]:
    """The 67 class names from ``assets/breeds67.txt`` plus the shared photos' breed folders.

    Folder names use underscores (``Maine_Coon``); both spellings are returned.
    """
    names = [line.strip() for line in BREEDS67_FILE.read_text(encoding="utf-8").splitlines() if line.strip()]
    names += SHARED_PHOTO_BREEDS
    extra = [prompts.display_name(n) for n in names]
    return list(dict.fromkeys(names + extra))


def tokenizer_corpus(extra_lines: Iterable[str] = ()) -> list[str]:
    """Deterministic training text: breed names, prompt sentences and trait words."""
    names = breed_names()
    lines = list(prompts.corpus_lines())
    lines += names
    lines += [f"This is a {n} cat. The cat in the photo is a {n}." for n in names]
    lines += [prompts.verdict_text([*names[i : i + 3], prompts.OTHER_LABEL]) for i in range(0, len(names), 3)]
    lines += [prompts.reasoning_text(names[i : i + 3]) for i in range(0, len(names), 3)]
    lines += ["USER: ASSISTANT: system user assistant You are a helpful assistant. [INST] [/INST]"]
    lines += list(extra_lines)
    return lines


def train_bpe_tokenizer(
    special_tokens: list[str], *, vocab_size: int, bos: str | None, extra_lines: Iterable[str] = ()
) -> Any:
    """Train a byte-level BPE :class:`tokenizers.Tokenizer` on :func:`tokenizer_corpus`.

    ``special_tokens`` get the first ids, in order. With ``bos`` the post-processor prepends it
    (Llama style); without, nothing is added (Qwen style). The result usually has fewer tokens
    than ``vocab_size`` (small corpus): use ``len(tokenizer)`` for the model's vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(extra_lines), trainer)
    if bos is not None:
        bos_id = tok.token_to_id(bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def llama_style_tokenizer(vocab_size: int = 1024, chat_template: str | None = None) -> Any:
    """``PreTrainedTokenizerFast`` with ``<s> </s> <unk> <pad>`` and ``<image>`` as special tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], vocab_size=vocab_size, bos="<s>")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=chat_template,
        padding_side="left",
    )


@dataclass(frozen=True)
class TinySize:
    """Dimensions of a tiny llava-1.5 (vision tower ``v_*``, language model ``t_*``)."""

    image_size: int
    patch_size: int
    v_hidden: int
    v_layers: int
    v_heads: int
    t_hidden: int
    t_layers: int
    t_heads: int
    t_intermediate: int
    vocab_size: int


LLAVA_SIZES: dict[str, TinySize] = {
    # 224 px / 14 = 16x16 = 256 image tokens; ~0.6M parameters.
    "demo": TinySize(224, 14, 48, 2, 2, 96, 3, 4, 256, 1024),
    # 336 px / 14 = 24x24 = 576 image tokens (llava-1.5's geometry); ~14M parameters.
    "14m": TinySize(336, 14, 128, 4, 4, 256, 12, 8, 1024, 2048),
}


def seed_everything(seed: int) -> None:
    """Seed torch's default generator (the weight initialisation of the next model built)."""
    import torch

    torch.manual_seed(seed)


def mark_build(config: Any, **info: Any) -> None:
    """Store how the model was built in its config (changes the config hash, so the version)."""
    config.catreview_build = dict(info)


def save_model(out_dir: Path, model: Any, processor: Any) -> Path:
    """``save_pretrained`` model and processor into ``out_dir`` (created); returns ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def clip_vision_config(s: TinySize) -> Any:
    """``CLIPVisionConfig`` of the vision tower dimensions in ``s``."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(
        hidden_size=s.v_hidden,
        intermediate_size=4 * s.v_hidden,
        num_hidden_layers=s.v_layers,
        num_attention_heads=s.v_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
        projection_dim=s.v_hidden,
    )


def llama_config(s: TinySize, vocab_size: int, tokenizer: Any) -> Any:
    """``LlamaConfig`` of the language-model dimensions in ``s``, special-token ids from ``tokenizer``."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=s.t_hidden,
        intermediate_size=s.t_intermediate,
        num_hidden_layers=s.t_layers,
        num_attention_heads=s.t_heads,
        num_key_value_heads=s.t_heads,
        max_position_embeddings=4096,
        initializer_range=0.1,  # wider than 0.02 so random logits are not near-uniform
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def clip_image_processor(image_size: int) -> Any:
    """``CLIPImageProcessor``: resize the short side to ``image_size``, centre crop, CLIP mean/std."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )


def build_tiny_llava(out_dir: str | Path, *, size: Literal["demo", "14m"] = "demo", seed: int = 0) -> Path:
    """Build and save a tiny llava-1.5 (CLIP vision + Llama text) into ``out_dir``.

    Args:
        out_dir: folder to write (created; existing files are overwritten).
        size: ``"demo"`` (~0.6M params, 224 px, 256 image tokens) or ``"14m"`` (~14M params,
            336 px, 576 image tokens).
        seed: weight initialisation seed; same seed, same weights.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`, loadable with ``AutoProcessor`` and
        ``AutoModelForImageTextToText``.

    Raises:
        KeyError: unknown ``size``.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    s = LLAVA_SIZES[size]
    tokenizer = llama_style_tokenizer(s.vocab_size, chat_template=LLAVA_15_CHAT_TEMPLATE)
    config = LlavaConfig(
        vision_config=clip_vision_config(s),
        text_config=llama_config(s, len(tokenizer), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(s.image_size // s.patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    mark_build(config, family="llava", size=size, seed=seed)
    seed_everything(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = LlavaProcessor(
        image_processor=clip_image_processor(s.image_size),
        tokenizer=tokenizer,
        patch_size=s.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )
    return save_model(Path(out_dir), model, processor)
