"""Triton kernels for the chunked contrastive losses (CLIP softmax, SigLIP sigmoid).

Callers (flipkern/losses.py) check arguments. A pass is the logits matrix
S = scale * A @ B^T (+ bias) of A [R, D] (this rank's samples of one tower) against
B [N, D] (all samples of the other); row i's positive pair is column offset + i.
The matrix is never stored: every kernel computes its [BLOCK_M, BLOCK_N] tiles with
tl.dot over D in BLOCK_K steps and keeps per-row statistics only.

Forward, one program per (block of rows, part of the columns), walking the column
blocks of its part:
  softmax: online logsumexp of each row over the part -> [parts, R], merged by a
           logsumexp over the parts -> lse [R];
  sigmoid: sum of softplus over the part -> [parts, R], summed -> [R].
CLIP runs two passes, (images, all texts) and (texts, all images); on one process
the second is the columns of the first, and its lse is what the backward needs.
Backward recomputes the tiles and turns them into G = dLoss/dS:
  softmax: coef * (exp(S - lse_row) [+ exp(S - lse_col)]) - pos_coef on the positives;
  sigmoid: coef * sigmoid(S + bias) - coef on the positives.
dA = scale * G @ B comes from programs over (row block, D block, part of the columns)
walking the column blocks of their part, dB = scale * G^T @ A from programs over
(column block, D block, part of the rows): every element of the per-part results
has one writer, and the parts are summed in a fixed order afterwards (no atomics;
bitwise reproducible). The row programs also write sum_j G * (A B^T) and sum_j G
per row, for the scale and bias gradients. Splitting the walked dimension into parts
(_splits) keeps a small local batch (256 rows: 4 row blocks) from leaving most SMs idle.
scale, bias and the incoming gradient are read from device memory (no host sync).

Products take the input dtype (bf16/fp16 on tensor cores; fp32 as tf32x3 on tensor
cores, fp64 in full precision: _tiles.dot_precision) and accumulate in fp32 (fp64 for fp64);
G is rounded to the input dtype before the G @ B products, as in flash-attention.
"""
import torch
import triton
import triton.language as tl

from .._dtypes import stat_dtype
from ._tiles import acc_type, dot_precision, gpu_tiles, interpreter_upcast, launcher, mm


def _blocks(D, dtype, device):
    """(BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_D, num_warps): tile, D step of the products,
    D block of the gradient accumulators. The backward recomputes a tile once per D
    block, so BLOCK_D is as wide as the registers allow ([64, 256] fp32 over 8 warps)."""
    if not gpu_tiles(device):  # the interpreter: the smallest tiles tl.dot takes
        return 16, 16, 16, 16, 1
    if dtype == torch.float64:
        return 32, 32, 16, min(64, max(16, triton.next_power_of_2(D))), 4
    bd = min(256, max(16, triton.next_power_of_2(D)))
    warps = 8 if bd > 128 else 4
    return 64, 64, (64 if dtype.itemsize <= 2 else 32), bd, warps


@triton.jit
def _tile(A, B, rows, cols, row_ok, col_ok, D, sa0, sa1, sb0, sb1,
          ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """A[rows] @ B[cols]^T, unscaled: [BLOCK_M, BLOCK_N] in ACC."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in range(0, D, BLOCK_K):
        kk = k0 + offs_k
        k_ok = kk < D
        a = tl.load(A + rows[:, None] * sa0 + kk[None, :] * sa1,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        bT = tl.load(B + cols[None, :] * sb0 + kk[:, None] * sb1,
                     mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        acc += mm(a, bT, PREC, ACC, UPCAST)
    return acc


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(x)))


@triton.jit
def _fwd_kernel(A, B, OUT, SCALE, BIAS, R, N, D, span, sa0, sa1, sb0, sb1,
                SOFTMAX: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # program (row block, column split): OUT[split, i] = logsumexp (softmax) or sum of
    # softplus(S_ij + bias) (sigmoid) over the columns j of this split.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    split = tl.program_id(1)
    lo = split * span
    scale = tl.load(SCALE).to(ACC)
    bias = tl.load(BIAS).to(ACC)
    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    for n0 in range(lo, tl.minimum(N, lo + span), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        s = _tile(A, B, rows, cols, row_ok, col_ok, D, sa0, sa1, sb0, sb1,
                  ACC, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K) * scale
        if SOFTMAX:
            # every block holds at least one valid column: m_new is finite
            s = tl.where(col_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
            m_i = m_new
        else:
            l_i += tl.sum(tl.where(col_ok[None, :], _softplus(s + bias), 0.0), 1)
    if SOFTMAX:
        tl.store(OUT + split * R + rows, m_i + tl.log(l_i), mask=row_ok)
    else:
        tl.store(OUT + split * R + rows, l_i, mask=row_ok)


@triton.jit
def _sigmoid(x):
    # exp of -|x| only: no overflow for logits far from zero
    z = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + z), z / (1.0 + z))


@triton.jit
def _grad_tile(raw, rows, cols, row_ok, col_ok, la, lb, scale, bias, coef, pos_coef, offset,
               SOFTMAX: tl.constexpr, HAS_COL: tl.constexpr):
    """G = dLoss/dS of a tile, zero outside the matrix."""
    x = raw * scale
    if SOFTMAX:
        g = tl.exp(x - la[:, None])
        if HAS_COL:
            g += tl.exp(x - lb[None, :])
    else:
        g = _sigmoid(x + bias)
    g = g * coef
    g = tl.where(cols[None, :] == rows[:, None] + offset, g - pos_coef, g)
    return tl.where(row_ok[:, None] & col_ok[None, :], g, 0.0)


@triton.jit
def _bwd_rows_kernel(A, B, LA, LB, DA, PART, SCALE, BIAS, GRAD, R, N, D, span, offset, coef_div, pos_mult,
                     sa0, sa1, sb0, sb1, sda_split, sda0,
                     SOFTMAX: tl.constexpr, HAS_COL: tl.constexpr, ACC: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (row block, D block, column split): DA[split, rows, d] = scale * sum_j G_ij B[j, d]
    # over the columns j of the split; the D block 0 programs also write
    # PART[split, 0, i] = sum_j G_ij (A B^T)_ij and PART[split, 1, i] = sum_j G_ij.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    lo = split * span
    row_ok = rows < R
    d_ok = dd < D
    scale = tl.load(SCALE).to(ACC)
    bias = tl.load(BIAS).to(ACC)
    coef = tl.load(GRAD).to(ACC) / coef_div
    la = tl.load(LA + rows, mask=row_ok, other=0.0) if SOFTMAX else tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    dsc = tl.zeros([BLOCK_M], ACC)
    dbi = tl.zeros([BLOCK_M], ACC)
    for n0 in range(lo, tl.minimum(N, lo + span), BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = cols < N
        raw = _tile(A, B, rows, cols, row_ok, col_ok, D, sa0, sa1, sb0, sb1,
                    ACC, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        lb = tl.load(LB + cols, mask=col_ok, other=0.0) if HAS_COL else tl.zeros([BLOCK_N], ACC)
        g = _grad_tile(raw, rows, cols, row_ok, col_ok, la, lb, scale, bias, coef,
                       coef * pos_mult, offset, SOFTMAX, HAS_COL)
        b = tl.load(B + cols[:, None] * sb0 + dd[None, :] * sb1,
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc += mm(g.to(b.dtype), b, PREC, ACC, UPCAST)
        dsc += tl.sum(g * raw, 1)
        dbi += tl.sum(g, 1)
    tl.store(DA + split.to(tl.int64) * sda_split + rows[:, None] * sda0 + dd[None, :], acc * scale,
             mask=row_ok[:, None] & d_ok[None, :])
    if tl.program_id(1) == 0:
        tl.store(PART + split * 2 * R + rows, dsc, mask=row_ok)
        tl.store(PART + split * 2 * R + R + rows, dbi, mask=row_ok)


@triton.jit
def _bwd_cols_kernel(A, B, LA, LB, DB, SCALE, BIAS, GRAD, R, N, D, span, offset, coef_div, pos_mult,
                     sa0, sa1, sb0, sb1, sdb_split, sdb0,
                     SOFTMAX: tl.constexpr, HAS_COL: tl.constexpr, ACC: tl.constexpr,
                     PREC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    # program (column block, D block, row split): DB[split, cols, d] = scale * sum_i G_ij A[i, d]
    # over the rows i of the split.
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    dd = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    split = tl.program_id(2)
    lo = split * span
    col_ok = cols < N
    d_ok = dd < D
    scale = tl.load(SCALE).to(ACC)
    bias = tl.load(BIAS).to(ACC)
    coef = tl.load(GRAD).to(ACC) / coef_div
    lb = tl.load(LB + cols, mask=col_ok, other=0.0) if HAS_COL else tl.zeros([BLOCK_N], ACC)
    acc = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for m0 in range(lo, tl.minimum(R, lo + span), BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = rows < R
        raw = _tile(A, B, rows, cols, row_ok, col_ok, D, sa0, sa1, sb0, sb1,
                    ACC, PREC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K)
        la = tl.load(LA + rows, mask=row_ok, other=0.0) if SOFTMAX else tl.zeros([BLOCK_M], ACC)
        g = _grad_tile(raw, rows, cols, row_ok, col_ok, la, lb, scale, bias, coef,
                       coef * pos_mult, offset, SOFTMAX, HAS_COL)
        a = tl.load(A + rows[:, None] * sa0 + dd[None, :] * sa1,
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        acc += mm(tl.trans(g.to(a.dtype)), a, PREC, ACC, UPCAST)
    tl.store(DB + split.to(tl.int64) * sdb_split + cols[:, None] * sdb0 + dd[None, :], acc * scale,
             mask=col_ok[:, None] & d_ok[None, :])


# ----------------------------------------------------------------------------- launchers

def _meta(x):
    BM, BN, BK, BD, warps = _blocks(x.shape[1], x.dtype, x.device)
    return dict(ACC=acc_type(x.dtype), PREC=dot_precision(x.dtype), UPCAST=interpreter_upcast(x),
                BLOCK_M=BM, BLOCK_N=BN,
                BLOCK_K=BK, num_warps=warps), BD


# A grid of about this many programs fills a GPU (4 per SM of an H100's 132): the walked
# dimension (columns for the row programs, rows for the column programs) is split into
# parts until the grid has that many, so a local batch of 256 runs on every SM. The same
# number on every device (not the SM count), so the results do not depend on the GPU.
TARGET_PROGRAMS = 512
# Elements of one backward pass's per-split gradient partials at most (32 MiB in fp32).
PARTIAL_ELEMENTS = 1 << 23


def _splits(programs, extent, block, partial_size=0):
    """(parts, span): the walked dimension of ``extent`` in blocks of ``block`` split into
    ``parts`` non-empty ranges of ``span`` (a multiple of block), for a grid of ``programs``
    programs per part whose partial results have ``partial_size`` elements per part."""
    blocks = triton.cdiv(extent, block)
    parts = min(blocks, triton.cdiv(TARGET_PROGRAMS, programs))
    if partial_size:
        parts = min(parts, max(1, PARTIAL_ELEMENTS // partial_size))
    span = triton.cdiv(blocks, max(parts, 1)) * block
    return triton.cdiv(extent, span), span


def _row_stats(A, B, scale, bias, softmax):
    """Per row of A: logsumexp of its logits (softmax) or the sum of their softplus."""
    R, D = A.shape
    N = B.shape[0]
    meta, _ = _meta(A)
    row_blocks = triton.cdiv(R, meta["BLOCK_M"])
    parts, span = _splits(row_blocks, N, meta["BLOCK_N"])
    out = torch.empty((parts, R), dtype=stat_dtype(A.dtype), device=A.device)
    _fwd_kernel[(row_blocks, parts)](
        A, B, out, scale, bias, R, N, D, span, *A.stride(), *B.stride(), SOFTMAX=softmax, **meta)
    # merge the parts in a fixed order (no atomics): the same bits on every run
    return torch.logsumexp(out, 0) if softmax else out.sum(0)


def _pass_backward(grad, A, B, la, lb, scale, bias, offset, coef_div, pos_mult, softmax):
    """One pass: (dA [R, D], dB [N, D]) in the accumulation dtype, and the per-row
    partials [2, R] of the scale and bias gradients."""
    R, D = A.shape
    N = B.shape[0]
    acc = stat_dtype(A.dtype)
    meta, BD = _meta(A)
    has_col = lb is not None
    la = la if softmax else scale  # placeholders, never read
    lb = lb if has_col else scale
    common = dict(SOFTMAX=softmax, HAS_COL=has_col, BLOCK_D=BD, **meta)
    d_blocks = triton.cdiv(D, BD)
    row_blocks, col_blocks = triton.cdiv(R, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])
    parts, span = _splits(row_blocks * d_blocks, N, meta["BLOCK_N"], R * D)
    dA = torch.empty((parts, R, D), dtype=acc, device=A.device)
    part = torch.empty((parts, 2, R), dtype=acc, device=A.device)
    _bwd_rows_kernel[(row_blocks, d_blocks, parts)](
        A, B, la, lb, dA, part, scale, bias, grad, R, N, D, span, offset, coef_div, pos_mult,
        *A.stride(), *B.stride(), dA.stride(0), dA.stride(1), **common)
    parts, span = _splits(col_blocks * d_blocks, R, meta["BLOCK_M"], N * D)
    dB = torch.empty((parts, N, D), dtype=acc, device=A.device)
    _bwd_cols_kernel[(col_blocks, d_blocks, parts)](
        A, B, la, lb, dB, scale, bias, grad, R, N, D, span, offset, coef_div, pos_mult,
        *A.stride(), *B.stride(), dB.stride(0), dB.stride(1), **common)
    # merge the parts in a fixed order (no atomics): the same bits on every run
    return dA.sum(0), dB.sum(0), part.sum(0)


def _positive_sum(a, b, scale):
    acc = stat_dtype(a.dtype)
    return (a.to(acc) * b.to(acc)).sum() * scale.to(acc)


@launcher("clip_loss")
def clip_loss_forward(all_image, all_text, scale, offset, b):
    I_loc, T_loc = all_image[offset:offset + b], all_text[offset:offset + b]
    # Two row passes (on one process the second one gives the columns of the first):
    # programs own rows, so column statistics would need a second walk anyway.
    lse_image = _row_stats(I_loc, all_text, scale, scale, True)  # bias unused: any pointer
    lse_text = _row_stats(T_loc, all_image, scale, scale, True)
    pos = _positive_sum(I_loc, T_loc, scale)
    loss = (lse_image.sum() + lse_text.sum() - 2 * pos) / (2 * b)
    return loss.to(all_image.dtype), lse_image, lse_text


@launcher("clip_loss_backward")
def clip_loss_backward(grad, all_image, all_text, scale, lse_image, lse_text, offset, b):
    if b == all_image.shape[0]:  # one matrix, both softmaxes: each positive is in both directions
        dI, dT, part = _pass_backward(grad, all_image, all_text, lse_image, lse_text, scale, scale,
                                      0, 2.0 * b, 2.0, True)
        dscale = part[0].sum()
    else:
        sl = slice(offset, offset + b)
        dI_loc, dT_all, part_i = _pass_backward(grad, all_image[sl], all_text, lse_image, None, scale,
                                                scale, offset, 2.0 * b, 1.0, True)
        dT_loc, dI_all, part_t = _pass_backward(grad, all_text[sl], all_image, lse_text, None, scale,
                                                scale, offset, 2.0 * b, 1.0, True)
        dI, dT = dI_all, dT_all
        dI[sl] += dI_loc
        dT[sl] += dT_loc
        dscale = part_i[0].sum() + part_t[0].sum()
    return (dI.to(all_image.dtype), dT.to(all_text.dtype), dscale.to(scale.dtype))


@launcher("siglip_loss")
def siglip_loss_forward(image, all_text, scale, bias, offset):
    b = image.shape[0]
    total = _row_stats(image, all_text, scale, bias, False).sum()
    # -log sigmoid(x) = softplus(x) - x on the positives, softplus(x) elsewhere
    pos = _positive_sum(image, all_text[offset:offset + b], scale) + bias.to(total.dtype) * b
    return ((total - pos) / b).to(image.dtype)


@launcher("siglip_loss_backward")
def siglip_loss_backward(grad, image, all_text, scale, bias, offset):
    b = image.shape[0]
    dI, dT, part = _pass_backward(grad, image, all_text, None, None, scale, bias, offset,
                                  float(b), 1.0, False)
    return (dI.to(image.dtype), dT.to(all_text.dtype), part[0].sum().to(scale.dtype),
            part[1].sum().to(bias.dtype))
