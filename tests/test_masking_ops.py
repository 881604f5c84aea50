"""Token-dropping ops against flipkern.reference on every backend usable here."""
import pytest
import torch
from _tolerance import assert_close_to_reference, rounding_rtol
from conftest import usable_backends

import flipkern as fk
from flipkern.backends import triton_interpret
from flipkern.reference import masking as ref

BACKENDS = usable_backends(fk.masking.ALL_BACKENDS)
KERNELS = [b for b in BACKENDS if b != "reference"]  # reference vs reference checks nothing
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _inputs(B, N, D, K, dtype, *, duplicates=False, layout="contiguous"):
    x = torch.randn(B, N, D, dtype=dtype)
    if layout == "transposed":  # same values, D not the contiguous dimension
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "sliced":  # a view with gaps between rows
        x = torch.randn(B, N, 2 * D, dtype=dtype)[..., ::2]
    pos = torch.randn(N, D, dtype=dtype)
    if duplicates:
        ids = torch.randint(0, N, (B, K))
    else:
        ids = torch.stack([torch.randperm(N)[:K] for _ in range(B)]) if B else torch.empty(0, K, dtype=torch.long)
    return x, ids, pos


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_pos", [True, False])
def test_drop_tokens_matches_reference(backend, dtype, with_pos):
    x, ids, pos = _inputs(3, 17, 24, 6, dtype)
    pos = pos if with_pos else None
    with fk.use_backend(backend):
        out = fk.drop_tokens(x, ids, pos)
    # A gather plus one rounded add: bit-identical to the reference in the same dtype.
    torch.testing.assert_close(out, ref.drop_tokens(x, ids, pos), rtol=rounding_rtol(backend, dtype), atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_drop_tokens_position_add_special_values(backend, dtype):
    # Infinities, NaN, overflow, signed zeros, subnormals and rounding ties: the
    # kernels' add (vectorized bit operations for bfloat16 on the CPU) rounds as torch's.
    info = torch.finfo(dtype)
    vals = [float("nan"), float("inf"), -float("inf"), info.max, 1.0, 1.0 + info.eps, -0.0, info.tiny / 2]
    adds = [1.0, -float("inf"), 1.0, info.max, info.eps / 2, info.eps / 2, 0.0, info.tiny / 2]
    if backend == "triton" and dtype == torch.bfloat16 and triton_interpret():
        # The interpreter's numpy emulation of bfloat16 flushes subnormals to zero (Triton
        # on a GPU does not): the subnormal case is checked on every other backend/dtype.
        vals, adds = vals[:-1], adds[:-1]
    x = torch.tensor(vals, dtype=dtype).reshape(1, 1, -1).repeat(2, 3, 1)
    pos = torch.tensor(adds, dtype=dtype).reshape(1, -1).repeat(3, 1)
    ids = torch.tensor([[2, 0], [1, 1]])
    with fk.use_backend(backend):
        out = fk.drop_tokens(x, ids, pos)
    torch.testing.assert_close(out, ref.drop_tokens(x, ids, pos), rtol=rounding_rtol(backend, dtype), atol=0,
                               equal_nan=True)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("layout", ["transposed", "sliced"])
@pytest.mark.parametrize("shape", [(2, 9, 8, 9), (2, 9, 8, 1), (0, 9, 8, 3), (2, 9, 8, 0)])
def test_drop_tokens_shapes_and_strides(backend, layout, shape):
    B, N, D, K = shape
    x, ids, pos = _inputs(B, N, D, K, torch.float32, layout=layout)
    pos = pos.t().contiguous().t()  # pos_embed with non-unit stride along D
    with fk.use_backend(backend):
        out = fk.drop_tokens(x, ids, pos)
    assert out.shape == (B, K, D)
    torch.testing.assert_close(out, ref.drop_tokens(x, ids, pos), rtol=0, atol=0)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("duplicates", [False, True])
def test_drop_tokens_backward_matches_reference(backend, duplicates):
    x, ids, pos = _inputs(4, 13, 10, 7, torch.float64, duplicates=duplicates)
    g = torch.randn(4, 7, 10, dtype=torch.float64)
    xr, pr = x.clone().requires_grad_(), pos.clone().requires_grad_()
    ref.drop_tokens(xr, ids, pr).backward(g)
    xk, pk = x.clone().requires_grad_(), pos.clone().requires_grad_()
    with fk.use_backend(backend):
        fk.drop_tokens(xk, ids, pk).backward(g)
    torch.testing.assert_close(xk.grad, xr.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pk.grad, pr.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_drop_tokens_backward_low_precision(backend, dtype):
    # d(pos_embed) sums B rows per position; repeated ids accumulate in dx.
    x, ids, pos = _inputs(16, 9, 8, 6, torch.float64, duplicates=True)
    g = torch.randn(16, 6, 8, dtype=torch.float64)
    grads = {}
    for name, dt in (("ref64", torch.float64), ("ref", dtype), ("kernel", dtype)):
        xi, pi = x.to(dt).detach().requires_grad_(), pos.to(dt).detach().requires_grad_()
        with fk.use_backend(backend if name == "kernel" else "reference"):
            fk.drop_tokens(xi, ids, pi).backward(g.to(dt))
        grads[name] = (xi.grad, pi.grad)
    for i, what in enumerate(("dx", "d(pos_embed)")):
        assert_close_to_reference(grads["kernel"][i], grads["ref64"][i], grads["ref"][i], atol=1e-6, name=what)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_tokens_gradcheck(backend):
    x, ids, pos = _inputs(2, 6, 4, 3, torch.float64)
    x.requires_grad_()
    pos.requires_grad_()
    with fk.use_backend(backend):
        assert torch.autograd.gradcheck(lambda a, p: fk.drop_tokens(a, ids, p), (x, pos))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
def test_drop_tokens_opcheck(backend):
    x, ids, pos = _inputs(2, 9, 8, 4, torch.float32)
    x.requires_grad_()
    pos.requires_grad_()
    op = torch.ops.flipkern.drop_tokens_triton if backend == "triton" else torch.ops.flipkern.drop_tokens
    torch.library.opcheck(op, (x, ids, pos))
    torch.library.opcheck(op, (x, ids, None))
    bwd = (torch.ops.flipkern.drop_tokens_backward_triton if backend == "triton"
           else torch.ops.flipkern.drop_tokens_backward)
    torch.library.opcheck(bwd, (torch.randn(2, 4, 8), ids, 9))


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_tokens_compiles_fullgraph(backend):
    x, ids, pos = _inputs(2, 9, 8, 4, torch.float32)
    lin = torch.nn.Linear(8, 8)

    def f(x, ids, pos):
        return lin(fk.drop_tokens(x, ids, pos)).sum()

    with fk.use_backend(backend):
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        xc = x.clone().requires_grad_()
        compiled(xc, ids, pos).backward()
        xe = x.clone().requires_grad_()
        f(xe, ids, pos).backward()
    torch.testing.assert_close(xc.grad, xe.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_tokens_bad_input(backend):
    x, ids, pos = _inputs(2, 9, 8, 4, torch.float32)
    with fk.use_backend(backend):
        with pytest.raises(ValueError, match="x must be 3-D"):
            fk.drop_tokens(x[0], ids, pos)
        with pytest.raises(ValueError, match="ids_keep must have dtype"):
            fk.drop_tokens(x, ids.int(), pos)
        with pytest.raises(ValueError, match="ids_keep has batch 1"):
            fk.drop_tokens(x, ids[:1], pos)
        with pytest.raises(ValueError, match="pos_embed must be"):
            fk.drop_tokens(x, ids, pos[:4])
        with pytest.raises(ValueError, match="pos_embed dtype"):
            fk.drop_tokens(x, ids, pos.double())
        with pytest.raises((ValueError, RuntimeError), match="ids_keep"):
            fk.drop_tokens(x, ids + 9, pos)  # out of range, above
        with pytest.raises((ValueError, RuntimeError), match="ids_keep"):
            fk.drop_tokens(x, ids - 9, pos)  # negative
