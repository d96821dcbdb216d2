"""Typed config of the training data (the ``data`` node of a run config)."""

from __future__ import annotations

from dataclasses import dataclass, field

MIX_MISSING = ("error", "renormalise")
"""The choices of ``data.mix_missing``."""


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Pile-format ``.jsonl.zst`` shards (paths or glob patterns, relative to the working directory), streamed
    and tokenised on the fly. Ignored when ``prepared`` is set."""
    prepared: str = ""
    """Directory written by ``scripts/prepare_data.py``: the fast path (memory-mapped tokens)."""
    mix: dict[str, float] = field(default_factory=dict)
    """Prepared data only: sampling weight of each source (``meta.pile_set_name``); empty: in proportion to
    the sources' tokens. Sources not listed are not used."""
    mix_missing: str = "error"
    """A data.mix domain the prepared data does not hold: error (name it and stop before the model is built) |
    renormalise (drop it; the others' weights are rescaled to sum to 1, and the run's mixture.json says so)."""
    num_workers: int = 0
    """Prepared data only: dataloader worker processes."""
    val_files: list[str] = field(default_factory=list)
    """Held-out shards for validation loss (optional)."""
    tokenizer: str = ""
    """A sentencepiece ``.model``, a Hugging Face ``tokenizer.json``, or a folder holding either (special tokens
    and chat template from its ``tokenizer_config.json``); checkpoints carry these files."""
    seq_len: int = 128
    """Tokens per training sequence; windows of seq_len + 1 tokens give inputs and shifted labels."""
    count_bytes: int = 50_000_000
    """Bytes of training text sampled to count token frequencies (for loss.name=pdl)."""
    count_over: str = "targets"
    """targets: count the tokens that carry loss (a fine-tuning set's responses) | all: every token, prompts
    included, as the official PDL code counts. The same for pretraining, where every token is a target."""
    sft_files: list[str] = field(default_factory=list)
    """Fine-tuning records (``.jsonl`` / ``.jsonl.zst``: prompt/response or chat messages, see ``data/sft.py``),
    streamed instead of ``train_files``: the loss falls on the responses, packed records are kept apart."""
    train_on_prompt: bool = False
    """Fine-tuning: put the loss on the prompt tokens too."""
    shuffle_buffer: int = 256
    """Documents held in a seeded shuffle buffer while streaming (0 = corpus order)."""
    allow_changed: bool = False
    """Resume even when the data differ from those the checkpoint was trained on (``data/fingerprint.py``: each
    file's size and content hash, recorded at start). false: a difference stops the resume with one line naming
    the file. true: the run goes on, and the differences are recorded in ``run_info.json`` and on W&B."""
