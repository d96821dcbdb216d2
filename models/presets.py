"""Named model sizes. Presets fix the shape; the vocabulary always comes from the tokenizer.

The paper sizes follow the MiLe paper's LLaMA configs (arXiv 2310.19531, github.com/suu990901/LLaMA-MiLe-Loss)
with a GPT-NeoX block whose MLP is 1.5x the SwiGLU width so that parameter counts match
(468.2M / 1.205B / 6.738B at vocab 32000).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    n_layers: int
    d_model: int
    n_heads: int
    d_swiglu: int
    """LLaMA's SwiGLU width; the NeoX block uses 1.5x this (same parameter count)."""
    max_seq_len: int
    init_std: float = 0.02

    def d_mlp(self, block: str) -> int:
        return self.d_swiglu if block == "llama" else self.d_swiglu * 3 // 2


PRESETS: dict[str, Preset] = {
    # Tests and smoke runs: seconds on a laptop CPU.
    "debug": Preset(n_layers=2, d_model=64, n_heads=4, d_swiglu=192, max_seq_len=256),
    # The CPU demo: small enough to train a few hundred steps on 2 cores in minutes.
    "tiny": Preset(n_layers=4, d_model=128, n_heads=4, d_swiglu=384, max_seq_len=256),
    # One-GPU experiments: ~60M parameters at vocab 32000 (half of them embeddings), 1024 context.
    "small": Preset(n_layers=8, d_model=512, n_heads=8, d_swiglu=1536, max_seq_len=1024),
    # MiLe paper shapes (github.com/suu990901/LLaMA-MiLe-Loss configs; the paper's LLaMA uses init std 0.01).
    "468m": Preset(n_layers=24, d_model=1024, n_heads=16, d_swiglu=4096, max_seq_len=1024, init_std=0.01),
    "1.2b": Preset(n_layers=16, d_model=2048, n_heads=8, d_swiglu=8192, max_seq_len=1024, init_std=0.01),
    "6.7b": Preset(n_layers=32, d_model=4096, n_heads=32, d_swiglu=11008, max_seq_len=2048, init_std=0.01),
}

# Architecture defaults of each block family (fields a run config may still override).
BLOCK_DEFAULTS: dict[str, dict] = {
    "neox": {"rotary_pct": 0.25, "parallel_residual": True, "bias": True},
    "llama": {"rotary_pct": 1.0, "parallel_residual": False, "bias": False},
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {sorted(PRESETS)}") from None
