"""gather_patches against flipkern.reference and against a Conv2d patch embedding."""
import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_reference
from conftest import usable_backends

import flipkern as fk
from flipkern.reference import masking as ref

BACKENDS = usable_backends(fk.masking.ALL_BACKENDS)
KERNELS = [b for b in BACKENDS if b != "reference"]  # reference vs reference checks nothing
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _images(B, C, H, W, dtype=torch.float32, layout="contiguous"):
    x = torch.randn(B, C, H, W, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":  # a view with gaps along every dimension but the batch
        x = torch.randn(B, C + 1, H + 2, 2 * W, dtype=dtype)[:, 1:, 1:-1, ::2]
    return x


def _ids(B, N, K, duplicates=False):
    if duplicates:
        return torch.randint(0, N, (B, K))
    return torch.stack([torch.randperm(N)[:K] for _ in range(B)]) if B else torch.empty(0, K, dtype=torch.long)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_patches_matches_reference(backend, dtype):
    x = _images(2, 3, 8, 12, dtype)
    ids = _ids(2, 6, 4)
    with fk.use_backend(backend):
        out = fk.gather_patches(x, ids, 4)
    assert out.shape == (2, 4, 3 * 16)
    torch.testing.assert_close(out, ref.gather_patches(x, ids, 4), rtol=0, atol=0)  # a copy: exact


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("shape", [(2, 6, 6), (2, 6, 1), (0, 6, 2), (2, 6, 0), (2, 6, 9)])
def test_gather_patches_shapes_and_strides(backend, layout, shape):
    B, N, K = shape  # 6 patches of 3x3 (a 6x9 image), K = N, K = 1, B = 0, K = 0, repeats
    x = _images(B, 2, 6, 9, layout=layout)
    ids = _ids(B, N, K, duplicates=K > N)
    ids = ids.t().contiguous().t()  # strided indices too
    with fk.use_backend(backend):
        out = fk.gather_patches(x, ids, 3)
    assert out.shape == (B, K, 2 * 9)
    torch.testing.assert_close(out, ref.gather_patches(x, ids, 3), rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_patches_then_linear_equals_conv_then_drop(backend):
    """The point of the op: patch-embedding only the kept patches gives the kept
    rows of patch-embedding everything."""
    B, C, H, W, p, D = 3, 3, 16, 20, 4, 10
    x = _images(B, C, H, W, torch.float64)
    conv = torch.nn.Conv2d(C, D, p, stride=p).double()
    ids = _ids(B, (H // p) * (W // p), 7)
    with torch.no_grad(), fk.use_backend(backend):
        kept = F.linear(fk.gather_patches(x, ids, p), conv.weight.flatten(1), conv.bias)
        everything = conv(x).flatten(2).transpose(1, 2)
    torch.testing.assert_close(kept, ref.drop_tokens(everything, ids), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("duplicates", [False, True])
def test_gather_patches_backward_matches_reference(backend, duplicates):
    x = _images(3, 2, 8, 8, torch.float64, layout="sliced")
    ids = _ids(3, 16, 9, duplicates=duplicates)
    g = torch.randn(3, 9, 2 * 4, dtype=torch.float64)  # 16 patches of 2x2
    xr = x.detach().clone().requires_grad_()
    ref.gather_patches(xr, ids, 2).backward(g)
    xk = x.detach().clone().requires_grad_()
    with fk.use_backend(backend):
        fk.gather_patches(xk, ids, 2).backward(g)
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gather_patches_backward_low_precision(backend, dtype):
    # Repeated patches accumulate in the low precision, like the reference's scatter-add.
    x = _images(2, 2, 4, 4, torch.float64)
    ids = torch.tensor([[0, 3, 0, 0, 2], [1, 1, 3, 1, 0]])
    g = torch.randn(2, 5, 8, dtype=torch.float64)
    grads = {}
    for name, dt in (("ref64", torch.float64), ("ref", dtype), ("kernel", dtype)):
        xi = x.to(dt).detach().requires_grad_()
        if name == "kernel":
            with fk.use_backend(backend):
                fk.gather_patches(xi, ids, 2).backward(g.to(dt))
        else:
            ref.gather_patches(xi, ids, 2).backward(g.to(dt))
        grads[name] = xi.grad
    assert_close_to_reference(grads["kernel"], grads["ref64"], grads["ref"], atol=1e-6, name="d(images)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_patches_gradcheck(backend):
    x = _images(2, 2, 4, 6, torch.float64).requires_grad_()
    ids = torch.tensor([[5, 0, 2], [1, 1, 4]])
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a: fk.gather_patches(a, ids, 2), (x,))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_gather_patches_opcheck(backend):
    x = _images(2, 3, 4, 6).requires_grad_()
    ids = torch.tensor([[5, 0, 2], [1, 3, 4]])
    triton = backend == "triton"
    fwd = torch.ops.flipkern.gather_patches_triton if triton else torch.ops.flipkern.gather_patches
    bwd = torch.ops.flipkern.gather_patches_backward_triton if triton else torch.ops.flipkern.gather_patches_backward
    torch.library.opcheck(fwd, (x, ids, 2))
    torch.library.opcheck(bwd, (torch.randn(2, 3, 12), ids, [2, 3, 4, 6], 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_patches_bad_input(backend):
    x = _images(2, 3, 8, 8)
    ids = _ids(2, 4, 2)
    with fk.use_backend(backend):
        with pytest.raises(ValueError, match="images must be 4-D"):
            fk.gather_patches(x[0], ids, 4)
        with pytest.raises(ValueError, match="patch_size 3 does not divide the image size 8x8"):
            fk.gather_patches(x, ids, 3)
        with pytest.raises(ValueError, match="patch_size must be >= 1"):
            fk.gather_patches(x, ids, 0)
        with pytest.raises(ValueError, match="patch_size must be an int"):
            fk.gather_patches(x, ids, 4.0)
        with pytest.raises(ValueError, match="ids_keep must have dtype"):
            fk.gather_patches(x, ids.int(), 4)
        with pytest.raises(ValueError, match="ids_keep must be 2-D"):
            fk.gather_patches(x, ids[0], 4)
        with pytest.raises(ValueError, match="ids_keep has batch 1"):
            fk.gather_patches(x, ids[:1], 4)
        with pytest.raises(RuntimeError, match=r"ids_keep has values in \[.*\], outside the valid range \[0, 4\)"):
            fk.gather_patches(x, ids + 4, 4)
        with pytest.raises(RuntimeError, match=r"ids_keep has values in \[-"):
            fk.gather_patches(x, ids - 4, 4)
