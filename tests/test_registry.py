"""Which models the settings select: profile names are checked, never silently replaced by the
demo VLM; the demo-model cache never deletes a folder that is not its own."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from catreview.cli import main as cli
from catreview.config import ConfigError, load_settings
from catreview.models.classifier import ClassifierError
from catreview.models.demo import DEMO_RECIPE_VERSION, ensure_demo_models
from catreview.models.registry import ModelRegistry, UnknownProfileError

# Hub ids as configuration strings only: these tests never load them (no hub here).
PROFILES = {"7B": {"model": "llava-hf/llava-1.5-7b-hf"}, "13B": {"model": "llava-hf/llava-1.5-13b-hf"}}


def _settings(tmp_path: Path, demo_dir: Path, **kw):
    return load_settings(database_url=f"sqlite:///{tmp_path / 'r.db'}", demo_dir=demo_dir, **kw)


def test_unknown_active_vlm_fails_at_load_naming_the_profiles(tmp_path: Path, demo_dir: Path) -> None:
    with pytest.raises(ConfigError, match=r"active_vlm '7b' is not a configured VLM profile; configured: '7B', '13B'"):
        _settings(tmp_path, demo_dir, vlm_profiles=PROFILES, active_vlm="7b")
    # Left unset while profiles are configured: also refused, not the demo model.
    with pytest.raises(ConfigError, match=r"active_vlm is not set but VLM profiles are configured \('7B', '13B'\)"):
        _settings(tmp_path, demo_dir, vlm_profiles=PROFILES)
    # A profile named but none configured at all.
    with pytest.raises(ConfigError, match=r"active_vlm '7B' names no VLM profile: no vlm_profiles are configured"):
        _settings(tmp_path, demo_dir, active_vlm="7B")
    # The same from a TOML file (the usual way a typo arrives).
    cfg = tmp_path / "bad.toml"
    cfg.write_text('active_vlm = "13b"\n[vlm_profiles.7B]\nmodel = "a"\n[vlm_profiles.13B]\nmodel = "b"\n')
    with pytest.raises(ConfigError, match=rf"configured: '7B', '13B'.*read from file {cfg}"):
        load_settings(cfg)


def test_demo_profile_only_when_none_configured(tmp_path: Path, demo_dir: Path) -> None:
    reg = ModelRegistry(_settings(tmp_path, demo_dir))
    assert reg.settings.uses_demo_models
    assert reg.active_vlm_name == "demo" and list(reg.profiles()) == ["demo"]
    assert reg.base_model() == str(demo_dir / "llava-tiny")

    reg = ModelRegistry(_settings(tmp_path, demo_dir, vlm_profiles=PROFILES, active_vlm="13B"))
    assert reg.active_vlm_name == "13B" and list(reg.profiles()) == ["7B", "13B"]
    assert reg.base_model() == "llava-hf/llava-1.5-13b-hf"
    assert reg.base_model("7B") == "llava-hf/llava-1.5-7b-hf"
    for lookup in (lambda: reg.base_model("demo"), lambda: reg.vlm("70B")):
        with pytest.raises(UnknownProfileError, match=r"^no VLM profile named '\w+'; configured: '7B', '13B'$") as info:
            lookup()
        assert isinstance(info.value, ConfigError) and isinstance(info.value, KeyError)

    # Settings copied without validation still cannot switch to the demo silently.
    unchecked = reg.settings.model_copy(update={"active_vlm": "13b"})
    with pytest.raises(UnknownProfileError, match=r"'13b' \(active_vlm\); configured: '7B', '13B'"):
        ModelRegistry(unchecked).active_vlm_name


def test_cli_reports_unknown_profiles_in_one_line(tmp_path: Path, demo_dir: Path, capsys) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'demo_dir = "{demo_dir}"\nactive_vlm = "7B"\n[vlm_profiles.7B]\nmodel = "{demo_dir / "llava-tiny"}"\n'
    )
    db = ["--db", f"sqlite:///{tmp_path / 'c.db'}", "--config", str(cfg)]
    for argv in (
        ["export", "--out", str(tmp_path / "out"), "--vlm", "13B", *db],
        ["adapters", "list", "--vlm", "13B", *db],
        ["predict", "--vlm", "13B", *db],
    ):
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err == "error: no VLM profile named '13B'; configured: '7B'\n", (argv, err)
    assert not (tmp_path / "out").exists()
    bad = tmp_path / "bad.toml"
    bad.write_text('active_vlm = "7b"\n[vlm_profiles.7B]\nmodel = "x"\n')
    assert cli.main(["predictions", "--config", str(bad)]) == 2
    assert "active_vlm '7b' is not a configured VLM profile; configured: '7B'" in capsys.readouterr().err


def test_cli_keeps_tracebacks_for_key_errors() -> None:
    # A KeyError is a bug (e.g. a missing dict key), not a user error to print as "error: 'label'".
    assert not any(issubclass(KeyError, e) for e in cli._user_errors())
    assert issubclass(UnknownProfileError, cli._user_errors())


def test_foreign_demo_dir_is_refused_and_left_intact(tmp_path: Path) -> None:
    foreign = tmp_path / "my-models"
    (foreign / "classifier").mkdir(parents=True)
    (foreign / "classifier" / "weights.bin").write_bytes(b"precious")
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match=rf"demo_dir {foreign} holds files that are not catreview demo models"):
        ensure_demo_models(foreign)
    assert sorted(p.relative_to(foreign).as_posix() for p in foreign.rglob("*")) == [
        "classifier",
        "classifier/weights.bin",
        "notes.txt",
    ]
    assert (foreign / "classifier" / "weights.bin").read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".my-models.") and p.is_dir()] == []
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        ensure_demo_models(afile)
    assert afile.read_text() == "x"


def test_demo_dir_empty_or_older_recipe_is_replaced(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    models = ensure_demo_models(empty)
    assert models.classifier_checkpoint.is_file() and (models.vlm_dir / "config.json").is_file()
    # A build of an older recipe (only READY.json, as older code wrote) is ours: rebuilt.
    old = tmp_path / "old"
    (old / "llava-tiny").mkdir(parents=True)
    (old / "llava-tiny" / "stale.txt").write_text("old")
    (old / "READY.json").write_text(json.dumps({"recipe": "0"}))
    models = ensure_demo_models(old)
    assert json.loads((old / "READY.json").read_text()) == {"recipe": DEMO_RECIPE_VERSION}
    assert not (old / "llava-tiny" / "stale.txt").exists() and models.classifier_checkpoint.is_file()
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name.startswith(".")] == []


def test_concurrent_builds_share_one_complete_build(tmp_path: Path) -> None:
    target = tmp_path / "demo"
    results: list[object] = []
    errors: list[BaseException] = []

    def build() -> None:
        try:
            results.append(ensure_demo_models(target))
        except Exception as exc:  # collected; the test asserts there are none
            errors.append(exc)

    threads = [threading.Thread(target=build) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(results) == 3 and len(set(results)) == 1
    assert json.loads((target / "READY.json").read_text()) == {"recipe": DEMO_RECIPE_VERSION}
    assert [p.name for p in tmp_path.iterdir() if p.is_dir() and p.name != "demo"] == []


def test_misspelt_or_incomplete_model_settings_are_errors(tmp_path: Path, demo_dir: Path) -> None:
    # A misspelt key in a section is refused (it used to be ignored, keeping the default).
    cfg = tmp_path / "typo.toml"
    cfg.write_text("[fusion]\nwieght = 0.7\n")
    with pytest.raises(ConfigError, match="wieght"):
        load_settings(cfg)
    with pytest.raises(ConfigError, match="batchsize"):
        _settings(tmp_path, demo_dir, vlm_profiles={"7B": {"model": "a", "batchsize": 4}}, active_vlm="7B")
    # A checkpoint without the architecture would silently run the demo classifier.
    with pytest.raises(ConfigError, match="classifier.model is not"):
        _settings(tmp_path, demo_dir, classifier={"checkpoint": str(tmp_path / "m.safetensors")})
    # An architecture without a checkpoint would run random weights.
    settings = _settings(
        tmp_path, demo_dir, classifier={"model": "convnext_atto", "labels_file": "assets/breeds67.txt"}
    )
    with pytest.raises(ClassifierError, match="has no checkpoint: a timm architecture name alone gives random weights"):
        ModelRegistry(settings).classifier()


def test_adapters_cli_says_what_id_it_needs(tmp_path: Path, demo_dir: Path, capsys) -> None:
    db = ["--db", f"sqlite:///{tmp_path / 'r.db'}"]
    for argv, words in (
        (["adapters", "promote", "xyz"], "promote needs a version id (a number from 'adapters list'), got 'xyz'"),
        (["adapters", "rollback", "xyz"], "rollback needs a version id or 'none', got 'xyz'"),
        (["adapters", "list", "extra"], "'adapters list' takes no argument (got 'extra')"),
    ):
        assert cli.main([*argv, *db]) == 2
        assert capsys.readouterr().err.strip() == f"error: {words}"


def test_in_memory_database_url_is_refused(tmp_path: Path, demo_dir: Path) -> None:
    for url in ("sqlite:///", "sqlite://", "sqlite:///:memory:"):
        with pytest.raises(ConfigError, match="names no file"):
            load_settings(database_url=url, demo_dir=demo_dir)
