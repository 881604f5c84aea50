"""One pre-norm transformer block forward, dense or packed, for every block family.

    x = x + ls_1(out_proj(attention(qkv(ln_1(x)))))
    x = x + ls_2(mlp(ln_2(x)))

Each model library spells that block its own way (the reference ``Block``,
open_clip's ``ResidualAttentionBlock``, timm's ``Block``). An *adapter* per
block family reads a block module's parts into a ``BlockParts``; the one
forward below uses only those parts, so the model code is never duplicated
and a new family is one adapter (``register_block_adapter``). Adapters read the
module's own submodules and parameters: the fast path computes with the same
parameters as the module, so checkpoints are shared.

Rotary position embedding (EVA-02) is token-wise too: ``rope`` [..., 2*head_dim]
holds each token's sin|cos (prefix tokens: sin 0, cos 1, which leaves them
unrotated exactly), laid out like the tokens, and the block's ``rotary`` part
turns q and k with it before attention.

Only attention differs between the two layouts, so it is the one argument
``block_forward`` takes besides the block (and the tokens' rope):
- dense, [B, N, D] with every token valid: one fused SDPA call, no mask;
- packed, [total, D] with int32 cu_seqlens [B+1] (flipkern.pack): LayerNorm,
  the projections and the MLP work token by token, so they run on the packed
  rows as they are, and attention is flipkern.varlen_attention; nothing is
  spent on padding anywhere in the block.
"""
from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .attention import varlen_attention
from .reference.vit import run_blocks


def _identity(x):
    return x


class BlockParts(NamedTuple):
    """What the block forward needs of a block. Every field is a callable on [..., D]
    tokens except num_heads and scale (None: 1/sqrt(head_dim)).

    qkv returns [..., 3*D] laid out (3, num_heads, head_dim): q, k, v views, no copies.
    rotary(t [..., H, head_dim], rope [..., 1, 2*head_dim]) -> t rotated, in t's dtype,
    or None for a block without rotary position embedding.
    """
    ln_1: Callable
    qkv: Callable
    num_heads: int
    scale: Optional[float]
    out_proj: Callable
    ln_2: Callable
    mlp: Callable
    ls_1: Callable = _identity
    ls_2: Callable = _identity
    rotary: Optional[Callable] = None


# "module.QualName" of a block type -> adapter(block) -> BlockParts. Keyed by name, not by
# the type, so an optional library (open_clip, timm) is not imported to register it; exact
# type only, since a subclass may change the forward the adapter describes.
_ADAPTERS = {}


def _type_name(cls):
    return f"{cls.__module__}.{cls.__qualname__}"


def register_block_adapter(block_type, adapter):
    """Serve blocks of ``block_type`` (a class or its "module.QualName") with ``adapter``."""
    _ADAPTERS[block_type if isinstance(block_type, str) else _type_name(block_type)] = adapter


def block_parts(block):
    """The BlockParts of ``block`` from its family's adapter."""
    adapter = _ADAPTERS.get(_type_name(type(block)))
    if adapter is None:
        raise TypeError(f"flipkern.blocks: block has type {_type_name(type(block))}, which no adapter "
                        f"serves (registered: {sorted(_ADAPTERS)}); see register_block_adapter")
    return adapter(block)


def reference_block_parts(block):
    """flipkern.reference.vit.Block (both reference towers use it)."""
    attn = block.attn
    return BlockParts(ln_1=block.ln_1, qkv=attn.qkv, num_heads=attn.num_heads, scale=attn.scale,
                      out_proj=attn.out_proj, ln_2=block.ln_2, mlp=block.mlp)


def _register_reference():
    from .reference.vit import Block
    register_block_adapter(Block, reference_block_parts)


_register_reference()


# ----------------------------------------------------------------------------- the forward

def block_forward(block, x, attend, rope=None):
    """One block on tokens x [..., D]; attend(qkv [..., 3*D], num_heads, scale) -> [..., D];
    rope [..., 2*head_dim]: the tokens' rotary sin|cos, or None."""
    p = block_parts(block)
    qkv = p.qkv(p.ln_1(x))
    if rope is not None:
        qkv = rotate_qk(p, qkv, rope)
    x = x + p.ls_1(p.out_proj(attend(qkv, p.num_heads, p.scale)))
    return x + p.ls_2(p.mlp(p.ln_2(x)))


def rotate_qk(parts, qkv, rope):
    """qkv [..., 3*D] with q and k turned by the block's rotary part at each token's rope."""
    if parts.rotary is None:
        raise ValueError("flipkern.blocks: rope was given for a block without a rotary part")
    q, k, v = qkv.unflatten(-1, (3, parts.num_heads, -1)).unbind(-3)
    rope = rope.unsqueeze(-2)  # one rotation per token, shared by the heads
    return torch.stack((parts.rotary(q, rope), parts.rotary(k, rope), v), dim=-3).flatten(-3)


def dense_attention(qkv, num_heads, scale=None, causal=False):
    """Self-attention of [B, N, 3*D] fused QKV projections laid out (3, H, Dh) -> [B, N, D].

    Every token is valid (all samples share N), so this is one fused
    scaled-dot-product-attention call with no mask: SDPA picks its best kernel
    (flash attention on CPU and CUDA).
    """
    B, N, D3 = qkv.shape
    q, k, v = qkv.view(B, N, 3, num_heads, D3 // (3 * num_heads)).permute(2, 0, 3, 1, 4)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    return out.transpose(1, 2).reshape(B, N, D3 // 3)


def packed_attention(qkv, num_heads, scale, cu_seqlens, max_seqlen, causal=False):
    """Self-attention within each packed sequence: qkv [total, 3*D] -> [total, D]."""
    total, D3 = qkv.shape
    # [total, 3, H, Dh] and its three strided views: no copies before the kernel
    q, k, v = qkv.view(total, 3, num_heads, D3 // (3 * num_heads)).unbind(1)
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)
    return out.reshape(total, D3 // 3)


def dense_block_forward(block, x, causal=False, rope=None):
    """One block on [B, N, D] tokens, all of them valid: ``block(x, causal=causal)``;
    rope [B, N, 2*head_dim] or None as in block_forward."""
    if x.dim() != 3:
        raise ValueError(f"flipkern.dense_block_forward: x must be 3-D [B, N, D], got shape {tuple(x.shape)}")
    return block_forward(block, x, lambda qkv, heads, scale: dense_attention(qkv, heads, scale, causal), rope)


def packed_block_forward(block, x_packed, cu_seqlens, max_seqlen, causal=False, rope=None):
    """One block on packed tokens: x [total, D] -> [total, D]; rope [total, 2*head_dim]
    (packed as x is) or None.

    Equals ``block(x_padded, key_padding_mask=..., causal=causal)`` at the valid
    positions of the padded batch.
    """
    if x_packed.dim() != 2:
        raise ValueError(f"flipkern.packed_block_forward: x_packed must be 2-D [total, D], "
                         f"got shape {tuple(x_packed.shape)}")

    def attend(qkv, heads, scale):
        return packed_attention(qkv, heads, scale, cu_seqlens, max_seqlen, causal)

    return block_forward(block, x_packed, attend, rope)


def dense_blocks_forward(blocks, x, causal=False, checkpoint=False, rope=None):
    """A stack of blocks (an iterable, e.g. nn.ModuleList) on [B, N, D] tokens; checkpoint:
    per-block activation checkpointing (reference.vit.run_blocks); rope as in block_forward."""
    return run_blocks(blocks, dense_block_forward, x, causal, rope, checkpoint=checkpoint)


def packed_blocks_forward(blocks, x_packed, cu_seqlens, max_seqlen, causal=False, checkpoint=False, rope=None):
    """A stack of blocks on packed tokens; checkpoint and rope as in dense_blocks_forward."""
    return run_blocks(blocks, packed_block_forward, x_packed, cu_seqlens, max_seqlen, causal, rope,
                      checkpoint=checkpoint)


__all__ = ["BlockParts", "register_block_adapter", "block_parts", "reference_block_parts", "block_forward",
           "rotate_qk", "dense_attention", "packed_attention", "dense_block_forward", "packed_block_forward",
           "dense_blocks_forward", "packed_blocks_forward", "run_blocks"]
