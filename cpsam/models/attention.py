"""Global multi-head attention with SAM's decomposed relative-position bias, two numeric paths.

`RelPosAttention` subclasses `segment_anything`'s `Attention` so that its parameters and their
state_dict names (`qkv`, `proj`, `rel_pos_h`, `rel_pos_w`) are exactly SAM's. It adds one choice:

- ``"math"``: SAM's own forward (explicit (N, N) score matrix, bias added, softmax, matmul).
- ``"sdpa"``: `torch.nn.functional.scaled_dot_product_attention`, no (N, N) matrix ever held
  whole. On CPU the bias is passed as SDPA's attn_mask, built one block of queries at a time
  (`_chunked_mask_attention`; the blocks stay in cache). On CUDA the bias is folded into queries
  and keys augmented with one-hot key codes (`_augmented_attention`), so the flash kernel, which
  takes no mask, can run. On a CPU the chunked mask is the fastest inference path (timings of the
  three: docs/results/network.md). Training on a CPU uses the augmented form too (no mask: SDPA's
  flash kernel and its memory-light backward).

Both compute softmax(q k^T / sqrt(d) + B) v with B[(i, j), (k, l)] = q_(i,j) . Rh[i - k]
+ q_(i,j) . Rw[j - l], the relative-position tables being linearly resampled to length 2*L - 1
by SAM's `get_rel_pos` (CP-SAM keeps the constructed 27/127-row tables and resamples them to 63
at run time; see cpsam_recipe.md section 1.2 item 3).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

from cpsam.models.lean_autograd import RelPosFlashAttention, augmented_qkv, decomposed_bias, lean_applies

AttentionPath = Literal["sdpa", "math"]
ATTENTION_PATHS: tuple[str, ...] = ("sdpa", "math")
# Rows (batch x heads x queries) of one attn_mask block on the CPU path: 2048 x 1024 keys x 4 B = 8 MiB.
MASK_ROWS = 2048


class RelPosAttention(Attention):
    """SAM attention block (same parameters and keys) with a selectable fast path.

    Input and output: (B, H, W, C) channels-last tokens, any float dtype.
    """

    path: AttentionPath = "sdpa"
    lean: bool = True  # training on a CPU through RelPosFlashAttention (False: plain autograd of the same ops)

    @classmethod
    def adopt(cls, sam_attention: Attention, path: AttentionPath = "sdpa") -> RelPosAttention:
        """Re-class an existing SAM `Attention` module in place (its parameters are kept as they are)."""
        if not isinstance(sam_attention, Attention):
            raise TypeError(f"expected segment_anything Attention, got {type(sam_attention).__name__}")
        sam_attention.__class__ = cls
        adopted: RelPosAttention = sam_attention  # type: ignore[assignment]
        adopted.set_path(path)
        return adopted

    def set_path(self, path: AttentionPath) -> None:
        """Select ``"sdpa"`` (fused kernel) or ``"math"`` (SAM's original computation)."""
        if path not in ATTENTION_PATHS:
            raise ValueError(f"unknown attention path {path!r}; choose one of {ATTENTION_PATHS}")
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        if self.path == "math":
            return super().forward(x)
        return self._forward_sdpa(x)

    def relative_position_bias(self, q: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Additive attention bias from the decomposed relative-position tables.

        q: (B, heads, H*W, head_dim) unscaled queries. Returns (B, heads, H*W, H*W) in q's dtype.
        """
        rel_h = get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)  # (H, H, d)
        rel_w = get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)  # (W, W, d)
        batch, heads, _, dim = q.shape
        r_q = q.reshape(batch, heads, height, width, dim)
        bias_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rel_h)  # (B, n, H, W, Hk)
        bias_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rel_w)  # (B, n, H, W, Wk)
        bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, n, H, W, Hk, Wk)
        return bias.reshape(batch, heads, height * width, height * width)

    def _forward_sdpa(self, x: torch.Tensor) -> torch.Tensor:
        training_on_cpu = self.use_rel_pos and x.device.type == "cpu" and torch.is_grad_enabled() and (
            x.requires_grad or any(p.requires_grad for p in self.parameters()))
        batch, height, width, _ = x.shape
        tokens = height * width
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        if not self.use_rel_pos:  # SDPA's default scale is head_dim ** -0.5, which is SAM's `self.scale`.
            out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        elif q.device.type == "cpu" and not training_on_cpu:
            out = self._chunked_mask_attention(q, k, v, height, width)
        elif q.device.type == "cpu":
            # training on a CPU: SDPA with a bias that needs a gradient runs its plain kernel per query
            # block and keeps two scaled copies of K per block (2.1x the time, 1.75x the memory of SAM's
            # block at batch 2); the augmented form has no mask, so SDPA's CPU flash kernel runs, whose
            # backward recomputes the scores from q, k, v and the row log-sum-exp instead of saving the
            # (N, N) matrices (same gradients; time and memory against SAM's block: docs/results/network.md).
            # `lean` (default): the same kernels through `RelPosFlashAttention`, which saves q, k, v and the
            # output instead of the augmented tensors (24 MiB less per ViT-L block at batch 1).
            if lean_applies(self, x):
                rel_h = get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)
                rel_w = get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)
                out = RelPosFlashAttention.apply(q, k, v, rel_h, rel_w, self.scale, height, width).transpose(1, 2)
            else:
                out = self._augmented_attention(q, k, v, height, width).transpose(1, 2)
        else:
            out = self._augmented_attention(q, k, v, height, width).transpose(1, 2)
        return self.proj(out.reshape(batch, height, width, -1))

    def _decomposed_bias(
        self, q: torch.Tensor, height: int, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two factors of the bias: q (B, heads, N, d) unscaled -> (B, heads, N, H), (B, heads, N, W)."""
        rel_h = get_rel_pos(height, height, self.rel_pos_h).to(q.dtype)  # (H, H, d)
        rel_w = get_rel_pos(width, width, self.rel_pos_w).to(q.dtype)  # (W, W, d)
        return decomposed_bias(q, rel_h, rel_w, height, width)

    def _chunked_mask_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int, mask_rows: int = 0
    ) -> torch.Tensor:
        """CPU: SDPA with the bias as attn_mask, built and consumed one block of queries at a time.

        Each block's mask is (B, heads, rows, N) with B * heads * rows = MASK_ROWS (8 MiB in fp32;
        `mask_rows` overrides it), so it stays in cache and is never materialised whole, and the
        matmuls keep head_dim d instead of the augmented path's 2 * d.
        q, k, v: (B, heads, N, d) -> (B, N, heads, d) (token-major, so the head merge is a view).
        """
        batch, heads, tokens, dim = q.shape
        bias_h, bias_w = self._decomposed_bias(q, height, width)
        rows = max(1, (mask_rows or MASK_ROWS) // (batch * heads))
        out = q.new_empty(batch, tokens, heads, dim)
        for start in range(0, tokens, rows):
            stop = min(tokens, start + rows)
            mask = bias_h[:, :, start:stop, :, None] + bias_w[:, :, start:stop, None, :]
            mask = mask.reshape(batch, heads, stop - start, tokens)
            block = F.scaled_dot_product_attention(q[:, :, start:stop], k, v, attn_mask=mask)
            out[:, start:stop] = block.transpose(1, 2)
        return out

    def _augmented_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, height: int, width: int
    ) -> torch.Tensor:
        """Fold the decomposed bias into the dot product instead of materialising an (N, N) mask.

        bias[(i, j), (k, l)] = rel_h[(i, j), k] + rel_w[(i, j), l] is the dot product of
        [rel_h[(i, j)], rel_w[(i, j)]] with the one-hot code [e_k, e_l] of the key position, so
        q' = [q * scale, rel_h, rel_w] and k' = [k, e_row, e_col] give q' . k' = score + bias.
        V is zero-padded to the same width because the fused kernels need equal head sizes.
        q, k, v: (B, heads, N, d) -> (B, heads, N, d).
        """
        dim = q.shape[-1]
        bias_h, bias_w = self._decomposed_bias(q, height, width)
        q_aug, k_aug, v_aug = augmented_qkv(q, k, v, bias_h, bias_w, self.scale, height, width)
        out = F.scaled_dot_product_attention(q_aug, k_aug, v_aug, scale=1.0)
        return out[..., :dim]
