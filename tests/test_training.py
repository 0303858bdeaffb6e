"""LoRA rounds (training/): configuration, label masking, the loss the scorer reads, and a real
round on the shared photos that must measurably learn -- then gating against it on the held-out
test split.

Models are the tiny LLaVAs of :mod:`catreview.models.tiny_llava`, built offline: ``"demo"`` (0.6M
parameters, 224 px) for the mechanics, ``"14m"`` (14M parameters, 336 px, 576 image tokens,
llava-1.5 geometry) for the learning test. Nothing is mocked: the rounds run peft + accelerate
on real photos, and accuracies are measured with the app's own scorer.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch

from catreview.adapters.runfolder import BEST_DIR, CHECKPOINT_DIR, PROGRESS_FILE, RESULT_FILE, read_progress
from catreview.adapters.train_config import DEFAULT_TARGET_MODULES, TrainConfig
from catreview.cli.train_flags import add_config_arguments, config_from_args
from catreview.models.vlm import prompts
from tests.conftest import shared_photos_dir
from tests.export_builder import write_export
from training.data import Collator, TrainDataset, answer_end_token, eval_items, read_export
from training.evaluation import evaluate, evaluate_adapter, make_scorer
from training.lora import train_round
from training.loss import answer_loss, batch_loss
from training.model import add_lora, load_base_model, lora_module_names

# Three breeds that differ in coat colour (black / ruddy / silver tabby), so that even a randomly
# initialised vision tower carries a usable signal; 4 validation photos each. The held-out test
# split (the gate's data) takes 10 further photos of the two breeds that have them (Bombay's 10
# photos are all used): 20 photos, the default GatePolicy.min_test_photos.
LEARN_BREEDS = {"Bombay": 6, "Abyssinian": 10, "American_Shorthair": 10}
VAL_PER_BREED = 4
LEARN_TEST = {"Abyssinian": 10, "American_Shorthair": 10}


def export_rows(
    breeds: dict[str, int], val_per_breed: int, test: dict[str, int] | None = None
) -> list[tuple[Path, str, str]]:
    """(photo, canonical breed, split): the first ``n`` photos (sorted) train, the last
    ``val_per_breed`` validation, and ``test[folder]`` photos after the training ones test."""
    root = shared_photos_dir()
    test = test or {}
    rows = []
    for folder, n_train in breeds.items():
        files = sorted((root / folder).glob("*.jpg"))
        n_test = test.get(folder, 0)
        assert len(files) >= n_train + n_test + val_per_breed, f"{folder}: {len(files)} photos"
        breed = prompts.display_name(folder)
        rows += [(f, breed, "train") for f in files[:n_train]]
        rows += [(f, breed, "test") for f in files[n_train : n_train + n_test]]
        rows += [(f, breed, "validation") for f in files[-val_per_breed:]]
    return rows


@pytest.fixture(scope="session")
def demo_llava(tmp_path_factory) -> Path:
    from catreview.models.tiny_llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("llava-demo"), size="demo")


@pytest.fixture(scope="session")
def llava_14m(tmp_path_factory) -> Path:
    from catreview.models.tiny_llava import build_tiny_llava

    return build_tiny_llava(tmp_path_factory.mktemp("llava-14m"), size="14m")


@pytest.fixture(scope="session")
def small_export(tmp_path_factory) -> Path:
    rows = export_rows({"Bombay": 3, "Abyssinian": 3, "Bengal": 3}, 2)
    return write_export(rows, tmp_path_factory.mktemp("export-small"))


# ------------------------------------------------------------------------------ configuration


def test_config_defaults_flags_and_json_roundtrip(tmp_path):
    cfg = TrainConfig()
    assert (cfg.rank, cfg.lora_alpha, cfg.lr, cfg.epochs) == (16, 32, 2e-4, 3)
    assert cfg.target_modules_arg() == DEFAULT_TARGET_MODULES  # a regex string for peft
    assert TrainConfig(target_modules="q_proj, v_proj").target_modules_arg() == ["q_proj", "v_proj"]

    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    args = parser.parse_args(
        ["--rank", "8", "--grad-accum", "4", "--train-projector", "--max-steps", "none", "--balance", "loss"]
    )
    got = config_from_args(args, TrainConfig(max_steps=10))
    assert (got.rank, got.lora_alpha, got.grad_accum, got.train_projector, got.max_steps, got.balance) == (
        8,
        16,
        4,
        True,
        None,
        "loss",
    )
    got.save(tmp_path / "c.json")
    assert TrainConfig.load(tmp_path / "c.json") == got
    for bad in ({"rank": 0}, {"lr": 0.0}, {"balance": "oversample"}, {"dropout": 1.0}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


# ------------------------------------------------------------------------------ data and masking


def test_labels_mask_prompt_and_image_tokens_and_end_with_eos(demo_llava, small_export):
    from transformers import AutoProcessor

    from catreview.models.vlm.scoring import answer_token_ids, candidate_answer

    processor = AutoProcessor.from_pretrained(demo_llava)
    data = read_export(small_export)
    ds = TrainDataset(data.train, data.breeds, TrainConfig(other_rate=0.0, candidate_source="sampled"))
    samples = [ds[i] for i in range(3)]
    batch = Collator(processor)(samples)
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    end_id = tok.convert_tokens_to_ids(answer_end_token(processor))
    assert answer_end_token(processor) == prompts.end_of_turn_token(processor) == "</s>" == tok.eos_token  # llava-1.5
    for i, s in enumerate(samples):
        prompt = prompts.verdict_prompt(processor, list(s.candidates))
        expected = answer_token_ids(tok, prompt, candidate_answer(prompt, s.target), eos_id=end_id)
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        learned = labels[labels != -100].tolist()
        assert learned == expected and learned[-1] == end_id  # answer + end of turn, nothing else
        start = int(batch["answer_start"][i])
        assert (labels[:start] == -100).all()
        assert (ids[:start] == image_id).sum().item() == 256  # 224 px / 14 = 16x16 image tokens, all masked
        assert ids[start : start + len(expected)].tolist() == expected
    assert s.target == s.breed and s.target in s.candidates and s.candidates[-1] == prompts.OTHER_LABEL


def test_answers_learn_the_templates_end_of_turn_like_the_scorer(small_export, tmp_path):
    """Idefics3-8B-Llama3 ends an assistant turn with <end_of_utterance> while its tokenizer's
    eos_token is <|end_of_text|>: training must append the token the chat template writes -- the
    one the app's scorer appends to every candidate answer -- not eos_token."""
    from catreview.config import VLMProfile
    from catreview.data.images import load_rgb
    from catreview.models.vlm.postclassifier import VLMPostClassifier
    from tests.tiny_vlms import build_tiny_idefics3

    scorer = VLMPostClassifier(VLMProfile(model=str(build_tiny_idefics3(tmp_path / "idefics3"))), name="t").load()
    processor, tok = scorer.processor, scorer.processor.tokenizer
    tok.eos_token = "<|endoftext|>"  # as in Idefics3-8B-Llama3: not the end of an assistant turn
    scorer._end_of_turn = None
    end_id = tok.convert_tokens_to_ids("<end_of_utterance>")
    assert answer_end_token(processor) == "<end_of_utterance>" and tok.eos_token_id != end_id
    data = read_export(small_export)
    sample = TrainDataset(data.train, data.breeds, TrainConfig(other_rate=0.0, candidate_source="sampled"))[0]
    collator = Collator(processor)
    assert collator.eos_id == end_id == scorer._eos_id()
    batch = collator([sample])
    learned = batch["labels"][0][batch["labels"][0] != -100].tolist()
    scored = scorer._prepare([load_rgb(sample.image)], [list(sample.candidates)])
    assert learned == scored.answers[0][list(sample.candidates).index(sample.target)]  # exactly what is scored
    assert learned[-1] == end_id
    processor.chat_template = processor.chat_template.replace(
        "<end_of_utterance>", ""
    )  # no special token after answers
    assert prompts.end_of_turn_token(processor) is None and answer_end_token(processor) == "<|endoftext|>"  # eos_token
    assert Collator(processor).eos_id == tok.convert_tokens_to_ids("<|endoftext|>")


def test_class_balanced_sampling_weights_and_other_prompts(small_export):
    rows = export_rows({"Bombay": 2, "Abyssinian": 6}, 1)
    data = read_export(write_export(rows, small_export.parent / "unbalanced"))
    ds = TrainDataset(data.train, data.breeds, TrainConfig(other_rate=0.5, candidate_source="sampled", n_candidates=1))
    w = ds.sampling_weights()
    per_breed = {b: sum(x for x, e in zip(w, data.train) if e.breed == b) for b in data.breeds}
    assert per_breed == pytest.approx({"Abyssinian": 1.0, "Bombay": 1.0})  # each breed drawn equally often
    targets = [ds[i].target for i in range(len(ds))] + [(ds.select_epoch(1), ds[i].target)[1] for i in range(len(ds))]
    assert prompts.OTHER_LABEL in targets and set(targets) - {prompts.OTHER_LABEL} <= set(data.breeds)


def test_prompts_are_a_pure_function_of_seed_epoch_and_index(small_export):
    """A resumed round rebuilds its dataset and must see the prompts the killed one would have:
    each row's candidates and target depend on (seed, epoch, index) only -- not on which rows
    were read before, nor in what order -- and another epoch or seed draws other lists."""
    data = read_export(small_export)

    def rows(seed: int, epoch: int, order=None):
        ds = TrainDataset(
            data.train, data.breeds, TrainConfig(other_rate=0.5, candidate_source="sampled", n_candidates=2, seed=seed)
        )
        ds.select_epoch(epoch)
        order = list(range(len(ds))) if order is None else order
        got = {i: ds[i] for i in order}
        return [(got[i].candidates, got[i].target) for i in range(len(ds))]

    first = rows(seed=0, epoch=1)
    assert len(first) == 9
    assert rows(seed=0, epoch=1, order=list(reversed(range(9)))) == first  # fresh dataset, other read order
    assert rows(seed=0, epoch=2) != first and rows(seed=1, epoch=1) != first
    ds = TrainDataset(data.train, data.breeds, TrainConfig(other_rate=0.5, candidate_source="sampled", n_candidates=2))
    ds.select_epoch(1)
    [ds[i] for i in range(9)]
    ds.select_epoch(2)
    ds.select_epoch(1)  # going back to an epoch gives its rows again
    assert [(ds[i].candidates, ds[i].target) for i in range(9)] == first


def test_stage1_candidates_from_the_export_are_used_and_missed_breeds_answer_other(tmp_path):
    rows = export_rows({"Bombay": 1, "Bengal": 1}, 1)
    out = write_export(rows, tmp_path / "exp")
    recs = [json.loads(line) for line in (out / "llava" / "validation.jsonl").read_text().splitlines()]
    recs[0]["metadata"]["predictions_at_review"] = {
        "stage1": [
            {"label": "Siamese", "probability": 0.5},
            {"label": recs[0]["metadata"]["breed"], "probability": 0.3},
        ]
    }
    recs[1]["metadata"]["predictions_at_review"] = {"stage1": [{"label": "Persian", "probability": 0.9}]}
    (out / "llava" / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    data = read_export(out)
    items = eval_items(data.validation, data.breeds, TrainConfig())
    assert (
        items[0].candidates == ("Siamese", recs[0]["metadata"]["breed"])
        and items[0].target == recs[0]["metadata"]["breed"]
    )
    assert items[1].candidates == ("Persian",) and items[1].target == prompts.OTHER_LABEL
    sampled = eval_items(data.validation, data.breeds, TrainConfig(candidate_source="sampled"))
    assert all(it.target == it.breed and it.breed in it.candidates for it in sampled)


# ------------------------------------------------------------------------------ model and loss


def test_lora_targets_language_model_attention_only(demo_llava):
    _, model = load_base_model(demo_llava, torch.float32, torch.device("cpu"))
    model = add_lora(model, TrainConfig(train_projector=True))
    names = lora_module_names(model)
    assert names and all(".language_model." in n and n.endswith(("q_proj", "v_proj")) for n in names)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert not any("vision_tower" in n for n in trainable)  # the vision tower stays frozen
    assert any("multi_modal_projector" in n for n in trainable)  # modules_to_save copy
    assert all("lora_" in n or "multi_modal_projector" in n for n in trainable)


def test_answer_loss_is_weighted_mean_of_per_row_token_means():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, -100, -100, 3, 5], [-100, -100, -100, -100, 2]])
    loss, per_row = answer_loss(logits, labels, torch.tensor([1.0, 3.0]))
    lp = torch.log_softmax(logits, -1)
    row0 = -(lp[0, 1, 3] + lp[0, 2, 5]) / 2  # logits[:, j] (position L-K+j) predicts token L-K+j+1
    row1 = -lp[1, 2, 2]
    assert per_row.tolist() == pytest.approx([row0.item(), row1.item()], rel=1e-6)
    assert loss.item() == pytest.approx((row0 + 3 * row1).item() / 4, rel=1e-6)


def test_val_loss_from_scores_equals_training_loss_on_the_same_rows(demo_llava, small_export):
    """The scorer's length-normalised score of the correct answer is minus the training loss of
    that row: same tokens, same masking, same EOS ("train on what you evaluate")."""
    processor, model = load_base_model(demo_llava, torch.float32, torch.device("cpu"))
    cfg = TrainConfig(candidate_source="sampled")
    model = add_lora(model, cfg).eval()
    data = read_export(small_export)
    items = eval_items(data.validation, data.breeds, cfg)
    metrics = evaluate(make_scorer(model, processor, demo_llava, cfg, torch.device("cpu"), torch.float32), items, cfg)
    with torch.no_grad():
        _, per_row = batch_loss(model, Collator(processor)([it.sample() for it in items]))
    assert metrics["val_loss"] == pytest.approx(per_row.mean().item(), rel=1e-4)
    assert metrics["n"] == len(items) == 6


# ------------------------------------------------------------------------------ reproducible resume


def _adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / CHECKPOINT_DIR / "adapter" / "adapter_model.safetensors"))


def test_resume_computes_with_the_rounds_thread_count_and_gives_the_callers_back(demo_llava, small_export, tmp_path):
    """A round resumed by a process with another thread count (another OMP_NUM_THREADS, launcher or
    machine default) still reproduces the uninterrupted round bit for bit: the count the round
    started with is recorded in its checkpoint and used again. (Float sums are split by thread:
    2 and 3 threads drift apart by ~1e-7 a step, which Adam compounds.) A caller's thread count
    and determinism flags are what they were after a round, also after one that failed."""
    cfg = TrainConfig(
        max_steps=8,
        epochs=100,
        batch_size=2,
        lr=1e-3,
        eval_every=8,
        save_every=2,
        early_stopping_patience=0,
        candidate_source="sampled",
        other_rate=0.0,
    )

    class Killed(Exception):
        pass

    def die_after_step_4(row):
        if row.get("kind") == "train" and row["step"] == 5:  # checkpoint 4 is written, 5 is not
            raise Killed

    ambient = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        reference = train_round(small_export, demo_llava, tmp_path / "reference", cfg)
        with pytest.raises(Killed):
            train_round(small_export, demo_llava, tmp_path / "run", cfg, on_event=die_after_step_4)
        assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()
        torch.set_num_threads(3)  # the resuming process has another default
        resumed = train_round(small_export, demo_llava, tmp_path / "run", cfg)
        assert torch.get_num_threads() == 3 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(ambient)
    assert resumed["resumed_from_step"] == [4] and resumed["steps"] == reference["steps"] == 8
    state = json.loads((tmp_path / "run" / CHECKPOINT_DIR / "trainer_state.json").read_text())["state"]
    assert state["num_threads"] == 2
    resume_rows = [r for r in read_progress(tmp_path / "run" / PROGRESS_FILE) if r["kind"] == "resume"]
    assert [(r["step"], r["num_threads"]) for r in resume_rows] == [(4, 2)]
    want, got = _adapter_weights(tmp_path / "reference"), _adapter_weights(tmp_path / "run")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_rng_state_covers_the_accelerator_devices_own_generator():
    """Dropout on an MPS/XPU/NPU device draws from that device's generator, not the CPU one: the
    checkpoint must carry it, and a checkpoint that has one cannot silently resume elsewhere."""
    from training.checkpoint import _device_rng_module, _rng_state, _set_rng_state
    from training.errors import TrainingError

    cpu = _rng_state(torch.device("cpu"))
    assert "device" not in cpu and _device_rng_module("cpu") is None and _device_rng_module("cuda") is None
    assert _device_rng_module("mps") is torch.mps  # has get_rng_state/set_rng_state on every build
    torch.manual_seed(1)
    _set_rng_state(cpu)
    assert torch.equal(torch.get_rng_state(), cpu["torch"])
    if not torch.backends.mps.is_available():
        with pytest.raises(TrainingError, match="mps device"):
            _set_rng_state({**cpu, "device": {"type": "mps", "state": torch.get_rng_state()}})


def test_rng_checkpoint_loads_with_weights_only_and_continues_every_generator(tmp_path):
    """``rng-<i>.pt`` holds only plain containers and tensors, so ``torch.load(weights_only=True)``
    (what :func:`training.checkpoint.load_checkpoint` uses) reads it, and the restored Python, NumPy
    (including its cached Gaussian) and torch generators continue exactly where they were saved."""
    import random

    import numpy as np

    from training.checkpoint import _rng_state, _set_rng_state

    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    np.random.standard_normal()  # leaves a cached Gaussian in NumPy's state
    torch.save(_rng_state(torch.device("cpu")), tmp_path / "rng-0.pt")
    want = (
        random.random(),
        np.random.standard_normal(3).tolist(),
        np.random.randint(0, 2**31, 3).tolist(),
        torch.rand(3).tolist(),
    )
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    _set_rng_state(torch.load(tmp_path / "rng-0.pt", weights_only=True))
    got = (
        random.random(),
        np.random.standard_normal(3).tolist(),
        np.random.randint(0, 2**31, 3).tolist(),
        torch.rand(3).tolist(),
    )
    assert got == want


# ------------------------------------------------------------------------------ progress log


def test_progress_reader_skips_only_a_torn_last_line(tmp_path):
    """A kill mid-write (or a read during a write) can cut the last line only: it is not a row yet.
    A damaged line anywhere else is an error naming the file and line, never silently dropped."""
    from catreview.adapters.runfolder import ProgressFileError

    path = tmp_path / PROGRESS_FILE
    rows = [{"kind": "train", "step": 1, "loss": 2.5}, {"kind": "eval", "step": 1, "val_loss": 2.0}]
    complete = "".join(json.dumps(r) + "\n" for r in rows)
    assert read_progress(tmp_path / "absent.jsonl") == []
    path.write_text(complete)
    assert read_progress(path) == rows
    path.write_text(complete + '{"kind": "train", "st')  # torn by a kill
    assert read_progress(path) == rows
    path.write_text(complete + json.dumps({"kind": "train", "step": 2}))  # complete object, newline not yet written
    assert read_progress(path) == [*rows, {"kind": "train", "step": 2}]

    path.write_text(json.dumps(rows[0]) + "\n" + '{"kind": "train", "st\n' + json.dumps(rows[1]) + "\n")
    with pytest.raises(ProgressFileError, match=rf"{PROGRESS_FILE}, line 2: not valid JSON"):
        read_progress(path)
    path.write_text(complete + '{"kind": "eval", "step": 3,\n')  # the last line, but its newline was written
    with pytest.raises(ProgressFileError, match="line 3: not valid JSON"):
        read_progress(path)
    path.write_text(complete + "[1, 2]\n")
    with pytest.raises(ProgressFileError, match="line 3: expected a JSON object"):
        read_progress(path)


def test_resume_drops_a_torn_progress_line(tmp_path):
    """A resumed round rewrites progress.jsonl without the torn line before appending to it, so the
    cut row never ends up in the middle of the file."""
    from training.progress import ProgressLog

    path = tmp_path / PROGRESS_FILE
    path.write_text("".join(json.dumps({"kind": "train", "step": i}) + "\n" for i in (1, 2, 3)) + '{"kind": "tr')
    log = ProgressLog(path, enabled=True)
    log.truncate_after(2)
    log.write({"kind": "resume", "step": 2})
    assert read_progress(path) == [
        {"kind": "train", "step": 1},
        {"kind": "train", "step": 2},
        {"kind": "resume", "step": 2},
    ]


# ------------------------------------------------------------------------------ a real round


@pytest.fixture(scope="module")
def learned_round(llava_14m, tmp_path_factory):
    """One round on 26 real training photos of 3 breeds (14M LLaVA, 336 px, 30 steps of 4); 12
    validation photos select the checkpoint, 20 held-out test photos are scored for the gate."""
    tmp = tmp_path_factory.mktemp("learn")
    export = write_export(export_rows(LEARN_BREEDS, VAL_PER_BREED, LEARN_TEST), tmp / "export")
    cfg = TrainConfig(
        max_steps=30,
        epochs=100,
        batch_size=4,
        lr=2e-3,
        warmup_ratio=0.1,
        train_projector=True,
        eval_every=15,
        early_stopping_patience=0,
        other_rate=0.0,
        candidate_source="sampled",
        seed=0,
    )
    result = train_round(export, llava_14m, tmp / "run", cfg)
    return {"result": result, "export": export, "run": tmp / "run", "base": llava_14m, "cfg": cfg, "tmp": tmp}


@pytest.mark.slow
def test_round_learns_on_real_photos(learned_round, capsys):
    """Validation loss must fall and the app's candidate scoring must get better than with the
    untrained adapter (= the base model: LoRA's B starts at zero).

    Margins: 12 validation photos, candidates = true breed + 2 distractors + "other". The untrained
    model sits near or below chance (it favours whatever its random weights like, often "other").
    We require (a) val loss at most half the untrained value -- the loss is deterministic on fixed
    items, so this is no noise question, it says the answers' tokens were learned; (b) at least 3
    more photos right (+25 points) than the untrained adapter, measured through the app's loading
    path (VLMProfile(adapter=best/)); and (c) accuracy above 1/3, the best any image-blind answer
    can do on 3 balanced breeds (always naming one breed), so the adapter reads the photos.
    """
    r, run = learned_round["result"], learned_round["run"]
    rows = read_progress(run / PROGRESS_FILE)
    evals = [x for x in rows if x["kind"] == "eval"]
    assert [x["step"] for x in evals] == [0, 15, 30]
    assert all({"step", "loss"} <= set(x) for x in rows if x["kind"] == "train") and len(rows) == 30 + 3
    assert {"val_loss", "val_balanced_accuracy"} <= set(evals[0])
    assert r["steps"] == 30 and (run / RESULT_FILE).is_file() and (run / CHECKPOINT_DIR / "COMPLETE").is_file()

    before, after = r["initial_metrics"], r["metrics"]
    assert after["val_loss"] <= 0.5 * before["val_loss"], (before["val_loss"], after["val_loss"])

    base, export, cfg = learned_round["base"], learned_round["export"], learned_round["cfg"]
    untrained = evaluate_adapter(base, None, export, cfg)
    trained = evaluate_adapter(base, run / BEST_DIR, export, cfg)
    assert untrained["balanced_accuracy"] == pytest.approx(before["balanced_accuracy"])  # step 0 == base model
    assert trained["balanced_accuracy"] == pytest.approx(after["balanced_accuracy"])  # app path == in-training eval
    n = trained["n"]
    assert n == 12
    assert trained["accuracy"] >= untrained["accuracy"] + 3 / n, (untrained, trained)
    assert trained["accuracy"] > 1 / 3, trained

    # The gate's held-out numbers: the selected checkpoint and the base model, each scored once on
    # the 20 test photos (never in progress.jsonl), equal to what the app's loading path gives.
    test, base_test = r["test_metrics"], r["initial_test_metrics"]
    assert r["n_test"] == test["n"] == base_test["n"] == 20 and test["photos"] == base_test["photos"]
    assert len(test["predicted"]) == len(test["truth"]) == 20 and set(test["truth"]) == {
        "Abyssinian",
        "American Shorthair",
    }
    for adapter, got in ((None, base_test), (run / BEST_DIR, test)):
        app = evaluate_adapter(base, adapter, export, cfg, split="test")
        assert app["predicted"] == got["predicted"] and app["balanced_accuracy"] == pytest.approx(
            got["balanced_accuracy"]
        )
        assert app["loss"] == pytest.approx(got["loss"], rel=1e-4)
    assert test["balanced_accuracy"] > base_test["balanced_accuracy"], (base_test, test)

    # The same held-out numbers from the command line (python -m training --evaluate ADAPTER).
    from training.__main__ import main as training_main

    cfg_file = run.parent / "eval-config.json"
    cfg.save(cfg_file)
    argv = ["--export", str(export), "--base", str(base), "--config-json", str(cfg_file), "--split", "test"]
    capsys.readouterr()
    assert training_main([*argv, "--evaluate", str(run / BEST_DIR)]) == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert cli["predicted"] == test["predicted"] and cli["balanced_accuracy"] == pytest.approx(
        test["balanced_accuracy"]
    )
    assert training_main([*argv, "--evaluate", str(run / "no-such-adapter")]) == 2


@pytest.mark.slow
def test_gate_blocks_a_worse_adapter_and_keeps_the_active_one(learned_round):
    """The learned adapter beats the base model on the held-out test photos, so it is activated; a
    deliberately worse round (one step at a negligible learning rate: the base model's behaviour)
    scores the active adapter once on the same validation and test photos, is gated on the test
    numbers, blocked, and left inactive. The gate never uses the best-of-N validation number."""
    from sqlmodel import Session

    from catreview.adapters.gate import GatePolicy, paired_bootstrap_p_better
    from catreview.adapters.rounds import register_round
    from catreview.adapters.versions import active_version
    from catreview.config import Settings
    from catreview.data.db import AdapterVersion, make_engine

    tmp, learned = learned_round["tmp"], learned_round["result"]
    settings = Settings(database_url=f"sqlite:///{tmp / 'gate.db'}", data_dir=tmp / "data")
    engine = make_engine(settings.database_url)
    good = register_round(engine, settings, learned_round["run"])  # default policy: 20 test photos suffice
    d = good.decision
    assert good.activated and d.passed and d.gated and d.reference == "no adapter (base model)", d.summary()
    assert (d.split, d.n) == ("test", 20)
    assert d.candidate_balanced_accuracy == learned["test_metrics"]["balanced_accuracy"]
    assert d.reference_balanced_accuracy == learned["initial_test_metrics"]["balanced_accuracy"]
    assert d.p_better >= GatePolicy().min_p_better and d.p_better == paired_bootstrap_p_better(
        learned["test_metrics"]["truth"],
        learned["test_metrics"]["predicted"],
        learned["initial_test_metrics"]["predicted"],
    )
    active = active_version(engine, str(learned_round["base"]))
    assert active is not None and active.id == good.adapter_id

    worse_cfg = learned_round["cfg"].replace(max_steps=1, lr=1e-9, eval_every=1)
    worse_run = tmp / "worse"
    r = train_round(learned_round["export"], learned_round["base"], worse_run, worse_cfg, baseline_adapter=active.path)
    assert r["baseline"]["metrics"]["balanced_accuracy"] == pytest.approx(learned["metrics"]["balanced_accuracy"])
    assert r["metrics"]["balanced_accuracy"] < r["baseline"]["metrics"]["balanced_accuracy"]
    # the stored active adapter, scored once on the test photos, is the learned round's selected checkpoint
    assert r["baseline"]["test_metrics"]["predicted"] == learned["test_metrics"]["predicted"]
    assert r["test_metrics"]["balanced_accuracy"] < r["baseline"]["test_metrics"]["balanced_accuracy"]

    outcome = register_round(engine, settings, worse_run, policy=GatePolicy(min_breed_photos=4, max_breed_drop=0.1))
    assert not outcome.activated and not outcome.decision.passed and outcome.decision.gated
    assert outcome.decision.reference == f"adapter #{good.adapter_id}"
    assert any("test balanced accuracy fell" in reason for reason in outcome.decision.reasons)
    rows = outcome.decision.rows()
    assert {row["breed"] for row in rows} == {"Abyssinian", "American Shorthair"}  # the test photos' breeds
    assert all(row["n"] == 10 for row in rows)
    assert any(row["blocking"] for row in rows) == any(row["delta"] < -0.1 for row in rows)
    with Session(engine) as s:
        assert s.get(AdapterVersion, good.adapter_id).active and not s.get(AdapterVersion, outcome.adapter_id).active
        stored = json.loads(s.get(AdapterVersion, outcome.adapter_id).metrics_json)
    assert stored["gate"]["passed"] is False and stored["per_breed"] and stored["baseline"] is not None
    assert stored["test"]["balanced_accuracy"] == r["test_metrics"]["balanced_accuracy"]
    assert stored["reference_test"]["balanced_accuracy"] == r["baseline"]["test_metrics"]["balanced_accuracy"]
    assert "predicted" not in stored["test"] and stored["n_test"] == 20  # per-photo lists stay in result.json
