"""Transformer blocks on packed tokens: the fast path of both towers.

A padded batch [B, N, D] with lengths L_b becomes one [total, D] tensor (total =
sum L_b) plus int32 cu_seqlens [B+1] (flipkern.pack). Every part of a
pre-norm transformer block except attention works token by token, so LayerNorm,
the QKV projection, the output projection and the MLP run on [total, D] as they
are, and attention is flipkern.varlen_attention over the packed sequences: no
compute or memory is spent on padding anywhere in the block.

``packed_block_forward`` takes the reference ``Block`` module
(flipkern.reference.vit) itself, so the packed and the padded path share one set
of parameters (and checkpoints).
"""
from .attention import varlen_attention


def packed_attention_forward(attn, x, cu_seqlens, max_seqlen, causal=False):
    """The reference Attention module ``attn`` on packed tokens x [total, D] -> [total, D]."""
    total, D = x.shape
    H = attn.num_heads
    # [total, 3, H, Dh] and its three strided views: no copies before the kernel
    q, k, v = attn.qkv(x).view(total, 3, H, D // H).unbind(1)
    out = varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=getattr(attn, "scale", None))
    return attn.out_proj(out.reshape(total, D))


def packed_block_forward(block, x_packed, cu_seqlens, max_seqlen, causal=False):
    """One pre-norm transformer block on packed tokens: x [total, D] -> [total, D].

    Equals ``block(x_padded, key_padding_mask=..., causal=causal)`` at the valid
    positions of the padded batch.
    """
    if x_packed.dim() != 2:
        raise ValueError(f"flipkern.packed_block_forward: x_packed must be 2-D [total, D], "
                         f"got shape {tuple(x_packed.shape)}")
    x = x_packed + packed_attention_forward(block.attn, block.ln_1(x_packed), cu_seqlens, max_seqlen, causal)
    return x + block.mlp(block.ln_2(x))


def packed_blocks_forward(blocks, x_packed, cu_seqlens, max_seqlen, causal=False):
    """A stack of blocks (an iterable, e.g. nn.ModuleList) on packed tokens."""
    for block in blocks:
        x_packed = packed_block_forward(block, x_packed, cu_seqlens, max_seqlen, causal)
    return x_packed


__all__ = ["packed_attention_forward", "packed_block_forward", "packed_blocks_forward"]
