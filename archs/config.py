"""Typed model configuration shared by every architecture family."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

# Layer-pattern alphabet: one character per layer kind, tiled over the depth.
#   A  global attention (causal or bidirectional, per `causal`)
#   S  sliding-window attention (window = `window`)
#   G  Gated DeltaNet
#   M  Mamba-2 (SSD)
#   L  multi-head latent attention (DeepSeek-V2/V3 MLA: keys and values from a compressed latent)
LAYER_KINDS = {
    "A": "attention",
    "S": "sliding attention",
    "G": "gated deltanet",
    "M": "mamba2",
    "L": "latent attention",
}
MLP_KINDS = ("swiglu", "moe")


@dataclass
class MoEConfig:
    """Mixture-of-experts MLP settings; used when mlp == 'moe' (archs/moe.py).

    Every token goes through `shared_experts` always-on experts plus its `top_k` routed experts
    out of `experts`; each expert is a SwiGLU of width `expert_width`.
    """

    experts: int = 8  # routed experts
    top_k: int = 2  # routed experts per token
    shared_experts: int = 1  # always-on experts (DeepSeekMoE); 0: none
    # 0: the dense SwiGLU width split over the experts one token uses,
    # ceil(mlp_hidden / (top_k + shared_experts)) rounded up to mlp_multiple, so a token's
    # active MLP matches the dense model's (fine-grained expert segmentation, DeepSeekMoE).
    expert_width: int = 0
    # sigmoid: per-expert affinities sigmoid(x W) (DeepSeek-V3) | softmax: softmax(x W) over experts
    router: str = "sigmoid"
    norm_topk: bool = True  # gate weights = chosen affinities / their sum (DeepSeek-V3; with top_k=1 the gate is 1)
    # aux: Switch/GShard loss n_experts * sum_i f_i P_i added with aux_weight |
    # bias: DeepSeek-V3's loss-free balancing, a per-expert selection bias nudged by bias_step each step
    balance: str = "aux"
    aux_weight: float = 1e-2
    bias_step: float = 1e-3
    capacity_factor: float = 0.0  # 0: dropless (grouped GEMM); > 0: buffers of ceil(cf * tokens * top_k / experts)


@dataclass
class MLAConfig:
    """Multi-head latent attention settings for L layers (archs/mla.py)."""

    kv_rank: int = 0  # latent width of c_kv; 0: 4 x head_dim (DeepSeek-V2: 512 = 4 x 128)
    rope_dim: int = 0  # decoupled RoPE key/query dims, the key shared across heads; 0: head_dim // 2
    q_rank: int = 0  # latent width of the query; 0: no query compression


class GdnImpl(StrEnum):
    """Chunked Gated DeltaNet kernel (ssm.gated_delta_pallas.gated_delta_kernel)."""

    auto = "auto"  # pallas on GPU / TPU, xla elsewhere
    xla = "xla"  # ssm.gated_delta_rule: XLA einsums + lax.scan
    pallas = "pallas"  # Pallas kernels (Triton on GPU, Mosaic on TPU; interpret mode on CPU: slow)


class AttentionImpl(StrEnum):
    """Softmax attention kernel of A, S and L layers (archs.attention_ops; the KV-cache decode path
    is always xla). An explicit choice that cannot run a layer is a ConfigError naming the fix."""

    auto = "auto"  # GPU: cudnn where it can, TPU: pallas where it can, else xla; CPU: blocked for long T * S
    xla = "xla"  # dense [T, S] scores and mask (the reference)
    blocked = "blocked"  # online softmax over key blocks, no [T, S] array (long sequences on CPU)
    cudnn = "cudnn"  # jax.nn.dot_product_attention(implementation="cudnn"): GPU, bf16 / fp16
    pallas = "pallas"  # Pallas flash attention (Triton on GPU, Mosaic on TPU; interpret mode on CPU: slow)


class Remat(StrEnum):
    """What a block keeps for the backward pass (archs.model.REMAT_POLICIES); the rest is
    recomputed. A memory-for-compute trade of the training step, never a change of its numbers."""

    none = "none"  # keep every activation (fastest, most memory)
    block = "block"  # keep only each block's input; recompute the block in the backward pass
    dots = "dots"  # keep the outputs of matmuls without batch dimensions (the projections), recompute the rest


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
    mlp: str = "swiglu"  # the MLP of every block: swiglu | moe (settings in `moe`)
    vocab_size: int = 259  # text tokens + EOD, MASK, PAD (archs.tokens); the engine sets the data's
    causal: bool = True
    window: int = 64  # for S layers
    qk_norm: bool = False  # A and S layers (an L layer normalises its latent instead)
    attn_gate: bool = False  # sigmoid gate on every head's output from the layer input (Qwen3-Next); A, S, L
    rope_theta: float = 10000.0
    attention_impl: AttentionImpl = AttentionImpl.auto  # attention kernel (AttentionImpl)
    doc_mask: bool = True  # packed documents do not see each other (attention mask / state reset)
    tie_embeddings: bool = False
    # Compute dtype; parameters, norms' statistics, softmax and loss stay float32. auto: bfloat16 on
    # GPU / TPU, float32 on CPU (resolved by the engine's plan from the backend; until then, and in
    # code that builds a Model from an unresolved config, auto computes in float32).
    dtype: str = "auto"
    init_std: float = 0.02
    # Recurrent mixers.
    conv_kernel: int = 4
    chunk_size: int = 64
    gdn_impl: GdnImpl = GdnImpl.auto
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
    moe: MoEConfig = field(default_factory=MoEConfig)
    mla: MLAConfig = field(default_factory=MLAConfig)
