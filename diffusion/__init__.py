"""Masked text diffusion (MDLM / LLaDA): schedules, the NELBO objective, samplers."""

from diffusion.objective import MaskedDiffusionObjective, subs_log_probs
from diffusion.samplers import ModelDenoiser, ancestral, remask, sample
from diffusion.schedules import get_schedule

__all__ = ["MaskedDiffusionObjective", "ModelDenoiser", "ancestral", "get_schedule", "remask", "sample",
           "subs_log_probs"]
