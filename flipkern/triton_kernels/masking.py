"""Triton kernels for token dropping. Callers (flipkern/masking.py) check arguments."""
import torch
import triton
import triton.language as tl

from ._tiles import acc_type, launcher


def _block_d(D):
    return min(1024, triton.next_power_of_2(max(D, 1)))


@triton.jit
def _drop_tokens_fwd(x_ptr, ids_ptr, pos_ptr, out_ptr, K, D,
                     sxb, sxn, sxd, sib, sik, spn, spd,
                     HAS_POS: tl.constexpr, ACC: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (row = b * K + k, block of D): out[b, k, :] = x[b, n, :] + pos[n, :], n = ids[b, k]
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * D and b * (sample stride) may pass 2**31
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
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * (sample stride) may pass 2**31
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    for k in range(0, K):
        n = tl.load(ids_ptr + b * sib + k * sik)
        g = tl.load(g_ptr + b * sgb + k * sgk + d * sgd, mask=mask).to(ACC)
        dst = dx_ptr + (b * N + n) * D + d
        acc = tl.load(dst, mask=mask).to(ACC) + g
        tl.store(dst, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _patch_offsets(n, e, p, grid_w, sc, sh, sw):
    # The same index math as csrc/masking_index.h (patch_origin + patch_element), for
    # images [B, C, H, W]: patch n at grid (n // grid_w, n % grid_w), element e of its
    # (C, p, p) flattening at channel e // p^2, row (e // p) % p, column e % p.
    gy = n // grid_w
    gx = n - gy * grid_w
    c = e // (p * p)
    r = e - c * (p * p)
    i = r // p
    j = r - i * p
    return gy * p * sh + gx * p * sw + c * sc + i * sh + j * sw


@triton.jit
def _gather_patches_fwd(img_ptr, ids_ptr, out_ptr, K, E, p, grid_w, sib_img, sc, sh, sw, sib, sik,
                        BLOCK: tl.constexpr):
    # program (row = b * K + k, block of E): out[b, k, e] = the e-th value of patch ids[b, k]
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * D and b * (sample stride) may pass 2**31
    b = row // K
    k = row - b * K
    n = tl.load(ids_ptr + b * sib + k * sik)
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = e < E
    v = tl.load(img_ptr + b * sib_img + _patch_offsets(n, e, p, grid_w, sc, sh, sw), mask=mask)
    tl.store(out_ptr + row * E + e, v, mask=mask)


@triton.jit
def _gather_patches_bwd(g_ptr, ids_ptr, dimg_ptr, K, E, p, grid_w, sib_img, sc, sh, sw,
                        sgb, sgk, sge, sib, sik, ACC: tl.constexpr, BLOCK: tl.constexpr):
    # program (b, block of E) walks the K kept patches of sample b in order: a repeated
    # patch accumulates without atomics.
    b = tl.program_id(0).to(tl.int64)  # 64-bit: b * (sample stride) may pass 2**31
    e = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = e < E
    for k in range(0, K):
        n = tl.load(ids_ptr + b * sib + k * sik)
        dst = dimg_ptr + b * sib_img + _patch_offsets(n, e, p, grid_w, sc, sh, sw)
        g = tl.load(g_ptr + b * sgb + k * sgk + e * sge, mask=mask).to(ACC)
        acc = tl.load(dst, mask=mask).to(ACC) + g
        tl.store(dst, acc.to(dimg_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _restore_tokens_fwd(x_ptr, inv_ptr, fill_ptr, out_ptr, N, D, sxb, sxk, sxd, sf,
                        BLOCK_D: tl.constexpr):
    # program (row = b * N + n, block of D): x[b, inv[b, n]] where a kept token owns the
    # position (inv >= 0), else fill
    row = tl.program_id(0).to(tl.int64)  # 64-bit: row * D and b * (sample stride) may pass 2**31
    b = row // N
    k = tl.load(inv_ptr + row)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = d < D
    if k >= 0:
        v = tl.load(x_ptr + b * sxb + k * sxk + d * sxd, mask=mask)
    else:
        v = tl.load(fill_ptr + d * sf, mask=mask)
    tl.store(out_ptr + row * D + d, v, mask=mask)


@launcher("drop_tokens")
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
        HAS_POS=has_pos, ACC=acc_type(x.dtype), BLOCK_D=BLOCK_D)
    return out


@launcher("drop_tokens_backward")
def drop_tokens_backward(grad, ids_keep, num_tokens):
    B, K, D = grad.shape
    dx = torch.zeros((B, num_tokens, D), dtype=grad.dtype, device=grad.device)
    if grad.numel() == 0:
        return dx
    BLOCK_D = _block_d(D)
    _drop_tokens_bwd[(B, triton.cdiv(D, BLOCK_D))](
        grad, ids_keep, dx, K, num_tokens, D, *grad.stride(), *ids_keep.stride(),
        ACC=acc_type(grad.dtype), BLOCK_D=BLOCK_D)
    return dx


@launcher("gather_patches")
def gather_patches(images, ids_keep, patch_size):
    B, C, H, W = images.shape
    K, p = ids_keep.shape[1], patch_size
    E = C * p * p
    out = torch.empty((B, K, E), dtype=images.dtype, device=images.device)
    if out.numel() == 0:
        return out
    BLOCK = _block_d(E)
    _gather_patches_fwd[(B * K, triton.cdiv(E, BLOCK))](
        images, ids_keep, out, K, E, p, W // p, *images.stride(), *ids_keep.stride(), BLOCK=BLOCK)
    return out


@launcher("gather_patches_backward")
def gather_patches_backward(grad, ids_keep, image_shape, patch_size):
    B, C, H, W = image_shape
    K, p = ids_keep.shape[1], patch_size
    E = C * p * p
    dimages = torch.zeros(image_shape, dtype=grad.dtype, device=grad.device)
    if grad.numel() == 0:
        return dimages
    BLOCK = _block_d(E)
    _gather_patches_bwd[(B, triton.cdiv(E, BLOCK))](
        grad, ids_keep, dimages, K, E, p, W // p, *dimages.stride(), *grad.stride(),
        *ids_keep.stride(), ACC=acc_type(grad.dtype), BLOCK=BLOCK)
    return dimages


@launcher("restore_tokens")
def restore_tokens(x_vis, inverse, fill):
    """inverse: int64 [B, N], the k that owns each position or -1 (flipkern._checks.keep_inverse)."""
    B, K, D = x_vis.shape
    N = inverse.shape[1]
    out = torch.empty((B, N, D), dtype=x_vis.dtype, device=x_vis.device)
    if out.numel() == 0:
        return out
    BLOCK_D = _block_d(D)
    _restore_tokens_fwd[(B * N, triton.cdiv(D, BLOCK_D))](
        x_vis, inverse.contiguous(), fill, out, N, D, *x_vis.stride(), fill.stride(0), BLOCK_D=BLOCK_D)
    return out
