"""Text transformer: token + position embedding, causal pre-LN blocks, final LN,
pooling at each caption's end-of-text token, projection to the joint space.

Tokens are int64 [B, context_length], ``[sot, ..., eot, pad, ...]``. Causal
attention means the positions up to the eot never see the padding after it, so
no padding mask is needed and a packed (unpadded) run gives the same features.
"""
import dataclasses

import torch
from torch import nn

from .vit import Block, _call_block, run_blocks


@dataclasses.dataclass
class TextConfig:
    context_length: int = 77
    vocab_size: int = 49408
    width: int = 512
    depth: int = 12
    heads: int = 8
    mlp_ratio: float = 4.0
    pad_id: int = 0
    eot_id: int = 49407

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"text width {self.width} is not divisible by heads {self.heads}")
        if not 0 <= self.eot_id < self.vocab_size:
            raise ValueError(f"eot_id {self.eot_id} is outside the vocabulary of {self.vocab_size}")


def eot_positions(tokens, eot_id):
    """[B] index of each row's first eot token (the last position when a row has none)."""
    is_eot = tokens == eot_id
    first = is_eot.int().argmax(dim=1)
    last = torch.full_like(first, tokens.shape[1] - 1)
    return torch.where(is_eot.any(dim=1), first, last)


class TextTransformer(nn.Module):
    def __init__(self, cfg: TextConfig, output_dim):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.token_embedding = nn.Embedding(cfg.vocab_size, w)
        self.pos_embed = nn.Parameter(torch.randn(cfg.context_length, w) * 0.01)
        self.blocks = nn.ModuleList(Block(w, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.ln_final = nn.LayerNorm(w)
        self.proj = nn.Linear(w, output_dim, bias=False)
        self.grad_checkpointing = False  # run_blocks(checkpoint=...); CLIP.set_grad_checkpointing

    def embed(self, tokens):
        L = tokens.shape[1]
        if L > self.cfg.context_length:
            raise ValueError(f"tokens have length {L} > context_length {self.cfg.context_length}")
        return self.token_embedding(tokens) + self.pos_embed[:L]

    def forward(self, tokens):
        """tokens int64 [B, L] -> [B, output_dim]."""
        x = run_blocks(self.blocks, _call_block, self.embed(tokens), True, checkpoint=self.grad_checkpointing)
        x = self.ln_final(x)
        pooled = x[torch.arange(x.shape[0], device=x.device), eot_positions(tokens, self.cfg.eot_id)]
        return self.proj(pooled)
