"""Model definitions. Nothing here knows about training, DeepSpeed or config files."""

from models.config import GPTConfig
from models.gpt import GPT, KVCache
from models.presets import BLOCK_DEFAULTS, PRESETS, Preset, get_preset

__all__ = ["BLOCK_DEFAULTS", "GPT", "PRESETS", "GPTConfig", "KVCache", "Preset", "get_preset"]
