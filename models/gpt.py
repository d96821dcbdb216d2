"""A decoder with two block families (``GPTConfig.block``):

- ``neox``: rotary attention on ``rotary_pct`` of each head, parallel residual, LayerNorm, GELU MLP with two
  matrices, biases — HF ``GPTNeoXForCausalLM``;
- ``llama``: full rotary, sequential residual, RMSNorm, SwiGLU MLP, no biases — HF ``LlamaForCausalLM``.

Attention is grouped-query when ``n_kv_heads < n_heads`` (``GPTConfig.kv_heads`` key/value heads, each shared
by ``g = n_heads / kv_heads`` consecutive query heads: query head ``h`` reads key/value head ``h // g``, as in HF's
``repeat_kv`` and SDPA's ``enable_gqa``). The fused QKV projection ``attn.qkv`` has ``(n_heads + 2 kv_heads) *
head_dim`` output rows laid out group by group, ``[kv_heads, g + 2, head_dim]``: for each key/value head, its
``g`` query heads, then its key, then its value (Megatron-LM's GQA layout). With ``g = 1`` this is exactly
NeoX's ``[n_heads, 3, head_dim]`` (q, k, v per head), so NeoX's export is a renaming and checkpoints from before
GQA load unchanged; LLaMA's export splits the rows into ``q_proj``/``k_proj``/``v_proj``. ``models/hf.py``
converts.

Embeddings are untied by default; with ``tie_embeddings`` the output head reads the input embedding matrix
(``embed.weight``, one Parameter: ``parameters()``, ``state_dict()`` and ZeRO-3's consolidated weights hold it
once, under that name, and the head owns no parameter). Under ZeRO-3 DeepSpeed gathers it for the head's
forward as an external parameter of the head (found on first access inside the engine's forward).

The model returns final hidden states; the output head is a separate module so a training loss can consume
``(hidden, head.weight)`` without materialising the logits (see ``LMHead.forward``). For generation,
``forward(ids, cache=KVCache.empty(n_layers))`` keeps each layer's keys and values (only the ``kv_heads``
key/value heads), so later calls feed one new token at a time. Prompts of mixed lengths decode together
left-padded: ``KVCache.empty(n_layers, pad=...)`` names each row's padding, which no position attends to and
which shifts the row's rotary positions so that they start at 0 at its first real token (HF's ``position_ids``
from the attention mask); ``capacity`` preallocates the keys and values of that many positions, so a step
writes its own instead of copying the cache; ``KVCache.place`` fills rows from prompts run in smaller groups
(no padding to the batch's longest prompt), and ``KVCache.keep`` drops finished rows.

Packed documents (``forward(ids, segment_ids=...)``): a segment is a maximal run of equal ids in a row. Both
isolation mechanisms apply: attention is block-diagonal causal (a token attends only to earlier tokens of its
own segment) AND rotary positions restart at 0 at each segment start, so a segment packed anywhere in a row
gives the logits it would give alone at the start of a row. (Rotary scores depend on relative positions only:
the mask is what isolates; the restart makes the numbers those of the segment alone, as the fp32 rotary tables
round differently at other offsets, and matches HF's per-document ``position_ids``.)
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

# SDPA shares key/value heads across query groups itself from torch 2.5 (no repeated K/V in memory).
_SDPA_GQA = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


@dataclass
class LayerKV:
    k: Tensor | None = None  # [B, kv_heads, L, hd]: the L positions seen so far (a view of the buffer, if any)
    v: Tensor | None = None  # [B, kv_heads, L, hd]
    capacity: int = 0  # > 0: positions preallocated on the first write (each step then writes its own)
    k_buf: Tensor | None = None  # [B, kv_heads, capacity, hd]
    v_buf: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Cache the keys and values ``k``, ``v`` [B, KV, T, hd] of T new positions; -> those of all positions."""
        length = 0 if self.k is None else self.k.shape[2]
        if self.capacity and self.k_buf is None:
            B, KV, _, hd = k.shape
            self.k_buf = k.new_empty(B, KV, max(self.capacity, length + k.shape[2]), hd)
            self.v_buf = v.new_empty(self.k_buf.shape)
            if length:
                self.k_buf[:, :, :length], self.v_buf[:, :, :length] = self.k, self.v
        if self.k_buf is not None and length + k.shape[2] <= self.k_buf.shape[2]:
            end = length + k.shape[2]
            self.k_buf[:, :, length:end], self.v_buf[:, :, length:end] = k, v
            self.k, self.v = self.k_buf[:, :, :end], self.v_buf[:, :, :end]
        else:
            self.k_buf = self.v_buf = None  # full (or none): grow by concatenation
            if self.k is not None:
                k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)  # [B, KV, L + T, hd]
            self.k, self.v = k, v
        return self.k, self.v

    def place(self, rows: Tensor, k: Tensor, v: Tensor, end: int, batch: int) -> None:
        """Write ``k``, ``v`` [b, KV, T, hd] into batch rows ``rows`` [b] at positions end - T .. end - 1 (a cache of
        ``batch`` rows, its buffers zeroed on the first write: positions no part wrote are finite padding)."""
        if self.k_buf is None:
            shape = (batch, k.shape[1], max(self.capacity, end), k.shape[3])
            self.k_buf, self.v_buf = k.new_zeros(shape), v.new_zeros(shape)
        self.k_buf[rows, :, end - k.shape[2] : end] = k
        self.v_buf[rows, :, end - k.shape[2] : end] = v
        self.k, self.v = self.k_buf[:, :, :end], self.v_buf[:, :, :end]

    def keep(self, rows: Tensor) -> None:
        if self.k_buf is not None:
            length = self.k.shape[2]
            self.k_buf, self.v_buf = self.k_buf[rows], self.v_buf[rows]
            self.k, self.v = self.k_buf[:, :, :length], self.v_buf[:, :, :length]
        elif self.k is not None:
            self.k, self.v = self.k[rows], self.v[rows]


@dataclass
class KVCache:
    """Keys and values of the ``length`` positions seen so far, per layer (incremental decoding). ``pad``: [B]
    int64, the left padding of each row (its first ``pad[b]`` positions are not tokens: no position attends to
    them, and the row's positions count from its first token)."""

    layers: list[LayerKV]
    length: int = 0
    pad: Tensor | None = None

    @classmethod
    def empty(cls, n_layers: int, *, pad: Tensor | None = None, capacity: int = 0) -> KVCache:
        return cls([LayerKV(capacity=capacity) for _ in range(n_layers)], pad=pad)

    def place(self, rows: Tensor, part: KVCache, end: int) -> None:
        """Fill batch rows ``rows`` [b] with the keys and values of ``part`` (those rows' prompts run alone or in a
        smaller batch, left-padded to ``part.length``), right-aligned to end at position ``end``, this cache's new
        length: prompts of very different lengths run in groups of similar lengths, not padded to the longest,
        and make one left-padded cache. ``pad`` must give each row's padding in this cache."""
        if self.pad is None or part.length > end:
            raise ValueError("place() needs the batch's padding (pad) and a part no longer than the cache")
        for kv, other in zip(self.layers, part.layers, strict=True):
            kv.place(rows, other.k, other.v, end, len(self.pad))
        self.length = end

    def keep(self, rows: Tensor) -> None:
        """Keep only the batch rows ``rows`` [B'] (indices, in order): finished sequences leave the batch."""
        for kv in self.layers:
            kv.keep(rows)
        if self.pad is not None:
            self.pad = self.pad[rows]

    def padded(self, T: int) -> Packing:
        """Positions and attention mask of T new tokens after the cached ones, in left-padded rows."""
        assert self.pad is not None
        device = self.pad.device
        query = torch.arange(self.length, self.length + T, device=device)  # [T] absolute positions
        key = torch.arange(self.length + T, device=device)  # [L + T]
        real = key[None, :] >= self.pad[:, None]  # [B, L + T]: not padding
        causal = key[None, :] <= query[:, None]  # [T, L + T]
        # a padding position attends to itself (only): no row of the mask is empty, so none gives NaN
        mask = (real[:, None, :] & causal[None]) | (key[None, :] == query[:, None])[None]  # [B, T, L + T]
        positions = (query[None, :] - self.pad[:, None]).clamp(min=0)  # [B, T]
        return Packing(positions=positions, mask=mask[:, None])


@dataclass
class Packing:
    """Per-token positions and the block-diagonal causal mask of packed segments (see the module docstring)."""

    positions: Tensor  # [B, T] int64: position within the token's own segment
    mask: Tensor  # [B, 1, T, T] bool: True where query t may attend to key s (same segment, s <= t)

    @classmethod
    def from_segment_ids(cls, segment_ids: Tensor) -> Packing:
        # segment_ids: [B, T] any integer ids; a new segment starts wherever the id changes
        B, T = segment_ids.shape
        starts = torch.ones_like(segment_ids, dtype=torch.bool)
        starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # [B, T]
        run = starts.long().cumsum(dim=1)  # [B, T] segment number (runs, so repeated ids stay apart)
        idx = torch.arange(T, device=segment_ids.device).expand(B, T)
        first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values  # [B, T] start of own segment
        causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
        same = run[:, :, None] == run[:, None, :]  # [B, T, T]
        return cls(positions=idx - first, mask=(same & causal)[:, None])


class Rotary(nn.Module):
    """GPT-NeoX rotary embedding (``rotate_half`` convention) on the first ``dims`` channels of each head."""

    def __init__(self, dims: int, max_seq_len: int, base: float) -> None:
        super().__init__()
        self.dims = dims
        inv_freq = 1.0 / (base ** (torch.arange(0, dims, 2, dtype=torch.float64) / dims))  # [dims/2]
        t = torch.arange(max_seq_len, dtype=torch.float64)
        freqs = torch.outer(t, inv_freq)  # [T, dims/2]: both halves of the rotated channels use the same angles
        # fp32 tables; non-persistent so checkpoints hold only learned weights.
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)

    def forward(self, x: Tensor, offset: int = 0, positions: Tensor | None = None) -> Tensor:
        # x: [B, T, *heads, hd], token-major (the heads after the position axis), at positions offset .. offset +
        # T - 1, or at ``positions`` [B, T] (packed segments, padded rows) -> contiguous, same shape
        if self.dims == 0:
            return x.contiguous()
        T, heads = x.shape[1], x.ndim - 3
        if positions is None:
            cos, sin = self.cos[offset : offset + T], self.sin[offset : offset + T]  # [T, dims/2]
        else:
            cos, sin = self.cos[positions], self.sin[positions]  # [B, T, dims/2]
        cos = cos.view(*cos.shape[:-1], *[1] * heads, cos.shape[-1]).to(x.dtype)  # broadcasts over the heads
        sin = sin.view(cos.shape).to(x.dtype)
        half = self.dims // 2
        # split, not slices: its backward is one cat of the pieces' gradients, where each slice's would fill a
        # zero gradient of the whole input and add it
        x1, x2, rest = x.split([half, half, x.shape[-1] - self.dims], dim=-1)
        # x * cos + rotate_half(x) * sin, half by half (the same products and sums: bit-identical, without the
        # rotated copy and the full-width temporaries)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class Attention(nn.Module):
    """Multi-head or grouped-query attention; the fused QKV rows are ``[kv_heads, g + 2, head_dim]`` (module
    docstring)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.group = cfg.n_heads // cfg.kv_heads  # query heads per key/value head
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.rotary = Rotary(cfg.rotary_dims, cfg.max_seq_len, cfg.rotary_base)

    def forward(self, x: Tensor, kv: LayerKV | None = None, offset: int = 0, packing: Packing | None = None) -> Tensor:
        B, T, D = x.shape
        G, hd = self.group, self.head_dim
        # split (one cat in backward), not slices (a zero-filled gradient of the whole projection for each)
        q, k, v = self.qkv(x).view(B, T, self.kv_heads, G + 2, hd).split([G, 1, 1], dim=3)  # [B, T, KV, g|1|1, hd]
        positions = None if packing is None else packing.positions
        # Rotary reads the strided pieces of the fused projection and writes q and k contiguous, token-major: the
        # head axes then move with views (query head h = kv * g + j reads key/value head kv = h // g).
        q = self.rotary(q, offset, positions).view(B, T, self.n_heads, hd).transpose(1, 2)  # [B, H, T, hd]
        k = self.rotary(k, offset, positions).view(B, T, self.kv_heads, hd).transpose(1, 2)  # [B, KV, T, hd]
        v = v.squeeze(3).transpose(1, 2)  # [B, KV, T, hd]
        if kv is not None:  # generation: attend to the cached positions too, and cache these
            k, v = kv.append(k, v)  # [B, KV, offset + T, hd]
        y = self._sdpa(q, k, v, offset, packing)  # [B, H, T, hd]
        return self.proj(y.transpose(1, 2).reshape(B, T, D))

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, offset: int, packing: Packing | None) -> Tensor:
        # q: [B, H, T, hd]; k, v: [B, KV, L, hd]
        gqa = self.group > 1
        # Shared key/value heads go to SDPA as they are (flash and CPU kernels serve the groups themselves). They
        # are repeated only where that cannot work: torch < 2.5, and a packing mask on CUDA, whose mask-taking
        # memory-efficient kernel has no GQA (SDPA would take the math kernel, which repeats them anyway and also
        # builds [B, H, T, T] scores).
        if gqa and (not _SDPA_GQA or (packing is not None and q.is_cuda)):
            k, v = (t.repeat_interleave(self.group, dim=1) for t in (k, v))  # [B, H, L, hd]; head h -> kv h // g
            gqa = False
        extra = {"enable_gqa": True} if gqa else {}
        if packing is not None:  # packed segments or padded rows: the mask includes causality
            return F.scaled_dot_product_attention(q, k, v, attn_mask=packing.mask, **extra)
        # A prompt attends causally; a single new token attends to every position before it.
        return F.scaled_dot_product_attention(q, k, v, is_causal=offset == 0, **extra)


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

    def forward(self, x: Tensor, kv: LayerKV | None = None, offset: int = 0, packing: Packing | None = None) -> Tensor:
        if self.parallel_residual:  # x + attn(ln1(x)) + mlp(ln2(x)), GPT-J / NeoX style
            return x + self.attn(self.ln_attn(x), kv, offset, packing) + self.mlp(self.ln_mlp(x))
        x = x + self.attn(self.ln_attn(x), kv, offset, packing)
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
        weight = self.weight
        if weight.shape[0] != self.vocab_size:  # [V, d]; padding rows get no logits and no gradient
            # (a slice, even of every row, costs a zero-filled [padded V, d] gradient and a copy in backward)
            weight = weight[: self.vocab_size]
        if fn is None:
            return F.linear(hidden, weight)  # [..., V]
        return fn(hidden, weight)


class TiedLMHead(LMHead):
    """The output projection that reads the input embedding's matrix (``weight`` is ``embed.weight``).

    The embedding is kept as a plain attribute, not a submodule: the matrix then has one name (``embed.weight``)
    in ``named_parameters()``, ``state_dict()`` and ZeRO-3's module walk, and this module owns no parameter.
    Under ZeRO-3, DeepSpeed sees ``embed.weight`` read inside this module's forward and gathers it here as an
    external parameter (forward and backward), so the fused loss inside ``forward`` gets the full matrix."""

    def __init__(self, cfg: GPTConfig, embed: nn.Embedding) -> None:
        nn.Module.__init__(self)
        self.vocab_size = cfg.vocab_size
        object.__setattr__(self, "_embed", embed)  # bypasses nn.Module's submodule registration

    @property
    def weight(self) -> nn.Parameter:  # type: ignore[override]
        return self._embed.weight  # [padded V, d]

    def extra_repr(self) -> str:
        return "tied to embed.weight"


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.padded_vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = make_norm(cfg)
        self.head = TiedLMHead(cfg, self.embed) if cfg.tie_embeddings else LMHead(cfg)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) for every matrix; residual output projections scaled by 1/sqrt(2 n_layers)
        (GPT-2 / Megatron) so the residual stream's variance does not grow with depth, unless ``scaled_init`` is
        off (the MiLe official code's N(0, 0.01) for every matrix)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers) if self.cfg.scaled_init else std
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

    def forward(self, input_ids: Tensor, cache: KVCache | None = None, segment_ids: Tensor | None = None) -> Tensor:
        # input_ids: [B, T] -> hidden [B, T, d]; with a cache, the positions after the cached ones;
        # segment_ids: [B, T] packed documents kept apart (module docstring)
        x = self.embed(input_ids)
        if cache is None:
            packing = None
            if segment_ids is not None:
                if segment_ids.shape != input_ids.shape:
                    raise ValueError(f"segment_ids {tuple(segment_ids.shape)} != input_ids {tuple(input_ids.shape)}")
                packing = Packing.from_segment_ids(segment_ids)
            for block in self.blocks:
                x = block(x, None, 0, packing)
            return self.ln_f(x)
        if segment_ids is not None:
            raise ValueError("segment_ids (packed documents) are for training; a KV cache decodes one sequence")
        T = input_ids.shape[1]
        if cache.length and T != 1:
            raise ValueError("a non-empty KV cache is extended one token at a time")
        if cache.length + T > self.cfg.max_seq_len:
            raise ValueError(f"{cache.length + T} positions exceed max_seq_len={self.cfg.max_seq_len}")
        padded = None if cache.pad is None else cache.padded(T)  # left-padded rows: their positions and mask
        for block, kv in zip(self.blocks, cache.layers, strict=True):
            x = block(x, kv, cache.length, padded)
        cache.length += T
        return self.ln_f(x)

    def logits(self, input_ids: Tensor, segment_ids: Tensor | None = None) -> Tensor:
        return self.head(self.forward(input_ids, segment_ids=segment_ids))  # [B, T, V]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def column_major_(self) -> GPT:
        """Store every weight matrix transposed in memory, with the same values and shape (``W.t().contiguous()
        .t()``), for inference on a CPU: a product of few rows with a [out, in] weight (``F.linear``, one token
        per sequence when decoding, a few continuation rows when scoring) takes another, for most of the model's
        shapes faster, CPU kernel when the weight's columns are contiguous (the end-to-end effect is in the
        generation and evaluate.py rows of docs/benchmarks.md, 2026-12-07). Sums may round differently (another
        kernel; tests/test_model_gqa.py checks the logits against float64), so the training step keeps the layout
        it was written for."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding, LMHead)) and module.weight.ndim == 2:
                module.weight.data = module.weight.data.t().contiguous().t()  # the tied head is embed.weight
        return self
