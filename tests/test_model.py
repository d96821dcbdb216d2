from __future__ import annotations

import pytest
import torch

from models import BLOCK_DEFAULTS, GPT, PRESETS, GPTConfig, KVCache
from trainer import parallelize
from trainer.config import load_config, model_config


def tiny_config(block: str = "neox", **kw) -> GPTConfig:
    base = dict(vocab_size=300, n_layers=2, d_model=64, n_heads=4, d_mlp=128, max_seq_len=64, block=block)
    base.update(BLOCK_DEFAULTS[block])
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize("block", ["neox", "llama"])
@pytest.mark.parametrize("parallel", [True, False])
def test_forward_shapes(block, parallel):
    model = GPT(tiny_config(block, parallel_residual=parallel))
    ids = torch.randint(0, 300, (3, 17))
    assert model(ids).shape == (3, 17, 64)
    assert model.logits(ids).shape == (3, 17, 300)  # real vocabulary only, padding never predicted


@pytest.mark.parametrize("block", ["neox", "llama"])
def test_causal_masking(block):
    torch.manual_seed(0)
    model = GPT(tiny_config(block)).eval()
    ids = torch.randint(0, 300, (2, 20))
    changed = ids.clone()
    changed[:, 12:] = torch.randint(0, 300, (2, 8))
    with torch.no_grad():
        a, b = model.logits(ids), model.logits(changed)
    assert torch.equal(a[:, :12], b[:, :12])  # earlier positions never see later tokens
    assert not torch.allclose(a[:, 12:], b[:, 12:])


@pytest.mark.parametrize("block", ["neox", "llama"])
def test_kv_cache_gives_the_full_forward_logits(block):
    torch.manual_seed(0)
    model = GPT(tiny_config(block, rotary_pct=0.5 if block == "neox" else 1.0)).eval()
    ids = torch.randint(0, 300, (3, 20))
    cache = KVCache.empty(model.cfg.n_layers)
    with torch.no_grad():
        full = model.logits(ids)  # [3, 20, V]
        steps = [model.head(model(ids[:, :12], cache))]  # a prompt of 12, then one token at a time
        steps += [model.head(model(ids[:, t : t + 1], cache)) for t in range(12, 20)]
    assert cache.length == 20
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)
    with pytest.raises(ValueError, match="one token at a time"):
        model(ids[:, :2], cache)
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        model(ids[:, :1], KVCache(cache.layers, length=64))


def test_block_families_differ_as_documented():
    neox, llama = GPT(tiny_config("neox")), GPT(tiny_config("llama"))
    assert isinstance(neox.ln_f, torch.nn.LayerNorm) and isinstance(llama.ln_f, torch.nn.RMSNorm)
    assert hasattr(llama.blocks[0].mlp, "gate") and not hasattr(neox.blocks[0].mlp, "gate")
    assert all(not n.endswith("bias") for n, _ in llama.named_parameters())


def test_vocab_padding_rows_get_no_gradient():
    model = GPT(tiny_config(vocab_size=300))
    assert model.head.weight.shape[0] == 384 and model.embed.weight.shape[0] == 384
    model.logits(torch.randint(0, 300, (2, 8))).sum().backward()
    assert model.head.weight.grad[300:].abs().sum() == 0
    assert model.head.weight.grad[:300].abs().sum() > 0


@pytest.mark.parametrize("pct", [0.0, 0.25, 0.5, 1.0])
def test_rotary_turns_channel_pairs_by_position_times_frequency(pct):
    """Independent truth (complex numbers): the first r = head_dim * pct channels form pairs (i, i + r/2), each
    turned by the angle position * base^(-2i/r); the other channels pass unchanged."""
    from models.gpt import Rotary

    hd, T, base = 16, 20, 500.0
    r = int(hd * pct)
    rot = Rotary(r, max_seq_len=T, base=base)
    x = torch.randn(2, 3, T, hd, generator=torch.Generator().manual_seed(0))  # [B, H, T, hd]
    half = r // 2
    angle = torch.arange(T, dtype=torch.float64)[:, None] * base ** (-2.0 * torch.arange(half) / r)  # [T, r/2]
    z = torch.complex(x[..., :half].double(), x[..., half:r].double()) * torch.polar(torch.ones_like(angle), angle)
    expected = torch.cat([z.real, z.imag, x[..., r:].double()], dim=-1).float()
    tokens_first = x.transpose(1, 2)  # Rotary reads [B, T, H, hd] (the heads after the position axis)
    assert torch.allclose(rot(tokens_first).transpose(1, 2), expected, atol=1e-5)
    later = rot(tokens_first[:, 7:], offset=7).transpose(1, 2)  # generation's offset
    assert torch.allclose(later, expected[:, :, 7:], atol=1e-5)


@pytest.mark.parametrize("pct", [0.0, 0.25, 1.0])
def test_rotary_fraction_is_the_only_source_of_position(pct):
    """Without rotary channels attention is blind to order: the last position's logits do not change when the
    tokens before it are permuted (one layer: deeper, the earlier positions' own prefixes change); with any
    rotary channels they do."""
    torch.manual_seed(0)
    model = GPT(tiny_config(rotary_pct=pct, n_layers=1)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        ids = torch.randint(0, 300, (1, 12))
        shuffled = torch.cat([ids[:, :11][:, torch.randperm(11)], ids[:, 11:]], dim=1)
        a, b = model.logits(ids)[0, -1], model.logits(shuffled)[0, -1]
    if pct == 0.0:
        assert torch.allclose(a, b, atol=1e-5)
    else:
        assert (a - b).abs().max() > 1e-3


# MiLe paper's parameter counts at vocab 32000 (untied): 468.2M, 1.205B, 6.738B
PAPER_PARAMS = {"468m": 468.2e6, "1.2b": 1.205e9, "6.7b": 6.738e9}


@pytest.mark.parametrize("preset", sorted(PAPER_PARAMS))
@pytest.mark.parametrize("block", ["neox", "llama"])
def test_paper_presets_have_the_paper_parameter_count(preset, block):
    cfg = model_config(load_config(None, [f"model.preset={preset}", f"model.block={block}", "data.seq_len=128"]), 32000)
    with torch.device("meta"):
        n = GPT(cfg).num_params()
    assert abs(n - PAPER_PARAMS[preset]) / PAPER_PARAMS[preset] < 0.01, n
    if block == "llama":
        assert abs(n - PAPER_PARAMS[preset]) / PAPER_PARAMS[preset] < 1e-3
    shape = PRESETS[preset]
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.max_seq_len) == (
        shape.n_layers,
        shape.d_model,
        shape.n_heads,
        shape.max_seq_len,
    )


@pytest.mark.parametrize("block", ["neox", "llama"])
def test_activation_checkpointing_gives_the_same_gradients(block):
    torch.manual_seed(0)
    plain = GPT(tiny_config(block))
    ckpt = GPT(tiny_config(block))
    ckpt.load_state_dict(plain.state_dict())
    parallelize.apply(ckpt, activation_checkpointing=True, compile=False)
    assert ckpt.state_dict().keys() == plain.state_dict().keys()
    ids = torch.randint(0, 300, (2, 16))
    plain.logits(ids).square().mean().backward()
    ckpt.logits(ids).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-7), name
