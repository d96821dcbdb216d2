"""losslab.hf.patch on real transformers models (tiny, random, float64): the patched loss is the model's own
cross-entropy for ``ce`` and losslab's own trainer's loss for every loss, gradients included, with no [N, V]
logits in training; logits and generation stay as they were."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from losslab import hf  # noqa: E402
from losslab.losses import IGNORE_INDEX, LOSSES, build_loss  # noqa: E402
from tests.test_losses import LOSS_PARAMS, rel_err  # noqa: E402

V, T, B = 96, 12, 3


def tiny(family: str, tied: bool = False) -> torch.nn.Module:
    """A random 2-layer model of ``family`` in float64, weights far from init so that every path matters."""
    shape = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                 max_position_embeddings=64, tie_word_embeddings=tied)  # fmt: skip
    gqa = dict(num_key_value_heads=2)
    config = {
        "llama": lambda: transformers.LlamaConfig(**shape, **gqa),
        "gpt_neox": lambda: transformers.GPTNeoXConfig(**shape, rotary_pct=0.5),
        "qwen2": lambda: transformers.Qwen2Config(**shape, **gqa),
        "qwen3": lambda: transformers.Qwen3Config(**shape, **gqa, head_dim=8),
        "mistral": lambda: transformers.MistralConfig(**shape, **gqa, sliding_window=None),
    }[family]()
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.train()


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input ids, attention mask (the last row right-padded) and labels (-100 on a prompt and on padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[-1, -4:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :5] = IGNORE_INDEX  # a prompt
    return ids, mask, labels


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "gpt_neox", "qwen2", "qwen3", "mistral"])
@pytest.mark.parametrize("tied", [False, True])
def test_patched_ce_is_the_models_own_loss_without_logits(family, tied):
    model = tiny(family, tied)
    ids, mask, labels = batch()
    own = model(input_ids=ids, attention_mask=mask, labels=labels)  # transformers computes it in float32
    logits = own.logits  # [B, T, V] float64
    reference = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V), labels[:, 1:].reshape(-1))
    assert reference.item() == pytest.approx(own.loss.item(), rel=1e-6)
    reference.backward()
    expected = grads(model)
    model.zero_grad()
    hf.patch(model, "ce")
    assert model.accepts_loss_kwargs  # a token mean: Trainer passes num_items_in_batch
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert out.logits is None and out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(reference.item(), rel=1e-12)
    out.loss.backward()
    got = grads(model)
    assert got.keys() == expected.keys()  # the tied head's gradient reaches the embedding matrix
    for name in expected:
        assert rel_err(got[name], expected[name]) < 1e-10, name
    # num_items_in_batch: the sum over this batch's targets divided by the step's count, as HF's own loss
    n = int((labels[:, 1:] != IGNORE_INDEX).sum())
    scaled = model(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(3 * n))
    assert scaled.loss.item() == pytest.approx(reference.item() / 3, rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_logits_when_asked_in_eval_and_at_generation(family):
    model = tiny(family)
    ids, mask, labels = batch()
    plain = model(input_ids=ids, attention_mask=mask).logits
    model.eval()
    want = model.generate(ids[:2, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    hf.patch(model, "mile", gamma=1.0)
    assert not model.accepts_loss_kwargs  # weight-normalised: Trainer averages the micro-steps
    model.train()
    fused = model(input_ids=ids, attention_mask=mask, labels=labels)
    with_logits = model(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True)
    assert torch.equal(with_logits.logits, plain) and fused.logits is None
    assert with_logits.loss.item() == pytest.approx(fused.loss.item(), rel=1e-12)  # the same loss from the logits
    model.eval()
    evaluated = model(input_ids=ids, attention_mask=mask, labels=labels)
    assert torch.equal(evaluated.logits, plain) and evaluated.loss.item() == pytest.approx(fused.loss.item(), rel=1e-12)
    assert torch.equal(model.generate(ids[:2, :4], max_new_tokens=5, do_sample=False, pad_token_id=0), want)
    assert model(input_ids=ids).loss is None  # no labels: the model's own forward
    assert set(model.losslab.metrics) >= {"ce", "entropy", "weight", "tokens"}
    hf.unpatch(model)
    assert model(input_ids=ids, attention_mask=mask, labels=labels).loss.item() != pytest.approx(fused.loss.item())


def test_training_builds_no_vocabulary_sized_tensor():
    """With labels in training mode the largest tensor is a [chunk, V] block (or the [d, V] head), never [B*T, V]."""
    model = tiny("llama").float()
    hf.patch(model, "mile", chunk_size=8)
    ids = torch.randint(0, V, (4, 32))
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.dim() >= 1 and result.shape[-1] == V:
                seen.append(result.numel())
            return result

    with Spy():
        out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    d = model.config.hidden_size
    assert seen and max(seen) <= max(8, d) * V < 4 * 32 * V


@pytest.fixture(scope="module")
def twins():
    """A losslab GPT (llama block, GQA) and the same weights as a transformers Llama, float64."""
    from models import GPT, GPTConfig
    from models.hf import to_hf_model

    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=V, block="llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2, d_mlp=48,
                    max_seq_len=64, bias=False, rotary_pct=1.0, parallel_residual=False)  # fmt: skip
    gpt = GPT(cfg).double()
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return gpt.train(), to_hf_model(gpt).double().train()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_equals_losslabs_own_objective(twins, name):
    """The same batch through losslab's training objective (CausalLMObjective, what the DeepSpeed engine runs)
    and through the patched transformers model: the same loss and hidden-state gradients, float64."""
    from trainer.objective import CausalLMObjective

    gpt, model = twins
    g = torch.Generator().manual_seed(3)
    windows = torch.randint(0, V, (B, T + 1), generator=g)
    labels = windows.clone()
    labels[0, :6] = IGNORE_INDEX
    counts = torch.randint(0, 200, (V,), generator=g)
    weight = torch.rand(B, T + 1, generator=g, dtype=torch.float64)  # per-token inputs, aligned with labels
    ref_ce = torch.rand(B, T + 1, generator=g, dtype=torch.float64) * 4
    params = {**LOSS_PARAMS[name], "z_loss": 1e-3}
    inputs = {"weight": weight[:, 1:].reshape(-1), "ref_ce": ref_ce[:, 1:].reshape(-1)}
    gpt.zero_grad()
    ours = CausalLMObjective(gpt, build_loss(name, token_counts=counts, **params))
    expected = ours(windows, labels=labels[:, 1:], token_inputs=inputs).loss
    expected.backward()
    expected_grad = gpt.embed.weight.grad[:V].clone()  # losslab pads the vocabulary rows
    model.zero_grad()
    hf.patch(model, name, token_counts=counts, **params)
    keys = {"token_weights": weight, "ref_ce": ref_ce}
    kwargs = {k: v for k, v in keys.items() if k in model.losslab.batch_keys}
    out = model(input_ids=windows, labels=labels, **kwargs)
    # transformers builds its rotary tables in float32 (whatever the model's dtype): the two models' hidden
    # states agree to ~1e-8, not to float64's last digits
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-7)
    out.loss.backward()
    assert rel_err(model.model.embed_tokens.weight.grad, expected_grad) < 1e-6
    # on transformers' own hidden states, the patched loss is losslab's loss to float64 precision
    with torch.no_grad():
        hidden = model.model(input_ids=windows).last_hidden_state[:, :-1]  # [B, T, d]
    direct = build_loss(name, token_counts=counts, **params)(
        hidden, model.lm_head.weight, labels[:, 1:], token_inputs=inputs
    )
    assert out.loss.item() == pytest.approx(direct.loss.item(), rel=1e-12)


def test_a_loss_that_needs_data_says_which_batch_key():
    model = tiny("llama")
    ids, _, labels = batch()
    hf.patch(model, "weighted")
    with pytest.raises(ValueError, match=r"loss weighted needs the batch key\(s\) \['token_weights'\]"):
        model(input_ids=ids, labels=labels)
    hf.patch(model, "rho1")
    with pytest.raises(ValueError, match=r"\['ref_ce'\].*patch\(\.\.\., reference="):
        model(input_ids=ids, labels=labels)


def test_rho1_with_a_reference_model_scores_each_batch_online():
    """reference=an HF model: its per-target CE is the ref_ce a data stream would carry."""
    model, reference = tiny("llama"), tiny("llama", tied=True)
    ids, mask, labels = batch()
    with torch.no_grad():
        logits = reference(input_ids=ids, attention_mask=mask).logits  # [B, T, V]
    y = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
    ref_ce = torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1), reduction="none")
    carried = torch.nn.functional.pad(ref_ce.reshape(B, T)[:, :-1], (1, 0))  # aligned with labels
    hf.patch(model, "rho1", keep_ratio=0.5)
    by_key = model(input_ids=ids, attention_mask=mask, labels=labels, ref_ce=carried).loss
    hf.patch(model, "rho1", keep_ratio=0.5, reference=reference)
    online = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    assert online.item() == pytest.approx(by_key.item(), rel=1e-12)
    assert not any(p.requires_grad for p in reference.parameters())


def test_a_model_whose_logits_are_scaled_is_refused():
    model = tiny("llama")
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="changes its logits after the head"):
        hf.patch(model, "ce")
    model.config.final_logit_softcapping = None
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"losslab.hf.declare\(model_type\)"):
        hf.patch(model, "ce")
    hf.declare("mystery")
    try:
        assert hf.patch(model, "ce") is model
    finally:
        hf.FAMILIES.discard("mystery")


def test_a_deep_copy_of_a_patched_model_is_patched_on_its_own():
    """TRL and others deep-copy models (a reference model): the copy computes its loss with its own head."""
    import copy

    model = tiny("llama", tied=True)
    ids, mask, labels = batch()
    hf.patch(model, "mile")
    clone = copy.deepcopy(model)
    with torch.no_grad():
        clone.model.embed_tokens.weight.mul_(2.0)  # the copy's (tied) head changes; the original's does not
    original = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    fused = clone(input_ids=ids, attention_mask=mask, labels=labels).loss
    from_logits = clone(input_ids=ids, attention_mask=mask, labels=labels, return_logits=True).loss
    assert fused.item() == pytest.approx(from_logits.item(), rel=1e-12)  # the copy's own weights
    assert abs(fused.item() - original.item()) > 1e-3
    assert model.get_output_embeddings()._losslab_state is model.losslab
    assert clone.get_output_embeddings()._losslab_state is clone.losslab is not model.losslab
    hf.unpatch(clone)
    assert model(input_ids=ids, attention_mask=mask, labels=labels).logits is None  # the original stays patched
