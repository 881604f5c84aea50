"""Hypothesis-driven shapes, strides and indices for the C++ CPU token-dropping
kernels, against flipkern.reference (float64, so gathers and sums compare tightly)."""
import pytest
import torch
from conftest import usable_backends
from hypothesis import given, settings
from hypothesis import strategies as st

import flipkern as fk
from flipkern.reference import masking as ref

pytestmark = pytest.mark.skipif("cpu" not in usable_backends(), reason="the C++ extension is not built")
SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@st.composite
def kept(draw, B, N, unique=True):
    """ids_keep [B, K] with 0 <= K <= N (unique) or any K (repeats allowed), possibly strided."""
    K = draw(st.integers(0, N if unique else N + 3))
    rows = [draw(st.permutations(range(N)))[:K] if unique else draw(st.lists(st.integers(0, N - 1), min_size=K,
                                                                           max_size=K)) for _ in range(B)]
    ids = torch.tensor(rows, dtype=torch.long).reshape(B, K)
    return ids.t().contiguous().t() if draw(st.booleans()) else ids


def _strided(t, draw):
    """t itself, or the same values in a layout with a permuted memory order."""
    perm = draw(st.permutations(range(t.dim())))
    inv = [perm.index(i) for i in range(t.dim())]
    return t.permute(perm).contiguous().permute(inv)


@SETTINGS
@given(st.data(), st.integers(0, 3), st.integers(1, 9), st.integers(1, 7), st.booleans(), st.booleans())
def test_drop_tokens_cpu(data, B, N, D, with_pos, unique):
    ids = data.draw(kept(B, N, unique))
    x = _strided(torch.randn(B, N, D, dtype=torch.float64), data.draw).requires_grad_()
    pos = torch.randn(N, D, dtype=torch.float64, requires_grad=True) if with_pos else None
    g = torch.randn(B, ids.shape[1], D, dtype=torch.float64)
    with fk.use_backend("cpu"):
        out = fk.drop_tokens(x, ids, pos)
        grads = torch.autograd.grad(out, [x] + ([pos] if with_pos else []), g)
    expect = ref.drop_tokens(x, ids, pos)
    expect_grads = torch.autograd.grad(expect, [x] + ([pos] if with_pos else []), g)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    for a, b in zip(grads, expect_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(st.data(), st.integers(0, 3), st.integers(1, 3), st.integers(1, 4), st.integers(1, 3), st.integers(1, 3),
       st.booleans())
def test_gather_patches_cpu(data, B, C, p, gh, gw, unique):
    ids = data.draw(kept(B, gh * gw, unique))
    x = _strided(torch.randn(B, C, gh * p, gw * p, dtype=torch.float64), data.draw).requires_grad_()
    g = torch.randn(B, ids.shape[1], C * p * p, dtype=torch.float64)
    with fk.use_backend("cpu"):
        out = fk.gather_patches(x, ids, p)
        (dx,) = torch.autograd.grad(out, [x], g)
    expect = ref.gather_patches(x, ids, p)
    (expect_dx,) = torch.autograd.grad(expect, [x], g)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    torch.testing.assert_close(dx, expect_dx, rtol=1e-12, atol=1e-12)


@SETTINGS
@given(st.data(), st.integers(0, 3), st.integers(1, 9), st.integers(1, 7))
def test_restore_tokens_cpu(data, B, N, D):
    ids = data.draw(kept(B, N))
    x = _strided(torch.randn(B, ids.shape[1], D, dtype=torch.float64), data.draw).requires_grad_()
    fill = torch.randn(D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(B, N, D, dtype=torch.float64)
    with fk.use_backend("cpu"):
        out = fk.restore_tokens(x, ids, N, fill)
        grads = torch.autograd.grad(out, [x, fill], g)
    expect = ref.restore_tokens(x, ids, N, fill)
    expect_grads = torch.autograd.grad(expect, [x, fill], g)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    for a, b in zip(grads, expect_grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
