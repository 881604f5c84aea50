"""FLOPs of one step, counted by torch.utils.flop_counter with formulas for the ops it lacks.

The same convention for every case, so that the FLOP ratio of two cases is the
speedup that avoiding work alone can give:
  - matmuls and convolutions: torch's own formulas (2 per multiply-add).
  - attention (SDPA's CPU flash kernel, which torch has no formula for, its other
    kernels, and flipkern's varlen op): 4 * Lq * Lk * Dh per head forward (Q K^T and
    P V), twice that backward; with is_causal / causal=True only the L(L+1)/2 pairs
    on and below the diagonal, as the kernels skip the masked blocks. A kernel
    given an explicit mask (open_clip's causal mask) computes every pair and is
    counted so.
  - flipkern's chunked CLIP loss: the useful work of the full-matrix loss, one
    [B_local, B] x D product forward and two backward. (At batch 32 it is
    < 0.01% of a step either way.)
  - gathers, copies, norms and elementwise ops: 0 (torch's convention).
"""
import torch
from torch.utils.flop_counter import FlopCounterMode


def attention_flops(lengths_q, lengths_k, heads, head_dim, causal, backward=False):
    """FLOPs of attention over sequences with these query / key lengths (ints or int tensors)."""
    lq = torch.as_tensor(lengths_q, dtype=torch.float64)
    lk = torch.as_tensor(lengths_k, dtype=torch.float64)
    pairs = lq * (lq + 1) / 2 if causal else lq * lk
    fwd = 4 * float(pairs.sum()) * heads * head_dim
    return 2 * fwd if backward else fwd


def _raw(fn):
    fn._get_raw = True  # FlopCounterMode passes the real arguments (cu_seqlens values are needed)
    return fn


def _sdpa(backward):
    def count(*args, out_val=None, **kwargs):
        q, k = (args[1], args[2]) if backward else (args[0], args[1])
        is_causal = (args[7] if len(args) > 7 else kwargs.get("is_causal", False)) if backward else \
            (args[4] if len(args) > 4 else kwargs.get("is_causal", False))
        causal = bool(is_causal) and kwargs.get("attn_mask") is None
        B, H, Lq, Dh = q.shape
        return attention_flops([Lq] * B, [k.shape[2]] * B, H, Dh, causal, backward)
    return _raw(count)


def _varlen(backward):
    def count(*args, out_val=None, **kwargs):
        q, cu, causal = (args[1], args[6], args[8]) if backward else (args[0], args[3], args[5])
        lengths = cu.long().diff()
        return attention_flops(lengths, lengths, q.shape[1], q.shape[2], causal, backward)
    return _raw(count)


def _clip_loss(backward):
    def count(*args, out_val=None, **kwargs):
        all_image, local_batch = (args[1], args[7]) if backward else (args[0], args[4])
        B, D = all_image.shape
        return (4 if backward else 2) * local_batch * B * D
    return _raw(count)


def _mapping():
    aten, fk = torch.ops.aten, torch.ops.flipkern
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa(False),
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa(True)}
    for suffix in ("", "_triton"):
        for name, formula in (("varlen_attention_fwd", _varlen(False)), ("varlen_attention_bwd", _varlen(True)),
                              ("clip_loss_fwd", _clip_loss(False)), ("clip_loss_bwd", _clip_loss(True))):
            if hasattr(fk, name + suffix):  # the C++ ops exist once the extension loaded
                mapping[getattr(fk, name + suffix)] = formula
    return mapping


def count_flops(fn):
    """(total FLOPs, {op: FLOPs}) of running fn() once."""
    with FlopCounterMode(display=False, custom_mapping=_mapping()) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op
