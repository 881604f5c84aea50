"""restore_tokens (MAE-style) against flipkern.reference."""
import pytest
import torch
from _tolerance import assert_close_to_reference
from conftest import usable_backends

import flipkern as fk
from flipkern.reference import masking as ref

BACKENDS = usable_backends(fk.masking.ALL_BACKENDS)
KERNELS = [b for b in BACKENDS if b != "reference"]  # reference vs reference checks nothing
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _ids(B, N, K):
    return torch.stack([torch.randperm(N)[:K] for _ in range(B)]) if B else torch.empty(0, K, dtype=torch.long)


def _fill(kind, D, dtype):
    if kind == "number":
        return -1.5
    if kind == "scalar":
        return torch.tensor(0.25, dtype=dtype)
    return torch.randn(2 * D, dtype=dtype)[::2]  # a strided [D] mask token


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fill_kind", ["tensor", "scalar", "number"])
def test_restore_tokens_matches_reference(backend, dtype, fill_kind):
    x = torch.randn(3, 5, 8, dtype=dtype)
    ids = _ids(3, 11, 5)
    fill = _fill(fill_kind, 8, dtype)
    with fk.use_backend(backend):
        out = fk.restore_tokens(x, ids, 11, fill)
    assert out.shape == (3, 11, 8)
    torch.testing.assert_close(out, ref.restore_tokens(x, ids, 11, fill), rtol=0, atol=0)  # a copy: exact


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("shape", [(2, 7, 7), (2, 7, 1), (0, 7, 3), (2, 7, 0)])
def test_restore_tokens_shapes_and_strides(backend, shape):
    B, N, K = shape
    x = torch.randn(B, 6, K).transpose(1, 2)  # x_vis [B, K, 6] with D not contiguous
    ids = _ids(B, N, K).t().contiguous().t()
    fill = torch.randn(6)
    with fk.use_backend(backend):
        out = fk.restore_tokens(x, ids, N, fill)
    torch.testing.assert_close(out, ref.restore_tokens(x, ids, N, fill), rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("fill_kind", ["tensor", "scalar"])
def test_restore_tokens_backward_matches_reference(backend, fill_kind):
    x = torch.randn(3, 4, 6, dtype=torch.float64)
    ids = _ids(3, 9, 4)
    fill = _fill(fill_kind, 6, torch.float64)
    g = torch.randn(3, 9, 6, dtype=torch.float64)
    grads = []
    for run in ("reference", backend):
        xi, fi = x.clone().requires_grad_(), fill.clone().requires_grad_()
        with fk.use_backend(run):
            fk.restore_tokens(xi, ids, 9, fi).backward(g)
        grads.append((xi.grad, fi.grad))
    (xr, fr), (xk, fk_) = grads
    torch.testing.assert_close(xk, xr, rtol=0, atol=0)  # a gather: exact
    torch.testing.assert_close(fk_, fr, rtol=1e-12, atol=1e-12)  # a sum: order may differ


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_restore_tokens_fill_grad_low_precision(backend, dtype):
    x = torch.randn(4, 3, 5, dtype=torch.float64)
    ids = _ids(4, 30, 3)  # most positions take fill: a long sum
    fill = torch.randn(5, dtype=torch.float64)
    g = torch.randn(4, 30, 5, dtype=torch.float64)
    grads = {}
    for name, dt in (("ref64", torch.float64), ("ref", dtype), ("kernel", dtype)):
        fi = fill.to(dt).detach().requires_grad_()
        with fk.use_backend("reference" if name != "kernel" else backend):
            fk.restore_tokens(x.to(dt), ids, 30, fi).backward(g.to(dt))
        grads[name] = fi.grad
    assert_close_to_reference(grads["kernel"], grads["ref64"], grads["ref"], atol=1e-6, name="d(fill)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_tokens_gradcheck(backend):
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    fill = torch.randn(4, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[4, 0, 2], [1, 3, 5]])
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, f: fk.restore_tokens(a, ids, 6, f), (x, fill))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_restore_tokens_opcheck(backend):
    x = torch.randn(2, 3, 4, requires_grad=True)
    fill = torch.randn(4, requires_grad=True)
    ids = torch.tensor([[4, 0, 2], [1, 3, 5]])
    op = torch.ops.flipkern.restore_tokens_triton if backend == "triton" else torch.ops.flipkern.restore_tokens
    torch.library.opcheck(op, (x, ids, 6, fill))


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_tokens_bad_input(backend):
    x = torch.randn(2, 3, 4)
    ids = torch.tensor([[4, 0, 2], [1, 3, 5]])
    fill = torch.zeros(4)
    with fk.use_backend(backend):
        with pytest.raises(RuntimeError, match="ids_keep repeats a position within a sample"):
            fk.restore_tokens(x, torch.tensor([[4, 0, 4], [1, 3, 5]]), 6, fill)
        with pytest.raises(RuntimeError, match=r"ids_keep has values in \[0, 6\], outside the valid range \[0, 6\)"):
            fk.restore_tokens(x, ids + (ids == 5).long(), 6, fill)
        with pytest.raises(RuntimeError, match=r"ids_keep has values in \[-1"):
            fk.restore_tokens(x, ids - 1, 6, fill)
        with pytest.raises(ValueError, match="num_tokens must be >= 3"):
            fk.restore_tokens(x, ids, 2, fill)
        with pytest.raises(ValueError, match="x_vis must be 3-D"):
            fk.restore_tokens(x[0], ids, 6, fill)
        with pytest.raises(ValueError, match="ids_keep has K = 2 but x_vis has 3 rows"):
            fk.restore_tokens(x, ids[:, :2], 6, fill)
        with pytest.raises(ValueError, match="ids_keep has batch 1"):
            fk.restore_tokens(x, ids[:1], 6, fill)
        with pytest.raises(ValueError, match="ids_keep must have dtype"):
            fk.restore_tokens(x, ids.int(), 6, fill)
        with pytest.raises(ValueError, match="fill must be a number, a 0-d tensor or \\[D\\]"):
            fk.restore_tokens(x, ids, 6, torch.zeros(5))
        with pytest.raises(ValueError, match="fill dtype"):
            fk.restore_tokens(x, ids, 6, fill.double())
        with pytest.raises(ValueError, match="fill must be a number or a tensor"):
            fk.restore_tokens(x, ids, 6, "zero")
