"""Property-based tests (hypothesis) of every op family against flipkern.reference, on
every backend usable here: random shapes, lengths including 0 and 1, strided inputs,
every dtype, chunk sizes and extreme logit scales.

Each example runs the op and its backward on one backend in one dtype and compares
value and gradients with the reference by the tolerance rule (tests/_tolerance.py):
error against the float64 reference <= 3 x the reference's own error in that dtype,
plus the interpreter's bf16 truncation slack. Example counts are small (the Triton
interpreter is slow) and the runs derandomized, so CI sees the same examples each time.
"""
import pytest
import torch
import torch.nn.functional as F
from _tolerance import assert_close_to_reference, rounding_rtol
from conftest import usable_backends
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import flipkern as fk
from flipkern import reference as ref

BACKENDS = usable_backends()
DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
SETTINGS = settings(max_examples=8, deadline=None, derandomize=True)
every_backend = pytest.mark.parametrize("backend", BACKENDS)

dtypes = st.sampled_from(DTYPES)


def _layout(draw, t):
    """t, or the same values in another memory layout: a permuted order or a strided slice."""
    how = draw(st.sampled_from(["contiguous", "permuted", "sliced"]))
    if how == "permuted":
        perm = draw(st.permutations(range(t.dim())))
        return t.permute(perm).contiguous().permute([perm.index(i) for i in range(t.dim())])
    if how == "sliced":
        wide = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        wide[..., ::2] = t
        return wide[..., ::2]
    return t


def _value_and_grads(fn, inputs, grad_seed):
    """fn(*inputs) and the gradients of <fn(...), g> for the floating inputs (g: a fixed
    random cotangent of the output's shape and dtype)."""
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]
    out = fn(*leaves)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed), dtype=torch.float64)
    wrt = [t for t in leaves if t.requires_grad]
    grads = torch.autograd.grad(out, wrt, g.to(out.dtype), allow_unused=True)
    return [out.detach()] + [torch.zeros_like(t) if d is None else d for t, d in zip(wrt, grads)]


def check(backend, dtype, op, reference, inputs, *, magnitude=1.0, factor=3.0):
    """op on ``backend`` with the floating inputs in ``dtype`` against the reference in float64
    and in ``dtype``; inputs are float64 masters (rounded to dtype first, so every run sees
    the same values) and index tensors. ``magnitude``: the largest intermediate (a logit),
    whose rounding sets the absolute slack (32 ulps of it): in float64 the reference in
    ``dtype`` is the float64 reference itself and its own error, 0, bounds nothing."""
    low = [t.to(dtype) if t.is_floating_point() else t for t in inputs]
    exact = [t.double() if t.is_floating_point() else t for t in low]
    with fk.use_backend(backend):
        got = _value_and_grads(op, low, 1)
    want64 = _value_and_grads(reference, exact, 1)
    want_low = _value_and_grads(reference, low, 1)
    # A computation that overflows ``dtype`` in the reference (fp16 with logit scale 1e4: the
    # sum of the row losses passes 65504) has no bound to hold a kernel to: draw another.
    assume(all(torch.isfinite(t).all() for t in want_low))
    for i, (a, b, c) in enumerate(zip(got, want64, want_low)):
        slack = rounding_rtol(backend, dtype) * (b.abs().max().item() if b.numel() else 0.0)
        scale = max(1.0, magnitude, b.abs().max().item() if b.numel() else 0.0)
        atol = 32 * torch.finfo(dtype).eps * scale + 2 * slack
        assert_close_to_reference(a, b, c, factor=factor, atol=atol,
                                  name=f"{backend} {dtype} {'output' if i == 0 else f'grad {i}'}")


@st.composite
def keep_ids(draw, B, N, unique):
    """ids_keep [B, K], K from 0 to N (unique) or to N + 2 (repeats), maybe strided."""
    K = draw(st.integers(0, N if unique else N + 2))
    if unique:
        rows = [draw(st.permutations(range(N)))[:K] for _ in range(B)]
    else:
        rows = [draw(st.lists(st.integers(0, N - 1), min_size=K, max_size=K)) for _ in range(B)]
    ids = torch.tensor(rows, dtype=torch.long).reshape(B, K)
    return ids.t().contiguous().t() if draw(st.booleans()) else ids


# ----------------------------------------------------------------------------- masking

@every_backend
@SETTINGS
@given(st.data(), dtypes, st.integers(0, 3), st.integers(1, 9), st.integers(1, 6), st.booleans(),
       st.booleans())
def test_drop_tokens(backend, data, dtype, B, N, D, with_pos, unique):
    ids = data.draw(keep_ids(B, N, unique))
    x = _layout(data.draw, torch.randn(B, N, D, dtype=torch.float64))
    if with_pos:
        check(backend, dtype, fk.drop_tokens, ref.masking.drop_tokens, [x, ids, torch.randn(N, D, dtype=torch.float64)])
    else:
        check(backend, dtype, lambda x, i: fk.drop_tokens(x, i), ref.masking.drop_tokens, [x, ids])


@every_backend
@SETTINGS
@given(st.data(), dtypes, st.integers(0, 2), st.integers(1, 3), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 3), st.booleans())
def test_gather_patches(backend, data, dtype, B, C, p, gh, gw, unique):
    ids = data.draw(keep_ids(B, gh * gw, unique))
    images = _layout(data.draw, torch.randn(B, C, gh * p, gw * p, dtype=torch.float64))
    check(backend, dtype, lambda x, i: fk.gather_patches(x, i, p), lambda x, i: ref.masking.gather_patches(x, i, p),
          [images, ids])


@every_backend
@SETTINGS
@given(st.data(), dtypes, st.integers(0, 3), st.integers(1, 9), st.integers(1, 6))
def test_restore_tokens(backend, data, dtype, B, N, D):
    ids = data.draw(keep_ids(B, N, unique=True))
    x = _layout(data.draw, torch.randn(B, ids.shape[1], D, dtype=torch.float64))
    check(backend, dtype, lambda x, i, f: fk.restore_tokens(x, i, N, f),
          lambda x, i, f: ref.masking.restore_tokens(x, i, N, f), [x, ids, torch.randn(D, dtype=torch.float64)])


# ----------------------------------------------------------------------------- attention

@every_backend
@SETTINGS
@given(st.data(), dtypes, st.lists(st.integers(0, 9), min_size=0, max_size=4), st.integers(1, 3),
       st.sampled_from([1, 4, 8, 16, 24]), st.booleans(), st.sampled_from([None, 0.0, 0.05, 3.0]))
def test_varlen_attention(backend, data, dtype, lengths, H, Dh, causal, scale):
    total = sum(lengths)
    cu = fk.cu_seqlens_from_lengths(torch.tensor(lengths, dtype=torch.int64))
    longest = max(lengths, default=0)
    max_seqlen = longest + data.draw(st.integers(0, 2))  # any bound >= the longest is valid
    if data.draw(st.booleans()):  # q, k, v as strided views of one packed qkv projection
        qkv = torch.randn(total, 3, H, Dh, dtype=torch.float64)
        q, k, v = qkv.unbind(1)
    else:
        q, k, v = (_layout(data.draw, torch.randn(total, H, Dh, dtype=torch.float64)) for _ in range(3))
    check(backend, dtype, lambda q, k, v, c: fk.varlen_attention(q, k, v, c, max_seqlen, causal=causal, scale=scale),
          lambda q, k, v, c: ref.attention.varlen_attention(q, k, v, c, max_seqlen, causal=causal, scale=scale),
          [q, k, v, cu])


# ----------------------------------------------------------------------------- losses

def _largest_logit(img, txt, scale):
    return abs(scale) * (img @ txt.t()).abs().max().item()


SCALES = [0.0, 1e-4, 1.0, 14.3, 100.0, 1e4]  # 100 is open_clip's clamp; 1e4 is far past it
BIASES = [-1e4, -10.0, 0.0, 10.0]


@every_backend
@SETTINGS
@given(st.data(), dtypes, st.integers(1, 20), st.integers(1, 12),
       st.sampled_from([None, 1, 2, 3, 7, 64]), st.sampled_from(SCALES), st.booleans())
def test_clip_loss(backend, data, dtype, B, D, chunk_size, scale, normalized):
    img, txt = (_layout(data.draw, torch.randn(B, D, dtype=torch.float64)) for _ in range(2))
    if normalized:
        img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    check(backend, dtype, lambda i, t, s: fk.clip_loss(i, t, s, chunk_size=chunk_size), ref.losses.clip_loss,
          [img, txt, torch.tensor(scale, dtype=torch.float64)], magnitude=_largest_logit(img, txt, scale))


@every_backend
@SETTINGS
@given(st.data(), dtypes, st.integers(1, 20), st.integers(1, 12),
       st.sampled_from([None, 1, 2, 3, 7, 64]), st.sampled_from(SCALES), st.sampled_from(BIASES))
def test_siglip_loss(backend, data, dtype, B, D, chunk_size, scale, bias):
    img, txt = (F.normalize(_layout(data.draw, torch.randn(B, D, dtype=torch.float64)), dim=-1) for _ in range(2))
    check(backend, dtype, lambda i, t, s, b: fk.siglip_loss(i, t, s, b, chunk_size=chunk_size), ref.losses.siglip_loss,
          [img, txt, torch.tensor(scale, dtype=torch.float64), torch.tensor(bias, dtype=torch.float64)],
          magnitude=_largest_logit(img, txt, scale) + abs(bias))
