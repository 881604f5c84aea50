"""Vision transformer with FLIP token dropping, and the transformer block both towers use.

Pre-LN blocks; patch embedding by a strided Conv2d; optional cls token; learned
or fixed 2-D sin-cos position embedding of the N patches, added before the
tokens are dropped (so every kept token keeps its position); ln_post, pooling
(cls token, else the mean of the kept tokens), projection to the joint space.
"""
import dataclasses

import torch
import torch.utils.checkpoint
from torch import nn

from . import masking
from .attention import attention


class Attention(nn.Module):
    """Multi-head self-attention with one fused QKV projection.

    qkv's output features are laid out (3, heads, head_dim), so a [..., 3*D] result
    views as [..., 3, H, Dh]; the packed fast path relies on this layout.
    """

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by heads {heads}")
        self.num_heads = heads
        self.head_dim = dim // heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x, key_padding_mask=None, causal=False):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal, scale=self.scale)
        return self.out_proj(out.transpose(1, 2).reshape(B, N, D))


class MLP(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x))."""

    def __init__(self, dim, heads, mlp_ratio=4.0):
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln_2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x, key_padding_mask=None, causal=False):
        x = x + self.attn(self.ln_1(x), key_padding_mask=key_padding_mask, causal=causal)
        return x + self.mlp(self.ln_2(x))


def run_blocks(blocks, block_fn, x, *args, checkpoint=False):
    """x through each block of ``blocks`` as ``block_fn(block, x, *args)``.

    checkpoint: activation checkpointing per block (when grad is enabled): only each
    block's input is kept and its activations are recomputed in the backward, so a
    tower holds one block's activations instead of all of them (non-reentrant
    torch.utils.checkpoint: works with autograd.backward on any output, keeps the RNG).
    """
    checkpoint = checkpoint and torch.is_grad_enabled()
    for block in blocks:
        if checkpoint:
            x = torch.utils.checkpoint.checkpoint(block_fn, block, x, *args, use_reentrant=False)
        else:
            x = block_fn(block, x, *args)
    return x


def _call_block(block, x, causal=False):
    return block(x, causal=causal)


@dataclasses.dataclass
class VisionConfig:
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    channels: int = 3
    cls_token: bool = False  # FLIP pools by the mean of the kept tokens
    pos_embed: str = "learned"  # or "sincos" (fixed)

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"patch_size {self.patch_size} does not divide image_size {self.image_size}")
        if self.pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {self.pos_embed!r}")
        if self.width % self.heads:
            raise ValueError(f"vision width {self.width} is not divisible by heads {self.heads}")

    @property
    def grid(self):
        return self.image_size // self.patch_size

    @property
    def num_patches(self):
        return self.grid ** 2


def sincos_pos_embed_2d(width, grid):
    """[grid*grid, width] fixed 2-D sin-cos embedding (MAE): half the channels encode
    the row, half the column, each as sin and cos of geometric frequencies."""
    if width % 4:
        raise ValueError(f"sin-cos position embedding needs width divisible by 4, got {width}")
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64),
                                torch.arange(grid, dtype=torch.float64), indexing="ij")

    def enc(pos):
        a = pos.reshape(-1, 1) * omega[None, :]
        return torch.cat([a.sin(), a.cos()], dim=1)

    return torch.cat([enc(rows), enc(cols)], dim=1).float()


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig, output_dim):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.patch_embed = nn.Conv2d(cfg.channels, w, cfg.patch_size, cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(w)) if cfg.cls_token else None
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.randn(cfg.num_patches, w) * 0.02)
        else:
            self.register_buffer("pos_embed", sincos_pos_embed_2d(w, cfg.grid), persistent=False)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.ln_post = nn.LayerNorm(w)
        self.proj = nn.Linear(w, output_dim, bias=False)
        self.grad_checkpointing = False  # run_blocks(checkpoint=...); CLIP.set_grad_checkpointing
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=0.02)

    def embed(self, images, ids_keep=None):
        """Patch embedding + position, kept tokens only: [B, K, width] (K = N without ids_keep)."""
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, width]
        if ids_keep is None:
            return x + self.pos_embed.to(x.dtype)
        return masking.drop_tokens(x, ids_keep, self.pos_embed.to(x.dtype))

    def with_cls(self, x):
        if self.cls_token is None:
            return x
        return torch.cat([self.cls_token.to(x.dtype).expand(x.shape[0], 1, -1), x], dim=1)

    def pool(self, x):
        """ln_post, pooling, projection: [B, L, width] -> [B, output_dim]."""
        x = self.ln_post(x)
        pooled = x[:, 0] if self.cls_token is not None else x.mean(dim=1)
        return self.proj(pooled)

    def forward_tokens(self, images, ids_keep=None):
        """The tokens after the last block (cls first, if any): [B, (1 +) K, width]."""
        x = self.with_cls(self.embed(images, ids_keep))
        x = run_blocks(self.blocks, _call_block, x, checkpoint=self.grad_checkpointing)
        return x

    def patch_tokens(self, x):
        """ln_post of forward_tokens' kept patch tokens, the cls token left out: [B, K, width]
        (what an MAE decoder reads, and A-CLIP's per-patch features)."""
        x = self.ln_post(x)
        return x[:, 1:] if self.cls_token is not None else x

    def forward(self, images, ids_keep=None):
        """images [B, C, H, W], ids_keep int64 [B, K] (None: keep all) -> [B, output_dim]."""
        return self.pool(self.forward_tokens(images, ids_keep))


def init_weights(module):
    """CLIP-like init: trunc-normal linear/conv weights, zero biases, unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


