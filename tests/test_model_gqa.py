"""Grouped-query attention and tied embeddings (issue 16): against transformers' LlamaForCausalLM and
GPTNeoXForCausalLM at toy size, against the same model with each key/value head repeated, with a KV cache, with
the fused loss, and trained under DeepSpeed ZeRO-0 and ZeRO-3 (tied head) through scripts/train.py."""

from __future__ import annotations

import pytest
import torch

from losslab.losses import build_loss
from models import BLOCK_DEFAULTS, GPT, GPTConfig, KVCache
from trainer.objective import CausalLMObjective


def tiny_config(block: str = "llama", **kw) -> GPTConfig:
    base = dict(vocab_size=300, n_layers=2, d_model=64, n_heads=4, d_mlp=96, max_seq_len=64, block=block)
    base.update(BLOCK_DEFAULTS[block])
    base.update(kw)
    return GPTConfig(**base)


def perturbed(model: GPT, scale: float = 0.2, seed: int = 0) -> GPT:
    """Weights far from their init (norm gains and biases too), so attention is far from uniform."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale)
    return model.eval()


def hf_to_losslab(cfg: GPTConfig, hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers state dict -> losslab's, for LlamaForCausalLM (GQA: q/k/v rows fused group by group into
    ``[kv_heads, g + 2, head_dim]``) and GPTNeoXForCausalLM (its fused rows are already ``[H, 3, hd]``).
    Embedding/head padding rows are zero; a tied model gets no ``head.weight``."""
    neox = cfg.block == "neox"
    pre = "gpt_neox." if neox else "model."
    V, P = cfg.vocab_size, cfg.padded_vocab_size

    def padded(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.new_zeros(P - V, t.shape[1])])

    sd = {"embed.weight": padded(hf[pre + ("embed_in" if neox else "embed_tokens") + ".weight"])}
    if not cfg.tie_embeddings:
        head = hf.get("lm_head.weight", hf.get("embed_out.weight"))  # transformers 5 / 4 name NeoX's head
        sd["head.weight"] = padded(head)
    norm = "final_layer_norm" if neox else "norm"
    for p in ("weight", "bias"):
        if f"{pre}{norm}.{p}" in hf:
            sd[f"ln_f.{p}"] = hf[f"{pre}{norm}.{p}"]
    if neox:
        names = {"ln_attn": "input_layernorm", "ln_mlp": "post_attention_layernorm",
                 "attn.qkv": "attention.query_key_value", "attn.proj": "attention.dense",
                 "mlp.up": "mlp.dense_h_to_4h", "mlp.down": "mlp.dense_4h_to_h"}  # fmt: skip
    else:
        names = {"ln_attn": "input_layernorm", "ln_mlp": "post_attention_layernorm", "attn.proj": "self_attn.o_proj",
                 "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}  # fmt: skip
    KV, hd, d = cfg.kv_heads, cfg.head_dim, cfg.d_model
    g = cfg.n_heads // KV
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"{pre}layers.{i}."
        for k, v in names.items():
            for p in ("weight", "bias"):
                if f"{theirs}{v}.{p}" in hf:
                    sd[f"{ours}{k}.{p}"] = hf[f"{theirs}{v}.{p}"]
        if not neox:
            q = hf[theirs + "self_attn.q_proj.weight"].view(KV, g, hd, d)  # query head h = kv * g + j
            k = hf[theirs + "self_attn.k_proj.weight"].view(KV, 1, hd, d)
            v = hf[theirs + "self_attn.v_proj.weight"].view(KV, 1, hd, d)
            sd[ours + "attn.qkv.weight"] = torch.cat([q, k, v], dim=1).reshape((cfg.n_heads + 2 * KV) * hd, d)
    return sd


def llama_pair(tied: bool, kv_heads: int = 2):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=kv_heads,
        intermediate_size=96, max_position_embeddings=64, tie_word_embeddings=tied, rms_norm_eps=0.3,
        rope_parameters={"rope_type": "default", "rope_theta": 777.0}, rope_theta=777.0,
    )  # fmt: skip
    torch.manual_seed(2)
    hf = transformers.LlamaForCausalLM(config)
    hf = perturbed(hf, seed=2)
    cfg = tiny_config("llama", n_kv_heads=kv_heads, tie_embeddings=tied, norm_eps=0.3, rotary_base=777.0)
    ours = GPT(cfg)
    ours.load_state_dict(hf_to_losslab(cfg, hf.state_dict()))  # strict: every tensor mapped, none left over
    return hf, ours.eval()


@pytest.mark.parametrize("tied", [False, True])
def test_llama_gqa_matches_transformers(tied):
    hf, ours = llama_pair(tied)
    assert hf.model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)  # really GQA on their side
    if tied:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight  # really tied on their side
        assert "head.weight" not in ours.state_dict() and ours.head.weight is ours.embed.weight
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours.logits(ids)
    assert (got - expected).abs().max() < 3e-5  # fp32 rounding of logits up to ~10: the thread count changes it
    assert expected.abs().max() > 1.0  # not a near-zero output that anything would match


@pytest.mark.parametrize("tied", [False, True])
def test_gpt_neox_matches_transformers(tied):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPTNeoXConfig(
        vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
        max_position_embeddings=64, tie_word_embeddings=tied, use_parallel_residual=True, layer_norm_eps=0.3,
        hidden_act="gelu", attention_bias=True,
        rope_parameters={"rope_type": "default", "rope_theta": 333.0, "partial_rotary_factor": 0.5},
        rotary_pct=0.5, rotary_emb_base=333.0, rope_theta=333.0, partial_rotary_factor=0.5,
    )  # fmt: skip
    torch.manual_seed(3)
    hf = perturbed(transformers.GPTNeoXForCausalLM(config), seed=3)
    head = hf.get_output_embeddings().weight
    if tied and head is not hf.gpt_neox.embed_in.weight:
        pytest.skip("this transformers release does not tie GPTNeoX's embeddings")
    cfg = tiny_config("neox", tie_embeddings=tied, norm_eps=0.3, rotary_base=333.0, rotary_pct=0.5)
    ours = GPT(cfg)
    ours.load_state_dict(hf_to_losslab(cfg, hf.state_dict()))
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = hf(ids).logits, ours.eval().logits(ids)
    assert (got - expected).abs().max() < 1e-5
    assert expected.abs().max() > 1.0


def repeated_kv(gqa: GPT) -> GPT:
    """The same model as multi-head attention: each key/value head copied to each of its query heads."""
    cfg = gqa.cfg
    mha = GPT(GPTConfig(**{**cfg.__dict__, "n_kv_heads": 0})).to(gqa.embed.weight.dtype)
    KV, hd, d, g = cfg.kv_heads, cfg.head_dim, cfg.d_model, cfg.n_heads // cfg.kv_heads
    sd = dict(gqa.state_dict())
    for i in range(cfg.n_layers):
        for p in ("weight", "bias"):
            key = f"blocks.{i}.attn.qkv.{p}"
            if key not in sd:
                continue
            rows = sd[key].view(KV, g + 2, hd, *sd[key].shape[1:])  # [KV, g+2, hd, (d)]
            q, k, v = rows[:, :g], rows[:, g : g + 1].expand_as(rows[:, :g]), rows[:, g + 1 :].expand_as(rows[:, :g])
            sd[key] = torch.stack([q, k, v], dim=2).reshape(3 * d, *sd[key].shape[1:])  # [H, 3, hd] NeoX layout
    mha.load_state_dict(sd)
    return mha.eval()


@pytest.mark.parametrize("block", ["neox", "llama"])
def test_gqa_equals_attention_with_repeated_key_value_heads(block):
    """Independent of transformers (NeoX has no GQA there): forward and gradients in float64."""
    torch.manual_seed(0)
    gqa = perturbed(GPT(tiny_config(block, n_heads=8, n_kv_heads=2, rotary_pct=0.5)).double())
    assert gqa.blocks[0].attn.qkv.weight.shape == ((8 + 2 * 2) * 8, 64)
    mha = repeated_kv(gqa)
    ids = torch.randint(0, 300, (2, 24))
    a, b = gqa.logits(ids), mha.logits(ids)
    assert torch.allclose(a, b, atol=1e-10, rtol=0)
    a.square().mean().backward()
    b.square().mean().backward()
    # a shared key/value head's gradient is the sum of its copies'
    g_mha = mha.blocks[0].attn.qkv.weight.grad.view(8, 3, 8, 64)
    g_gqa = gqa.blocks[0].attn.qkv.weight.grad.view(2, 6, 8, 64)
    assert torch.allclose(g_gqa[:, :4], g_mha[:, 0].reshape(2, 4, 8, 64), atol=1e-12)
    assert torch.allclose(g_gqa[:, 4], g_mha[:, 1].reshape(2, 4, 8, 64).sum(1), atol=1e-12)
    assert torch.allclose(g_gqa[:, 5], g_mha[:, 2].reshape(2, 4, 8, 64).sum(1), atol=1e-12)


def test_repeated_key_value_path_equals_sdpa_grouped_query(monkeypatch):
    """The path for torch < 2.5 and packed CUDA batches (K/V heads repeated before SDPA) gives the same numbers."""
    import models.gpt

    torch.manual_seed(0)
    model = perturbed(GPT(tiny_config("llama", n_heads=8, n_kv_heads=2)).double())
    ids, seg = torch.randint(0, 300, (2, 24)), torch.tensor([[0] * 10 + [1] * 14, [3] * 24])
    native = model.logits(ids), model.logits(ids, segment_ids=seg)
    monkeypatch.setattr(models.gpt, "_SDPA_GQA", False)
    repeated = model.logits(ids), model.logits(ids, segment_ids=seg)
    for a, b in zip(native, repeated, strict=True):
        assert torch.allclose(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("block", ["neox", "llama"])
def test_gqa_kv_cache_holds_only_key_value_heads_and_gives_the_full_forward(block):
    torch.manual_seed(0)
    model = perturbed(GPT(tiny_config(block, n_kv_heads=2, rotary_pct=0.5)))
    ids = torch.randint(0, 300, (3, 20))
    cache = KVCache.empty(model.cfg.n_layers)
    with torch.no_grad():
        full = model.logits(ids)
        steps = [model.head(model(ids[:, :12], cache))]
        steps += [model.head(model(ids[:, t : t + 1], cache)) for t in range(12, 20)]
    assert cache.layers[0].k.shape == (3, 2, 20, 16) and cache.layers[0].v.shape == (3, 2, 20, 16)
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5)


@pytest.mark.parametrize("block", ["neox", "llama"])
def test_defaults_keep_the_parameter_names_and_shapes_of_untied_multi_head_models(block):
    """Checkpoints written before GQA and tying existed must still load: same names, same shapes."""
    plain = GPT(tiny_config(block)).state_dict()
    explicit = GPT(tiny_config(block, n_kv_heads=4, tie_embeddings=False)).state_dict()
    assert {k: v.shape for k, v in plain.items()} == {k: v.shape for k, v in explicit.items()}
    assert plain["blocks.0.attn.qkv.weight"].shape == (3 * 64, 64) and "head.weight" in plain


@pytest.mark.parametrize("block", ["neox", "llama"])
def test_tied_head_is_the_embedding_matrix_once(block):
    untied, tied = GPT(tiny_config(block)), GPT(tiny_config(block, tie_embeddings=True))
    names = [n for n, _ in tied.named_parameters()]
    assert "embed.weight" in names and not any(n.startswith("head.") for n in names)
    assert tied.head.weight is tied.embed.weight
    assert set(tied.state_dict()) == set(untied.state_dict()) - {"head.weight"}
    assert tied.num_params() == untied.num_params() - untied.head.weight.numel()
    # to(), double(), and copies keep the tie
    copy = __import__("copy").deepcopy(tied).double()
    assert copy.head.weight is copy.embed.weight and copy.head.weight.dtype == torch.float64
    assert copy.embed.weight is not tied.embed.weight


@pytest.mark.parametrize("fused", [True, False])
def test_tied_loss_and_gradient_equal_the_untied_model_with_equal_matrices(fused):
    """Through CausalLMObjective (the loss runs inside the head's forward): the tied matrix's gradient is the
    sum of the untied embedding's and head's, and the loss is the same; float64."""
    torch.manual_seed(0)
    tied = perturbed(GPT(tiny_config("llama", tie_embeddings=True, n_kv_heads=2))).double().train()
    untied = GPT(tiny_config("llama", n_kv_heads=2)).double()
    sd = dict(tied.state_dict())
    sd["head.weight"] = sd["embed.weight"].clone()
    untied.load_state_dict(sd)
    loss_cfg = {"name": "ce", "fused": fused}
    windows = torch.randint(0, 300, (2, 17))
    out_t = CausalLMObjective(tied, build_loss(loss_cfg))(windows)
    out_u = CausalLMObjective(untied, build_loss(loss_cfg))(windows)
    out_t.loss.backward()
    out_u.loss.backward()
    assert torch.allclose(out_t.loss, out_u.loss, atol=1e-12)
    expected = untied.embed.weight.grad + untied.head.weight.grad
    assert torch.allclose(tied.embed.weight.grad, expected, atol=1e-12)
    assert untied.head.weight.grad.abs().max() > 1e-3 and untied.embed.weight.grad.abs().max() > 1e-3
    # float64 reference: plain cross-entropy of hidden @ E^T
    with torch.no_grad():
        logits = tied(windows[:, :-1]) @ tied.embed.weight[:300].T
        ref = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), windows[:, 1:].reshape(-1))
    assert torch.allclose(out_t.loss.detach(), ref, atol=1e-12)


# ZeRO-3 keeps parameters under 1e5 elements whole on every rank; 0 partitions the debug model's embedding too,
# so the tied head must gather it as an external parameter.
PARTITION_ALL = "distributed.raw.zero_optimization.stage3_param_persistence_threshold"
TIED_STEPS = 6


@pytest.fixture(scope="module")
def tied_runs(corpus, tmp_path_factory):
    """A tied GQA llama trained with ZeRO-0 on one rank (grad_accum 2) and ZeRO-3 on two ranks, same batches."""
    from tests.conftest import debug_overrides
    from tests.test_distributed import launch

    root = tmp_path_factory.mktemp("tied")
    runs = {}
    for name, nproc, extra in (("zero0", 1, {}), ("zero3", 2, {"distributed.zero_stage": 3, PARTITION_ALL: 0})):
        run_dir = root / name
        overrides = {"model.block": "llama", "model.tie_embeddings": "true", "model.n_kv_heads": 2,
                     "train.max_steps": TIED_STEPS, "train.log_every": 1, "train.precision": "fp32",
                     "train.global_batch_size": 16, "checkpoint.every": TIED_STEPS, **extra}  # fmt: skip
        proc = launch(nproc, debug_overrides(corpus, run_dir, **overrides))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = run_dir
    return runs


def test_tied_gqa_model_trains_alike_under_zero0_and_zero3(tied_runs):
    from tests.test_distributed import losses

    zero0, zero3 = losses(tied_runs["zero0"]), losses(tied_runs["zero3"])
    assert sorted(zero3) == list(range(1, TIED_STEPS + 1))
    for step in zero3:
        assert abs(zero3[step] - zero0[step]) < 1e-5, (step, zero3[step], zero0[step])
    assert zero0[TIED_STEPS] < zero0[1] - 0.1  # it learns: the tied matrix is being updated


@pytest.mark.parametrize("run", ["zero0", "zero3"])
def test_tied_checkpoint_holds_the_matrix_once_and_loads_back(tied_runs, run):
    from safetensors import safe_open

    from models.checkpoint import load_model

    ckpt = tied_runs[run] / "checkpoints" / f"step_{TIED_STEPS:07d}"
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        embed = f.get_tensor("embed.weight")
    assert "embed.weight" in names and not any(n.startswith("head.") for n in names)
    assert not any("_checkpoint_wrapped" in n for n in names)
    model, _ = load_model(ckpt)
    assert model.cfg.tie_embeddings and model.cfg.n_kv_heads == 2
    assert model.head.weight is model.embed.weight and torch.equal(model.embed.weight, embed)
    other, _ = load_model(tied_runs["zero0" if run == "zero3" else "zero3"] / "checkpoints" / ckpt.name)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(model.logits(ids), other.logits(ids), atol=1e-4)  # same training, either layout


@pytest.mark.parametrize("block", ["neox", "llama"])
def test_left_padded_rows_decode_as_they_would_alone(block):
    """Prompts of mixed lengths in one left-padded batch (``KVCache.empty(pad=...)``): each row's logits, prompt and
    steps, are those of the row alone without padding (float64: the padding is masked, not merely small), whatever
    the padding token; the preallocated cache equals the growing one; a cache filled row group by row group
    (``KVCache.place``: each prompt run alone) decodes the same; rows dropped with ``keep`` go on unchanged."""
    torch.manual_seed(0)
    model = perturbed(GPT(tiny_config(block, n_kv_heads=2, rotary_pct=0.5))).double()
    lengths, steps = [7, 3, 11, 5], 4
    prompts = [torch.randint(0, 300, (n,)) for n in lengths]
    later = torch.randint(0, 300, (len(lengths), steps))  # the tokens fed after the prompts
    width = max(lengths)
    pad = torch.tensor([width - n for n in lengths])
    with torch.no_grad():
        alone = [model.logits(torch.cat([p, t])[None])[0] for p, t in zip(prompts, later, strict=True)]  # [n + s, V]
        for mode, filler, capacity in (("padded", 0, 0), ("padded", 299, width + steps), ("placed", 0, width + 2)):
            cache = KVCache.empty(model.cfg.n_layers, pad=pad, capacity=capacity)
            if mode == "padded":
                ids = torch.stack([torch.cat([torch.full((width - n,), filler), p])
                                   for n, p in zip(lengths, prompts, strict=True)])  # fmt: skip
                first = model.head(model(ids, cache))  # [B, width, V]
                for b, n in enumerate(lengths):
                    assert torch.allclose(first[b, width - n :], alone[b][:n], atol=1e-10), (b, filler)
            else:
                for b, p in enumerate(prompts):
                    part = KVCache.empty(model.cfg.n_layers)
                    assert torch.allclose(model.head(model(p[None], part))[0], alone[b][: len(p)], atol=1e-10)
                    cache.place(torch.tensor([b]), part, end=width)
            rows = torch.arange(len(lengths))
            for s in range(steps):
                if s == 2:  # rows 0 and 2 finish: the others go on
                    rows = torch.tensor([1, 3])
                    cache.keep(rows)
                out = model.head(model(later[rows, s : s + 1], cache))[:, 0]  # [B', V]
                for i, b in enumerate(rows.tolist()):
                    assert torch.allclose(out[i], alone[b][lengths[b] + s], atol=1e-10), (b, s, mode, capacity)
            assert cache.length == width + steps and cache.layers[0].k.shape == (2, 2, width + steps, 16)


@pytest.mark.parametrize("block", ["llama", "neox"])
def test_fp32_loss_and_gradients_equal_transformers_in_float64(block):
    """The training step's path (the fused projection split into q, k and v, rotary applied half by half to the
    strided pieces, a pass-through remainder in NeoX's partial rotary): loss and every weight's gradient in fp32
    against transformers' eager model in float64, a plain reference written apart from ours."""
    import torch.nn.functional as F

    if block == "llama":
        hf, ours = llama_pair(tied=True)
    else:
        transformers = pytest.importorskip("transformers")
        config = transformers.GPTNeoXConfig(
            vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=64, use_parallel_residual=True, layer_norm_eps=0.3, hidden_act="gelu",
            attention_bias=True, rope_parameters={"rope_type": "default", "rope_theta": 333.0,
                                                  "partial_rotary_factor": 0.5},
            rotary_pct=0.5, rotary_emb_base=333.0, rope_theta=333.0, partial_rotary_factor=0.5,
        )  # fmt: skip
        torch.manual_seed(3)
        hf = perturbed(transformers.GPTNeoXForCausalLM(config), seed=3)
        cfg = tiny_config("neox", norm_eps=0.3, rotary_base=333.0, rotary_pct=0.5)
        ours = GPT(cfg)
        ours.load_state_dict(hf_to_losslab(cfg, hf.state_dict()))
    hf.config._attn_implementation = "eager"
    hf = hf.double().train()
    ours = ours.float().train()
    ids = torch.randint(0, 300, (2, 33), generator=torch.Generator().manual_seed(4))
    ref = F.cross_entropy(hf(ids[:, :-1]).logits.flatten(0, 1), ids[:, 1:].flatten())
    got = F.cross_entropy(ours.logits(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    ref.backward()
    got.backward()
    assert abs(got.item() - ref.item()) < 1e-5 * ref.item()
    expected = hf_to_losslab(ours.cfg, {n: p.grad for n, p in hf.named_parameters()})
    for name, p in ours.named_parameters():
        scale = expected[name].abs().max().item()
        assert scale > 0, name
        assert (p.grad.double() - expected[name]).abs().max().item() < 1e-4 * scale, name


@pytest.mark.parametrize("block", ["llama", "neox"])
def test_column_major_weights_keep_their_values_and_give_the_float64_logits(block):
    """``GPT.column_major_`` (CPU inference, evals/lm.py): every matrix keeps its values and shape with its
    columns contiguous; a cached, left-padded decode gives the float64 model's logits."""
    torch.manual_seed(0)
    model = perturbed(GPT(tiny_config(block, n_kv_heads=2, tie_embeddings=block == "llama", rotary_pct=0.5)))
    reference = __import__("copy").deepcopy(model).double()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.column_major_()
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
        if p.ndim == 2:
            assert p.stride() == (1, p.shape[0]), name
    assert model.head.weight is model.embed.weight or block == "neox"
    ids = torch.randint(0, 300, (3, 12))
    pad = torch.tensor([0, 4, 7])
    with torch.no_grad():
        expected = [reference.logits(ids[b, pad[b] :][None])[0] for b in range(3)]  # each row alone, float64
        cache = KVCache.empty(model.cfg.n_layers, pad=pad, capacity=14)
        got = model.head(model(ids[:, :10], cache))  # [3, 10, V]
        last = model.head(model(ids[:, 10:11], cache))[:, 0]  # [3, V]: one cached step
    for b in range(3):
        n = 10 - pad[b]
        assert (got[b, pad[b] :].double() - expected[b][:n]).abs().max() < 1e-4
        assert (last[b].double() - expected[b][n]).abs().max() < 1e-4
