"""Model side of the lab: configs, the size rule, the shared builder, attention, FLOP counts."""

from archs.config import DiffusionConfig, ModelConfig
from archs.errors import ConfigError
from archs.model import Model, count_params

__all__ = ["ConfigError", "DiffusionConfig", "Model", "ModelConfig", "count_params"]
