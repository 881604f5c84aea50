"""Variable-length (packed) attention: the public ops, their torch.library
registration (fake kernels, autograd) and the dispatch to a backend.

Packed layout (the flash-attention varlen convention): the tokens of B sequences
of lengths L_0 .. L_{B-1} are stacked as rows of one [total, ...] tensor,
sequence b owning rows cu_seqlens[b] .. cu_seqlens[b+1]-1 of the int32 offsets
cu_seqlens [B+1]. Attention runs within each sequence only; no padding is ever
computed.

Backends: ``cpu`` and ``cuda`` are the C++ op pair ``flipkern::varlen_attention_forward/_backward``
(csrc/attention_cpu.cpp: tiled ATen matmuls, parallel over sequences and heads;
csrc/attention_cuda.cu: a plain warp-per-row kernel, correct but not tuned);
``triton`` the Python custom ops ``flipkern::varlen_attention_forward_triton/_backward_triton``
(triton_kernels/attention.py), the fast GPU path and the default on CUDA tensors;
``reference`` is flipkern.reference.attention.
"""
import math

import torch

from . import _checks, _extension, backends
from ._dtypes import stat_dtype
from .reference import attention as ref

ALL_BACKENDS = ("reference", "cpu", "cuda", "triton")


# ----------------------------------------------------------------------------- packing helpers
# One implementation of each idea: the reference's, which are already single
# vectorized passes (no Python loop over the batch).

def cu_seqlens_from_lengths(lengths):
    """int lengths [B] -> int32 cu_seqlens [B+1] = [0, L_0, L_0+L_1, ...]."""
    op = "cu_seqlens_from_lengths"
    _checks.tensor(op, "lengths", lengths, dims=1, dtypes=_checks.INTEGER)
    _checks.lengths_values(op, "lengths", lengths, torch.iinfo(torch.int32).max)
    return ref.cu_seqlens_from_lengths(lengths)


def pack(x, lengths):
    """x [B, N, ...] padded (valid tokens first) -> (packed [total, ...], int32 cu_seqlens [B+1])."""
    op = "pack"
    _checks.tensor(op, "x", x)
    _checks.tensor(op, "lengths", lengths, dims=1, dtypes=_checks.INTEGER, device=x.device)
    if x.dim() < 2:
        _checks.fail(op, f"x must be at least 2-D [B, N, ...], got shape {tuple(x.shape)}")
    if lengths.shape[0] != x.shape[0]:
        _checks.fail(op, f"lengths has {lengths.shape[0]} entries but x has batch {x.shape[0]}")
    _checks.lengths_values(op, "lengths", lengths, x.shape[1])
    return ref.pack(x, lengths)


def unpack(packed, cu_seqlens, max_len):
    """packed [total, ...] -> [B, max_len, ...], zeros after each sequence's end."""
    op = "unpack"
    _checks.tensor(op, "packed", packed)
    _checks.tensor(op, "cu_seqlens", cu_seqlens, dims=1, dtypes=(torch.int32, torch.int64),
                   device=packed.device)
    if packed.dim() < 1:
        _checks.fail(op, "packed must be at least 1-D [total, ...], got a 0-d tensor")
    if cu_seqlens.shape[0] < 1:
        _checks.fail(op, "cu_seqlens must have B+1 >= 1 entries, got an empty tensor")
    if isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 0:
        _checks.fail(op, f"max_len must be an int >= 0, got {max_len!r}")
    _checks.cu_seqlens_values(op, cu_seqlens, packed.shape[0], max_len, rows_of="packed")
    return ref.unpack(packed, cu_seqlens, max_len)


def packed_from_padding_mask(x, key_padding_mask):
    """x [B, N, ...] and key_padding_mask [B, N] (True = padding, as in
    nn.MultiheadAttention) -> (packed [total, ...], cu_seqlens, max_seqlen).

    The valid tokens of each sample are packed in order (they need not come
    first). max_seqlen is a Python int (one device sync on CUDA).
    """
    op = "packed_from_padding_mask"
    _checks.tensor(op, "x", x)
    _checks.tensor(op, "key_padding_mask", key_padding_mask, dims=2, dtypes=(torch.bool,),
                   device=x.device)
    if tuple(key_padding_mask.shape) != tuple(x.shape[:2]):
        _checks.fail(op, f"key_padding_mask must be [B, N] = {list(x.shape[:2])}, "
                         f"got {list(key_padding_mask.shape)}")
    lengths = ref.lengths_from_padding_mask(key_padding_mask)
    cu = ref.cu_seqlens_from_lengths(lengths)
    max_seqlen = int(lengths.max()) if lengths.numel() else 0
    return x[~key_padding_mask], cu, max_seqlen


# ----------------------------------------------------------------------------- checks

def _check_structure(op, q, k, v, cu_seqlens, max_seqlen):
    """Shapes, dtypes, devices and types only (no values): runs under torch.compile."""
    _checks.floating(op, "q", q, dims=3)
    for name, t in (("k", k), ("v", v)):
        _checks.floating(op, name, t, dims=3, device=q.device)
        if t.shape != q.shape:
            _checks.fail(op, f"{name} has shape {list(t.shape)} but q has shape {list(q.shape)} "
                             f"(q, k, v must all be [total, H, Dh])")
        if t.dtype != q.dtype:
            _checks.fail(op, f"{name} dtype {t.dtype} differs from q dtype {q.dtype}")
    if q.shape[2] < 1:
        _checks.fail(op, "q must have a head dim Dh >= 1")
    _checks.tensor(op, "cu_seqlens", cu_seqlens, dims=1, dtypes=(torch.int32,), device=q.device)
    if cu_seqlens.shape[0] < 1:
        _checks.fail(op, "cu_seqlens must have B+1 >= 1 entries, got an empty tensor")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, (int, torch.SymInt)):
        _checks.fail(op, f"max_seqlen must be an int, got {type(max_seqlen).__name__}")
    if max_seqlen < 0:
        _checks.fail(op, f"max_seqlen must be >= 0, got {max_seqlen}")


def _resolve_scale(op, scale, Dh):
    if scale is None:
        return 1.0 / math.sqrt(Dh)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, torch.SymFloat, torch.SymInt)):
        _checks.fail(op, f"scale must be a float or None, got {type(scale).__name__}")
    return float(scale)


# ----------------------------------------------------------------------------- varlen_attention

def varlen_attention(q, k, v, cu_seqlens, max_seqlen, *, causal=False, scale=None):
    """Attention within each packed sequence: q, k, v [total, H, Dh] -> [total, H, Dh].

    cu_seqlens: int32 [B+1] offsets (B = 0 and zero-length sequences allowed);
    max_seqlen: an int >= every length (sizes the kernel grid); causal: key j
    is seen by query i only when j <= i (positions within the sequence); scale:
    multiplies q k^T, default 1/sqrt(Dh). float32/bfloat16/float16 (and float64)
    with float32 accumulation. The forward keeps only the per-row logsumexp for
    the backward (no [L, L] matrix is stored).
    """
    op = "varlen_attention"
    _check_structure(op, q, k, v, cu_seqlens, max_seqlen)
    if not isinstance(causal, bool):
        _checks.fail(op, f"causal must be a bool, got {type(causal).__name__}")
    scale = _resolve_scale(op, scale, q.shape[2])
    backend = backends.select(op, q.device, ALL_BACKENDS)
    if backend == "reference":
        if not torch.compiler.is_compiling():  # reads the values: eager only, as for masking
            _checks.cu_seqlens_values(op, cu_seqlens, q.shape[0], max_seqlen)
        return ref.varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal=causal, scale=scale)
    if backend == "triton":
        return varlen_attention_forward_triton(q, k, v, cu_seqlens, max_seqlen, causal, scale)[0]
    return torch.ops.flipkern.varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)[0]


def _forward_fake(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    total, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((H, total), dtype=stat_dtype(q.dtype))


def _backward_fake(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, causal, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens)
    ctx.max_seqlen, ctx.causal, ctx.scale = max_seqlen, causal, scale
    ctx.mark_non_differentiable(lse)


def _autograd(backward_op):
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse, cu_seqlens = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        dq, dk, dv = backward_op(grad_out, q, k, v, out, lse, cu_seqlens, ctx.max_seqlen,
                                 ctx.causal, ctx.scale)
        need = ctx.needs_input_grad
        return (dq if need[0] else None, dk if need[1] else None, dv if need[2] else None,
                None, None, None, None)
    return backward


@torch.library.custom_op("flipkern::varlen_attention_forward_triton", mutates_args=())
def varlen_attention_forward_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    from .triton_kernels import attention as tk
    op = "varlen_attention"
    _check_structure(op, q, k, v, cu_seqlens, max_seqlen)
    _checks.cu_seqlens_values(op, cu_seqlens, q.shape[0], max_seqlen)
    return tk.varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale)


@torch.library.custom_op("flipkern::varlen_attention_backward_triton", mutates_args=())
def varlen_attention_backward_triton(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                                v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                                cu_seqlens: torch.Tensor, max_seqlen: int, causal: bool,
                                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_kernels import attention as tk
    op = "varlen_attention_backward"
    _check_structure(op, q, k, v, cu_seqlens, max_seqlen)
    for name, t in (("grad_out", grad_out), ("out", out)):
        if t.shape != q.shape or t.device != q.device:
            _checks.fail(op, f"{name} must be like q ({list(q.shape)} on {q.device}), "
                             f"got {list(t.shape)} on {t.device}")
    if tuple(lse.shape) != (q.shape[1], q.shape[0]):
        _checks.fail(op, f"lse must be [H, total] = {[q.shape[1], q.shape[0]]}, got {list(lse.shape)}")
    _checks.cu_seqlens_values(op, cu_seqlens, q.shape[0], max_seqlen)
    return tk.varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale)


varlen_attention_forward_triton.register_fake(_forward_fake)
varlen_attention_backward_triton.register_fake(_backward_fake)
torch.library.register_autograd("flipkern::varlen_attention_forward_triton",
                                _autograd(varlen_attention_backward_triton), setup_context=_setup)


# ----------------------------------------------------------------------------- registration

def _register_cpp_ops():
    """Fake kernels and autograd for the C++ ops; runs once the extension is loaded."""
    torch.library.register_fake("flipkern::varlen_attention_forward")(_forward_fake)
    torch.library.register_fake("flipkern::varlen_attention_backward")(_backward_fake)
    torch.library.register_autograd(
        "flipkern::varlen_attention_forward", _autograd(torch.ops.flipkern.varlen_attention_backward),
        setup_context=_setup)


_extension.on_load(_register_cpp_ops)
