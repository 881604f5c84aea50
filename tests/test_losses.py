"""Chunked contrastive losses (single process) against flipkern.reference on every
backend usable here. Distributed checks: test_losses_distributed.py.

The Triton kernels run in the interpreter (TRITON_INTERPRET=1) on CPU tensors, which
is slow: their cases keep B <= 40 and D <= 24 (still several 16-row tiles).
"""
import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_reference
from conftest import usable_backends

import flipkern as fk
from flipkern import losses
from flipkern.reference import losses as ref

BACKENDS = usable_backends(losses.ALL_BACKENDS)
KERNELS = [b for b in BACKENDS if b != "reference"]
LOSSES = ["clip", "siglip"]

# (B, D, chunk_size): chunk not dividing B, chunk > B, chunk 1, B = 1, the default.
SHAPES = [(1, 4, None), (1, 4, 1), (7, 5, 3), (16, 8, 64), (33, 16, 8), (40, 24, None), (20, 3, 1)]


def _features(B, D, dtype=torch.float64, normalize=True):
    img, txt = torch.randn(B, D, dtype=torch.float64), torch.randn(B, D, dtype=torch.float64)
    if normalize:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    return img.to(dtype), txt.to(dtype)


def _params(dtype=torch.float64):
    # Large enough that the softmax is far from uniform, and a SigLIP-like bias.
    return torch.tensor(9.5, dtype=dtype), torch.tensor(-3.2, dtype=dtype)


def _loss(name, img, txt, scale, bias, **kw):
    if name == "clip":
        return fk.clip_loss(img, txt, scale, **kw)
    return fk.siglip_loss(img, txt, scale, bias, **kw)


def _ref_loss(name, img, txt, scale, bias):
    if name == "clip":
        return ref.clip_loss(img, txt, scale)
    return ref.siglip_loss(img, txt, scale, bias)


def _run(fn, img, txt, scale, bias):
    """fn's value and its gradients for image, text, scale (and bias when used)."""
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale, bias)]
    out = fn(*leaves)
    out.backward()
    grads = [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]
    return [out.detach()] + grads


NAMES = ("loss", "d_image", "d_text", "d_scale", "d_bias")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("B,D,chunk", SHAPES)
def test_matches_reference_float64(backend, name, B, D, chunk):
    img, txt = _features(B, D)
    scale, bias = _params()
    with fk.use_backend(backend):
        got = _run(lambda *a: _loss(name, *a, chunk_size=chunk), img, txt, scale, bias)
    want = _run(lambda *a: _ref_loss(name, *a), img, txt, scale, bias)
    for n, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("name", LOSSES)
def test_unnormalized_and_extreme_scale(backend, name):
    # Logits up to ~+-400: every exp would overflow without the running max.
    img, txt = _features(21, 6, normalize=False)
    scale, bias = torch.tensor(80.0, dtype=torch.float64), torch.tensor(-10.0, dtype=torch.float64)
    with fk.use_backend(backend):
        got = _run(lambda *a: _loss(name, *a, chunk_size=5), img, txt, scale, bias)
    want = _run(lambda *a: _ref_loss(name, *a), img, txt, scale, bias)
    for n, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


def _check_against_reference(backend, name, dtype, B, D, chunk, device="cpu"):
    img, txt = (t.to(device) for t in _features(B, D, dtype))
    # The scale and bias stay float32 (autocast keeps parameters there), as in open_clip.
    scale, bias = (t.to(device) for t in _params(torch.float64 if dtype == torch.float64 else torch.float32))
    with fk.use_backend(backend):
        got = _run(lambda *a: _loss(name, *a, chunk_size=chunk), img, txt, scale, bias)
    want64 = _run(lambda *a: _ref_loss(name, *a), img.double(), txt.double(), scale.double(),
                  bias.double())
    if dtype == torch.float64:
        for n, a, b in zip(NAMES, got, want64):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")
        return
    want_lowp = _run(lambda *a: _ref_loss(name, *a), img, txt, scale, bias)
    for n, a, b64, blow in zip(NAMES, got, want64, want_lowp):
        if name == "clip" and n == "d_bias":
            continue
        assert a.dtype == blow.dtype, f"{n}: dtype {a.dtype}, reference {blow.dtype}"
        # fp32 accumulation: never worse than the reference run in the same precision.
        assert_close_to_reference(a, b64, blow, factor=2.0, atol=1e-6, name=f"{backend} {dtype} {n}")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(backend, name, dtype):
    B, D = (40, 24) if backend == "triton" else (300, 64)
    _check_against_reference(backend, name, dtype, B, D, 32)


@pytest.mark.skipif("triton" not in KERNELS, reason="triton backend not usable here")
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 80), (torch.float32, 300), (torch.float64, 40)])
def test_triton_gpu_tile_sizes(name, dtype, D):
    # The GPU tile sizes (64 x 64 tiles, D blocks of 128/256) in the interpreter, with
    # more rows than a tile and more columns than one split (_splits) would take.
    from flipkern.triton_kernels._tiles import gpu_tile_sizes
    with gpu_tile_sizes():
        _check_against_reference("triton", name, dtype, 150, D, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("B,D,chunk", [(1, 8, None), (300, 72, 128), (1000, 512, None)])
def test_on_cuda(backend, name, dtype, B, D, chunk):
    _check_against_reference(backend, name, dtype, B, D, chunk, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_gradcheck(backend, name):
    img, txt = _features(6, 4)
    scale, bias = _params()
    args = [t.clone().requires_grad_() for t in (img, txt, scale, bias)]
    with fk.use_backend(backend):
        if name == "clip":
            assert torch.autograd.gradcheck(lambda i, t, s: fk.clip_loss(i, t, s, chunk_size=4), args[:3])
        else:
            assert torch.autograd.gradcheck(
                lambda i, t, s, b: fk.siglip_loss(i, t, s, b, chunk_size=4), args)


@pytest.mark.parametrize("backend", KERNELS)
def test_python_number_scale_and_bias(backend):
    img, txt = _features(9, 4)
    with fk.use_backend(backend):
        clip = fk.clip_loss(img, txt, 4.0)
        sig = fk.siglip_loss(img, txt, 4.0, -1)
    torch.testing.assert_close(clip, ref.clip_loss(img, txt, torch.tensor(4.0, dtype=torch.float64)),
                               rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sig, ref.siglip_loss(img, txt, torch.tensor(4.0, dtype=torch.float64),
                                                    torch.tensor(-1.0, dtype=torch.float64)),
                               rtol=1e-10, atol=1e-12)


def _ops(backend):
    if backend == "triton":
        return (torch.ops.flipkern.clip_loss_forward_triton, torch.ops.flipkern.clip_loss_backward_triton,
                torch.ops.flipkern.siglip_loss_forward_triton, torch.ops.flipkern.siglip_loss_backward_triton)
    return (torch.ops.flipkern.clip_loss_forward, torch.ops.flipkern.clip_loss_backward,
            torch.ops.flipkern.siglip_loss_forward, torch.ops.flipkern.siglip_loss_backward)


@pytest.mark.parametrize("backend", KERNELS)
def test_opcheck(backend):
    clip_fwd, clip_bwd, sig_fwd, sig_bwd = _ops(backend)
    img, txt = _features(20, 8, torch.float32)
    scale, bias = _params(torch.float32)
    grad = torch.tensor(0.7)
    req = [t.clone().requires_grad_() for t in (img, txt, scale, bias)]
    # one process (offset 0, all rows local) and a rank's view of a gather: rows 5..9 of
    # 20, the towers as strided halves of one [N, 2D] buffer.
    both = torch.cat([img, txt], 1)
    for a, t, off, b in ((req[0], req[1], 0, 20), (both[:, :8], both[:, 8:], 5, 5)):
        torch.library.opcheck(clip_fwd, (a, t, req[2], off, b, 7))
        _, lse_i, lse_t = clip_fwd(a.detach(), t.detach(), scale, off, b, 7)
        torch.library.opcheck(clip_bwd, (grad, a.detach(), t.detach(), scale, lse_i, lse_t, off, b, 7))
    torch.library.opcheck(sig_fwd, (req[0], req[1], req[2], req[3], 0, 7))
    torch.library.opcheck(sig_fwd, (req[0][5:10], req[1], req[2], req[3], 5, 3))
    torch.library.opcheck(sig_bwd, (grad, img[5:10], txt, scale, bias, 5, 3))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("chunk", [5, None])
def test_compiles_fullgraph(backend, name, chunk):
    torch._dynamo.reset()  # f below is one code object for every case: start each case fresh
    img, txt = _features(12, 8, torch.float32)
    scale, bias = _params(torch.float32)
    proj = torch.nn.Linear(8, 8, dtype=torch.float32)

    def f(i, t, s, b):
        return _loss(name, F.normalize(proj(i), dim=-1), t, s, b, chunk_size=chunk)

    with fk.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        got = _run(compiled, img, txt, scale, bias)
        want = _run(f, img, txt, scale, bias)
    for n, a, b in zip(NAMES, got, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_bad_input(backend, name):
    img, txt = _features(6, 4, torch.float32)
    scale, bias = _params(torch.float32)

    def call(i=img, t=txt, s=scale, b=bias, **kw):
        return _loss(name, i, t, s, b, **kw)

    with fk.use_backend(backend):
        with pytest.raises(ValueError, match="text_features has shape"):
            call(t=txt[:5])  # mismatched batch
        with pytest.raises(ValueError, match="text_features has shape"):
            call(t=torch.randn(6, 3))  # mismatched dim
        with pytest.raises(ValueError, match="image_features must be 2-D"):
            call(i=img[0])
        with pytest.raises(ValueError, match="text_features must be 2-D"):
            call(t=txt[None])
        with pytest.raises(ValueError, match="text_features dtype"):
            call(t=txt.double())
        with pytest.raises(ValueError, match="image_features must have dtype"):
            call(i=img.long(), t=txt.long())
        with pytest.raises(ValueError, match="logit_scale must be a 0-d tensor"):
            call(s=scale.reshape(1))
        with pytest.raises(ValueError, match="logit_scale must be a 0-d tensor"):
            call(s=torch.ones(2))
        with pytest.raises(ValueError, match="logit_scale must be a torch.Tensor"):
            call(s="10")
        with pytest.raises(ValueError, match="image_features must have at least one row"):
            call(i=img[:0], t=txt[:0])
        with pytest.raises(ValueError, match="chunk_size must be >= 1"):
            call(chunk_size=0)
        with pytest.raises(ValueError, match="chunk_size must be an int"):
            call(chunk_size=2.5)
        if name == "siglip":
            with pytest.raises(ValueError, match="logit_bias must be a 0-d tensor"):
                call(b=torch.zeros(3))


@pytest.mark.parametrize("backend", [b for b in KERNELS if b != "triton"])
def test_cpp_ops_check_their_arguments(backend):
    # The C++ ops are public torch ops too: they check what the Python front door checks.
    clip_fwd, clip_bwd, sig_fwd, _ = _ops(backend)
    img, txt = _features(6, 4, torch.float32)
    scale, bias = _params(torch.float32)
    with pytest.raises(RuntimeError, match="local rows"):
        clip_fwd(img, txt, scale, 4, 3, 2)  # rows 4..6 of 6
    with pytest.raises(RuntimeError, match="all_text has 5 rows"):
        clip_fwd(img, txt[:5], scale, 0, 5, 2)
    with pytest.raises(RuntimeError, match="logit_scale must be a 0-d"):
        clip_fwd(img, txt, scale.reshape(1), 0, 6, 2)
    with pytest.raises(RuntimeError, match="chunk_size must be >= 1"):
        clip_fwd(img, txt, scale, 0, 6, 0)
    with pytest.raises(RuntimeError, match="lse_image must be"):
        clip_bwd(torch.tensor(1.0), img, txt, scale, torch.zeros(5), torch.zeros(6), 0, 6, 2)
    with pytest.raises(RuntimeError, match="all_text has dim"):
        sig_fwd(img, txt[:, :3], scale, bias, 0, 2)
    with pytest.raises(RuntimeError, match="logit_bias must be a 0-d"):
        sig_fwd(img, txt, scale, bias.reshape(1, 1), 0, 2)


def test_default_chunk_size_rule():
    threads = torch.get_num_threads()
    assert losses.default_chunk_size("cpu", 100_000, 100_000) == 512
    assert losses.default_chunk_size("cpu", 1, 1) == 64
    assert losses.default_chunk_size("cpu", 130 * threads, 130 * threads) == 192
    assert losses.default_chunk_size("cuda", 1024, 2 ** 14) == 4096
    assert losses.default_chunk_size("cuda", 1024, 2 ** 20) == 256
    assert losses.default_chunk_size("cuda", 4, 4) == 8192


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("name", LOSSES)
def test_autocast_region_does_not_recast_the_kernel(backend, name):
    # Called (and differentiated) inside a bf16 autocast region, as a training step does:
    # float32 features give the float32 result, not a dtype error or a bf16-rounded value.
    img, txt = _features(12, 8, torch.float32)
    scale, bias = _params(torch.float32)
    with fk.use_backend(backend):
        want = _run(lambda *a: _loss(name, *a, chunk_size=5), img, txt, scale, bias)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = _run(lambda *a: _loss(name, *a, chunk_size=5), img, txt, scale, bias)
    for w, g, n in zip(want, got, NAMES):
        assert g.dtype == torch.float32, n
        torch.testing.assert_close(g, w, rtol=0, atol=0, msg=n)
