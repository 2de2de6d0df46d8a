"""Typed model configuration shared by every architecture family."""

from __future__ import annotations

from dataclasses import dataclass, field

# Layer-pattern alphabet: one character per layer kind, tiled over the depth.
#   A  global attention (causal or bidirectional, per `causal`)
#   S  sliding-window attention (window = `window`)
#   G  Gated DeltaNet
#   M  Mamba-2 (SSD)
LAYER_KINDS = {"A": "attention", "S": "sliding attention", "G": "gated deltanet", "M": "mamba2"}


@dataclass
class DiffusionConfig:
    """Masked diffusion (MDLM / LLaDA) objective settings; used when objective is 'diffusion' or
    'block_diffusion'."""

    schedule: str = "loglinear"  # loglinear (alpha_t = 1 - t) | cosine
    eps: float = 1e-3  # t is clipped to [eps, 1]
    antithetic: bool = True  # stratified t_i = (u + i / n) mod 1 across the batch
    # tokens: NELBO / sequence length (MDLM; equals LLaDA's pre-training eq. for fixed-length windows)
    # | masked: normalised by the realised masked-token count (see diffusion/objective.py)
    normalize: str = "tokens"
    time_conditioning: bool = False
    eval_samples: int = 4  # K Monte Carlo t samples per held-out window


@dataclass
class ModelConfig:
    name: str = "ar"  # the arch's name as recorded in the results database
    objective: str = "ar"  # ar | diffusion | block_diffusion
    pattern: str = "A"  # layer pattern, tiled over n_layers (see LAYER_KINDS)
    size: str = "s"  # size knob: a name in archs.sizes.SIZES or a target non-embedding count ("3M", "2.5e6")
    # Explicit overrides of the size rule; 0 means "from the size rule".
    d_model: int = 0
    n_layers: int = 0
    n_heads: int = 0
    n_kv_heads: int = 0  # 0: n_heads / gqa_ratio
    gqa_ratio: int = 1
    head_dim: int = 0  # 0: d_model // n_heads
    mlp_ratio: float = 8 / 3  # SwiGLU hidden = mlp_ratio * d_model, rounded up to mlp_multiple
    mlp_multiple: int = 32
    vocab_size: int = 259  # text tokens + EOD, MASK, PAD (archs.tokens); the engine sets the data's
    causal: bool = True
    window: int = 64  # for S layers
    qk_norm: bool = False
    rope_theta: float = 10000.0
    doc_mask: bool = True  # packed documents do not see each other (attention mask / state reset)
    tie_embeddings: bool = False
    dtype: str = "float32"  # compute dtype; parameters stay float32
    init_std: float = 0.02
    # Recurrent mixers.
    conv_kernel: int = 4
    chunk_size: int = 64
    gdn_head_dim: int = 0  # 0: head_dim
    gdn_expand_v: float = 1.0  # value head dim = gdn_expand_v * gdn_head_dim
    mamba_expand: int = 2
    mamba_head_dim: int = 0  # 0: head_dim
    mamba_d_state: int = 64
    mamba_groups: int = 1
    # Block diffusion (objective block_diffusion): tokens per block L; L divides the training window.
    # L = 1 is autoregressive, L = T is masked diffusion (BD3-LM); the diffusion settings below apply.
    block_size: int = 0
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
