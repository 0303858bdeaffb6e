"""Tiny, randomly initialised VLMs of five more real architectures, for tests and benchmarks only.

Each builder creates the same classes a hub checkpoint uses (config, model, tokenizer, image
processor, processor with a chat template), saves them with ``save_pretrained`` and returns the
folder, so ``AutoProcessor.from_pretrained(folder)`` and
``AutoModelForImageTextToText.from_pretrained(folder)`` load them through exactly the path used
for real checkpoints. Their weights are random: predictions are meaningless, shapes,
tokenisation, chat templates, caching and generation are real. The llava-1.5 builder (the demo
VLM) and the shared tokenizer/config helpers are in :mod:`catreview.models.tiny_llava`.

Builders (all deterministic for a ``seed``; the seed and size are stored in the saved config as
``catreview_build`` so two seeds give two model versions):

* :func:`build_tiny_llava_next` -- llava-1.6 "anyres" (``LlavaNextForConditionalGeneration``,
  ``LlavaNextImageProcessor`` with grid pinpoints, ``LlavaNextProcessor``, Mistral-style
  ``[INST] <image>\\n... [/INST]`` template). The number of image tokens depends on the photo's
  aspect ratio, as in the real model.
* :func:`build_tiny_qwen2_vl` -- Qwen2-VL (``Qwen2VLForConditionalGeneration``, native-resolution
  ``Qwen2VLImageProcessor``, M-RoPE 3-D positions, ``Qwen2VLProcessor`` with the ChatML template).
* :func:`build_tiny_idefics3` -- Idefics3 / SmolVLM (SigLIP-style vision, pixel-shuffle
  connector, Llama text, image splitting into a grid of tiles + a global image,
  ``User:<image>... Assistant:`` template).
* :func:`build_tiny_llava_onevision` -- LLaVA-OneVision (SigLIP vision, "full" features,
  anyres tiling, Qwen2 text, ``LlavaOnevisionProcessor`` with the ChatML-style template of
  ``llava-hf/llava-onevision-qwen2-*-ov-hf``).
* :func:`build_tiny_pixtral` -- Pixtral (``PixtralVisionModel`` with 2-D RoPE at native
  resolution + Mistral text in ``LlavaForConditionalGeneration``, ``PixtralProcessor`` with
  ``[IMG]``/``[IMG_BREAK]``/``[IMG_END]`` tokens and the ``[INST]...[/INST]`` template), the layout
  of ``mistral-community/pixtral-12b``.

Not built here: Mistral3, Gemma3 and the rest -- not attempted (no known blocker; each is a
config + processor from arguments like the builders below).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from catreview.config import REPO_ROOT
from catreview.models.tiny_llava import (
    CLIP_MEAN,
    CLIP_STD,
    TinySize,
    clip_vision_config,
    llama_config,
    llama_style_tokenizer,
    mark_build,
    save_model,
    seed_everything,
    train_bpe_tokenizer,
)

SHARED_PHOTOS_DIR = REPO_ROOT.parent / "shared" / "data" / "cats"
"""The shared cat photos (one folder per breed), the benchmark's default ``--photos-dir``."""

MISTRAL_INST_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{ ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ ' ' + content['text'] + eos_token }}{% endfor %}"
    "{% endif %}{% endfor %}"
)
"""llava-v1.6-mistral style template: ``[INST] <image>\\n<text> [/INST]`` (no generation suffix)."""

QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{% set image_count.value = image_count.value + 1 %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL-Instruct's ChatML template (images only, no video branch)."""


QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]


def qwen_style_tokenizer(vocab_size: int = 1024, chat_template: str | None = None) -> Any:
    """``PreTrainedTokenizerFast`` with Qwen2-VL's special tokens; ``<|im_end|>`` is EOS."""
    from transformers import PreTrainedTokenizerFast

    tok = train_bpe_tokenizer(QWEN_SPECIAL_TOKENS, vocab_size=vocab_size, bos=None)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        chat_template=chat_template,
        padding_side="left",
    )


def build_tiny_llava_next(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny llava-1.6 ("llava-next", anyres tiling) into ``out_dir``.

    112 px tiles (patch 14 -> 64 tokens a tile), grid pinpoints 1x1, 1x2, 2x1, 2x2 tiles; a 3:2
    photo gives a base tile + 2 tiles + one newline token per row of features. ~0.26M params.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
        LlavaNextProcessor,
    )

    tile = 112
    s = TinySize(tile, 14, 32, 2, 2, 64, 2, 4, 128, 1024)
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    tokenizer = llama_style_tokenizer(s.vocab_size, chat_template=MISTRAL_INST_CHAT_TEMPLATE)
    config = LlavaNextConfig(
        vision_config=clip_vision_config(s),
        text_config=llama_config(s, len(tokenizer), tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        image_seq_length=(tile // 14) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    mark_build(config, family="llava_next", size="demo", seed=seed)
    seed_everything(seed)
    model = LlavaNextForConditionalGeneration(config).eval()
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": tile},
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=MISTRAL_INST_CHAT_TEMPLATE,
    )
    return save_model(Path(out_dir), model, processor)


def build_tiny_qwen2_vl(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny Qwen2-VL into ``out_dir``.

    Native-resolution vision (patch 14, 2x2 merge, at most 224x224 px worth of patches -> at most
    64 image tokens, depending on aspect ratio), M-RoPE text model (hidden 64, 2 layers), ChatML
    template. ~0.28M params.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    tokenizer = qwen_style_tokenizer(1024, chat_template=QWEN2_VL_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    hidden, heads = 64, 4  # head_dim 16 -> 8 rotary frequencies split t/h/w as 2/3/3
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=2,
            max_position_embeddings=4096,
            initializer_range=0.1,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
        ),
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=hidden,
            num_heads=2,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    mark_build(config, family="qwen2_vl", size="demo", seed=seed)
    seed_everything(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    pixels = {"shortest_edge": 56 * 56, "longest_edge": 224 * 224}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=pixels, patch_size=14, merge_size=2, temporal_patch_size=2),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    return save_model(Path(out_dir), model, processor)


def _tiny_vision(image_size: int, patch_size: int, **extra: Any) -> dict[str, Any]:
    """Vision-config kwargs shared by the tiny non-CLIP towers (hidden 32, 2 layers, 2 heads)."""
    return dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )


def _tiny_text(model_type: str, tokenizer: Any, **extra: Any) -> dict[str, Any]:
    """Text-config kwargs shared by the tiny language models (hidden 64, 2 layers, 4 heads), with
    the tokenizer's vocabulary size and special-token ids."""
    return dict(
        model_type=model_type,
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""SmolVLM-Instruct's template: ``<|im_start|>User:<image><text><end_of_utterance>\nAssistant:``."""


def build_tiny_idefics3(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny Idefics3 (SmolVLM architecture) into ``out_dir``.

    64 px tiles, patch 8, pixel-shuffle scale 2 -> 16 image tokens a tile; photos are split into
    up to 2x2 tiles plus the global image, each wrapped in ``<fake_token_around_image>`` and
    ``<row_r_col_c>`` tags, as in the real processor. ~0.24M params.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
        PreTrainedTokenizerFast,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>"]
    tags = ["<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    tok = train_bpe_tokenizer(special + tags, vocab_size=1200, bos=None)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>"},
        chat_template=IDEFICS3_CHAT_TEMPLATE,
        padding_side="left",
    )
    tile, patch, scale = 64, 8, 2
    config = Idefics3Config(
        vision_config=_tiny_vision(tile, patch),
        text_config=_tiny_text("llama", tokenizer, num_key_value_heads=4, initializer_range=0.1),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        pad_token_id=tokenizer.pad_token_id,
    )
    mark_build(config, family="idefics3", size="demo", seed=seed)
    seed_everything(seed)
    model = Idefics3ForConditionalGeneration(config).eval()
    image_processor = Idefics3ImageProcessor(
        do_image_splitting=True, size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    return save_model(Path(out_dir), model, processor)


LLAVA_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + ' ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\n' + content['text'] }}{% endfor %}{{ '<|im_end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""llava-onevision-qwen2 template (images, then text): ``<|im_start|>user <image>\n<text><|im_end|>
<|im_start|>assistant\n``."""


def build_tiny_llava_onevision(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny LLaVA-OneVision into ``out_dir``.

    SigLIP vision (56 px tiles, patch 14 -> 16 tokens a tile, all tokens kept: ``"full"``),
    anyres grid pinpoints up to 2x2 tiles with ``anyres_max_9`` pooling, Qwen2 text (hidden 64,
    2 layers), ChatML-style template. ~0.25M params.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
        PreTrainedTokenizerFast,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_tokenizer(special, vocab_size=1024, bos=None),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        padding_side="left",
    )
    tile, patch = 56, 14
    pinpoints = [[tile, tile], [tile, 2 * tile], [2 * tile, tile], [2 * tile, 2 * tile]]
    config = LlavaOnevisionConfig(
        vision_config=_tiny_vision(tile, patch, model_type="siglip_vision_model"),
        text_config=_tiny_text("qwen2", tokenizer, num_key_value_heads=2, max_position_embeddings=4096),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        vision_aspect_ratio="anyres_max_9",
    )
    mark_build(config, family="llava_onevision", size="demo", seed=seed)
    seed_everything(seed)
    model = LlavaOnevisionForConditionalGeneration(config).eval()
    size = {"height": tile, "width": tile}
    processor = LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(
            size=size, image_grid_pinpoints=pinpoints, image_mean=[0.5] * 3, image_std=[0.5] * 3
        ),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=size),
        num_image_tokens=(tile // patch) ** 2,
        vision_feature_select_strategy="full",
        chat_template=LLAVA_ONEVISION_CHAT_TEMPLATE,
        vision_aspect_ratio="anyres_max_9",
    )
    return save_model(Path(out_dir), model, processor)


PIXTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST]' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '[IMG]' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{{ '[/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + eos_token }}{% endfor %}{% endif %}{% endfor %}"
)
"""Pixtral-12B's template, user and assistant turns: ``<s>[INST][IMG]<text>[/INST]``."""


def build_tiny_pixtral(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny Pixtral (``LlavaForConditionalGeneration`` + Pixtral vision).

    Native resolution: the longest side is resized to 128 px and cut into 16 px patches, one image
    token per patch, an ``[IMG_BREAK]`` after each row and ``[IMG_END]`` last, so the token count
    follows the photo's aspect ratio as in the real model. Mistral text (hidden 64, 2 layers).
    ~0.25M params.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`.
    """
    from transformers import (
        LlavaConfig,
        LlavaForConditionalGeneration,
        PixtralImageProcessor,
        PixtralProcessor,
        PreTrainedTokenizerFast,
    )

    special = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]", "<pad>"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_bpe_tokenizer(special, vocab_size=1024, bos=None),  # BOS comes from the template
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={
            "image_token": "[IMG]",
            "image_break_token": "[IMG_BREAK]",
            "image_end_token": "[IMG_END]",
        },
        chat_template=PIXTRAL_CHAT_TEMPLATE,
        padding_side="left",
    )
    patch, longest = 16, 128
    config = LlavaConfig(
        vision_config=_tiny_vision(longest, patch, model_type="pixtral", head_dim=16),
        text_config=_tiny_text("mistral", tokenizer, num_key_value_heads=2, head_dim=16, max_position_embeddings=4096),
        image_token_id=tokenizer.convert_tokens_to_ids("[IMG]"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
    )
    mark_build(config, family="pixtral", size="demo", seed=seed)
    seed_everything(seed)
    model = LlavaForConditionalGeneration(config).eval()
    processor = PixtralProcessor(
        image_processor=PixtralImageProcessor(
            size={"longest_edge": longest}, patch_size={"height": patch, "width": patch}
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        spatial_merge_size=1,
        chat_template=PIXTRAL_CHAT_TEMPLATE,
    )
    return save_model(Path(out_dir), model, processor)


__all__ = [
    "SHARED_PHOTOS_DIR",
    "build_tiny_idefics3",
    "build_tiny_llava_next",
    "build_tiny_llava_onevision",
    "build_tiny_pixtral",
    "build_tiny_qwen2_vl",
]


FASTVLM_IMAGE_SIZE = 128
"""Input side of :func:`build_tiny_fastvlm` (timm ``test_efficientnet``, stride 32 -> 4x4 = 16 image tokens)."""


def build_tiny_fastvlm(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Build and save a tiny FastVLM (timm tower + Llama text) into ``out_dir``.

    The classes of the built-in VLMs (``catreview.models.fastvlm``): ``TimmWrapperConfig`` around
    timm's ``test_efficientnet`` (0.1M params, 256 output channels, BatchNorm, stride 32; random
    weights, ``do_pooling=False`` so the tower returns channels-first ``(B, 256, 4, 4)``),
    ``FastVlmConfig`` + ``FastVlmForConditionalGeneration`` (projector ``linear_1``/``linear_2``
    flattening the 4x4 grid into 16 image tokens), ``LlavaProcessor`` with a ``CLIPImageProcessor``
    (128 px, timm's 0.5/0.5 normalisation of the EfficientNet-Lite towers), ``patch_size=32``,
    ``vision_feature_select_strategy="full"`` and the llava-1.5 chat template. ~0.4M params.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path` (``AutoProcessor`` / ``AutoModelForImageTextToText``).
    """
    import timm
    from transformers import (
        CLIPImageProcessor,
        FastVlmConfig,
        FastVlmForConditionalGeneration,
        LlavaProcessor,
        TimmWrapperConfig,
    )

    from catreview.models.tiny_llava import LLAVA_15_CHAT_TEMPLATE

    s = TinySize(FASTVLM_IMAGE_SIZE, 32, 256, 0, 0, 96, 3, 4, 256, 1024)
    tokenizer = llama_style_tokenizer(s.vocab_size, chat_template=LLAVA_15_CHAT_TEMPLATE)
    vision = TimmWrapperConfig(architecture="test_efficientnet", do_pooling=False, hidden_size=s.v_hidden)
    config = FastVlmConfig(
        vision_config=vision,
        text_config=llama_config(s, len(tokenizer), tokenizer),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(s.image_size // s.patch_size) ** 2,
    )
    mark_build(config, family="fast_vlm", size="tiny", seed=seed)
    seed_everything(seed)
    model = FastVlmForConditionalGeneration(config).eval()
    # transformers' weight init leaves a timm tower nearly dead (outputs ~1e-15): give it timm's
    # own random init, so photos reach the projector with O(1) features like a real tower's.
    tower = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    model.model.vision_tower.timm_model.load_state_dict(tower.state_dict(), strict=False)
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": s.image_size},
        crop_size={"height": s.image_size, "width": s.image_size},
        resample=3,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=s.patch_size,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=LLAVA_15_CHAT_TEMPLATE,
    )
    return save_model(Path(out_dir), model, processor)
