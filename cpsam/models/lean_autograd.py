"""Memory-lean autograd functions for training CP-SAM's ViT blocks on a CPU.

Autograd keeps, per ViT-L block at a 256-px tile (1024 tokens, batch 1, float32), about 92 MiB of
activations for the backward pass; over 24 blocks that is the largest share of a training step's
peak memory after the weights and AdamW's state. Two parts of a block keep more than they need:

- Attention (`RelPosFlashAttention`): with SAM's relative-position bias folded into augmented
  queries and keys (see `cpsam.models.attention`), SDPA's CPU flash kernel saves its augmented
  q', k', v' (head size 64 + 64 bias / one-hot columns) and its zero-padded output, 32 MiB, and
  the two einsums of the bias save two contiguous copies of q, 8 MiB. This function saves q, k, v
  themselves (views of the qkv projection's output, 12 MiB), the un-padded output (4 MiB) and the
  row log-sum-exp, and rebuilds the augmented tensors in the backward pass (concatenations and
  two einsums: by our count ~0.1 GFLOP, against ~34 GFLOP of the block's forward; not timed apart). 24 MiB
  less per block (counted in tests/cpsam/test_lean_autograd.py).
- MLP (`GeluLinear`): lin2(gelu(h)) keeps both h (for GELU's backward) and gelu(h) (for lin2's
  weight gradient). This function keeps h only and recomputes gelu(h) in the backward pass (one
  elementwise op). 16 MiB less per block.

Both compute exactly what autograd computes through the plain modules (same kernels; gradients
agree to float rounding, tested in tests/cpsam/test_lean_autograd.py). They are used for training on a
CPU only (`cpsam.models.attention.RelPosAttention`, `LeanMLP`); on CUDA the plain modules run
(mixed precision and the CUDA kernels are not exercised by this code's tests).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling.common import MLPBlock
from torch import nn


def decomposed_bias(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, height: int,
                    width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two factors of SAM's relative-position bias.

    q: (B, heads, N = height * width, d) unscaled queries; rel_h (height, height, d), rel_w (width, width, d)
    resampled tables (`get_rel_pos`). Returns (B, heads, N, height) and (B, heads, N, width), q's dtype.
    """
    batch, heads, tokens, dim = q.shape
    r_q = q.reshape(batch, heads, height, width, dim)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rel_h).reshape(batch, heads, tokens, height)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rel_w).reshape(batch, heads, tokens, width)
    return bias_h, bias_w


def augmented_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias_h: torch.Tensor, bias_w: torch.Tensor,
                  scale: float, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q' = [q * scale, bias_h, bias_w], k' = [k, one-hot row, one-hot column], v' = [v, 0]: q' . k' = scaled
    score + bias, so attention with the bias runs as mask-free SDPA with scale 1.

    q, k, v: (B, heads, N, d); bias_h (B, heads, N, height), bias_w (B, heads, N, width).
    Returns three (B, heads, N, d + height + width) tensors in q's dtype.
    """
    batch, heads, tokens, _ = q.shape
    positions = torch.arange(tokens, device=q.device)
    row_code = F.one_hot(positions // width, height).to(q.dtype)  # (N, H)
    col_code = F.one_hot(positions % width, width).to(q.dtype)  # (N, W)
    codes = torch.cat([row_code, col_code], dim=-1).expand(batch, heads, tokens, height + width)
    q_aug = torch.cat([q * scale, bias_h, bias_w], dim=-1)
    k_aug = torch.cat([k, codes], dim=-1)
    v_aug = F.pad(v, (0, height + width))
    return q_aug, k_aug, v_aug


class RelPosFlashAttention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v on a CPU via SDPA's flash kernel, saving q, k, v, out and the
    log-sum-exp instead of the augmented tensors (see the module docstring).

    Inputs: q, k, v (B, heads, N, d) float32/bfloat16 CPU tensors; rel_h (height, height, d) and rel_w
    (width, width, d); scale (SAM's head_dim ** -0.5); height * width = N. Output (B, heads, N, d).
    """

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rel_h: torch.Tensor,
                rel_w: torch.Tensor, scale: float, height: int, width: int) -> torch.Tensor:
        bias_h, bias_w = decomposed_bias(q, rel_h, rel_w, height, width)
        q_aug, k_aug, v_aug = augmented_qkv(q, k, v, bias_h, bias_w, scale, height, width)
        del bias_h, bias_w
        out_aug, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q_aug, k_aug, v_aug, 0.0, False, scale=1.0)
        # v' is zero beyond column d, so out' is exactly zero there: keep the first d columns only.
        out = out_aug[..., : q.shape[-1]].contiguous()
        ctx.save_for_backward(q, k, v, rel_h, rel_w, out, lse)
        ctx.geometry = (scale, height, width)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, rel_h, rel_w, out, lse = ctx.saved_tensors
        scale, height, width = ctx.geometry
        batch, heads, tokens, dim = q.shape
        extra = height + width
        with torch.no_grad():
            bias_h, bias_w = decomposed_bias(q, rel_h, rel_w, height, width)
            q_aug, k_aug, v_aug = augmented_qkv(q, k, v, bias_h, bias_w, scale, height, width)
            del bias_h, bias_w
            dq_aug, dk_aug, dv_aug = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                F.pad(grad_out, (0, extra)), q_aug, k_aug, v_aug, F.pad(out, (0, extra)), lse, 0.0, False,
                scale=1.0)
            del q_aug, k_aug, v_aug
            d_bias_h = dq_aug[..., dim: dim + height].reshape(batch, heads, height, width, height)
            d_bias_w = dq_aug[..., dim + height:].reshape(batch, heads, height, width, width)
            r_q = q.reshape(batch, heads, height, width, dim)
            dq = dq_aug[..., :dim] * scale
            dq = dq + (torch.einsum("bnhwk,hkc->bnhwc", d_bias_h, rel_h)
                       + torch.einsum("bnhwk,wkc->bnhwc", d_bias_w, rel_w)).reshape(batch, heads, tokens, dim)
            d_rel_h = torch.einsum("bnhwk,bnhwc->hkc", d_bias_h, r_q) if ctx.needs_input_grad[3] else None
            d_rel_w = torch.einsum("bnhwk,bnhwc->wkc", d_bias_w, r_q) if ctx.needs_input_grad[4] else None
        return dq, dk_aug[..., :dim], dv_aug[..., :dim], d_rel_h, d_rel_w, None, None, None


class GeluLinear(torch.autograd.Function):
    """y = linear(gelu(h), weight, bias) (exact GELU) that saves h only and recomputes gelu(h) for the
    weight gradient in the backward pass.

    h (..., in_features); weight (out_features, in_features); bias (out_features,) or None.
    Output (..., out_features) in h's dtype.
    """

    @staticmethod
    def forward(ctx: Any, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(h, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h, weight = ctx.saved_tensors
        grad_h = grad_w = grad_b = None
        flat_grad = grad_y.reshape(-1, grad_y.shape[-1])
        if ctx.needs_input_grad[1]:
            grad_w = flat_grad.t().mm(F.gelu(h).reshape(-1, h.shape[-1]))
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = flat_grad.sum(0)
        if ctx.needs_input_grad[0]:
            grad_h = torch.ops.aten.gelu_backward(grad_y.matmul(weight), h)
        return grad_h, grad_w, grad_b


def lean_applies(module: nn.Module, x: torch.Tensor) -> bool:
    """True when a lean function should replace the plain modules: gradients are being recorded, on a CPU,
    outside autocast, and `module` is in lean mode (`module.lean`, default True)."""
    return (getattr(module, "lean", True) and x.device.type == "cpu" and torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and (x.requires_grad or any(p.requires_grad for p in module.parameters())))


class LeanMLP(MLPBlock):
    """segment_anything's `MLPBlock` (same parameters and state_dict keys) whose training forward on a CPU
    runs lin2(gelu(.)) as `GeluLinear`. Input and output (..., embedding_dim)."""

    lean: bool = True

    @classmethod
    def adopt(cls, mlp: MLPBlock) -> LeanMLP:
        """Re-class an existing `MLPBlock` in place; only exact-GELU blocks can be adopted."""
        if not isinstance(mlp, MLPBlock):
            raise TypeError(f"expected segment_anything MLPBlock, got {type(mlp).__name__}")
        if not (isinstance(mlp.act, nn.GELU) and mlp.act.approximate == "none"):
            raise TypeError(f"LeanMLP needs an exact nn.GELU activation, got {mlp.act!r}")
        mlp.__class__ = cls
        return mlp  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if lean_applies(self, x):
            return GeluLinear.apply(self.lin1(x), self.lin2.weight, self.lin2.bias)
        return super().forward(x)
