"""Triton kernels for token dropping. Callers (flipkern/masking.py) check arguments."""
import torch
import triton
import triton.language as tl


def _acc_dtype(dtype):
    # fp32 math for fp16/bf16/fp32 (one rounding, like PyTorch's own add); fp64 stays fp64.
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_d(D):
    return min(1024, triton.next_power_of_2(max(D, 1)))


@triton.jit
def _drop_tokens_fwd(x_ptr, ids_ptr, pos_ptr, out_ptr, K, D,
                     sxb, sxn, sxd, sib, sik, spn, spd,
                     HAS_POS: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (row = b * K + k, block of D): out[b, k, :] = x[b, n, :] + pos[n, :], n = ids[b, k]
    row = tl.program_id(0)
    b = row // K
    k = row - b * K
    n = tl.load(ids_ptr + b * sib + k * sik)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    v = tl.load(x_ptr + b * sxb + n * sxn + d * sxd, mask=mask).to(ACC)
    if HAS_POS:
        v += tl.load(pos_ptr + n * spn + d * spd, mask=mask).to(ACC)
    tl.store(out_ptr + row * D + d, v.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _drop_tokens_bwd(g_ptr, ids_ptr, dx_ptr, K, N, D, sgb, sgk, sgd, sib, sik,
                     ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (b, block of D) walks the K kept rows of sample b in order: repeated
    # indices accumulate without atomics.
    b = tl.program_id(0)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    for k in range(0, K):
        n = tl.load(ids_ptr + b * sib + k * sik)
        g = tl.load(g_ptr + b * sgb + k * sgk + d * sgd, mask=mask).to(ACC)
        dst = dx_ptr + (b * N + n) * D + d
        acc = tl.load(dst, mask=mask).to(ACC) + g
        tl.store(dst, acc.to(dx_ptr.dtype.element_ty), mask=mask)


def drop_tokens(x, ids_keep, pos_embed):
    B, N, D = x.shape
    K = ids_keep.shape[1]
    out = torch.empty((B, K, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    BLOCK_D = _block_d(D)
    has_pos = pos_embed is not None
    pos = pos_embed if has_pos else x  # a placeholder pointer, never read
    _drop_tokens_fwd[(B * K, triton.cdiv(D, BLOCK_D))](
        x, ids_keep, pos, out, K, D, *x.stride(), *ids_keep.stride(),
        pos.stride(0) if has_pos else 0, pos.stride(1) if has_pos else 0,
        HAS_POS=has_pos, ACC=_acc_dtype(x.dtype), BLOCK_D=BLOCK_D)
    return out


def drop_tokens_backward(grad, ids_keep, num_tokens):
    B, K, D = grad.shape
    dx = torch.zeros((B, num_tokens, D), dtype=grad.dtype, device=grad.device)
    if grad.numel() == 0:
        return dx
    BLOCK_D = _block_d(D)
    _drop_tokens_bwd[(B, triton.cdiv(D, BLOCK_D))](
        grad, ids_keep, dx, K, num_tokens, D, *grad.stride(), *ids_keep.stride(),
        ACC=_acc_dtype(grad.dtype), BLOCK_D=BLOCK_D)
    return dx
