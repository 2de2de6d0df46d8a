"""Model side of the lab: configs, the size rule, the shared builder, attention (standard, latent,
gated), mixture-of-experts MLPs, FLOP counts."""

from archs.config import DiffusionConfig, MLAConfig, ModelConfig, MoEConfig
from archs.errors import ConfigError
from archs.model import Model, count_active_params, count_params

__all__ = ["ConfigError", "DiffusionConfig", "MLAConfig", "Model", "ModelConfig", "MoEConfig", "count_active_params",
           "count_params"]
