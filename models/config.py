"""Architecture config of the decoder. Knows nothing of training, data or DeepSpeed."""

from __future__ import annotations

from dataclasses import dataclass

BLOCKS = ("neox", "llama")


@dataclass
class GPTConfig:
    """A decoder, fully resolved (no optional fields). ``block`` picks the layer family:
    ``neox``: LayerNorm, GELU MLP with 2 matrices, biases (GPT-NeoX / Pythia);
    ``llama``: RMSNorm, SwiGLU MLP with 3 matrices, no biases (LLaMA, the MiLe paper's architecture).
    Residual layout and rotary fraction are separate fields (NeoX: parallel, 0.25; LLaMA: sequential, 1.0)."""

    vocab_size: int
    """Number of real tokens (from the tokenizer). The embedding is padded to ``padded_vocab_size``."""
    n_layers: int
    d_model: int
    n_heads: int
    d_mlp: int
    """MLP width (NeoX's GELU MLP has 2 matrices, LLaMA's SwiGLU 3: a NeoX width of 1.5x the SwiGLU width
    gives the same parameter count)."""
    max_seq_len: int
    block: str = "neox"
    rotary_pct: float = 0.25
    """Fraction of each head's dimensions that get rotary embeddings (GPT-NeoX ``rotary_pct``)."""
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    parallel_residual: bool = True
    bias: bool = True
    vocab_multiple: int = 128
    """The embedding and head rows are padded to a multiple of this for fast matmuls; padding is never predicted."""
    n_kv_heads: int = 0
    """Key/value heads (grouped-query attention: each serves n_heads / n_kv_heads query heads); 0 = n_heads."""
    tie_embeddings: bool = False
    """The output head reuses the input embedding matrix (SmolLM2 and many small models)."""
    scaled_init: bool = True
    """Residual output projections start at init_std / sqrt(2 n_layers) (GPT-2 / Megatron); False: every
    matrix at init_std, as the MiLe paper's official code initialises."""

    def __post_init__(self) -> None:
        if self.block not in BLOCKS:
            raise ValueError(f"unknown block {self.block!r}; valid blocks: {list(BLOCKS)}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}")
        if self.n_kv_heads < 0 or (self.n_kv_heads and self.n_heads % self.n_kv_heads):
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if not 0.0 <= self.rotary_pct <= 1.0:
            raise ValueError(f"rotary_pct={self.rotary_pct} must be in [0, 1]")
        if self.rotary_dims % 2:
            raise ValueError(f"rotary dims {self.rotary_dims} (head_dim x rotary_pct) must be even")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return (self.vocab_size + m - 1) // m * m
