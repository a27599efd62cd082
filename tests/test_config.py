"""Config presets, overrides (CLI and files share one syntax) and clear errors."""

import pytest

from lmstack.config import (PRESETS, ConfigError, RunConfig, apply_overrides, build_run_config, get_preset,
                            load_config_file, tiny)


def test_presets_validate_and_round_trip():
    for name in PRESETS:
        cfg = get_preset(name)
        cfg.validate()
        again = RunConfig.from_dict(cfg.to_dict())
        assert again.to_dict() == cfg.to_dict()


def test_gpt2_124m_has_gpt2_small_shapes():
    from lmstack.models import build_model

    cfg = get_preset("gpt2-124m")
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == (12, 12, 768, 1024)
    model = build_model(m)
    # GPT-2 small has 124M parameters (with its 50257 vocab; 50304 padded adds ~36k)
    assert 123e6 < model.num_params() < 126e6


def test_cli_overrides_are_typed():
    cfg = build_run_config("tiny", overrides=["model.n_layer=3", "optim.lr=1e-3", "train.compile=true",
                                              "model.n_kv_head=none", "train.max_steps=2e3"])
    assert cfg.model.n_layer == 3 and isinstance(cfg.model.n_layer, int)
    assert cfg.optim.lr == 1e-3
    assert cfg.train.compile is True
    assert cfg.model.n_kv_head is None
    assert cfg.train.max_steps == 2000


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "model:\n  n_layer: 3\noptim.lr: 0.002\n"),
    (".toml", "[model]\nn_layer = 3\n[optim]\nlr = 0.002\n"),
    (".json", '{"model": {"n_layer": 3}, "optim": {"lr": 0.002}}'),
])
def test_config_files_use_the_same_keys(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    cfg = build_run_config("tiny", config_file=str(path), overrides=["model.n_layer=5"])
    assert cfg.optim.lr == 0.002
    assert cfg.model.n_layer == 5  # the command line wins over the file


@pytest.mark.parametrize("override,needle", [
    ("model.n_layers=3", "valid model keys"),
    ("model.n_layer=three", "expected a value of type int"),
    ("train.dtype=fp8", "train.dtype"),
    ("model.norm=batchnorm", "model.norm"),
    ("n_layer=3", "keys look like"),
    ("model.n_layer", "section.key=value"),
    ("model.family=nope", "model.family"),
    ("model.n_head=3", "divisible"),
])
def test_bad_overrides_name_the_problem(override, needle):
    with pytest.raises(ConfigError, match=needle):
        build_run_config("tiny", overrides=[override])


@pytest.mark.parametrize("override, message", [
    ("optim.lr=nan", r"optim.lr=nan must be a finite number in \(0, inf\)"),
    ("optim.lr=inf", r"optim.lr=inf must be a finite number"),
    ("optim.lr=-1", r"optim.lr=-1.0 must be a finite number in \(0, inf\)"),
    ("optim.beta1=2", r"optim.beta1=2.0 must be a finite number in \[0, 1\)"),
    ("optim.beta2=1", r"optim.beta2=1.0 must be a finite number in \[0, 1\)"),
    ("optim.eps=0", r"optim.eps=0.0 must be a finite number in \(0, inf\)"),
    ("optim.weight_decay=-0.1", r"optim.weight_decay=-0.1 must be a finite number in \[0, inf\)"),
    ("optim.grad_clip=-1", r"optim.grad_clip=-1.0 must be"),
    ("train.spike_factor=0", r"train.spike_factor=0.0 must be a finite number in \(1, inf\)"),
    ("train.eval_every=-1", r"train.eval_every=-1 must be an integer in \[0, inf\)"),
    ("train.ckpt_every=-5", r"train.ckpt_every=-5 must be an integer"),
    ("train.max_minutes=nan", r"train.max_minutes=nan must be a finite number"),
    ("train.seed=-1", r"train.seed=-1 must be an integer"),
    ("train.device=tpu", r"train.device='tpu': choose auto, cpu"),
    ("train.compile=maybe", r"train.compile='maybe': expected a value of type bool"),
])
def test_every_optim_and_train_value_is_range_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config("tiny", overrides=[override])


def test_values_from_a_file_are_converted_and_checked_like_overrides():
    cfg = RunConfig.from_dict({"model": vars(tiny().model), "train": {"max_steps": "12"}, "optim": {"lr": 0.01}})
    assert cfg.train.max_steps == 12
    with pytest.raises(ConfigError, match="train.batch_size=True"):
        RunConfig.from_dict({"model": vars(tiny().model), "train": {"batch_size": True}})
    with pytest.raises(ConfigError, match="model must be a mapping"):
        RunConfig.from_dict({"model": [1, 2]})


def test_seq_len_longer_than_context_is_rejected():
    with pytest.raises(ConfigError, match="block_size"):
        build_run_config("tiny", overrides=["train.seq_len=4096"])


def test_unknown_preset_and_bad_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset"):
        get_preset("huge")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [1, 2\n")
    with pytest.raises(ConfigError, match="could not be parsed"):
        load_config_file(bad)


def test_override_dict_form():
    cfg = get_preset("tiny")
    apply_overrides(cfg, {"model": {"n_layer": 2}, "train.seed": 7})
    assert cfg.model.n_layer == 2 and cfg.train.seed == 7


def test_config_and_data_pipeline_import_without_torch():
    """Cleaning workers import lmstack.data.pipeline (and through it lmstack.config) in every process:
    they must not pay for `import torch` (about 1.5 CPU seconds each)."""
    import subprocess
    import sys

    code = ("import sys, lmstack.config, lmstack.data.pipeline, lmstack.atomic; "
            "sys.exit(1 if 'torch' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
