"""Settings: a config checked once (`config_check.check`), then frozen and read everywhere."""

import importlib.util
import json
import pathlib

import jax
import ml_collections
import pytest

from vitvq import config_check, memory, parallel
from vitvq.errors import ConfigError
from vitvq.settings import Settings, frozen
from vitvq.train import pipeline, runner, stage1

REPO = pathlib.Path(__file__).resolve().parents[1]


def demo_config():
    """configs/demo.py with batches that split over the suite's 8 host devices."""
    config = load_config("demo")
    config.eval_batch_size = config.vim.eval_batch_size = 96
    return config


def load_config(name: str, arg: str | None = None):
    spec = importlib.util.spec_from_file_location(name, REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def small_config():
    config = load_config("vitvq_small", "runlocal")
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    return config


def test_settings_read_like_the_config_and_cannot_change():
    config = ml_collections.ConfigDict({"a": 1, "block": {"b": [1, 2], "c": "x"}})
    config.d = ml_collections.FieldReference(5)
    config.e = config.get_ref("d") * 2  # a reference: resolved when frozen
    s = frozen(config)
    assert s.a == 1 and s["a"] == 1 and s.block.c == "x" and s.get("missing", 7) == 7
    assert s.block.b == (1, 2) and s.e == 10 and "block" in s and len(s) == 4
    assert s.to_dict() == {"a": 1, "block": {"b": [1, 2], "c": "x"}, "d": 5, "e": 10}
    with pytest.raises(TypeError, match="frozen"):
        s.a = 2
    with pytest.raises(TypeError, match="frozen"):
        s.block.c = "y"
    with pytest.raises(TypeError):
        s["a"] = 2
    with pytest.raises(AttributeError, match="'nope'"):
        _ = s.nope
    plain = s.to_dict()
    plain["block"]["c"] = "changed"  # a copy: the settings keep their value
    assert s.block.c == "x"
    assert not s.checked and frozen(s) is s


def test_replace_and_without_copy_and_keep_the_original():
    s = Settings({"loss": {"l2": 1.0, "vq": 1.0}, "vim": {"x": 1}, "eval_lpips": True})
    t = s.replace("loss.l2", 0.5, eval_lpips=False)
    assert (t.loss.l2, t.loss.vq, t.eval_lpips) == (0.5, 1.0, False)
    assert (s.loss.l2, s.eval_lpips) == (1.0, True)
    assert "vim" not in s.without("vim") and "vim" in s
    with pytest.raises(TypeError, match="pairs"):
        s.replace("loss.l2")
    # Equal values: equal and the same hash (settings can key a cache of compiled steps).
    u = Settings({"loss": {"vq": 1.0, "l2": 1.0}, "vim": {"x": 1}, "eval_lpips": True})
    assert u == s and hash(u) == hash(s) and t != s


def test_check_returns_frozen_settings_equal_to_the_config():
    config = small_config()
    s = config_check.check(config)
    assert s.checked and isinstance(s, Settings)
    assert json.loads(s.to_json()) == json.loads(config.to_json_best_effort())
    assert config_check.check(s) is s  # checked settings are never checked again
    assert s.model.checked  # a block of checked settings counts as checked


def test_check_keeps_the_one_line_errors_and_names_the_batch_key():
    config = small_config()
    config.loss.r1_every = 0
    with pytest.raises(ConfigError, match=r"^config\.loss\.r1_every=0 is invalid"):
        config_check.check(config)
    config = small_config()
    config.eval_batch_size = 3
    with pytest.raises(ConfigError, match=r"config\.eval_batch_size 3 is not divisible by the 2"):
        config_check.check(config, num_devices=2, process_count=1)
    config_check.check(config, num_devices=1, process_count=1)  # one device: 3 splits


def test_past_the_check_nothing_validates_again(monkeypatch, tmp_path):
    """The trainer checks the config once; its builder, the memory report and the workdir
    read the settings without checking a key again."""
    settings = stage1.check_config(small_config())

    def refuse(*args, **kwargs):
        raise AssertionError("a rule ran twice")

    monkeypatch.setattr(config_check, "validate", refuse)
    assert stage1.check_config(settings) is settings
    mesh = parallel.make_mesh(settings.mesh)
    trainer = stage1.Stage1(settings, mesh)
    assert trainer.config is settings
    memory.build_trainer(settings, mesh, perceptual=False)
    runner.prepare_workdir(settings, str(tmp_path))
    written = json.loads((tmp_path / "config.json").read_text())
    assert written == settings.to_dict()


def test_the_pipeline_checks_both_stages_once_and_hands_on_checked_settings(monkeypatch, tmp_path):
    calls = []
    real_validate = config_check.validate

    def counting(config, **kwargs):
        calls.append(kwargs.get("prefix", "config"))
        return real_validate(config, **kwargs)

    class Reached(Exception):
        pass

    def first_stage(config, workdir, *, summary=True):
        assert not summary  # the pipeline prints the one JSON summary itself
        stage1.check_config(config)  # what stage 1 does first: no second validation
        raise Reached(config)

    monkeypatch.setattr(config_check, "validate", counting)
    monkeypatch.setattr(pipeline.stage1, "train_and_evaluate", first_stage)
    config = demo_config()
    with pytest.raises(Reached) as reached:
        pipeline.train_and_evaluate(config, str(tmp_path))
    # One call for the pipeline, which validates its vim block within it.
    assert calls == ["config", "config.vim"]
    handed = reached.value.args[0]
    assert handed.checked and handed.trainer == "vitvqgan" and "vim" not in handed


def test_a_bad_vim_block_fails_before_the_tokenizer_trains(monkeypatch, tmp_path):
    monkeypatch.setattr(
        pipeline.stage1, "train_and_evaluate", lambda *a, **k: pytest.fail("stage 1 started")
    )
    config = demo_config()
    config.vim.eval_batch_size = 3
    devices = jax.device_count()
    if devices == 1:
        pytest.skip("one device: every batch splits")
    with pytest.raises(ConfigError, match=r"config\.vim\.eval_batch_size 3"):
        pipeline.train_and_evaluate(config, str(tmp_path))
