from __future__ import annotations

from pathlib import Path

import pytest

from trainer.config import CONFIG_ROOT, ConfigError, RunConfig, load_config

EXPERIMENTS = sorted((CONFIG_ROOT / "experiments").rglob("*.yaml"))
LAYERS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if p.parent.name in ("model", "loss", "data"))


def test_there_are_configs_to_check():
    assert EXPERIMENTS and LAYERS


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_experiment_configs_load(path: Path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


@pytest.mark.parametrize("path", LAYERS, ids=lambda p: str(p.relative_to(CONFIG_ROOT)))
def test_layer_configs_load(path: Path, tmp_path: Path):
    exp = tmp_path / "exp.yaml"
    exp.write_text(f"includes: [{path.relative_to(CONFIG_ROOT)}]\n")
    cfg = load_config(exp)
    if path.parent.name == "loss":
        assert cfg.loss.name == path.stem
    elif path.parent.name == "model":
        assert cfg.model.preset == path.stem
    else:
        assert cfg.data.prepared or cfg.data.train_files


def test_required_keys_exist_and_overrides_apply():
    cfg = load_config(
        None,
        [
            "model.preset=tiny",
            "loss.name=mile",
            "train.max_steps=7",
            "train.micro_batch_size=3",
            "train.seed=5",
            "checkpoint.every=2",
            "run.dir=/tmp/x",
        ],
    )
    assert (cfg.model.preset, cfg.loss.name, cfg.train.max_steps) == ("tiny", "mile", 7)
    assert (cfg.train.micro_batch_size, cfg.train.seed, cfg.checkpoint.every, cfg.run.dir) == (3, 5, 2, "/tmp/x")


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.max_stepz") as err:
        load_config(None, ["train.max_stepz=3"])
    assert "max_steps" in str(err.value)  # the valid keys are listed


def test_unknown_key_in_yaml_names_file_and_key(tmp_path: Path):
    exp = tmp_path / "bad.yaml"
    exp.write_text("loss:\n  name: mile\n  gamma_: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*loss\.gamma_"):
        load_config(exp)


def test_wrong_type_and_bad_values():
    with pytest.raises(ConfigError, match=r"train\.max_steps"):
        load_config(None, ["train.max_steps=many"])
    with pytest.raises(ConfigError, match=r"loss\.name='nope'.*mile"):
        load_config(None, ["loss.name=nope"])
    with pytest.raises(ConfigError, match=r"model\.preset"):
        load_config(None, ["model.preset=huge"])
    with pytest.raises(ConfigError, match=r"data\.seq_len"):
        load_config(None, ["model.preset=debug", "data.seq_len=100000"])
    with pytest.raises(ConfigError, match=r"offload_ratio < 1.*offload_optimizer=true.*zero_stage=3"):
        load_config(None, ["distributed.preset=zero2", "distributed.offload_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"offload_ratio=1.5 is out of range"):
        load_config(None, ["distributed.preset=zero3_offload", "distributed.offload_ratio=1.5"])


def test_missing_config_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("configs/experiments/does_not_exist.yaml")
