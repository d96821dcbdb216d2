"""Packed documents kept apart (``segment_ids``): block-diagonal causal attention and per-document rotary
positions, in the model and through the training objective; float64 so that "unchanged" can be tight."""

from __future__ import annotations

import pytest
import torch

from losslab.losses import build_loss
from models import BLOCK_DEFAULTS, GPT, GPTConfig, KVCache
from models.gpt import Packing
from trainer.objective import CausalLMObjective

LENGTHS = (9, 7, 8)  # three documents packed into one row of 24 tokens


def model_for(block: str, **kw) -> GPT:
    base = dict(vocab_size=300, n_layers=2, d_model=64, n_heads=4, d_mlp=96, max_seq_len=64, block=block)
    base.update(BLOCK_DEFAULTS[block])
    base.update(kw)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**base)).double()
    with torch.no_grad():  # far from init, so attention is far from uniform and positions matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def packed_row(seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    docs = [torch.randint(0, 300, (n,), generator=gen) for n in LENGTHS]
    segments = torch.cat([torch.full((n,), 7 + i) for i, n in enumerate(LENGTHS)])  # any ids, not 0-based
    return docs, torch.cat(docs)[None], segments[None]  # ids [1, 24], segment_ids [1, 24]


def test_segments_give_per_document_positions_and_a_block_diagonal_causal_mask():
    seg = torch.tensor([[5, 5, 5, 2, 2, 5, 5]])  # a repeated id after another segment is a new segment
    packing = Packing.from_segment_ids(seg)
    assert packing.positions.tolist() == [[0, 1, 2, 0, 1, 0, 1]]
    doc = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    expected = (doc[:, None] == doc[None, :]) & torch.ones(7, 7, dtype=torch.bool).tril()
    assert torch.equal(packing.mask[0, 0], expected)


@pytest.mark.parametrize("block", ["neox", "llama"])
@pytest.mark.parametrize("kv_heads", [0, 2])
def test_a_tokens_logits_ignore_the_other_documents_in_its_row(block, kv_heads):
    model = model_for(block, n_kv_heads=kv_heads)
    _, ids, seg = packed_row()
    changed = ids.clone()
    a, b = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    changed[0, :a] = torch.randint(0, 300, (a,), generator=torch.Generator().manual_seed(5))  # the one before
    changed[0, b:] = torch.randint(0, 300, (ids.shape[1] - b,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        before, after = model.logits(ids, segment_ids=seg), model.logits(changed, segment_ids=seg)
        unpacked = model.logits(changed)
    assert torch.allclose(before[0, a:b], after[0, a:b], atol=1e-12, rtol=0)
    assert (before[0, b:] - after[0, b:]).abs().max() > 1e-2  # the changed documents' own logits do change
    assert (unpacked[0, a:b] - before[0, a:b]).abs().max() > 1e-2  # without segment_ids the row is one document


@pytest.mark.parametrize("block", ["neox", "llama"])
@pytest.mark.parametrize("kv_heads", [0, 2])
def test_a_packed_document_has_the_logits_it_has_alone_at_the_start_of_a_row(block, kv_heads):
    model = model_for(block, n_kv_heads=kv_heads)
    docs, ids, seg = packed_row()
    with torch.no_grad():
        packed = model.logits(ids, segment_ids=seg)[0]  # [24, V]
        start = 0
        for doc in docs:
            alone = model.logits(doc[None])[0]  # [n, V]
            assert torch.allclose(packed[start : start + len(doc)], alone, atol=1e-10, rtol=0)
            start += len(doc)
        one_segment = model.logits(ids, segment_ids=torch.zeros_like(seg))
    assert torch.equal(one_segment, model.logits(ids).detach())  # one segment is the plain causal forward


def test_the_mask_isolates_and_restarted_positions_make_it_exact():
    """Rotary attention depends on relative positions only, so the mask is what isolates documents (restarted
    positions with a plain causal mask do not); restarting positions makes a packed document's numbers those of
    the document alone (fp32 rotary tables at other offsets round differently)."""
    model = model_for("llama")
    docs, ids, seg = packed_row()
    packing = Packing.from_segment_ids(seg)
    causal = torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()[None, None]
    positions_only = Packing(positions=packing.positions, mask=causal)
    with torch.no_grad():
        x_packed, x_positions_only = model.embed(ids), model.embed(ids)
        for block in model.blocks:
            x_packed = block(x_packed, None, 0, packing)
            x_positions_only = block(x_positions_only, None, 0, positions_only)
        alone = model(docs[1][None])[0]
    a, b = LENGTHS[0], LENGTHS[0] + LENGTHS[1]
    assert torch.allclose(model.ln_f(x_packed)[0, a:b], alone, atol=1e-10, rtol=0)
    assert (model.ln_f(x_positions_only)[0, a:b] - alone).abs().max() > 1e-2


@pytest.mark.parametrize("fused", [True, False])
def test_objective_loss_and_gradients_of_a_packed_row_equal_the_documents_trained_alone(fused):
    """CE through CausalLMObjective with segment_ids [B, T+1]: no document sees another, and a document's last
    token does not predict the next one's first (no loss there); loss and every gradient equal the documents
    trained one by one (summed CE over all their predictions / their count), float64."""
    model = model_for("llama", n_kv_heads=2)
    loss_fn = build_loss({"name": "ce", "fused": fused})
    docs, ids, seg = packed_row(seed=1)
    out = CausalLMObjective(model, loss_fn)(ids, segment_ids=seg)
    grads = torch.autograd.grad(out.loss, list(model.parameters()))
    n = sum(len(d) - 1 for d in docs)
    assert out.metrics["tokens"].item() == n
    ref = sum(CausalLMObjective(model, loss_fn)(d[None]).loss * (len(d) - 1) for d in docs) / n
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    assert torch.allclose(out.loss, ref, atol=1e-12)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert torch.allclose(g, r, atol=1e-11), name
    # labels given by the caller (IGNORE_INDEX on a prompt) are kept, and the boundary is still ignored
    labels = ids[:, 1:].clone()
    labels[0, :4] = -100
    masked = CausalLMObjective(model, loss_fn)(ids, segment_ids=seg, labels=labels)
    assert masked.metrics["tokens"].item() == n - 4


def test_bad_segment_ids_are_refused():
    model = model_for("neox")
    ids = torch.randint(0, 300, (1, 8))
    with pytest.raises(ValueError, match="segment_ids"):
        model(ids, segment_ids=torch.zeros(1, 7, dtype=torch.long))
    with pytest.raises(ValueError, match="KV cache"):
        model(ids, KVCache.empty(2), segment_ids=torch.zeros_like(ids))
    objective = CausalLMObjective(model, build_loss({"name": "ce"}))
    with pytest.raises(ValueError, match="segment_ids"):
        objective(ids, segment_ids=torch.zeros(1, 7, dtype=torch.long))  # must align with windows [B, T+1]


def test_activation_checkpointing_keeps_packed_gradients():
    from trainer import parallelize

    plain, ckpt = model_for("neox", n_kv_heads=2), model_for("neox", n_kv_heads=2)
    parallelize.apply(ckpt, activation_checkpointing=True, compile=False)
    _, ids, seg = packed_row()
    plain.logits(ids, segment_ids=seg).square().mean().backward()
    ckpt.logits(ids, segment_ids=seg).square().mean().backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        assert torch.allclose(a.grad, b.grad, atol=1e-12), name
