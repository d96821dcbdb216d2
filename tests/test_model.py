from __future__ import annotations

import pytest
import torch

from models import GPT, PRESETS, GPTConfig


def tiny_config(**kw) -> GPTConfig:
    base = dict(vocab_size=300, n_layers=2, d_model=64, n_heads=4, d_mlp=256, max_seq_len=64)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("parallel", [True, False])
def test_forward_shapes(parallel):
    model = GPT(tiny_config(parallel_residual=parallel))
    ids = torch.randint(0, 300, (3, 17))
    assert model(ids).shape == (3, 17, 64)
    assert model.logits(ids).shape == (3, 17, 300)  # real vocabulary only, padding never predicted


def test_causal_masking():
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()
    ids = torch.randint(0, 300, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        a, b = model.logits(ids), model.logits(changed)
    assert torch.equal(a[:, :12], b[:, :12])  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_vocab_padding_rows_get_no_gradient():
    model = GPT(tiny_config(vocab_size=300))
    assert model.head.weight.shape[0] == 384 and model.embed.weight.shape[0] == 384
    model.logits(torch.randint(0, 300, (2, 8))).sum().backward()
    assert model.head.weight.grad[300:].abs().sum() == 0
    assert model.head.weight.grad[:300].abs().sum() > 0


def test_rotary_pct_zero_and_full():
    for pct in (0.0, 1.0):
        model = GPT(tiny_config(rotary_pct=pct))
        assert model.logits(torch.randint(0, 300, (1, 10))).isfinite().all()


def test_presets_build_on_meta_device():
    for name, preset in PRESETS.items():
        with torch.device("meta"):
            model = GPT(GPTConfig(vocab_size=32000, **preset.__dict__))
        assert model.num_params() > 0, name
