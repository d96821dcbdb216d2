"""A decoder with two block families (``GPTConfig.block``):

- ``neox``: rotary attention on ``rotary_pct`` of each head, parallel residual, LayerNorm, GELU MLP with two
  matrices, biases — HF ``GPTNeoXForCausalLM``;
- ``llama``: full rotary, sequential residual, RMSNorm, SwiGLU MLP, no biases — HF ``LlamaForCausalLM``.

Both have untied embeddings and a fused QKV projection laid out ``[n_heads, 3, head_dim]`` per output row
(NeoX's layout, so its export is a renaming; LLaMA's export splits it). ``models/hf.py`` converts.

The model returns final hidden states; the output head is a separate module so a training loss can consume
``(hidden, head.weight)`` without materialising the logits (see ``LMHead.forward``). For generation,
``forward(ids, cache=KVCache.empty(n_layers))`` keeps each layer's keys and values, so later calls feed one
new token at a time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.config import GPTConfig


@dataclass
class LayerKV:
    k: Tensor | None = None  # [B, H, L, hd]
    v: Tensor | None = None  # [B, H, L, hd]


@dataclass
class KVCache:
    """Keys and values of the ``length`` positions seen so far, per layer (incremental greedy decoding)."""

    layers: list[LayerKV]
    length: int = 0

    @classmethod
    def empty(cls, n_layers: int) -> KVCache:
        return cls([LayerKV() for _ in range(n_layers)])


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding (``rotate_half`` convention) on the first ``dims`` channels of each head."""

    def __init__(self, dims: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        self.dims = dims
        inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims))  # [dims/2]
        t = torch.arange(max_seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)  # [T, dims/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [T, dims]
        # fp32 tables; non-persistent so checkpoints hold only learned weights.
        self.register_buffer("cos", emb.cos().float(), persistent=False)
        self.register_buffer("sin", emb.sin().float(), persistent=False)

    def forward(self, x: Tensor, offset: int = 0) -> Tensor:
        # x: [B, H, T, hd] at positions offset .. offset + T - 1
        if self.dims == 0:
            return x
        T = x.shape[-2]
        cos = self.cos[offset : offset + T].to(x.dtype)  # [T, dims]
        sin = self.sin[offset : offset + T].to(x.dtype)
        x_rot, x_pass = x[..., : self.dims], x[..., self.dims :]
        half = self.dims // 2
        rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)  # rotate_half
        return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.rotary = Rotary(cfg.rotary_dims, cfg.max_seq_len, cfg.rotary_base)

    def forward(self, x: Tensor, kv: LayerKV | None = None, offset: int = 0) -> Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, self.n_heads, 3, self.head_dim)  # [B, T, H, 3, hd] (NeoX layout)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each [B, H, T, hd]
        q, k = self.rotary(q, offset), self.rotary(k, offset)
        if kv is not None:  # generation: attend to the cached positions too, and cache these
            if kv.k is not None:
                k, v = torch.cat([kv.k, k], dim=2), torch.cat([kv.v, v], dim=2)  # [B, H, offset + T, hd]
            kv.k, kv.v = k, v
        # A prompt attends causally; a single new token attends to every position before it.
        y = F.scaled_dot_product_attention(q, k, v, is_causal=offset == 0)  # [B, H, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, D))


class GeluMLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))  # exact (erf) GELU, as HF's "gelu"


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, cfg.d_mlp, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_mlp, cfg.d_model, bias=cfg.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))  # [B, T, d]


def make_norm(cfg: GPTConfig) -> nn.Module:
    if cfg.block == "llama":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.parallel_residual = cfg.parallel_residual
        self.ln_attn = make_norm(cfg)
        self.ln_mlp = make_norm(cfg)
        self.attn = Attention(cfg)
        self.mlp = SwiGLU(cfg) if cfg.block == "llama" else GeluMLP(cfg)

    def forward(self, x: Tensor, kv: LayerKV | None = None, offset: int = 0) -> Tensor:
        if self.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x)), GPT-J / NeoX style
            return x + self.attn(self.ln_attn(x), kv, offset) + self.mlp(self.ln_mlp(x))
        x = x + self.attn(self.ln_attn(x), kv, offset)
        return x + self.mlp(self.ln_mlp(x))


class LMHead(nn.Module):
    """Untied output projection over the padded vocabulary.

    ``forward(hidden)`` gives logits over the real vocabulary only. ``forward(hidden, fn)`` returns
    ``fn(hidden, weight)`` with the real-vocabulary rows of the weight: a training loss runs *inside* this
    module's forward, so ZeRO-3 has the weight gathered, and the loss may never build the full logits.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.vocab_size = cfg.vocab_size
        self.weight = nn.Parameter(torch.empty(cfg.padded_vocab_size, cfg.d_model))

    def forward(self, hidden: Tensor, fn: Callable[[Tensor, Tensor], Any] | None = None) -> Any:
        weight = self.weight[: self.vocab_size]  # [V, d]; padding rows get no logits and no gradient
        if fn is None:
            return F.linear(hidden, weight)  # [..., V]
        return fn(hidden, weight)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = make_norm(cfg)
        self.head = LMHead(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix; residual output projections scaled by 1/sqrt(2 n_layers)
        (GPT-2 / Megatron) so the residual stream's variance does not grow with depth."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.ndim == 1:  # norms and biases
                if name.endswith("weight"):
                    p.fill_(1.0)
                else:
                    p.zero_()
            elif name.endswith(("proj.weight", "down.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    def forward(self, input_ids: Tensor, cache: KVCache | None = None) -> Tensor:
        # input_ids: [B, T] -> hidden [B, T, d]; with a cache, the positions after the cached ones
        x = self.embed(input_ids)
        if cache is None:
            for block in self.blocks:
                x = block(x)
            return self.ln_f(x)
        T = input_ids.shape[1]
        if cache.length and T != 1:
            raise ValueError("a non-empty KV cache is extended one token at a time")
        if cache.length + T > self.cfg.max_seq_len:
            raise ValueError(f"{cache.length + T} positions exceed max_seq_len={self.cfg.max_seq_len}")
        for block, kv in zip(self.blocks, cache.layers, strict=True):
            x = block(x, kv, cache.length)
        cache.length += T
        return self.ln_f(x)

    def logits(self, input_ids: Tensor) -> Tensor:
        return self.head(self.forward(input_ids))  # [B, T, V]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
