"""Variable-length attention against flipkern.reference on every backend usable here.

The Triton kernels run in the interpreter (TRITON_INTERPRET=1) on CPU tensors, which
is slow: their cases keep total tokens <= 64, H <= 2, Dh 16/32.
"""
import math
import os

import pytest
import torch
from _tolerance import assert_close_to_reference
from conftest import usable_backends

import flipkern as fk
from flipkern.reference import attention as ref

BACKENDS = usable_backends(fk.attention.ALL_BACKENDS)
KERNELS = [b for b in BACKENDS if b != "reference"]
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]

# Lengths with zero-length sequences, length 1, and one long sequence (several blocks of
# every tile size the interpreter uses). Small enough for the interpreter.
TRITON_LENGTHS = [0, 1, 5, 0, 33, 2, 17]
CPU_LENGTHS = [0, 1, 7, 0, 77, 3, 40, 1, 0, 130]


def _lengths(backend):
    return TRITON_LENGTHS if backend == "triton" else CPU_LENGTHS


def _cu(lengths):
    return fk.cu_seqlens_from_lengths(torch.tensor(lengths, dtype=torch.int64))


def _qkv(total, H, Dh, dtype, *, layout="contiguous"):
    if layout == "qkv":  # q, k, v as strided views of one [total, 3, H, Dh] projection
        qkv = torch.randn(total, 3, H, Dh, dtype=torch.float64).to(dtype)
        return qkv.unbind(1)
    return [torch.randn(total, H, Dh, dtype=torch.float64).to(dtype) for _ in range(3)]


def _run(fn, q, k, v, g):
    """fn(q, k, v) and its gradients for the upstream gradient g."""
    qs, ks, vs = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(qs, ks, vs)
    out.backward(g.to(out.dtype))
    return out.detach(), qs.grad, ks.grad, vs.grad


def _check_against_reference(backend, lengths, H, Dh, dtype, causal, *, scale=None, layout="contiguous",
                             device="cpu"):
    cu = _cu(lengths).to(device)
    total, max_len = sum(lengths), max(lengths, default=0)
    q, k, v = (t.to(device) for t in _qkv(total, H, Dh, dtype, layout=layout))
    g = torch.randn(total, H, Dh, dtype=torch.float64, device=device)

    def ref_fn(a, b, c):
        return ref.varlen_attention(a, b, c, cu, max_len, causal=causal, scale=scale)

    with fk.use_backend(backend):
        got = _run(lambda a, b, c: fk.varlen_attention(a, b, c, cu, max_len, causal=causal, scale=scale),
                   q, k, v, g)
    want64 = _run(ref_fn, q.double(), k.double(), v.double(), g)
    want_lowp = _run(ref_fn, q, k, v, g) if dtype != torch.float64 else want64
    for name, a, b64, blow in zip(("out", "dq", "dk", "dv"), got, want64, want_lowp):
        assert a.dtype == dtype, f"{name} dtype {a.dtype}"
        assert_close_to_reference(a, b64, blow, name=f"{backend} {dtype} {name}")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_matches_reference(backend, dtype, causal):
    _check_against_reference(backend, _lengths(backend), 2, 16 if backend == "triton" else 32, dtype, causal)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("Dh", [16, 24, 32, 64, 80, 128, 256])
def test_varlen_attention_head_dims(backend, Dh):
    lengths = [3, 0, 20, 9] if backend == "triton" else [3, 0, 50, 9, 1]
    dtypes = [torch.float32] if backend == "triton" else [torch.float32, torch.bfloat16, torch.float16]
    for dtype in dtypes:
        _check_against_reference(backend, lengths, 1 if backend == "triton" else 3, Dh, dtype, True)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_strided_qkv_and_scale(backend, causal):
    # q, k, v as views of one qkv projection (row stride 3*H*Dh), an explicit scale
    lengths = [9, 0, 21] if backend == "triton" else [9, 0, 70, 21]
    _check_against_reference(backend, lengths, 2, 16, torch.float32, causal, scale=0.37, layout="qkv")


CUDA_BACKENDS = usable_backends(("cuda", "triton"), device="cuda") if torch.cuda.is_available() else []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", CUDA_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("Dh", [32, 64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_cuda(backend, dtype, Dh, causal):
    # The compiled kernels on a GPU: Triton with its GPU tile sizes, and the CUDA C++ kernel.
    lengths = [0, 1, 300, 77, 5, 0, 128, 64, 1000]
    _check_against_reference(backend, lengths, 3, Dh, dtype, causal, device="cuda")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_random_lengths(backend, causal):
    # Random lengths (seeded), forced to include 0, 1 and one sequence longer than the rest.
    g = torch.Generator().manual_seed(1)
    small, B, long_len, Dh = (8, 4, 30, 16) if backend == "triton" else (60, 24, 300, 64)
    lengths = torch.randint(0, small, (B,), generator=g).tolist() + [0, 1, long_len]
    lengths = [lengths[i] for i in torch.randperm(len(lengths), generator=g).tolist()]
    for dtype in (torch.float32, torch.bfloat16):
        _check_against_reference(backend, lengths, 2, Dh, dtype, causal)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_saves_no_score_matrix(backend, causal):
    # What autograd keeps for the backward: q, k, v, out [total, H, Dh], lse [H, total] and
    # cu_seqlens; nothing with L * L (or total * total) elements.
    lengths = [20, 0, 33]
    total = sum(lengths)
    q, k, v = (t.requires_grad_() for t in _qkv(total, 2, 16, torch.float32))
    saved = []

    def pack_hook(t):
        saved.append(tuple(t.shape))
        return t

    with fk.use_backend(backend), torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        fk.varlen_attention(q, k, v, _cu(lengths), 33, causal=causal)
    assert sorted(saved) == sorted([(total, 2, 16)] * 4 + [(2, total), (len(lengths) + 1,)]), saved


# The GPU tile sizes in the interpreter (the other Triton cases use its small 16 x 16
# tiles): one case per dtype and tile bracket of attention._blocks, with sequences longer
# than a block so the block loops and the masked tails run. Ahead-of-time compiles of
# the same tiles: test_triton_aot.py.
@pytest.mark.skipif("triton" not in KERNELS, reason="triton backend not usable here")
@pytest.mark.parametrize("dtype,Dh", [(torch.bfloat16, 64), (torch.float16, 128), (torch.bfloat16, 256),
                                      (torch.float32, 128), (torch.float32, 256), (torch.float64, 64),
                                      (torch.float64, 128)])
def test_triton_gpu_tile_sizes(dtype, Dh):
    from flipkern.triton_kernels._tiles import gpu_tile_sizes
    with gpu_tile_sizes():
        _check_against_reference("triton", [0, 1, 70, 130], 1, Dh, dtype, True)


def test_triton_head_dim_limit():
    # Tiles for Dh > 256 need more shared memory than a GPU gives a block: a clear error
    # before anything launches (the interpreter included).
    if "triton" not in KERNELS:
        pytest.skip("triton backend not usable here")
    from flipkern.triton_kernels.attention import MAX_HEAD_DIM
    q, k, v = _qkv(4, 1, MAX_HEAD_DIM + 1, torch.float32)
    with fk.use_backend("triton"), pytest.raises(ValueError, match=r"q has head dim Dh = 257.*Dh <= 256"):
        fk.varlen_attention(q, k, v, _cu([4]), 4)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_long_sequence_cpu_blocks(causal):
    # Long enough that the C++ kernel splits the query rows into several blocks.
    if "cpu" not in BACKENDS:
        pytest.skip("cpu backend not usable")
    _check_against_reference("cpu", [600, 0, 5], 1, 16, torch.float32, causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 0]], ids=["B=0", "one-empty", "all-empty"])
def test_varlen_attention_empty(backend, lengths):
    cu = _cu(lengths)
    q, k, v = (torch.randn(0, 2, 16, requires_grad=True) for _ in range(3))
    with fk.use_backend(backend):
        out = fk.varlen_attention(q, k, v, cu, 0, causal=True)
        assert out.shape == (0, 2, 16)
        out.sum().backward()
    assert q.grad.shape == q.shape and k.grad.shape == k.shape and v.grad.shape == v.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention_max_seqlen_may_exceed_lengths(backend):
    lengths = [4, 7]
    cu = _cu(lengths)
    q, k, v = _qkv(11, 1, 16, torch.float64)
    with fk.use_backend(backend):
        out = fk.varlen_attention(q, k, v, cu, 40)
    torch.testing.assert_close(out, ref.varlen_attention(q, k, v, cu, 7))


@pytest.mark.parametrize("backend", KERNELS)
def test_varlen_attention_strided_cu_seqlens(backend):
    # A strided view of the offsets: the kernels must read its values, not its storage.
    lengths = [4, 0, 7, 2]
    cu = _cu(lengths)
    spread = torch.stack([cu, torch.full_like(cu, 1000)], 1).reshape(-1)[::2]
    assert not spread.is_contiguous()
    q, k, v = _qkv(13, 2, 16, torch.float64)
    with fk.use_backend(backend):
        got = fk.varlen_attention(q, k, v, spread, 7, causal=True)
    torch.testing.assert_close(got, ref.varlen_attention(q, k, v, cu, 7, causal=True))


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_gradcheck(backend, causal):
    lengths = [3, 0, 1, 4]
    cu = _cu(lengths)
    q, k, v = (t.requires_grad_() for t in _qkv(8, 2, 4, torch.float64))
    with fk.use_backend(backend):
        # fast_mode (random projections) for the interpreted Triton kernels: the full
        # Jacobian takes minutes there
        assert torch.autograd.gradcheck(
            lambda a, b, c: fk.varlen_attention(a, b, c, cu, 4, causal=causal, scale=0.7), (q, k, v),
            fast_mode=backend == "triton")


@pytest.mark.skipif(os.environ.get("FLIPKERN_CUDA") != "1", reason="FLIPKERN_CUDA=1 not set")
def test_varlen_attention_cuda_kernels_registered():
    # Compiled and linked even with no GPU to run them (FLIPKERN_CUDA=1 forces the build).
    assert fk.info()["cuda_kernels_compiled"]
    for op in ("varlen_attention_forward", "varlen_attention_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"flipkern::{op}", "CUDA"), op


def _ops(backend):
    if backend == "triton":
        return torch.ops.flipkern.varlen_attention_forward_triton, torch.ops.flipkern.varlen_attention_backward_triton
    return torch.ops.flipkern.varlen_attention_forward, torch.ops.flipkern.varlen_attention_backward


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_attention_opcheck(backend, causal):
    fwd, bwd = _ops(backend)
    lengths = [5, 0, 18, 1]
    cu = _cu(lengths)
    q, k, v = (t.requires_grad_() for t in _qkv(24, 2, 16, torch.float32))
    torch.library.opcheck(fwd, (q, k, v, cu, 18, causal, 0.25))
    out, lse = fwd(q.detach(), k.detach(), v.detach(), cu, 18, causal, 0.25)
    g = torch.randn_like(out)
    torch.library.opcheck(bwd, (g, q.detach(), k.detach(), v.detach(), out, lse, cu, 18, causal, 0.25))


# The reference backend is a Python loop over cu_seqlens.tolist(): data-dependent control
# flow that no graph can hold, so only the kernels are compiled with fullgraph=True.
@pytest.mark.parametrize("backend", KERNELS)
def test_varlen_attention_compiles_fullgraph(backend):
    lengths = [5, 0, 18, 1]
    cu = _cu(lengths)
    q, k, v = _qkv(24, 2, 16, torch.float32)
    lin = torch.nn.Linear(16, 16)

    def f(q, k, v, cu):
        return lin(fk.varlen_attention(q, k, v, cu, 18, causal=True)).square().sum()

    grads = []
    with fk.use_backend(backend):
        for fn in (torch.compile(f, fullgraph=True, backend="aot_eager"), f):
            qs, ks, vs = (t.clone().requires_grad_() for t in (q, k, v))
            fn(qs, ks, vs, cu).backward()
            grads.append((qs.grad, ks.grad, vs.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention_bad_input(backend):
    lengths = [3, 0, 5]
    cu = _cu(lengths)
    q, k, v = _qkv(8, 2, 16, torch.float32)
    va = fk.varlen_attention
    with fk.use_backend(backend):
        # structural: at the front door, for every backend
        with pytest.raises(ValueError, match="k has shape"):
            va(q, k[:, :1], v, cu, 5)
        with pytest.raises(ValueError, match="v has shape"):
            va(q, k, v[:7], cu, 5)
        with pytest.raises(ValueError, match="q must be 3-D"):
            va(q[0], k, v, cu, 5)
        with pytest.raises(ValueError, match="k dtype"):
            va(q, k.double(), v, cu, 5)
        with pytest.raises(ValueError, match="cu_seqlens must have dtype"):
            va(q, k, v, cu.long(), 5)
        with pytest.raises(ValueError, match="cu_seqlens must be 1-D"):
            va(q, k, v, cu[None], 5)
        with pytest.raises(ValueError, match="max_seqlen must be an int"):
            va(q, k, v, cu, torch.tensor(5))
        with pytest.raises(ValueError, match="max_seqlen must be >= 0"):
            va(q, k, v, cu, -1)
        with pytest.raises(ValueError, match="scale must be"):
            va(q, k, v, cu, 5, scale="0.5")
        # values: inside the op, before any kernel runs (the reference reads them in front)
        with pytest.raises((ValueError, RuntimeError), match=r"cu_seqlens\[0\] must be 0"):
            va(q, k, v, torch.tensor([1, 3, 3, 8], dtype=torch.int32), 5)
        with pytest.raises((ValueError, RuntimeError), match="cu_seqlens must be non-decreasing"):
            va(q, k, v, torch.tensor([0, 3, 2, 8], dtype=torch.int32), 6)
        with pytest.raises((ValueError, RuntimeError), match=r"cu_seqlens\[-1\] = 7 must equal"):
            va(q, k, v, torch.tensor([0, 3, 3, 7], dtype=torch.int32), 5)
        with pytest.raises((ValueError, RuntimeError), match="length 5 > max_seqlen = 4"):
            va(q, k, v, cu, 4)


@pytest.mark.parametrize("backend", KERNELS)
def test_varlen_attention_backward_op_bad_input(backend):
    fwd, bwd = _ops(backend)
    cu = _cu([3, 5])
    q, k, v = _qkv(8, 2, 16, torch.float32)
    out, lse = fwd(q, k, v, cu, 5, False, 0.25)
    g = torch.randn_like(out)
    with pytest.raises((ValueError, RuntimeError), match="lse must be"):
        bwd(g, q, k, v, out, lse[:, :7], cu, 5, False, 0.25)
    with pytest.raises((ValueError, RuntimeError), match="grad_out"):
        bwd(g[:7], q, k, v, out, lse, cu, 5, False, 0.25)
    with pytest.raises((ValueError, RuntimeError), match="out"):
        bwd(g, q, k, v, out[:, :1], lse, cu, 5, False, 0.25)
    with pytest.raises((ValueError, RuntimeError), match="length 5 > max_seqlen = 4"):
        bwd(g, q, k, v, out, lse, cu, 4, False, 0.25)


def test_cu_seqlens_values_are_rechecked_after_an_in_place_change():
    if "triton" not in BACKENDS:
        pytest.skip("triton backend not usable")
    cu = _cu([3, 5])
    q, k, v = _qkv(8, 1, 16, torch.float32)
    with fk.use_backend("triton"):
        fk.varlen_attention(q, k, v, cu, 5)
        cu[1] = 9  # bumps the version counter: the cached check no longer holds
        with pytest.raises(RuntimeError, match="non-decreasing"):
            fk.varlen_attention(q, k, v, cu, 9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_varlen_attention_in_inference_mode(backend):
    # Inference tensors (no version counter, no autograd) must work too.
    with torch.inference_mode():
        cu = _cu([3, 5])
        q, k, v = _qkv(8, 2, 16, torch.float64)
        with fk.use_backend(backend):
            got = fk.varlen_attention(q, k, v, cu, 5, causal=True)
            got_again = fk.varlen_attention(q, k, v, cu, 5, causal=True)
    want = ref.varlen_attention(q, k, v, cu, 5, causal=True)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got_again, want)


# ----------------------------------------------------------------------------- packing helpers

def test_cu_seqlens_from_lengths():
    cu = fk.cu_seqlens_from_lengths(torch.tensor([3, 0, 2]))
    assert cu.dtype == torch.int32
    assert cu.tolist() == [0, 3, 3, 5]
    assert fk.cu_seqlens_from_lengths(torch.tensor([], dtype=torch.int64)).tolist() == [0]


def test_pack_unpack_roundtrip():
    lengths = torch.tensor([3, 0, 5, 1])
    x = torch.randn(4, 6, 2, 3)
    packed, cu = fk.pack(x, lengths)
    assert packed.shape == (9, 2, 3) and cu.tolist() == [0, 3, 3, 8, 9]
    torch.testing.assert_close(packed[3:8], x[2, :5], rtol=0, atol=0)
    back = fk.unpack(packed, cu, 6)
    valid = torch.arange(6)[None, :] < lengths[:, None]
    torch.testing.assert_close(back[valid], x[valid], rtol=0, atol=0)
    assert (back[~valid] == 0).all()


def test_packed_from_padding_mask():
    x = torch.randn(3, 5, 4)
    pad = torch.tensor([[False, False, True, True, True],
                        [True, True, True, True, True],
                        [False, True, False, False, True]])  # valid tokens need not come first
    packed, cu, max_seqlen = fk.packed_from_padding_mask(x, pad)
    assert cu.tolist() == [0, 2, 2, 5] and max_seqlen == 3
    torch.testing.assert_close(packed, torch.cat([x[0, :2], x[2, [0, 2, 3]]]), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_padded_attention_with_mask(backend, causal):
    # The packed op on the valid tokens == the padded reference with a key padding mask.
    B, N, H, Dh = 3, 9, 2, 16
    lengths = torch.tensor([9, 0, 4]) if backend != "triton" else torch.tensor([9, 1, 4])
    x = torch.randn(3, B, N, H, Dh, dtype=torch.float64)
    pad = torch.arange(N)[None, :] >= lengths[:, None]
    want = ref.attention(*(t.transpose(1, 2) for t in x), key_padding_mask=pad, causal=causal).transpose(1, 2)
    q, cu = fk.pack(x[0], lengths)
    k, _ = fk.pack(x[1], lengths)
    v, _ = fk.pack(x[2], lengths)
    with fk.use_backend(backend):
        got = fk.varlen_attention(q, k, v, cu, int(lengths.max()), causal=causal)
    valid = ~pad
    torch.testing.assert_close(fk.unpack(got, cu, N)[valid], want[valid], rtol=1e-10, atol=1e-10)


def test_default_scale_is_inverse_sqrt_head_dim():
    cu = _cu([5])
    q, k, v = _qkv(5, 1, 16, torch.float64)
    a = fk.varlen_attention(q, k, v, cu, 5)
    b = fk.varlen_attention(q, k, v, cu, 5, scale=1 / math.sqrt(16))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------- packed block

def _block(dim=32, heads=2):
    from flipkern.reference.vit import Block
    return Block(dim, heads).double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_packed_block_equals_reference_block(backend, causal):
    from flipkern.blocks import packed_block_forward
    block = _block()
    B, N = 4, 12
    lengths = torch.tensor([12, 3, 5, 1])  # no empty sample: the padded reference gives it NaNs
    x = torch.randn(B, N, 32, dtype=torch.float64)
    pad = torch.arange(N)[None, :] >= lengths[:, None]
    want = block(x, key_padding_mask=pad, causal=causal)
    packed, cu = fk.pack(x, lengths)
    with fk.use_backend(backend):
        got = packed_block_forward(block, packed, cu, int(lengths.max()), causal)
    valid = ~pad
    torch.testing.assert_close(fk.unpack(got, cu, N)[valid], want[valid], rtol=1e-10, atol=1e-10)
    # and the gradients of the shared parameters, from the valid positions only
    g = torch.randn_like(got)
    want_grads = torch.autograd.grad(want[valid], list(block.parameters()), g)
    got_grads = torch.autograd.grad(got, list(block.parameters()), g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_autocast_region_does_not_recast_the_kernel(backend):
    # Forward and backward inside a bf16 autocast region (a training step's): the kernel
    # computes in the dtype it was given, so float32 inputs give the float32 results.
    cu = _cu([5, 3])
    q, k, v = _qkv(8, 2, 16, torch.float32)
    g = torch.randn(8, 2, 16)

    def fn(a, b, c):
        return fk.varlen_attention(a, b, c, cu, 5, causal=True)

    with fk.use_backend(backend):
        want = _run(fn, q, k, v, g)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _run(fn, q, k, v, g)
    for w, x in zip(want, got):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x, w, rtol=0, atol=0)
