"""Model side of the lab: configs, the size rule, the shared builder, attention, FLOP counts."""

from archs.config import DiffusionConfig, ModelConfig
from archs.errors import ConfigError
from archs.model import Model, count_params

ARCH_NAMES = ("ar", "ar_swa", "diffusion", "gdn", "mamba2", "hybrid", "hybrid_swa")

__all__ = ["ARCH_NAMES", "ConfigError", "DiffusionConfig", "Model", "ModelConfig", "count_params"]
