"""Analytic FLOP count of a training step, per layer.

Conventions (stated, because every scaling-law comparison depends on them):
- A multiply-add is 2 FLOPs. Training = 3 x forward (backward = 2 x forward).
- Every matmul with a parameter matrix counts 2 * tokens * (in * out), embeddings included
  (as the input-side matmul with a one-hot vector, Chinchilla's convention) and the output head.
- Attention scores and the weighted sum count 2 * 2 * T_q * T_k * head_dim per head; causal
  attention counts only the keys a query may see (about T^2 / 2 pairs), sliding windows only
  their window; bidirectional attention counts all T^2 pairs.
- Every mixer states its own count (archs.mixers); recurrent mixers count their chunked scans.
- Mixture-of-experts MLPs count active experts only (archs.moe.moe_flops): the router matmul,
  the shared experts and each token's top_k routed experts, so FLOPs and `active_params`
  (archs.model.count_active_params) put MoE and dense models on one compute axis.
- Element-wise work (norms, activations, softmax) is not counted; it is a few percent.

`executed=True` drops the causal discount and counts what a dense masked kernel actually
computes: that is what XLA's cost analysis reports, so tests compare against it.

Block diffusion (BD3-LM) trains in one pass over [noisy; clean] copies of the window: every
layer sees 2 T tokens and attention the pairs its block-causal mask allows (T (T + L) for
global attention, archs.attention.block_attention_pairs; executed: the dense [2T, 2T]
product); the head runs on the T noisy positions only. flops_per_token divides by the T scored
tokens, so the doubled pass is in every FLOP budget and compute axis.
"""

from __future__ import annotations

from archs.config import ModelConfig
from archs.mixers import check_block_mask_support, mixer_kind
from archs.moe import moe_flops
from archs.sizes import check_block_size, layer_kinds, mlp_hidden, resolve


def mlp_flops(cfg: ModelConfig, seq_len: int, *, executed: bool = False) -> float:
    """Forward FLOPs of one block's MLP (dense SwiGLU or MoE) for one sequence."""
    if cfg.mlp == "moe":
        return moe_flops(cfg, seq_len, executed=executed)
    return 2 * seq_len * 3 * cfg.d_model * mlp_hidden(cfg)


def layer_flops(cfg: ModelConfig, kind: str, seq_len: int, *, executed: bool = False) -> float:
    """Forward FLOPs of one block (mixer + MLP) for one sequence."""
    return mixer_kind(kind).flops(cfg, seq_len, executed) + mlp_flops(cfg, _pass_tokens(cfg, seq_len),
                                                                   executed=executed)


def _pass_tokens(cfg: ModelConfig, seq_len: int) -> int:
    """Tokens through the stack per window: block diffusion runs its noisy and clean copies."""
    return 2 * seq_len if cfg.objective == "block_diffusion" else seq_len


def forward_flops(cfg: ModelConfig, seq_len: int, *, executed: bool = False, embedding: bool = True) -> dict:
    """Forward FLOPs for one sequence of seq_len (scored) tokens, with a per-part breakdown."""
    cfg = resolve(cfg)
    check_block_size(cfg, seq_len)
    check_block_mask_support(cfg)
    layers = [layer_flops(cfg, kind, seq_len, executed=executed) for kind in layer_kinds(cfg)]
    head = 2 * seq_len * cfg.d_model * cfg.vocab_size
    embed = 2 * _pass_tokens(cfg, seq_len) * cfg.d_model * cfg.vocab_size if embedding else 0.0
    time = 2 * cfg.d_model * cfg.d_model if cfg.diffusion.time_conditioning else 0.0
    return {
        "layers": layers,
        "embedding": embed,
        "head": head,
        "time": time,
        "total": sum(layers) + embed + head + time,
    }


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per scored token (3 x forward), block diffusion's doubled pass included."""
    return 3 * forward_flops(cfg, seq_len)["total"] / seq_len


def train_flops(cfg: ModelConfig, seq_len: int, tokens: int) -> float:
    return flops_per_token(cfg, seq_len) * tokens
