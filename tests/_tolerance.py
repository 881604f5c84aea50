"""The tolerance rule of docs/DESIGN.md (section 4, "Correctness: the tolerance rule"), in one place.

A kernel run in a low precision passes when its error against the float64
reference is at most ``factor`` times the error that the reference itself
makes when run in that same precision, plus a tiny absolute slack. For exact
ops (gathers, copies) use torch.testing.assert_close(..., rtol=0, atol=0).
"""
import torch


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def assert_close_to_reference(out, ref64, ref_lowp, *, factor=3.0, atol=1e-6, name="output"):
    """out: kernel result; ref64: reference in float64; ref_lowp: reference in out's dtype."""
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = max_err(out, ref64)
    ref_err = max_err(ref_lowp, ref64)
    bound = factor * ref_err + atol
    assert err <= bound, (f"{name}: max error {err:.3e} > {factor} x reference's own "
                          f"{ref_lowp.dtype} error {ref_err:.3e} + {atol:.0e}")


def rounding_rtol(backend, dtype):
    """Relative slack for results that should be bit-identical to the reference.

    Triton's interpreter (TRITON_INTERPRET=1, how the Triton kernels are tested on a CPU)
    converts fp32 -> bf16 by truncation, where torch and Triton on a GPU round to nearest:
    at most one bf16 ulp (2**-7 relative) apart. Everything else must match exactly.
    """
    from flipkern.backends import triton_interpret
    if backend == "triton" and dtype == torch.bfloat16 and triton_interpret():
        return 2.0 ** -7
    return 0.0
