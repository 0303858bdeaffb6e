"""A LLaVA-style VLM from a timm image tower and a causal language model (transformers' FastVLM classes).

:func:`build_fastvlm` assembles ``FastVlmForConditionalGeneration`` (``TimmWrapperConfig`` vision
tower, two-layer GELU projector, the given LM) and a ``LlavaProcessor`` (``CLIPImageProcessor`` +
the LM's tokenizer with an added ``<image>`` special token + an image-aware ChatML chat template),
and saves both with ``save_pretrained``, so ``AutoProcessor.from_pretrained(folder)`` and
``AutoModelForImageTextToText.from_pretrained(folder)`` load it exactly like a hub checkpoint.

Why FastVLM and not ``LlavaForConditionalGeneration``: a timm CNN returns channels-first features
``(B, C, H, W)``; FastVLM flattens them to ``(B, H*W, C)`` before the projector, LLaVA does not
(measured with transformers 5.24, ``../shared/NOTES.md``). One image gives ``(S/32)^2`` image
tokens for an EfficientNet at ``S`` px (49 at 224 px). ``TimmWrapperImageProcessor`` saves but
does not reload, hence ``CLIPImageProcessor`` configured like timm's eval transform.

The projector is randomly initialised (seeded): a freshly built model has never seen an image
paired with text, so its answers about a photo mean nothing until an adapter is trained on it.
:func:`build_tiny_fastvlm` builds a tiny random one (random EfficientNet-Lite0 tower + a tiny
Llama LM, seconds) for tests of mechanics and of the training recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

#: The image placeholder added to the tokenizer as a special token (expanded by the processor).
IMAGE_TOKEN = "<image>"

#: SmolLM2-Instruct's default system turn (its own chat template adds it when none is given).
SMOLLM2_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"

#: Mean/std of timm's ``tf_efficientnet_lite*`` pretrained configs (inputs scaled to [-1, 1]).
LITE_MEAN = [0.5, 0.5, 0.5]
LITE_STD = [0.5, 0.5, 0.5]

#: Output stride of EfficientNet (and most timm CNNs): one image token per 32x32 pixels.
CNN_STRIDE = 32


def chatml_image_template(default_system: str | None = SMOLLM2_SYSTEM) -> str:
    """A ChatML chat template (``<|im_start|>role\\n...<|im_end|>\\n``) that accepts list content.

    Image parts become ``<image>\\n`` before the text, text parts are joined; string content is
    kept as is. With ``default_system``, a system turn is added when the chat has none (as
    SmolLM2-Instruct's own, text-only, template does). The assistant's text is wrapped in
    ``{% generation %}`` (``return_assistant_tokens_mask``). ``add_generation_prompt`` ends the
    prompt with ``<|im_start|>assistant\\n``.
    """
    system = (
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + default_system.replace("'", "\\'") + "<|im_end|>\\n' }}{% endif %}"
        if default_system
        else ""
    )
    return (
        "{% for message in messages %}" + system + "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{% if message['content'] is string %}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
        "{% else %}{{ message['content'] }}{% endif %}"
        "{% else %}"
        "{% for part in message['content'] | selectattr('type', 'equalto', 'image') %}"
        "{{ '" + IMAGE_TOKEN + "\\n' }}{% endfor %}"
        "{% for part in message['content'] | selectattr('type', 'equalto', 'text') %}"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ part['text'] }}{% endgeneration %}"
        "{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
        "{% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )


def image_processor(image_size: int, resize_size: int | None = None) -> Any:
    """``CLIPImageProcessor`` equal to timm's EfficientNet-Lite eval transform.

    Resize the short side to ``resize_size`` (default ``round(image_size / 0.875)``, timm's
    ``crop_pct``), bicubic, centre crop ``image_size`` square, scale to [0, 1], normalise with
    mean/std 0.5 (so pixels lie in [-1, 1]).
    """
    from transformers import CLIPImageProcessor

    resize = resize_size if resize_size is not None else round(image_size / 0.875)
    return CLIPImageProcessor(
        size={"shortest_edge": resize},
        crop_size={"height": image_size, "width": image_size},
        resample=3,  # PIL.Image.BICUBIC
        do_center_crop=True,
        do_resize=True,
        do_normalize=True,
        do_convert_rgb=True,
        image_mean=LITE_MEAN,
        image_std=LITE_STD,
    )


def add_image_token(tokenizer: Any) -> int:
    """Add :data:`IMAGE_TOKEN` to ``tokenizer`` as a special token (in place) and return its id.

    A special token is never split by BPE, so the processor's placeholder count is exact.
    """
    from tokenizers import AddedToken

    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    tokenizer.image_token = IMAGE_TOKEN
    image_id: int = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return image_id


def _load_lm(language_model: Any) -> Any:
    """``language_model`` itself, or the causal LM saved in that folder (float32)."""
    if isinstance(language_model, (str, Path)):
        import torch
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(language_model), dtype=torch.float32)
    return language_model


def assemble_fastvlm(
    *,
    tower: str,
    language_model: Any,
    tokenizer: Any,
    tower_checkpoint: str | Path | None = None,
    image_size: int = 224,
    resize_size: int | None = None,
    chat_template: str | None = None,
    seed: int = 0,
    build_info: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """A ``FastVlmForConditionalGeneration`` and its ``LlavaProcessor``, not saved (see :func:`build_fastvlm`).

    Args:
        tower: timm architecture of the image tower (``"tf_efficientnet_lite0"``); created
            without its classifier head, features from its last stage (channels-first,
            flattened to ``(S/32)^2`` tokens).
        language_model: a causal LM (``PreTrainedModel`` with ``.model`` and ``lm_head``) or
            the folder of one; its weights are copied, its embeddings resized by one row.
        tokenizer: the LM's tokenizer; :data:`IMAGE_TOKEN` is added to it in place. It needs
            a pad token (its EOS is used when it has none).
        tower_checkpoint: ImageNet weights for ``tower`` (``.pth``, loaded with timm's
            ``load_checkpoint(remap=True)``: tensors matched by order, so a lukemelas-layout
            EfficientNet file loads); ``None``: timm's own random initialisation (seeded).
        image_size: square crop in pixels, a multiple of 32 (224 -> 49 image tokens).
        resize_size: short side before cropping (default ``image_size / 0.875``).
        chat_template: default :func:`chatml_image_template` (SmolLM2's system turn).
        seed: seeds the projector and the new ``<image>`` embedding row.
        build_info: stored in the config as ``catreview_build`` (part of the model version).

    Returns:
        ``(model, processor)``, the model in eval mode, float32, on CPU.

    Raises:
        ValueError: ``image_size`` not a multiple of 32, or the tower gives another number of
            features than the processor's placeholder count.
    """
    import timm
    import torch
    from transformers import FastVlmConfig, FastVlmForConditionalGeneration, LlavaProcessor, TimmWrapperConfig

    if image_size % CNN_STRIDE:
        raise ValueError(f"image_size must be a multiple of {CNN_STRIDE} (one image token per 32 px), got {image_size}")
    lm = _load_lm(language_model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    image_id = add_image_token(tokenizer)
    torch.manual_seed(seed)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    features = timm.create_model(tower, pretrained=False, num_classes=0).num_features
    n_tokens = (image_size // CNN_STRIDE) ** 2
    config = FastVlmConfig(
        vision_config=TimmWrapperConfig(architecture=tower, do_pooling=False, hidden_size=features),
        text_config=lm.config,
        image_token_index=image_id,
        image_seq_length=n_tokens,
    )
    config.catreview_build = dict(build_info or {}, tower=tower, image_size=image_size, seed=seed)
    config.text_config._name_or_path = ""  # where the LM was read from: not part of the model (nor its version)
    torch.manual_seed(seed)
    model = FastVlmForConditionalGeneration(config)
    timm_model = model.model.vision_tower.timm_model
    if tower_checkpoint is not None:
        timm.models.load_checkpoint(timm_model, str(tower_checkpoint), remap=True, strict=False)
    else:  # transformers' init leaves a timm CNN nearly dead (outputs ~1e-15): use timm's own (seeded)
        torch.manual_seed(seed)
        timm_model.load_state_dict(timm.create_model(tower, pretrained=False, num_classes=0).state_dict())
    model.model.language_model.load_state_dict(lm.model.state_dict())
    if not config.tie_word_embeddings:
        model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    model.eval()
    with torch.inference_mode():
        out = model.model.vision_tower(torch.zeros(1, 3, image_size, image_size), return_dict=True)
    got = out.last_hidden_state.shape[-2] * out.last_hidden_state.shape[-1]
    if got != n_tokens:
        raise ValueError(f"{tower} gives {got} feature positions at {image_size} px, expected {n_tokens}")
    processor = LlavaProcessor(
        image_processor=image_processor(image_size, resize_size),
        tokenizer=tokenizer,
        patch_size=CNN_STRIDE,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
        chat_template=chat_template or chatml_image_template(),
    )
    return model, processor


def build_fastvlm(out_dir: str | Path, **kwargs: Any) -> Path:
    """Assemble a FastVLM (:func:`assemble_fastvlm`, same keyword arguments) and save it to ``out_dir``.

    Model weights as safetensors (float32), processor, tokenizer and chat template beside them.

    Returns:
        ``out_dir`` as a :class:`~pathlib.Path`, loadable with ``AutoProcessor`` and
        ``AutoModelForImageTextToText``.
    """
    model, processor = assemble_fastvlm(**kwargs)
    return save_fastvlm(out_dir, model, processor)


def save_fastvlm(out_dir: str | Path, model: Any, processor: Any) -> Path:
    """``save_pretrained`` ``model`` (safetensors) and ``processor`` into ``out_dir`` (created)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def assemble_tiny_fastvlm(*, seed: int = 0, tower: str = "tf_efficientnet_lite0") -> tuple[Any, Any]:
    """A tiny random FastVLM, not saved: random ``tower``, a 3-layer Llama of width 96, a BPE
    tokenizer trained on the breed/prompt corpus with ChatML tokens; ~4M parameters, 224 px,
    49 image tokens. Same seed, same weights. Returns ``(model, processor)`` like
    :func:`assemble_fastvlm`.

    Real architecture, random weights: for tests of mechanics (loading, scoring, LoRA training).
    """
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    from catreview.models.tiny_llava import LLAVA_SIZES, llama_config, seed_everything, train_bpe_tokenizer

    raw = train_bpe_tokenizer(
        ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"],
        vocab_size=1024,
        bos=None,
        extra_lines=["<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_start|>assistant\n"],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<unk>", pad_token="<pad>"
    )
    seed_everything(seed)
    lm = LlamaForCausalLM(llama_config(LLAVA_SIZES["demo"], len(tokenizer) + 1, tokenizer))
    return assemble_fastvlm(
        tower=tower,
        language_model=lm,
        tokenizer=tokenizer,
        chat_template=chatml_image_template(None),
        seed=seed,
        build_info={"family": "fastvlm", "size": "tiny"},
    )


def build_tiny_fastvlm(out_dir: str | Path, *, seed: int = 0, tower: str = "tf_efficientnet_lite0") -> Path:
    """:func:`assemble_tiny_fastvlm` saved into ``out_dir`` (seconds); returns ``out_dir`` as a
    :class:`~pathlib.Path`, loadable with ``AutoProcessor`` + ``AutoModelForImageTextToText``."""
    model, processor = assemble_tiny_fastvlm(seed=seed, tower=tower)
    return save_fastvlm(out_dir, model, processor)
