"""Stage-2 VLM post-classifier on tiny real-architecture models built offline.

The models (llava-1.5, llava-next, llava-onevision, Pixtral, Qwen2-VL, Idefics3; random weights) are built into a temporary folder
once per module and loaded through ``AutoProcessor`` / ``AutoModelForImageTextToText`` exactly as
hub checkpoints are. Photos are real shared cat photos; the model only ever gets pixels.
No mocks.
"""

from __future__ import annotations

import gc
import itertools
import os
import threading
import weakref
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

from catreview.config import VLMProfile
from catreview.models import tiny_llava
from catreview.models.vlm import prompts
from catreview.models.vlm.generation import match_candidate
from catreview.models.vlm.postclassifier import VLMPostClassifier
from catreview.models.vlm.scoring import (
    answer_token_ids,
    candidate_answer,
    pack_candidates,
    packed_attention_mask,
)
from catreview.models.vlm.types import TokenBoundaryError, VLMError
from tests import tiny_vlms
from tests.conftest import load_photos

ATOL = 1e-4


# The photos differ in size/aspect, so llava-next and Qwen2-VL get different image-token counts.
BREEDS = ["Bengal", "Maine_Coon"]
CANDIDATES = [["Bengal", "Maine_Coon", "Siamese"], ["Maine_Coon", "Persian"]]  # k differs on purpose


@pytest.fixture(scope="module")
def photos():
    return load_photos(BREEDS)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-vlms")
    return {
        "llava": tiny_llava.build_tiny_llava(root / "llava", size="demo", seed=0),
        "llava-next": tiny_vlms.build_tiny_llava_next(root / "llava-next", seed=0),
        "qwen2-vl": tiny_vlms.build_tiny_qwen2_vl(root / "qwen2-vl", seed=0),
        "idefics3": tiny_vlms.build_tiny_idefics3(root / "idefics3", seed=0),
        "llava-onevision": tiny_vlms.build_tiny_llava_onevision(root / "llava-onevision", seed=0),
        "pixtral": tiny_vlms.build_tiny_pixtral(root / "pixtral", seed=0),
    }


def make(model_dir: Path, **overrides) -> VLMPostClassifier:
    profile = VLMProfile(model=str(model_dir), max_new_tokens=24, **overrides)
    return VLMPostClassifier(profile, name="test")


@pytest.fixture(scope="module")
def llava(model_dirs) -> VLMPostClassifier:
    return make(model_dirs["llava"], batch_size=8).load()


def assert_close(a: list[float], b: list[float], atol: float = ATOL) -> None:
    assert len(a) == len(b)
    assert max(abs(x - y) for x, y in zip(a, b)) <= atol, (a, b)


# --------------------------------------------------------------------------------------------


def test_tiny_models_load_through_auto_classes(model_dirs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    expected = {
        "llava": "LlavaForConditionalGeneration",
        "llava-next": "LlavaNextForConditionalGeneration",
        "qwen2-vl": "Qwen2VLForConditionalGeneration",
        "idefics3": "Idefics3ForConditionalGeneration",
        "llava-onevision": "LlavaOnevisionForConditionalGeneration",
        "pixtral": "LlavaForConditionalGeneration",
    }
    for key, cls in expected.items():
        processor = AutoProcessor.from_pretrained(model_dirs[key])
        model = AutoModelForImageTextToText.from_pretrained(model_dirs[key])
        assert type(model).__name__ == cls
        assert processor.chat_template
    tok = AutoProcessor.from_pretrained(model_dirs["llava"]).tokenizer
    assert tok.convert_ids_to_tokens(tok("USER: <image>\nhi")["input_ids"]).count("<image>") == 1


def test_tiny_build_is_deterministic(tmp_path, model_dirs):
    again = tiny_llava.build_tiny_llava(tmp_path / "again", size="demo", seed=0)
    other = tiny_llava.build_tiny_llava(tmp_path / "other", size="demo", seed=1)
    version = lambda d: make(d).model_version.split("@")[1]
    assert version(again) == version(model_dirs["llava"])
    assert version(other) != version(again)
    assert (again / "tokenizer.json").read_bytes() == (model_dirs["llava"] / "tokenizer.json").read_bytes()
    assert (again / "model.safetensors").read_bytes() == (model_dirs["llava"] / "model.safetensors").read_bytes()


def test_probabilities_sum_to_one_and_match_reference(llava, photos):
    verdicts = llava.score_candidates(photos, CANDIDATES)
    assert len(verdicts) == 2
    for image, cands, v in zip(photos, CANDIDATES, verdicts):
        assert v.candidates == [*cands, prompts.OTHER_LABEL]
        assert abs(sum(v.probabilities) - 1.0) < 1e-6
        assert all(0.0 <= p <= 1.0 for p in v.probabilities) and all(s <= 0.0 for s in v.scores)
        assert v.label == v.candidates[max(range(len(v.probabilities)), key=v.probabilities.__getitem__)]
        assert v.confidence == max(v.probabilities)
        assert v.model_version == llava.model_version
        ref = llava.score_candidates_reference(image, cands)
        assert_close(v.scores, ref.scores)
        assert_close(v.probabilities, ref.probabilities)
    # random weights, but not degenerate: the test above would notice a wrong position or mask
    assert max(verdicts[0].scores) - min(verdicts[0].scores) > 0.05


def test_batched_equals_one_at_a_time(model_dirs, llava, photos):
    batched = llava.score_candidates(photos, CANDIDATES)
    single = make(model_dirs["llava"], batch_size=1)
    one_by_one = single.score_candidates(photos, CANDIDATES)
    for a, b in zip(batched, one_by_one):
        assert a.candidates == b.candidates and a.label == b.label
        assert_close(a.scores, b.scores, atol=1e-5)
    assert single.model_version == llava.model_version  # batch size is not part of the version


def test_token_boundary_check(llava):
    tok = llava.processor.tokenizer
    prompt = prompts.verdict_prompt(llava.processor, ["Maine_Coon", "Bengal", prompts.OTHER_LABEL])
    assert prompt.endswith("ASSISTANT: This is")  # the answer is prefilled (prompts.ANSWER_PREFILL)
    answer = candidate_answer(prompt, "Maine_Coon")
    assert answer == " a Maine Coon cat."
    ids = answer_token_ids(tok, prompt, answer, eos_id=tok.eos_token_id)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:-1]) == " a Maine Coon cat."
    # A template ending in a space: the space becomes its own token, and an answer without the
    # space merges with it -> the prompt's ids are no longer a prefix.
    with pytest.raises(TokenBoundaryError, match="token boundary"):
        answer_token_ids(tok, prompt + " ", "Maine Coon cat.", eos_id=tok.eos_token_id)
    # ChatML prompts end with a newline: no separator on the answer there.
    assert candidate_answer("<|im_start|>assistant\n", "Maine_Coon") == "a Maine Coon cat."


def test_packed_candidates_layout_and_mask():
    # photo 0: " Maine Coon"+EOS = [5, 6, 2] and " Bengal"+EOS = [7, 2]; photo 1: [8, 9, 4, 2];
    # photo 2: an EOS-only answer (nothing to feed after the prefill) and [3, 2].
    answers = [[[5, 6, 2], [7, 2]], [[8, 9, 4, 2]], [[2], [3, 2]]]
    packed = pack_candidates(answers, pad_id=0)
    # Semantics: gathering a candidate's columns from its photo's row gives back exactly the
    # tokens it feeds (a_1..a_{n-1}) and the tokens they predict (a_2..a_n).
    flat = [a for per_photo in answers for a in per_photo]
    for n, answer in enumerate(flat):
        cols = packed.gather[n][packed.gather_mask[n].bool()]
        row = packed.rows[n]
        assert packed.input_ids[row, cols].tolist() == answer[:-1]
        assert packed.targets[row, cols].tolist() == answer[1:]
        assert packed.offsets[row, cols].tolist() == list(range(len(answer) - 1))
    # The layout itself:
    assert packed.input_ids.tolist() == [[5, 6, 7], [8, 9, 4], [3, 0, 0]]
    assert packed.targets.tolist() == [[6, 2, 2], [9, 4, 2], [2, 0, 0]]
    assert packed.segments.tolist() == [[0, 0, 1], [0, 0, 0], [1, -1, -1]]
    assert packed.offsets.tolist() == [[0, 1, 0], [0, 1, 2], [0, 0, 0]]
    assert packed.rows.tolist() == [0, 0, 1, 2, 2]
    assert packed.gather.tolist() == [[0, 1, 0], [2, 0, 0], [0, 1, 2], [0, 0, 0], [0, 0, 0]]
    assert packed.gather_mask.tolist() == [[1, 1, 0], [1, 0, 0], [1, 1, 1], [0, 0, 0], [1, 0, 0]]
    with pytest.raises(ValueError, match="empty answer"):
        pack_candidates([[[5, 2], []]], pad_id=0)

    prompt_mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])  # right-padded prompts
    mask = packed_attention_mask(prompt_mask, packed.segments, torch.float32)
    assert mask.shape == (3, 1, 3, 6) and mask.dtype == torch.float32
    allowed = (mask[:, 0] == 0).int().tolist()
    # photo 0: " Bengal" (query 2) sees the real prompt and itself, not " Maine Coon" (cols 3, 4)
    assert allowed[0] == [[1, 1, 0, 1, 0, 0], [1, 1, 0, 1, 1, 0], [1, 1, 0, 0, 0, 1]]
    assert allowed[1] == [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]
    # padding queries see the prompt only: never an all-masked row (NaN in softmax)
    assert allowed[2] == [[1, 0, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert (mask[mask != 0] == torch.finfo(torch.float32).min).all()


def test_packed_scoring_under_eager_and_sdpa_attention(model_dirs, llava, photos):
    # The 4D packed mask is additive; both of transformers' mask-taking attention paths must agree.
    eager = make(model_dirs["llava"]).load()
    eager.model.set_attn_implementation("eager")
    assert eager.model.config.get_text_config()._attn_implementation == "eager"
    for a, b in zip(eager.score_candidates(photos, CANDIDATES), llava.score_candidates(photos, CANDIDATES)):
        assert_close(a.scores, b.scores, atol=1e-5)


def test_mean_and_sum_normalisation_differ_on_multi_token_name(model_dirs, llava, photos):
    cands = [["Maine_Coon", "Bengal", "Persian"]]
    prompt = prompts.verdict_prompt(llava.processor, prompts.with_other(cands[0]))
    tok = llava.processor.tokenizer
    n_tokens = [
        len(answer_token_ids(tok, prompt, candidate_answer(prompt, c), eos_id=tok.eos_token_id))
        for c in prompts.with_other(cands[0])
    ]
    assert n_tokens[0] > n_tokens[1]  # " Maine" " Coon" </s>  vs  " Bengal" </s>
    mean = llava.score_candidates(photos[:1], cands)[0]
    total = make(model_dirs["llava"], score_normalisation="sum").score_candidates(photos[:1], cands)[0]
    # sum = mean * length, exactly as documented
    assert_close(total.scores, [m * n for m, n in zip(mean.scores, n_tokens)])
    # the total penalises the longer name: its probability drops under "sum"
    assert total.probabilities[0] < mean.probabilities[0]
    assert total.model_version != mean.model_version


def test_stream_reasoning_grows_and_matches_reasoning(model_dirs, photos):
    vlm = make(model_dirs["llava-next"])
    texts = list(vlm.stream_reasoning(photos[0], CANDIDATES[0]))
    assert len(texts) >= 2
    for before, after in itertools.pairwise(texts):
        assert after.startswith(before) and len(after) > len(before)
    assert texts[-1].strip() == vlm.reasoning(photos[0], CANDIDATES[0])


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "llava-onevision", "pixtral"])
def test_batched_reasoning_equals_one_at_a_time(family, model_dirs, photos):
    # Left padding + attention mask: greedy text of each row equals the unbatched text.
    vlm = make(model_dirs[family], batch_size=4)
    cands = [CANDIDATES[i % 2] for i in range(len(photos))]
    batched = vlm.reasoning_batch(photos, cands)
    assert batched == [vlm.reasoning(im, c) for im, c in zip(photos, cands)]
    assert (
        len(
            {
                len(vlm.processor.tokenizer(vlm_prompt)["input_ids"])
                for vlm_prompt in (prompts.reasoning_prompt(vlm.processor, prompts.with_other(c)) for c in cands)
            }
        )
        > 1
    ), "rows must differ in length"


def test_stream_reasoning_can_be_cancelled(model_dirs, photos):
    vlm = make(model_dirs["llava-next"])
    vlm.profile.max_new_tokens = 200
    full = list(vlm.stream_reasoning(photos[0], CANDIDATES[0]))[-1]
    stop = threading.Event()
    seen = []
    for text in vlm.stream_reasoning(photos[0], CANDIDATES[0], stop_event=stop):
        seen.append(text)
        stop.set()
    assert seen and len(seen[-1]) < len(full)
    # closing the iterator early also stops and joins the generation thread
    stream = vlm.stream_reasoning(photos[0], CANDIDATES[0])
    next(stream)
    stream.close()
    assert not [t for t in threading.enumerate() if t.name.startswith("vlm-stream-")]


def test_4bit_on_cpu_raises_clear_error(model_dirs):
    vlm = make(model_dirs["llava"], load_in_4bit=True, device="cpu")
    with pytest.raises(VLMError, match="load_in_4bit needs a CUDA GPU") as info:
        vlm.load()
    assert "Traceback" not in str(info.value) and not vlm.loaded


def test_missing_model_raises_clear_error(tmp_path):
    with pytest.raises(VLMError, match="not found"):
        VLMPostClassifier(VLMProfile(model=str(tmp_path / "no-such-model"))).load()
    with pytest.raises(VLMError, match="not in the local Hugging Face cache"):
        VLMPostClassifier(VLMProfile(model="catreview-test/no-such-model-xyz")).load()
    with pytest.raises(VLMError, match="not in the local Hugging Face cache"):
        _ = VLMPostClassifier(VLMProfile(model="catreview-test/no-such-model-xyz")).model_version


def test_load_and_unload_free_the_model(model_dirs):
    vlm = make(model_dirs["llava"])
    assert not vlm.loaded
    vlm.load()
    assert vlm.loaded and vlm.dtype == torch.float32 and vlm.device.type == "cpu"
    ref = weakref.ref(vlm.model)
    vlm.unload()
    gc.collect()
    assert not vlm.loaded and ref() is None
    vlm.load()  # loads again after unload
    assert vlm.loaded
    vlm.unload()


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # peft 0.21 + transformers 5
def test_peft_adapter_is_loaded_and_versioned(tmp_path, model_dirs, photos):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(model_dirs["llava"])
    lora = LoraConfig(r=4, target_modules=r".*language_model.*\.(q_proj|v_proj)", init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(tmp_path / "adapter")
    plain = make(model_dirs["llava"])
    tuned = make(model_dirs["llava"], adapter=tmp_path / "adapter").load()
    assert isinstance(tuned.model, PeftModel)
    assert tuned.model_version != plain.model_version and "+adapter@" in tuned.model_version
    v = tuned.score_candidates(photos[:1], CANDIDATES[:1])[0]
    ref = tuned.score_candidates_reference(photos[0], CANDIDATES[0])
    assert_close(v.scores, ref.scores)
    base = plain.score_candidates(photos[:1], CANDIDATES[:1])[0]
    assert max(abs(a - b) for a, b in zip(v.scores, base.scores)) > 1e-3  # the adapter is active


@pytest.mark.parametrize("family", ["llava-next", "qwen2-vl", "idefics3", "llava-onevision", "pixtral"])
def test_other_families_verdict_and_reasoning(family, model_dirs, photos):
    vlm = make(model_dirs[family], batch_size=2)
    verdicts = vlm.score_candidates(photos, CANDIDATES)
    for image, cands, v in zip(photos, CANDIDATES, verdicts):
        assert abs(sum(v.probabilities) - 1.0) < 1e-6
        assert_close(v.scores, vlm.score_candidates_reference(image, cands).scores)
    text = vlm.reasoning(photos[1], CANDIDATES[1])
    # the streamed text ends where the cached one does; only new tokens, never the prompt echoed
    assert text and list(vlm.stream_reasoning(photos[1], CANDIDATES[1]))[-1].strip() == text
    assert "ASSISTANT" not in text and "[/INST]" not in text and "assistant\n" not in text
    generated = vlm.generate_verdict(photos[1], CANDIDATES[1])
    assert generated.candidates == [*CANDIDATES[1], prompts.OTHER_LABEL]
    assert generated.label == match_candidate(generated.extra["answer"], generated.candidates)
    assert vlm.model_version.startswith(family + "@")


def test_answers_end_with_the_templates_end_of_turn_not_eos(model_dirs, photos):
    # Idefics3-8B-Llama3 ends an assistant turn with <end_of_utterance> while its tokenizer's
    # eos_token is <|end_of_text|>: the model never emits EOS after an answer, so scoring (and
    # training) must append the end-of-turn token the template writes.
    expected = {
        "llava": "</s>",
        "llava-next": "</s>",
        "qwen2-vl": "<|im_end|>",
        "idefics3": "<end_of_utterance>",
        "llava-onevision": "<|im_end|>",
        "pixtral": "</s>",
    }
    for family, token in expected.items():
        vlm = make(model_dirs[family]).load()
        assert prompts.end_of_turn_token(vlm.processor) == token, family
    vlm = make(model_dirs["idefics3"]).load()
    vlm.processor.tokenizer.eos_token = "<|endoftext|>"  # as in Idefics3-8B-Llama3
    vlm._end_of_turn = None
    tok = vlm.processor.tokenizer
    batch = vlm._prepare(photos[:1], [prompts.with_other(CANDIDATES[0])])
    assert {ids[-1] for ids in batch.answers[0]} == {tok.convert_tokens_to_ids("<end_of_utterance>")}
    fast = vlm.score_candidates(photos[:1], CANDIDATES[:1])[0]
    assert_close(fast.scores, vlm.score_candidates_reference(photos[0], CANDIDATES[0]).scores)


def test_generated_answers_match_whole_words_only():
    labels = ["Bengal", "Persian", "Maine_Coon", prompts.OTHER_LABEL]
    assert match_candidate("Another look: this is a Bengal.", labels) == "Bengal"
    assert match_candidate("Its mother was a Persian; this is a Bengal", labels) == "Persian"
    assert match_candidate("A maine coon, clearly", labels) == "Maine_Coon"
    assert match_candidate("Bengals are spotted", labels) == prompts.OTHER_LABEL
    assert match_candidate("none of these: other", labels) == prompts.OTHER_LABEL
