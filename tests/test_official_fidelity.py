"""Options that make the paper grid match the MiLe authors' code where it can (configs/experiments/paper/)."""

from __future__ import annotations

import glob

import torch

from models import GPT, GPTConfig
from trainer.config import TrainSection, load_config
from trainer.optim import param_groups

SHAPE = {"vocab_size": 64, "n_layers": 8, "d_model": 64, "n_heads": 4, "d_mlp": 128, "max_seq_len": 16}


def test_official_init_draws_every_matrix_at_the_same_std():
    torch.manual_seed(0)
    scaled = GPT(GPTConfig(**SHAPE, block="llama", init_std=0.01))
    official = GPT(GPTConfig(**SHAPE, block="llama", init_std=0.01, scaled_init=False))
    down = "blocks.0.mlp.down.weight"
    assert abs(dict(official.named_parameters())[down].std().item() - 0.01) < 1e-3
    assert abs(dict(scaled.named_parameters())[down].std().item() - 0.01 / 4) < 1e-3  # 1 / sqrt(2 * 8)


def test_official_weight_decay_also_decays_the_final_norm():
    model = GPT(GPTConfig(**SHAPE, block="llama"))
    names = {id(p): n for n, p in model.named_parameters()}
    for official in (False, True):
        decay, no_decay = param_groups(model, TrainSection(decay_final_norm=official))
        decayed = {names[id(p)] for p in decay["params"]}
        assert ("ln_f.weight" in decayed) is official
        assert not any(n.endswith("norm.weight") or "ln_attn" in n or "ln_mlp" in n for n in decayed)
        assert len(decay["params"]) + len(no_decay["params"]) == len(names)


def test_the_paper_grid_uses_the_official_settings():
    for path in sorted(glob.glob("configs/experiments/paper/*.yaml")):
        cfg = load_config(path)
        assert not cfg.model.scaled_init and cfg.train.decay_final_norm and cfg.model.init_std in (None, 0.01)
        if cfg.loss.name in ("mile", "focal"):
            assert cfg.loss.count_ignored
        if cfg.loss.name == "mile":
            assert cfg.loss.entropy_clamp == 1e-8
