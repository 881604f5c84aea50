"""FLOPs of one step, counted by torch.utils.flop_counter with formulas for the ops it lacks.

The same convention for every case, so that the FLOP ratio of two cases is the
speedup that avoiding work alone can give:
  - matmuls and convolutions: torch's own formulas (2 per multiply-add).
  - attention (SDPA's CPU flash kernel, which torch has no formula for, its CUDA
    kernels, whose torch formulas ignore is_causal, and flipkern's varlen op):
    4 * Lq * Lk * Dh per head forward (Q K^T and P V), twice that backward; with
    is_causal / causal=True only the L(L+1)/2 pairs on and below the diagonal, as the
    kernels skip the masked blocks. A kernel
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


def _formula(packet, flops_of):
    """A FlopCounterMode formula for packet that calls flops_of({argument name: value}, backward)
    (the op's schema names its arguments; the real values are passed: cu_seqlens are needed)."""
    names = [a.name for a in packet.default._schema.arguments]
    backward = packet.default._schema.name.endswith(("_backward", "_backward_triton"))

    def count(*args, out_val=None, **kwargs):
        return flops_of({**dict(zip(names, args)), **kwargs}, backward)
    count._get_raw = True
    return count


def _sdpa_flops(a, backward):
    q, k = a["query"], a["key"]
    causal = bool(a.get("is_causal", False)) and a.get("attn_mask") is None and a.get("attn_bias") is None
    B, H, Lq, Dh = q.shape
    return attention_flops([Lq] * B, [k.shape[2]] * B, H, Dh, causal, backward)


def _varlen_flops(a, backward):
    lengths = a["cu_seqlens"].long().diff()
    return attention_flops(lengths, lengths, a["q"].shape[1], a["q"].shape[2], a["causal"], backward)


def _clip_loss_flops(a, backward):
    B, D = a["all_image"].shape
    return (4 if backward else 2) * a["local_batch"] * B * D


SDPA_OPS = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention")
FLIPKERN_OPS = {"varlen_attention": _varlen_flops, "clip_loss": _clip_loss_flops}


def _mapping():
    """Formulas for SDPA's kernels (replacing torch's, which ignore is_causal) and flipkern's ops."""
    from flipkern import _extension
    _extension.load()  # the C++ ops register on first use: make sure they exist to be counted
    aten, fk = torch.ops.aten, torch.ops.flipkern
    mapping = {}
    for name in SDPA_OPS:
        for op in (name, name + "_backward"):
            if hasattr(aten, op):
                mapping[getattr(aten, op)] = _formula(getattr(aten, op), _sdpa_flops)
    for name, flops_of in FLIPKERN_OPS.items():
        for op in (f"{name}_forward", f"{name}_backward", f"{name}_forward_triton", f"{name}_backward_triton"):
            if hasattr(fk, op):  # the C++ ops exist once the extension loaded
                mapping[getattr(fk, op)] = _formula(getattr(fk, op), flops_of)
    return mapping


def count_flops(fn):
    """(total FLOPs, {op: FLOPs}) of running fn() once."""
    with FlopCounterMode(display=False, custom_mapping=_mapping()) as counter:
        fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts()["Global"].items()}
    return int(counter.get_total_flops()), by_op
