"""Cellpose-SAM: SAM's ViT image encoder turned into a Cellpose flow network.

Built on `segment_anything.modeling.ImageEncoderViT` (not re-written). The encoder is constructed
with SAM's own geometry (1024 px, 16 px patches, 14-token windows, global blocks) so that every
tensor has the shape of the SAM / official Cellpose-SAM checkpoints, then modified as Cellpose-SAM
does (cpsam_recipe.md section 1.2):

1. 8x8 patches: the 16x16 patch kernel is subsampled at even taps (no rescaling).
2. Absolute position embeddings subsampled from SAM's 64x64 grid to the 32x32 token grid of a
   256 px tile.
3. Global attention in every block; the relative-position tables keep their constructed lengths
   (2*14-1 = 27 rows, 2*64-1 = 127 rows in the global blocks) and are resampled to 2*32-1 = 63 at
   run time by SAM's `get_rel_pos`.
4. Readout: neck (B, 256, 32, 32) -> 1x1 conv to 3*8*8 = 192 channels -> pixel shuffle by 8
   -> (B, 3, 256, 256) = [dY, dX, cellprob logit], flows at 5x unit length. The fixed `W2`
   buffer of the reference (identity transposed-conv kernel) is kept for checkpoint compatibility;
   `F.pixel_shuffle` computes exactly the same map and is what runs.
5. Per-sample layer drop while training, rate linear from 0 (first block) to `layer_drop` (last).
   A dropped block is the identity (no 1/(1-p) rescaling, as the reference).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import ImageEncoderViT
from torch import nn

from cpsam.models.attention import ATTENTION_PATHS, AttentionPath, RelPosAttention
from cpsam.models.lean_autograd import LeanMLP
from cpsam.models.registry import register_model


@dataclass
class CellposeSAMConfig:
    """Architecture of a Cellpose-SAM network; the SAM fields give the encoder's constructed shapes.

    Attributes:
        embed_dim: token width (ViT-B 768, ViT-L 1024, ViT-H 1280).
        depth: number of transformer blocks.
        num_heads: attention heads per block.
        global_attn_indexes: blocks SAM built with global attention (their rel-pos tables have
            2 * sam_img_size / sam_patch_size - 1 rows; the others 2 * sam_window_size - 1 rows).
        sam_img_size, sam_patch_size, sam_window_size: SAM's construction geometry (1024, 16, 14).
        patch_size: Cellpose-SAM patch size in pixels (8).
        tile_size: input tile size in pixels (256); tokens per side = tile_size / patch_size.
        out_chans: neck width (256).
        nout: output channels (3: dY, dX, cellprob).
        layer_drop: maximal per-sample layer-drop rate (last block), training only.
        attention: "sdpa" (fused kernel) or "math" (SAM's original computation).
    """

    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    global_attn_indexes: tuple[int, ...] = (5, 11, 17, 23)
    sam_img_size: int = 1024
    sam_patch_size: int = 16
    sam_window_size: int = 14
    patch_size: int = 8
    tile_size: int = 256
    out_chans: int = 256
    nout: int = 3
    layer_drop: float = 0.4
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)
        if self.sam_patch_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} must divide sam_patch_size {self.sam_patch_size}")
        if self.tile_size % self.patch_size:
            raise ValueError(f"tile_size {self.tile_size} must be a multiple of patch_size {self.patch_size}")
        sam_grid, grid = self.sam_img_size // self.sam_patch_size, self.tile_size // self.patch_size
        if sam_grid % grid:
            raise ValueError(f"token grid {grid} must divide SAM's position grid {sam_grid}")
        if self.attention not in ATTENTION_PATHS:
            raise ValueError(f"attention must be one of {ATTENTION_PATHS}, got {self.attention!r}")
        if not 0.0 <= self.layer_drop < 1.0:
            raise ValueError(f"layer_drop must be in [0, 1), got {self.layer_drop}")

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (what checkpoints store as `model_kwargs`)."""
        out = asdict(self)
        out["global_attn_indexes"] = list(self.global_attn_indexes)
        return out


class CellposeSAM(nn.Module):
    """Cellpose-SAM flow network.

    forward(x): x (B, C_in <= 3, tile, tile) float -> (y (B, 3, tile, tile), style zeros (B, 256)).
    Fewer than 3 input channels use the first C_in input channels of the patch kernel, which equals
    zero-padding the missing channels at the end (as cellpose 4).
    """

    in_channels: int = 3
    model_name: str = "cpsam"

    def __init__(self, config: CellposeSAMConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        config = CellposeSAMConfig(**{**asdict(config or CellposeSAMConfig()), **overrides})
        self.config = config
        self.tile_size = config.tile_size
        self.patch_size = config.patch_size
        self.nout = config.nout
        self.layer_drop = config.layer_drop

        self.diam_labels = nn.Parameter(torch.tensor([30.0]), requires_grad=False)
        self.diam_mean = nn.Parameter(torch.tensor([30.0]), requires_grad=False)

        self.encoder = ImageEncoderViT(
            img_size=config.sam_img_size,
            patch_size=config.sam_patch_size,
            in_chans=3,
            embed_dim=config.embed_dim,
            depth=config.depth,
            num_heads=config.num_heads,
            mlp_ratio=4.0,
            out_chans=config.out_chans,
            qkv_bias=True,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            act_layer=nn.GELU,
            use_abs_pos=True,
            use_rel_pos=True,
            window_size=config.sam_window_size,
            global_attn_indexes=config.global_attn_indexes,
        )
        self._adapt_encoder()

        self.out = nn.Conv2d(config.out_chans, config.nout * config.patch_size**2, kernel_size=1)
        eye = torch.eye(config.nout * config.patch_size**2)
        w2 = eye.reshape(-1, config.nout, config.patch_size, config.patch_size)
        # A buffer (not trained); persistent so that the state_dict matches the official files.
        self.register_buffer("W2", w2, persistent=True)

    def _adapt_encoder(self) -> None:
        """Apply the Cellpose-SAM changes to a freshly built SAM encoder (patch, pos-embed, attention)."""
        cfg = self.config
        old = self.encoder.patch_embed.proj
        step = cfg.sam_patch_size // cfg.patch_size
        new = nn.Conv2d(3, cfg.embed_dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        with torch.no_grad():
            new.weight.copy_(old.weight[:, :, ::step, ::step])
        self.encoder.patch_embed.proj = new

        ds = (cfg.sam_img_size // cfg.sam_patch_size) // (cfg.tile_size // cfg.patch_size)
        self.encoder.pos_embed = nn.Parameter(self.encoder.pos_embed.detach()[:, ::ds, ::ds].clone())

        for block in self.encoder.blocks:
            block.window_size = 0
            RelPosAttention.adopt(block.attn, cfg.attention)  # type: ignore[arg-type]
            LeanMLP.adopt(block.mlp)

    def set_lean_training(self, enabled: bool) -> None:
        """Train on a CPU through the memory-lean autograd functions (`cpsam.models.lean_autograd`, the default)
        or through plain autograd of the same ops (`enabled=False`; same results, ~40 MiB more per ViT-L block
        at batch 1)."""
        for block in self.encoder.blocks:
            block.attn.lean = enabled
            block.mlp.lean = enabled

    def model_kwargs(self) -> dict[str, Any]:
        """Arguments that rebuild this architecture: `create_model("cpsam", **model_kwargs())`."""
        return self.config.to_dict()

    @property
    def attention_path(self) -> str:
        """The attention path in use ("sdpa" or "math")."""
        return self.config.attention

    def set_attention_path(self, path: AttentionPath) -> None:
        """Switch every block between the fused ("sdpa") and the original ("math") attention."""
        for block in self.encoder.blocks:
            block.attn.set_path(path)
        self.config.attention = path

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch + position embedding: (B, C_in, tile, tile) -> tokens (B, T, T, embed_dim)."""
        proj = self.encoder.patch_embed.proj
        if x.shape[1] > proj.in_channels:
            raise ValueError(f"expected at most {proj.in_channels} input channels, got {x.shape[1]}")
        if x.shape[-2:] != (self.tile_size, self.tile_size):
            raise ValueError(f"expected {self.tile_size}x{self.tile_size} tiles, got {tuple(x.shape[-2:])}")
        x = x.to(proj.weight.dtype)
        tokens = F.conv2d(x, proj.weight[:, : x.shape[1]], proj.bias, stride=self.patch_size)
        # Contiguous once here: a permuted (channels-first in memory) residual stream would be
        # inherited by every residual add and copied again by both LayerNorms of every block.
        return tokens.permute(0, 2, 3, 1).contiguous() + self.encoder.pos_embed

    def layer_drop_rates(self) -> torch.Tensor:
        """Per-block drop probability (depth,), linear from 0 to `layer_drop`."""
        return torch.linspace(0.0, self.layer_drop, len(self.encoder.blocks))

    def run_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """Transformer blocks with per-sample layer drop in training: (B, T, T, D) -> (B, T, T, D)."""
        if not (self.training and self.layer_drop > 0):
            for block in self.encoder.blocks:
                tokens = block(tokens)
            return tokens
        rates = self.layer_drop_rates().to(tokens.device)
        drop = torch.rand(tokens.shape[0], len(rates), device=tokens.device) < rates
        for i, block in enumerate(self.encoder.blocks):
            kept = torch.nonzero(~drop[:, i]).flatten()
            if kept.numel() == 0:
                # Dropped for the whole batch: a zero-valued term keeps every parameter of the block
                # in the autograd graph (DDP without find_unused_parameters needs a gradient for all).
                tokens = tokens + 0.0 * sum(p.sum() for p in block.parameters())
                continue
            # Only kept samples go through the block (the reference computes all and discards).
            tokens = tokens.index_copy(0, kept, block(tokens.index_select(0, kept)))
        return tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Neck features (B, out_chans, T, T) for an input tile batch (B, C_in, tile, tile)."""
        tokens = self.run_blocks(self.embed(x))
        return self.encoder.neck(tokens.permute(0, 3, 1, 2))

    def readout(self, features: torch.Tensor) -> torch.Tensor:
        """Neck features (B, out_chans, T, T) -> (B, nout, tile, tile) via 1x1 conv + pixel shuffle."""
        return F.pixel_shuffle(self.out(features), self.patch_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C_in, tile, tile) -> (flows+cellprob (B, 3, tile, tile), style zeros (B, 256))."""
        features = self.forward_features(x)
        y = self.readout(features)
        style = torch.zeros(x.shape[0], 256, device=y.device, dtype=y.dtype)
        return y, style


VARIANTS: dict[str, dict[str, Any]] = {
    "cpsam_vit_b": dict(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11)),
    "cpsam_vit_l": dict(embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)),
    "cpsam_vit_h": dict(embed_dim=1280, depth=32, num_heads=16, global_attn_indexes=(7, 15, 23, 31)),
    # For tests and smoke runs: same code paths, tiny widths (one windowed and one global table).
    "cpsam_tiny": dict(embed_dim=64, depth=2, num_heads=4, global_attn_indexes=(1,), out_chans=32),
}


def _register_variant(name: str) -> None:
    def build(**kwargs: Any) -> CellposeSAM:
        return CellposeSAM(CellposeSAMConfig(**{**VARIANTS[name], **kwargs}))

    build.__name__ = f"build_{name}"
    build.__doc__ = f"Build {name} with random weights; keyword arguments override CellposeSAMConfig fields."
    register_model(name)(build)


for _name in VARIANTS:
    _register_variant(_name)


@register_model("cpsam")
def build_cpsam(**config: Any) -> CellposeSAM:
    """Build a Cellpose-SAM network from explicit CellposeSAMConfig fields (defaults: ViT-L)."""
    return CellposeSAM(CellposeSAMConfig(**config))
