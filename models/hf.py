"""Conversion between losslab checkpoints and Hugging Face transformers models (GPTNeoXForCausalLM for the
``neox`` block, LlamaForCausalLM for ``llama``, grouped-query attention and tied embeddings included). Only
the real vocabulary rows travel; padding rows are re-created (untrained) on import. Needs ``transformers`` (a
dev extra).

An exported folder loads in transformers 4.44+ and 5.x alike (tests/test_hf_compat.py runs both): the config
carries the rotary settings under the keys each major reads (5.x: ``rope_parameters``; 4.x: ``rotary_pct`` /
``rotary_emb_base`` for NeoX, ``rope_theta`` for Llama), the tokenizer is a plain ``PreTrainedTokenizerFast``
(5.x writes its own ``TokenizersBackend``, unknown to 4.x), and the tokenizer file keeps BPE merges in the
``"a b"`` form that every ``tokenizers`` release reads (0.20+ writes pairs, which 0.19 and older reject)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from models.config import GPTConfig
from models.gpt import GPT


class _NoAcceleratorNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Setting accelerator to CPU" not in record.getMessage()


def quiet_deepspeed() -> None:
    """Keep DeepSpeed's "Setting accelerator to CPU ..." out of commands that do not train: transformers'
    ``save_pretrained`` imports deepspeed (accelerate's ``unwrap_model`` does, whenever it is installed), and the
    import logs that line to stdout on a machine without a GPU. A filter on its logger, which DeepSpeed keeps
    when it configures the logger on import."""
    logger = logging.getLogger("DeepSpeed")
    if not any(isinstance(f, _NoAcceleratorNotice) for f in logger.filters):
        logger.addFilter(_NoAcceleratorNotice())


def _require_transformers() -> Any:
    quiet_deepspeed()
    try:
        import transformers
    except ImportError:
        raise ImportError("converting to or from Hugging Face needs transformers: pip install transformers") from None
    return transformers


def hf_config(cfg: GPTConfig, *, bos_id: int | None = None, eos_id: int | None = None) -> Any:
    tf = _require_transformers()
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        intermediate_size=cfg.d_mlp,
        max_position_embeddings=cfg.max_seq_len,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        initializer_range=cfg.init_std,
    )
    if cfg.block == "neox":
        if not cfg.bias:
            raise ValueError("GPTNeoXForCausalLM has biases; a neox block without them cannot be exported")
        if cfg.kv_heads != cfg.n_heads:
            raise ValueError("GPTNeoXForCausalLM has no grouped-query attention; export this model as llama")
        return tf.GPTNeoXConfig(
            **common,
            hidden_act="gelu",
            layer_norm_eps=cfg.norm_eps,
            use_parallel_residual=cfg.parallel_residual,
            attention_bias=True,
            **rope_keys(cfg),
            architectures=["GPTNeoXForCausalLM"],
        )
    if cfg.rotary_pct != 1.0 or cfg.parallel_residual:
        raise ValueError("LlamaForCausalLM has full rotary and a sequential residual; this llama variant has not")
    return tf.LlamaConfig(
        **common,
        num_key_value_heads=cfg.kv_heads,
        hidden_act="silu",
        rms_norm_eps=cfg.norm_eps,
        attention_bias=cfg.bias,
        mlp_bias=cfg.bias,
        head_dim=cfg.head_dim,
        **rope_keys(cfg),
        architectures=["LlamaForCausalLM"],
    )


def rope_keys(cfg: GPTConfig) -> dict[str, Any]:
    """The rotary settings under every name a transformers release reads (each ignores the others' names)."""
    if cfg.block == "neox":
        return {
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": cfg.rotary_base,
                "partial_rotary_factor": cfg.rotary_pct,
            },
            "rotary_pct": cfg.rotary_pct,  # 4.x
            "rotary_emb_base": cfg.rotary_base,  # 4.x
            "rope_theta": cfg.rotary_base,  # 4.47+ mirrors rotary_emb_base here
            "partial_rotary_factor": cfg.rotary_pct,
        }
    return {"rope_parameters": {"rope_type": "default", "rope_theta": cfg.rotary_base}, "rope_theta": cfg.rotary_base}


def make_portable(out_dir: str | Path, cfg: GPTConfig) -> None:
    """Rewrite a folder saved by ``save_pretrained`` so that transformers 4.44+ and 5.x both load it as saved
    (see the module docstring). The keys added are the ones the saving release dropped, with equal values."""
    out = Path(out_dir)
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config.update(rope_keys(cfg))
    config.pop("rope_scaling", None)  # 5.x prefers a non-null rope_scaling over rope_parameters
    config.setdefault("torch_dtype", config.get("dtype", "float32"))  # 4.x's name of "dtype"
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok_config_file = out / "tokenizer_config.json"
    if tok_config_file.is_file():
        tok_config = json.loads(tok_config_file.read_text())
        tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"  # both majors know it (5.x: its fast backend)
        tok_config.pop("backend", None)
        tok_config_file.write_text(json.dumps(tok_config, indent=2, sort_keys=True) + "\n")
    tok_file = out / "tokenizer.json"
    if tok_file.is_file():
        tok = json.loads(tok_file.read_text())
        merges = tok.get("model", {}).get("merges") or []
        if merges and all(isinstance(m, list) and not any(" " in part for part in m) for m in merges):
            tok["model"]["merges"] = [" ".join(m) for m in merges]
            tok_file.write_text(json.dumps(tok, ensure_ascii=False, indent=2) + "\n")


def _layer_map(cfg: GPTConfig) -> dict[str, str]:
    """losslab name (within blocks.{i}.) -> HF name (within the HF layer), for tensors that map one to one."""
    if cfg.block == "neox":
        names = {
            "ln_attn": "input_layernorm",
            "ln_mlp": "post_attention_layernorm",
            "attn.qkv": "attention.query_key_value",
            "attn.proj": "attention.dense",
            "mlp.up": "mlp.dense_h_to_4h",
            "mlp.down": "mlp.dense_4h_to_h",
        }
    else:
        names = {
            "ln_attn": "input_layernorm",
            "ln_mlp": "post_attention_layernorm",
            "attn.proj": "self_attn.o_proj",
            "mlp.gate": "mlp.gate_proj",
            "mlp.up": "mlp.up_proj",
            "mlp.down": "mlp.down_proj",
        }
    return {f"{k}.{p}": f"{v}.{p}" for k, v in names.items() for p in ("weight", "bias")}


def _prefixes(cfg: GPTConfig) -> dict[str, str]:
    if cfg.block == "neox":
        return {
            "embed": "gpt_neox.embed_in",
            "ln_f": "gpt_neox.final_layer_norm",
            "head": "embed_out",
            "layers": "gpt_neox.layers",
        }
    return {"embed": "model.embed_tokens", "ln_f": "model.norm", "head": "lm_head", "layers": "model.layers"}


def to_hf_state_dict(model: GPT) -> dict[str, Tensor]:
    cfg = model.cfg
    sd = model.state_dict()
    pre = _prefixes(cfg)
    V = cfg.vocab_size
    out = {
        f"{pre['embed']}.weight": sd["embed.weight"][:V],
        # tied: the head is the embedding (HF's tied lm_head reads the same matrix)
        f"{pre['head']}.weight": sd["head.weight" if "head.weight" in sd else "embed.weight"][:V],
        f"{pre['ln_f']}.weight": sd["ln_f.weight"],
    }
    if "ln_f.bias" in sd:
        out[f"{pre['ln_f']}.bias"] = sd["ln_f.bias"]
    mapping = _layer_map(cfg)
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"{pre['layers']}.{i}."
        for k, v in mapping.items():
            if ours + k in sd:
                out[theirs + v] = sd[ours + k]
        if cfg.block == "llama":  # split the fused [KV, g + 2, hd] QKV rows (models/gpt.py) into q, k, v
            KV, hd, d = cfg.kv_heads, cfg.head_dim, cfg.d_model
            g = cfg.n_heads // KV
            qkv = sd[ours + "attn.qkv.weight"].view(KV, g + 2, hd, d)
            out[f"{theirs}self_attn.q_proj.weight"] = qkv[:, :g].reshape(cfg.n_heads * hd, d)  # head kv * g + j
            out[f"{theirs}self_attn.k_proj.weight"] = qkv[:, g].reshape(KV * hd, d)
            out[f"{theirs}self_attn.v_proj.weight"] = qkv[:, g + 1].reshape(KV * hd, d)
    return {k: v.detach().clone().contiguous() for k, v in out.items()}


def from_hf_state_dict(cfg: GPTConfig, hf: dict[str, Tensor]) -> dict[str, Tensor]:
    """HF tensors -> a full losslab state dict (padding rows of embedding and head taken from a fresh init)."""
    pre = _prefixes(cfg)
    fresh = GPT(cfg).state_dict()
    V = cfg.vocab_size
    sd: dict[str, Tensor] = {}
    for ours, theirs in (("embed.weight", f"{pre['embed']}.weight"), ("head.weight", f"{pre['head']}.weight")):
        if ours not in fresh:  # tied: no head of its own
            continue
        full = fresh[ours].clone()
        full[:V] = hf[theirs]
        sd[ours] = full
    sd["ln_f.weight"] = hf[f"{pre['ln_f']}.weight"]
    if f"{pre['ln_f']}.bias" in hf:
        sd["ln_f.bias"] = hf[f"{pre['ln_f']}.bias"]
    mapping = _layer_map(cfg)
    for i in range(cfg.n_layers):
        ours, theirs = f"blocks.{i}.", f"{pre['layers']}.{i}."
        for k, v in mapping.items():
            if theirs + v in hf:
                sd[ours + k] = hf[theirs + v]
        if cfg.block == "llama":  # q, k, v projections -> fused rows [KV, g + 2, hd] (models/gpt.py)
            KV, hd, d = cfg.kv_heads, cfg.head_dim, cfg.d_model
            g = cfg.n_heads // KV
            q = hf[f"{theirs}self_attn.q_proj.weight"].view(KV, g, hd, d)  # query head h = kv * g + j
            k = hf[f"{theirs}self_attn.k_proj.weight"].view(KV, 1, hd, d)
            v = hf[f"{theirs}self_attn.v_proj.weight"].view(KV, 1, hd, d)
            sd[ours + "attn.qkv.weight"] = torch.cat([q, k, v], dim=1).reshape((cfg.n_heads + 2 * KV) * hd, d)
    return sd


def config_from_hf(hf_cfg: Any) -> GPTConfig:
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    shape = dict(
        vocab_size=hf_cfg.vocab_size,
        n_layers=hf_cfg.num_hidden_layers,
        d_model=hf_cfg.hidden_size,
        n_heads=hf_cfg.num_attention_heads,
        d_mlp=hf_cfg.intermediate_size,
        max_seq_len=hf_cfg.max_position_embeddings,
        tie_embeddings=bool(getattr(hf_cfg, "tie_word_embeddings", False)),
    )
    head_dim = getattr(hf_cfg, "head_dim", None)
    if head_dim and head_dim != hf_cfg.hidden_size // hf_cfg.num_attention_heads:
        raise ValueError(f"head_dim={head_dim} is not hidden_size / num_attention_heads, as losslab's blocks need")
    if hf_cfg.model_type == "gpt_neox":
        return GPTConfig(
            **shape,
            block="neox",
            rotary_pct=rope.get("partial_rotary_factor", getattr(hf_cfg, "rotary_pct", 0.25)),
            rotary_base=rope.get("rope_theta", getattr(hf_cfg, "rotary_emb_base", 10000.0)),
            norm_eps=hf_cfg.layer_norm_eps,
            parallel_residual=hf_cfg.use_parallel_residual,
            bias=True,
        )
    if hf_cfg.model_type == "llama":
        kv_heads = getattr(hf_cfg, "num_key_value_heads", None) or hf_cfg.num_attention_heads
        return GPTConfig(
            **shape,
            n_kv_heads=0 if kv_heads == hf_cfg.num_attention_heads else kv_heads,
            block="llama",
            rotary_pct=1.0,
            rotary_base=rope.get("rope_theta", getattr(hf_cfg, "rope_theta", 10000.0)),
            norm_eps=hf_cfg.rms_norm_eps,
            parallel_residual=False,
            bias=bool(getattr(hf_cfg, "attention_bias", False)),
        )
    raise ValueError(f"unsupported model type {hf_cfg.model_type!r}; losslab converts gpt_neox and llama")


def to_hf_model(model: GPT, **ids: int | None) -> Any:
    tf = _require_transformers()
    config = hf_config(model.cfg, **ids)
    cls = tf.GPTNeoXForCausalLM if model.cfg.block == "neox" else tf.LlamaForCausalLM
    hf_model = cls(config)
    state = to_hf_state_dict(model)
    if "embed_out.weight" in state and "embed_out.weight" not in hf_model.state_dict():
        state["lm_head.weight"] = state.pop("embed_out.weight")  # transformers >= 5 names NeoX's head lm_head
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"export mismatch: missing {missing}, unexpected {unexpected}")
    return hf_model.eval()


def from_hf_model(hf_model: Any) -> GPT:
    cfg = config_from_hf(hf_model.config)
    model = GPT(cfg)
    state = {k: v.float() for k, v in hf_model.state_dict().items()}
    if cfg.block == "neox" and "lm_head.weight" in state:
        state["embed_out.weight"] = state.pop("lm_head.weight")
    model.load_state_dict(from_hf_state_dict(cfg, state))
    return model.eval()


def load_hf_folder(hf_dir: str | Path) -> GPT:
    """A losslab model from a transformers folder, without building the transformers model: the config is read
    by transformers (which maps each release's key names), the weights by ``load_safetensors`` (a torn or
    foreign file is a ``CheckpointError`` naming it; pickled ``.bin`` weights are refused, never unpickled)."""
    from models.checkpoint_files import CheckpointError, load_json, load_safetensors

    tf = _require_transformers()
    folder = Path(hf_dir)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder / 'config.json'}: file not found (not a transformers model folder)")
    try:
        hf_cfg = tf.AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a config transformers can read: {e}") from None
    cfg = config_from_hf(hf_cfg)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(load_json(index).get("weight_map", {}).values()))
        files = [folder / s for s in shards]
    elif (folder / "model.safetensors").is_file() or not list(folder.glob("*.bin")):
        files = [folder / "model.safetensors"]
    else:
        raise CheckpointError(
            f"{folder}: only pickled .bin weights; losslab imports safetensors only (pickles can run code): "
            "re-save the model with save_pretrained(..., safe_serialization=True) where you trust it"
        )
    state: dict[str, Tensor] = {}
    for f in files:
        state.update({k: v.float() for k, v in load_safetensors(f).items()})
    pre = _prefixes(cfg)
    if cfg.block == "neox" and "lm_head.weight" in state:  # transformers 5 in memory / some conversions
        state["embed_out.weight"] = state.pop("lm_head.weight")
    if f"{pre['head']}.weight" not in state and getattr(hf_cfg, "tie_word_embeddings", False):
        state[f"{pre['head']}.weight"] = state[f"{pre['embed']}.weight"]
    try:
        converted = from_hf_state_dict(cfg, state)
    except KeyError as e:
        raise CheckpointError(f"{files[0]}: tensor {e} is missing (not a {hf_cfg.model_type} checkpoint?)") from None
    model = GPT(cfg)
    try:
        model.load_state_dict(converted)
    except RuntimeError as e:
        raise CheckpointError(f"{files[0]}: tensors do not match config.json: {str(e).splitlines()[0]}") from None
    return model.eval()
