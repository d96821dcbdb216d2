"""HF transformers interop: exact parity of both block families, export and import, and lm-eval agreement."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from data.hf_tokenizer import to_hf_tokenizer
from data.tokenizer import Tokenizer
from models import GPT, GPTConfig
from models.hf import from_hf_model, hf_config, to_hf_model
from tests.conftest import debug_overrides
from tests.corpus import documents

STYLES = {
    "neox": {"block": "neox"},
    "neox-sequential": {"block": "neox", "parallel_residual": False, "rotary_pct": 0.5},
    "llama": {"block": "llama", "rotary_pct": 1.0, "parallel_residual": False, "bias": False},
    # non-default norm eps and rope base travel too (a large eps: ignoring it would change every logit)
    "neox-eps-rope": {"block": "neox", "rotary_pct": 0.5, "norm_eps": 0.3, "rotary_base": 500.0},
    "llama-eps-rope": {"block": "llama", "rotary_pct": 1.0, "parallel_residual": False, "bias": False,
                       "norm_eps": 0.2, "rotary_base": 777.0},
}  # fmt: skip


def toy(style: str) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=300, n_layers=2, d_model=64, n_heads=4, d_mlp=96, max_seq_len=64, **STYLES[style]))
    with torch.no_grad():  # move norms and biases off their init so every tensor is checked
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


@pytest.mark.parametrize("style", sorted(STYLES))
def test_export_matches_transformers(style):
    model = toy(style)
    hf = to_hf_model(model)
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (model.logits(ids) - hf(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("block", ["neox", "llama"])
def test_import_of_a_transformers_initialised_model(block):
    import transformers

    cfg = toy("llama" if block == "llama" else "neox").cfg
    torch.manual_seed(1)
    cls = transformers.LlamaForCausalLM if block == "llama" else transformers.GPTNeoXForCausalLM
    hf = cls(hf_config(cfg)).eval()
    ours = from_hf_model(hf)
    ids = torch.randint(0, 300, (2, 40))
    with torch.no_grad():
        assert (ours.logits(ids) - hf(ids).logits).abs().max() < 1e-5


def test_hf_tokenizer_encodes_like_sentencepiece(corpus):
    sp = Tokenizer(corpus["tokenizer"])
    hf = to_hf_tokenizer(corpus["tokenizer"])
    for doc in documents(30, seed=7):
        text = doc["text"] + "  extra  spaces\tand\nlines, 42 numbers, é ☃"
        assert hf(text, add_special_tokens=False)["input_ids"] == sp.encode(text)
        assert hf.decode(sp.encode(text)) == sp.decode(sp.encode(text))


@pytest.fixture(scope="module")
def exported(corpus, dist_env, tmp_path_factory):
    from scripts.export_hf import export
    from trainer.config import load_config
    from trainer.loop import train

    root = tmp_path_factory.mktemp("hf")
    result = train(
        load_config(None, debug_overrides(corpus, root / "run", **{"train.max_steps": 20, "model.block": "llama"}))
    )
    return result, export(str(result.run_dir), str(root / "hf"))


def test_exported_folder_loads_and_round_trips(exported, tmp_path):
    import transformers

    from models.checkpoint import load_model
    from scripts.import_hf import import_hf

    result, out = exported
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    ids = torch.tensor([tok("The king loves the crown", add_special_tokens=False)["input_ids"]])
    ours, _ = load_model(result.run_dir)
    with torch.no_grad():
        assert (hf(ids).logits - ours.logits(ids)).abs().max() < 1e-5
    back, _ = load_model(import_hf(str(out), str(tmp_path / "imported")))
    with torch.no_grad():
        assert torch.equal(back.logits(ids), ours.logits(ids))


def test_stock_lm_eval_hf_agrees_with_losslab_lm(exported, tmp_path):
    import os

    os.environ["HF_DATASETS_OFFLINE"] = os.environ["HF_HUB_OFFLINE"] = "1"
    import lm_eval
    from lm_eval.tasks import TaskManager

    from data.tokenizer import Tokenizer as SP
    from evals.lm import LosslabLM
    from evals.tasks import write_multiple_choice_task
    from models.checkpoint import load_model

    result, out = exported
    docs = [
        {"context": "The king loves", "choices": [" the crown", " a song", " the sea"], "label": 0},
        {"context": "A fool fears", "choices": [" the night", " his honour"], "label": 1},
        {
            "context": "Her father serves the duke",
            "choices": [" in the morning.", " and says nothing.", "!"],
            "label": 0,
        },
    ] * 3
    write_multiple_choice_task(tmp_path / "tasks", "toy_mc", docs)

    def run(model):
        manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
        return lm_eval.simple_evaluate(
            model=model, tasks=["toy_mc"], task_manager=manager, log_samples=True, random_seed=0
        )

    model, ckpt = load_model(result.run_dir)
    ours = run(LosslabLM(model, SP(str(ckpt / "tokenizer.model")), batch_size=4))
    stock = run(lm_eval.api.registry.get_model("hf")(pretrained=str(out), dtype="float32", batch_size=4, device="cpu"))

    def loglikelihoods(res):
        return [
            [r[0] for r in s["filtered_resps"]] for s in sorted(res["samples"]["toy_mc"], key=lambda s: s["doc_id"])
        ]

    for a, b in zip(loglikelihoods(ours), loglikelihoods(stock), strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4
    assert ours["results"]["toy_mc"]["acc,none"] == stock["results"]["toy_mc"]["acc,none"]


SOURCE_SETTINGS = {
    # (transformers config keys, the losslab values they must become); a large eps against the activations' scale:
    # ignoring it changes every logit
    "neox": ({"layer_norm_eps": 0.5, "rope_parameters": {"rope_type": "default", "rope_theta": 500.0,
                                                          "partial_rotary_factor": 0.5}},
             {"norm_eps": 0.5, "rotary_base": 500.0, "rotary_pct": 0.5}),
    # a Pythia-era config.json: rotary_pct and rotary_emb_base at the top level
    "neox-legacy": ({"layer_norm_eps": 0.4, "rotary_pct": 0.5, "rotary_emb_base": 300.0},
                    {"norm_eps": 0.4, "rotary_base": 300.0, "rotary_pct": 0.5}),
    "llama": ({"rms_norm_eps": 0.3, "rope_parameters": {"rope_type": "default", "rope_theta": 777.0}},
              {"norm_eps": 0.3, "rotary_base": 777.0, "rotary_pct": 1.0}),
}  # fmt: skip


@pytest.mark.parametrize("source", sorted(SOURCE_SETTINGS))
def test_import_keeps_norm_eps_rope_base_and_rotary_fraction(source, corpus, tmp_path):
    """A transformers folder with non-default layer_norm_eps / rms_norm_eps, rope_theta and partial rotary,
    imported with scripts/import_hf.py: logits equal transformers', and each setting is needed to get there."""
    import dataclasses

    import transformers

    from models.checkpoint import load_model
    from scripts.import_hf import import_hf

    shape = dict(vocab_size=300, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                 max_position_embeddings=64, tie_word_embeddings=False)  # fmt: skip
    settings, wanted = SOURCE_SETTINGS[source]
    if source.startswith("neox"):
        config = transformers.GPTNeoXConfig(**shape, use_parallel_residual=True, **settings)
        cls = transformers.GPTNeoXForCausalLM
    else:
        config = transformers.LlamaConfig(**shape, num_key_value_heads=4, **settings)
        cls = transformers.LlamaForCausalLM
    torch.manual_seed(2)
    hf = cls(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.2)  # attention far from uniform, so that positions matter
    hf.save_pretrained(tmp_path / "hf")
    ours, _ = load_model(import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"), tokenizer=corpus["tokenizer"]))
    ids = torch.randint(0, 300, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids).logits
        parity = (ours.logits(ids) - expected).abs().max().item()
        assert parity < 1e-4
        assert {k: getattr(ours.cfg, k) for k in wanted} == wanted
        # each imported setting matters: with the default in its place the logits are far off
        defaults = {"norm_eps": 1e-5, "rotary_base": 10000.0}
        if source.startswith("neox"):
            defaults["rotary_pct"] = 0.25
        for field, default in defaults.items():
            other = type(ours)(dataclasses.replace(ours.cfg, **{field: default}))
            other.load_state_dict(ours.state_dict())
            assert (other.eval().logits(ids) - expected).abs().max() > max(1e-3, 100 * parity), field
