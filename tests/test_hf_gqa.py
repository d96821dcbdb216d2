"""models/hf.py converts grouped-query attention and tied embeddings both ways (Llama), logits equal."""

from __future__ import annotations

import pytest
import torch

from models import GPT, GPTConfig
from models.hf import from_hf_model, to_hf_model


@pytest.mark.parametrize("tied", [False, True])
def test_gqa_llama_round_trips_through_transformers(tied):
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=300, n_layers=2, d_model=64, n_heads=8, n_kv_heads=2, d_mlp=96, max_seq_len=64,
                    block="llama", rotary_pct=1.0, parallel_residual=False, bias=False, rotary_base=5000.0,
                    norm_eps=1e-4, tie_embeddings=tied)  # fmt: skip
    ours = GPT(cfg).double().eval()
    hf = to_hf_model(ours).double().eval()
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings is tied
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        assert (hf(ids).logits - ours.logits(ids)).abs().max() < 1e-6  # both use fp32 rotary tables
        back = from_hf_model(hf).double().eval()
        assert back.cfg == cfg
        assert torch.equal(back.logits(ids), ours.logits(ids))
