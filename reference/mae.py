"""MAE reconstruction (He et al. 2022), as FLIP adds it to CLIP training.

A light decoder reads the encoder's visible tokens, puts them back at their
positions with a learned mask token everywhere else (``restore_tokens``), adds
a fixed 2-D sin-cos position embedding, runs a few transformer blocks and
predicts every patch's pixels. The loss is MAE's norm_pix_loss: the mean
squared error against each patch normalized by its own mean and variance, on
the removed patches only.
"""
import dataclasses

import torch
from torch import nn

from . import masking
from .vit import Block, init_weights, sincos_pos_embed_2d


@dataclasses.dataclass
class MAEDecoderConfig:
    width: int = 64
    depth: int = 1
    heads: int = 4
    mlp_ratio: float = 4.0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"decoder width {self.width} is not divisible by heads {self.heads}")
        if self.width % 4:
            raise ValueError(f"decoder width {self.width} must be divisible by 4 (sin-cos position embedding)")


class MAEDecoder(nn.Module):
    """encoder tokens [B, K, encoder_width] + ids_keep -> predicted patches [B, N, C*p*p]."""

    def __init__(self, cfg: MAEDecoderConfig, encoder_width, grid, patch_dim):
        super().__init__()
        self.cfg = cfg
        self.num_patches = grid * grid
        self.embed = nn.Linear(encoder_width, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(cfg.width))
        self.register_buffer("pos_embed", sincos_pos_embed_2d(cfg.width, grid), persistent=False)
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width)
        self.pred = nn.Linear(cfg.width, patch_dim)
        init_weights(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, encoded, ids_keep):
        x = self.embed(encoded)
        x = masking.restore_tokens(x, ids_keep, self.num_patches, self.mask_token.to(x.dtype))
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))


def norm_pix_target(patches, eps=1e-6):
    """Each patch [..., C*p*p] normalized by its own mean and (unbiased) variance, in at
    least float32 (MAE's norm_pix_loss target)."""
    patches = patches.to(torch.promote_types(patches.dtype, torch.float32))
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True)
    return (patches - mean) / (var + eps) ** 0.5


def reconstruction_loss(pred, images, ids_keep, patch_size):
    """MAE's loss: per-patch mean squared error of pred [B, N, C*p*p] against the
    normalized pixels, averaged over the removed patches (those not in ids_keep)."""
    target = norm_pix_target(masking.patchify(images, patch_size))
    per_patch = (pred.to(target.dtype) - target).pow(2).mean(dim=-1)
    removed = torch.ones_like(per_patch).scatter(1, ids_keep, 0.0)
    return (per_patch * removed).sum() / removed.sum()
