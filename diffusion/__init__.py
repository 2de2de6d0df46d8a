"""Masked text diffusion (MDLM / LLaDA) and block diffusion (BD3-LM): schedules, objectives, samplers."""

from diffusion.block import BlockDiffusionObjective
from diffusion.block_sampler import ModelBlockDenoiser, block_sample, generate_blocks
from diffusion.objective import MaskedDiffusionObjective, subs_log_probs
from diffusion.samplers import ModelDenoiser, ancestral, remask, sample
from diffusion.schedules import get_schedule

__all__ = ["BlockDiffusionObjective", "MaskedDiffusionObjective", "ModelBlockDenoiser", "ModelDenoiser", "ancestral",
           "block_sample", "generate_blocks", "get_schedule", "remask", "sample", "subs_log_probs"]
