"""Model definitions. Nothing here knows about training, DeepSpeed or config files."""

from models.config import GPTConfig
from models.gpt import GPT
from models.presets import PRESETS, Preset, get_preset

__all__ = ["GPT", "PRESETS", "GPTConfig", "Preset", "get_preset"]
