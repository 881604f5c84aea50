"""Variable-length attention, forward + backward: flipkern vs SDPA on the padded batch.

Cases (H=12, Dh=64, the ViT-B/CLIP text width):
  text, lengths uniform in 5..77 (mean ~41) and 5..27 (mean ~16), B=128, causal: the
    text tower. SDPA runs on the batch padded to the context length 77 with a boolean
    mask (padding + causal), the way a CLIP text tower holds its batch; "sdpa-padded-max"
    pads only to the longest length of the batch (the best a padded model can do).
  image, equal lengths L=50 and L=99 (ViT-B/16 at 224px keeping 25% / 50% of 196
    patches, plus the class token), B=64, no mask: padding costs nothing here, so this
    measures the kernel itself against SDPA's own fused CPU/flash kernel.
Timings exclude packing: a packed model (flipkern/packed.py) keeps tokens packed
through every layer, and the padded model keeps them padded. ``flops`` is the useful
work (real tokens only, causal halves it) for every impl, so TFLOP/s compare directly.

CPU cases run in float32; CUDA cases (when a GPU is present) in bfloat16, adding
flash_attn_varlen_func when flash-attn is installed, the plain CUDA C++ kernel
("flipkern-cuda"; flipkern's default on CUDA is Triton), and a forward-only run of every
case (the issue's goal: >= 0.8x of flash-attn 2's forward at Dh=64, bf16). On CUDA,
SDPA picks its flash backend for the unmasked image cases; with the text cases' boolean
mask it cannot, and runs its memory-efficient (or math) backend instead.
"""
import pytest
import torch
import torch.nn.functional as F

import flipkern as fk
from flipkern.reference import attention as ref

from conftest import DEVICES, sync

H, DH = 12, 64


def _lengths(case):
    g = torch.Generator().manual_seed(0)
    if case == "text-mean41":
        return torch.randint(5, 78, (128,), generator=g), 77, True
    if case == "text-mean16":
        return torch.randint(5, 28, (128,), generator=g), 77, True
    if case == "image-L50":
        return torch.full((64,), 50), 50, False
    if case == "image-L99":
        return torch.full((64,), 99), 99, False
    raise ValueError(case)


CASES = ["text-mean41", "text-mean16", "image-L50", "image-L99"]


def _flops(lengths, causal, backward):
    # fwd: Q K^T and P V, 2 * 2 * L^2 * Dh per head; bwd: 2.5x the forward
    sq = float((lengths.double() ** 2).sum())
    return (3.5 if backward else 1.0) * 4 * sq * H * DH * (0.5 if causal else 1.0)


def _setup(case, device, dtype, impl, backward=True):
    lengths, context, causal = _lengths(case)
    B = lengths.shape[0]
    if impl in ("flipkern", "flipkern-cuda", "reference", "flash-attn-varlen"):
        cu = fk.cu_seqlens_from_lengths(lengths).to(device)
        total, max_len = int(lengths.sum()), int(lengths.max())
        q, k, v = (torch.randn(total, H, DH, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        g = torch.randn(total, H, DH, device=device, dtype=dtype)
        if impl == "flipkern":
            def fwd():
                return fk.varlen_attention(q, k, v, cu, max_len, causal=causal)
        elif impl == "flipkern-cuda":
            def fwd():
                with fk.use_backend("cuda"):
                    return fk.varlen_attention(q, k, v, cu, max_len, causal=causal)
        elif impl == "reference":
            def fwd():
                return ref.varlen_attention(q, k, v, cu, max_len, causal=causal)
        else:
            from flash_attn import flash_attn_varlen_func

            def fwd():
                return flash_attn_varlen_func(q, k, v, cu, cu, max_len, max_len, causal=causal)
    else:
        L = context if impl == "sdpa-padded" else int(lengths.max())
        q, k, v = (torch.randn(B, H, L, DH, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        g = torch.randn(B, H, L, DH, device=device, dtype=dtype)
        if bool((lengths == L).all()):  # no padding: SDPA's fastest path, no mask
            def fwd():
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        else:
            valid = (torch.arange(L)[None, :] < lengths[:, None]).to(device)
            mask = valid[:, None, None, :]
            if causal:
                mask = mask & torch.ones(L, L, dtype=torch.bool, device=device).tril()

            def fwd():
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    def step():
        if backward:
            torch.autograd.grad(fwd(), (q, k, v), g)
        else:
            with torch.no_grad():
                fwd()
        sync(device)

    return step, _flops(lengths, causal, backward)


def _impls(device, case):
    impls = ["flipkern", "sdpa-padded"]
    if case.startswith("text"):
        impls.append("sdpa-padded-max")
    if device == "cpu" and case == "text-mean16":
        impls.append("reference")  # a Python loop over sequences (seconds): one case is enough
    if device == "cuda":
        impls.append("flipkern-cuda")
        try:
            import flash_attn  # noqa: F401
            impls.append("flash-attn-varlen")
        except ImportError:
            pass
    return impls


PARAMS = [(d, c, i) for d in DEVICES for c in CASES for i in _impls(d, c)]
CUDA_PARAMS = [p for p in PARAMS if p[0] == "cuda"]


def _run(benchmark, device, case, impl, backward):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    step, flops = _setup(case, device, dtype, impl, backward)
    what = "fwd+bwd" if backward else "fwd"
    benchmark.group = f"varlen_attention {what} {case} H={H} Dh={DH} {str(dtype)[6:]} {device}"
    benchmark.extra_info.update(impl=impl, flops=flops)
    rounds = 5 if device == "cpu" else 20
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("device,case,impl", PARAMS, ids=[f"{d}-{c}-{i}" for d, c, i in PARAMS])
def test_varlen_attention_fwd_bwd(benchmark, device, case, impl):
    _run(benchmark, device, case, impl, backward=True)


@pytest.mark.parametrize("device,case,impl", CUDA_PARAMS, ids=[f"{d}-{c}-{i}" for d, c, i in CUDA_PARAMS])
def test_varlen_attention_fwd(benchmark, device, case, impl):
    _run(benchmark, device, case, impl, backward=False)
