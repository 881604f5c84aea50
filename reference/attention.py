"""Attention, dense and variable-length (packed).

Dense: q, k, v [B, H, N, Dh]; key_padding_mask [B, N] bool, True = padding (the
nn.MultiheadAttention convention). A row with every key masked gives NaN.
Packed (the flash-attention varlen layout): the tokens of B sequences stacked as
rows of one [total, ...] tensor, sequence b owning rows cu_seqlens[b] ..
cu_seqlens[b+1]-1 of int32 offsets cu_seqlens [B+1].
"""
import math

import torch


def attention(q, k, v, key_padding_mask=None, causal=False, scale=None):
    """softmax(q k^T * scale + masks) v, in the inputs' dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        s = s.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
    if causal:
        n_q, n_k = s.shape[-2], s.shape[-1]
        future = torch.ones(n_q, n_k, dtype=torch.bool, device=s.device).triu(1)
        s = s.masked_fill(future, float("-inf"))
    return torch.matmul(s.softmax(dim=-1), v)


def cu_seqlens_from_lengths(lengths):
    """lengths [B] -> int32 [B+1] = [0, L_0, L_0+L_1, ...]."""
    cu = torch.zeros(lengths.shape[0] + 1, dtype=torch.int32, device=lengths.device)
    cu[1:] = torch.cumsum(lengths, 0)
    return cu


def lengths_from_padding_mask(key_padding_mask):
    """[B, N] bool (True = padding) -> the number of valid tokens per sample [B]."""
    return (~key_padding_mask).sum(dim=1)


def _valid(lengths, n):
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


def pack(x, lengths):
    """x [B, N, ...] with each sample's valid tokens first -> (packed [total, ...], cu_seqlens)."""
    if lengths.numel() and (int(lengths.min()) < 0 or int(lengths.max()) > x.shape[1]):
        raise ValueError(f"lengths must be in [0, {x.shape[1]}]")
    return x[_valid(lengths, x.shape[1])], cu_seqlens_from_lengths(lengths)


def unpack(packed, cu_seqlens, max_len):
    """packed [total, ...] -> [B, max_len, ...], zeros after each sequence's end."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if lengths.numel() and int(lengths.max()) > max_len:
        raise ValueError(f"max_len {max_len} is shorter than a sequence ({int(lengths.max())})")
    out = packed.new_zeros((lengths.shape[0], max_len) + tuple(packed.shape[1:]))
    return out.index_put((_valid(lengths, max_len),), packed)


def varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=False, scale=None):
    """q, k, v [total, H, Dh] packed -> [total, H, Dh]: attention within each sequence.

    The oracle: a plain loop over the sequences. max_seqlen only has to bound
    the lengths (it is what a kernel sizes its grid by).
    """
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end - start > max_seqlen:
            raise ValueError(f"a sequence of length {end - start} exceeds max_seqlen {max_seqlen}")
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, L, Dh]
        outs.append(attention(qs, ks, vs, causal=causal, scale=scale).transpose(0, 1))
    if not outs:  # B = 0, so total = 0: attention over no tokens (keeps the autograd graph)
        qs, ks, vs = (t.transpose(0, 1) for t in (q, k, v))
        return attention(qs, ks, vs, causal=causal, scale=scale).transpose(0, 1)
    return torch.cat(outs, 0)
