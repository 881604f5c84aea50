"""Triton kernels for variable-length (packed) attention, flash-attention 2 style.

Callers (flipkern/attention.py) check arguments and cu_seqlens values.

Layout: q, k, v, out [total, H, Dh] with unit stride along Dh; int32 cu_seqlens
[B+1]; lse [H, total] (natural log, of the scaled scores) in float32 (float64
for float64 inputs). Programs are (sequence, block of rows) x head; a program
whose block starts past its sequence's end exits at once, so the grid is sized
by max_seqlen with no host-side look at cu_seqlens.

Forward: online softmax over key blocks in base 2 (scale * log2(e) folded into
the scores); only lse is kept for the backward. Backward: delta = rowsum(dO * O)
(one small kernel), then one program per key block accumulating dK and dV over
the query blocks, and one program per query block accumulating dQ over the key
blocks: every output element has one writer, no atomics.

Products take the input dtype (bf16/fp16 on tensor cores; fp32 as tf32x3 on tensor
cores, as accurate as fp32 FMA; fp64 in full precision: _tiles.dot_precision) and
accumulate in fp32 (fp64 for fp64); the probabilities are rounded to the input dtype
before the P @ V and dS @ K products, as in flash-attention. The softmax scale is an
fp64 kernel argument (Triton would pass a plain Python float as fp32), cast to the
accumulation type in the kernel. Head dims up to MAX_HEAD_DIM.
"""
import math

import torch
import triton
import triton.language as tl

from .. import _checks
from .._dtypes import stat_dtype
from ._tiles import acc_type, dot_precision, gpu_tiles, interpreter_upcast, launcher, mm

# exp2/log2 are the fast ones on GPUs: scores are scaled by log2(e) and the lse back by ln(2).
# constexpr so the kernels may read them (Triton rejects other globals); .value on the host.
LOG2E = tl.constexpr(math.log2(math.e))
LN2 = tl.constexpr(math.log(2.0))
# The largest head dim: the tiles of the next BLOCK_D (512) need more shared memory than
# any GPU gives a block, whatever the dtype (fp32 dQ at Dh 512 with 32 x 32 tiles:
# 262,144 B, vs 232,448 B on H100 and 166,912 B on A100); tests/test_triton_aot.py
# compiles every tile up to Dh 256 for sm_80 and sm_90 and checks it fits.
MAX_HEAD_DIM = 256


def _block_d(Dh):
    return max(16, triton.next_power_of_2(Dh))


def _blocks(Dh, dtype, device, backward=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for this head dim, dtype and device.

    Sized so that the tiles fit in shared memory on sm_80 (164 KiB) for Dh up to 256.
    """
    if not gpu_tiles(device):  # the interpreter: the smallest tiles tl.dot takes
        return 16, 16, 1, 1
    size = dtype.itemsize
    if size <= 2:  # bf16 / fp16 on tensor cores
        if backward:
            return (64, 64, 4, 2) if Dh <= 128 else (32, 32, 4, 1)
        return (128, 64, 4 if Dh <= 64 else 8, 2) if Dh <= 128 else (64, 32, 4, 1)
    if size == 4:  # fp32 as tf32x3: a TF32 head and remainder of every operand double its
        # registers, so the tiles are small; ptxas spills at most a few hundred bytes with these
        # (before, FMA dots with 64 x 32 tiles spilled 16 KB at Dh 128; test_triton_aot.py)
        if backward:
            return (16, 32, 4, 1) if Dh <= 128 else (16, 16, 4, 1)
        return (32, 32, 4, 2) if Dh <= 128 else (16, 16, 4, 1)
    return (32, 32, 4, 1) if Dh <= 64 else (16, 16, 4, 1)  # fp64


@triton.jit
def _program_block(CU, num_blocks, BLOCK: tl.constexpr):
    """The (head, first row of its sequence, sequence length, first row of its block in the
    sequence) of this program: programs are (sequence, block) along axis 0, heads along axis 1."""
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)  # h * (stride of a head) may pass 2**31
    b = pid // num_blocks
    first = tl.load(CU + b)
    L = tl.load(CU + b + 1) - first
    # 64-bit row offsets: total * row stride may pass 2**31
    return h, first.to(tl.int64), L, (pid % num_blocks) * BLOCK


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU, qk_scale: tl.float64, num_m_blocks, Dh,
                sqt, sqh, skt, skh, svt, svh, sot, soh, sl_h,
                CAUSAL: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    h, start, L, m0 = _program_block(CU, num_m_blocks, BLOCK_M)
    if ACC != tl.float64:  # the scale arrives as fp64 (annotation): fp64 kernels keep every bit
        qk_scale = tl.cast(qk_scale, ACC)
    if m0 < L:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < L
        d_ok = offs_d < Dh
        q = tl.load(Q + (start + offs_m)[:, None] * sqt + h * sqh + offs_d[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), ACC)
        l_i = tl.zeros([BLOCK_M], ACC)
        acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, m0 + BLOCK_M)
        for n0 in range(0, hi, BLOCK_N):
            kn = n0 + offs_n
            col_ok = kn < L
            kT = tl.load(K + (start + kn)[None, :] * skt + h * skh + offs_d[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            s = mm(q, kT, PREC, ACC, UPCAST) * qk_scale
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (kn[None, :] <= offs_m[:, None])
            s = tl.where(ok, s, float("-inf"))
            # Every row sees key 0 in the first block (row < L, or causal row >= 0), so
            # m_new is finite from the first block on.
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(V + (start + kn)[:, None] * svt + h * svh + offs_d[None, :],
                        mask=col_ok[:, None] & d_ok[None, :], other=0.0)
            acc = acc * alpha[:, None] + mm(p.to(v.dtype), v, PREC, ACC, UPCAST)
            m_i = m_new
        acc = acc / l_i[:, None]
        tl.store(O + (start + offs_m)[:, None] * sot + h * soh + offs_d[None, :],
                 acc.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
        # natural-log lse of the scaled scores: (m + log2 l) * ln 2
        tl.store(LSE + h * sl_h + start + offs_m, (m_i + tl.log2(l_i)) * LN2,
                 mask=row_ok)


@triton.jit
def _bwd_delta_kernel(O, DO, DELTA, total, Dh, sot, soh, sgt, sgh, sd_h,
                      ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    # delta[h, t] = sum_d dO[t, h, d] * O[t, h, d]
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)  # h * (stride of a head) may pass 2**31
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows < total)[:, None] & (offs_d < Dh)[None, :]
    o = tl.load(O + rows[:, None] * sot + h * soh + offs_d[None, :], mask=mask, other=0.0).to(ACC)
    g = tl.load(DO + rows[:, None] * sgt + h * sgh + offs_d[None, :], mask=mask, other=0.0).to(ACC)
    tl.store(DELTA + h * sd_h + rows, tl.sum(o * g, 1), mask=rows < total)


@triton.jit
def _bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, CU, qk_scale: tl.float64, scale: tl.float64, num_n_blocks, Dh,
                     sqt, sqh, skt, skh, svt, svh, sgt, sgh, sl_h, sdkt, sdkh, sdvt, sdvh,
                     CAUSAL: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (sequence, key block, head): dK, dV of its keys over all queries.
    h, start, L, n0 = _program_block(CU, num_n_blocks, BLOCK_N)
    if ACC != tl.float64:  # the scales arrive as fp64 (annotation): fp64 kernels keep every bit
        qk_scale, scale = tl.cast(qk_scale, ACC), tl.cast(scale, ACC)
    if n0 < L:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        col_ok = offs_n < L
        d_ok = offs_d < Dh
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + (start + offs_n)[:, None] * skt + h * skh + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + (start + offs_n)[:, None] * svt + h * svh + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
        lo = 0
        if CAUSAL:  # queries before this key block do not see it
            lo = (n0 // BLOCK_M) * BLOCK_M
        for m0 in range(lo, L, BLOCK_M):
            qm = m0 + offs_m
            row_ok = qm < L
            # transposed tiles: [BLOCK_D, BLOCK_M]
            qT = tl.load(Q + (start + qm)[None, :] * sqt + h * sqh + offs_d[:, None],
                         mask=row_ok[None, :] & d_ok[:, None], other=0.0)
            lse = tl.load(LSE + h * sl_h + start + qm, mask=row_ok, other=0.0) * LOG2E
            sT = mm(k, qT, PREC, ACC, UPCAST) * qk_scale  # [N, M], log2 units
            ok = col_ok[:, None] & row_ok[None, :]
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= qm[None, :])
            pT = tl.where(ok, tl.exp2(sT - lse[None, :]), 0.0)
            do = tl.load(DO + (start + qm)[:, None] * sgt + h * sgh + offs_d[None, :],
                         mask=row_ok[:, None] & d_ok[None, :], other=0.0)
            dv += mm(pT.to(do.dtype), do, PREC, ACC, UPCAST)
            delta = tl.load(DELTA + h * sl_h + start + qm, mask=row_ok, other=0.0)
            dpT = mm(v, tl.trans(do), PREC, ACC, UPCAST)
            dsT = pT * (dpT - delta[None, :])
            dk += mm(dsT.to(qT.dtype), tl.trans(qT), PREC, ACC, UPCAST)
        dk = dk * scale
        tl.store(DK + (start + offs_n)[:, None] * sdkt + h * sdkh + offs_d[None, :],
                 dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DV + (start + offs_n)[:, None] * sdvt + h * sdvh + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU, qk_scale: tl.float64, scale: tl.float64, num_m_blocks, Dh,
                   sqt, sqh, skt, skh, svt, svh, sgt, sgh, sl_h, sdqt, sdqh,
                   CAUSAL: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program per (sequence, query block, head): dQ of its queries over all keys.
    h, start, L, m0 = _program_block(CU, num_m_blocks, BLOCK_M)
    if ACC != tl.float64:  # the scales arrive as fp64 (annotation): fp64 kernels keep every bit
        qk_scale, scale = tl.cast(qk_scale, ACC), tl.cast(scale, ACC)
    if m0 < L:
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        row_ok = offs_m < L
        d_ok = offs_d < Dh
        q_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(Q + (start + offs_m)[:, None] * sqt + h * sqh + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + (start + offs_m)[:, None] * sgt + h * sgh + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + h * sl_h + start + offs_m, mask=row_ok, other=0.0) * LOG2E
        delta = tl.load(DELTA + h * sl_h + start + offs_m, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], ACC)
        hi = L
        if CAUSAL:
            hi = tl.minimum(L, m0 + BLOCK_M)
        for n0 in range(0, hi, BLOCK_N):
            kn = n0 + offs_n
            col_ok = kn < L
            kT = tl.load(K + (start + kn)[None, :] * skt + h * skh + offs_d[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            vT = tl.load(V + (start + kn)[None, :] * svt + h * svh + offs_d[:, None],
                         mask=col_ok[None, :] & d_ok[:, None], other=0.0)
            s = mm(q, kT, PREC, ACC, UPCAST) * qk_scale
            ok = row_ok[:, None] & col_ok[None, :]
            if CAUSAL:
                ok = ok & (kn[None, :] <= offs_m[:, None])
            p = tl.where(ok, tl.exp2(s - lse[:, None]), 0.0)
            dp = mm(do, vT, PREC, ACC, UPCAST)
            ds = p * (dp - delta[:, None])
            dq += mm(ds.to(kT.dtype), tl.trans(kT), PREC, ACC, UPCAST)
        dq = dq * scale
        tl.store(DQ + (start + offs_m)[:, None] * sdqt + h * sdqh + offs_d[None, :],
                 dq.to(DQ.dtype.element_ty), mask=q_mask)


def _check_head_dim(op, Dh):
    if Dh > MAX_HEAD_DIM:
        _checks.fail(op, f"q has head dim Dh = {Dh}, but the triton backend supports Dh <= {MAX_HEAD_DIM} "
                         f"(larger tiles need more shared memory than a GPU gives a thread block); "
                         f"split the heads or use backend 'reference'")


def _unit_last(t):
    return t if t.stride(2) == 1 else t.contiguous()


@launcher("varlen_attention")
def varlen_attention_forward(q, k, v, cu_seqlens, max_seqlen, causal, scale):
    total, H, Dh = q.shape
    _check_head_dim("varlen_attention", Dh)
    B = cu_seqlens.shape[0] - 1
    cu_seqlens = cu_seqlens.contiguous()  # the kernels read cu_seqlens[b] at CU + b
    out = torch.empty((total, H, Dh), dtype=q.dtype, device=q.device)
    lse = torch.empty((H, total), dtype=stat_dtype(q.dtype), device=q.device)
    if total == 0 or H == 0 or B == 0 or max_seqlen == 0:
        return out, lse
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    BM, BN, warps, stages = _blocks(Dh, q.dtype, q.device)
    nm = triton.cdiv(max_seqlen, BM)
    _fwd_kernel[(B * nm, H)](
        q, k, v, out, lse, cu_seqlens, scale * LOG2E.value, nm, Dh,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), lse.stride(0),
        CAUSAL=causal, ACC=acc_type(q.dtype), PREC=dot_precision(q.dtype), UPCAST=interpreter_upcast(q),
        BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=_block_d(Dh), num_warps=warps, num_stages=stages)
    return out, lse


@launcher("varlen_attention_backward")
def varlen_attention_backward(grad_out, q, k, v, out, lse, cu_seqlens, max_seqlen, causal, scale):
    total, H, Dh = q.shape
    _check_head_dim("varlen_attention_backward", Dh)
    B = cu_seqlens.shape[0] - 1
    cu_seqlens = cu_seqlens.contiguous()  # the kernels read cu_seqlens[b] at CU + b
    dq = torch.empty((total, H, Dh), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    if total == 0 or H == 0 or B == 0 or max_seqlen == 0:
        return dq, dk, dv
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    grad_out, out, lse = _unit_last(grad_out), _unit_last(out), lse.contiguous()
    acc, prec, BD = acc_type(q.dtype), dot_precision(q.dtype), _block_d(Dh)
    delta = torch.empty_like(lse)
    DM = 64 if gpu_tiles(q.device) else 16
    _bwd_delta_kernel[(triton.cdiv(total, DM), H)](
        out, grad_out, delta, total, Dh, out.stride(0), out.stride(1),
        grad_out.stride(0), grad_out.stride(1), delta.stride(0),
        ACC=acc, BLOCK_M=DM, BLOCK_D=BD)
    BM, BN, warps, stages = _blocks(Dh, q.dtype, q.device, backward=True)
    common = dict(CAUSAL=causal, ACC=acc, PREC=prec, UPCAST=interpreter_upcast(q), BLOCK_M=BM, BLOCK_N=BN, BLOCK_D=BD,
                  num_warps=warps, num_stages=stages)
    strides = (q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
               grad_out.stride(0), grad_out.stride(1), lse.stride(0))
    qk_scale = scale * LOG2E.value
    nn = triton.cdiv(max_seqlen, BN)
    _bwd_dkdv_kernel[(B * nn, H)](
        q, k, v, grad_out, lse, delta, dk, dv, cu_seqlens, qk_scale, scale, nn, Dh,
        *strides, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), **common)
    nm = triton.cdiv(max_seqlen, BM)
    _bwd_dq_kernel[(B * nm, H)](
        q, k, v, grad_out, lse, delta, dq, cu_seqlens, qk_scale, scale, nm, Dh,
        *strides, dq.stride(0), dq.stride(1), **common)
    return dq, dk, dv

