"""Token dropping: flipkern vs the PyTorch-native ways, in the same run.

Cases (ViT-B/16 at 224px: B=256 images, N=196 patches, D=768; keep 25% and 50%):
  drop_tokens+pos: gather the kept tokens and add their position embedding.
    flipkern            fk.drop_tokens(x, ids, pos): one pass, no [B, N, D] intermediate
    torch-index         (x + pos)[arange, ids]
    torch-gather        torch.gather(x + pos, 1, ids expanded) (= flipkern.reference)
    torch-gather-add    torch.gather(x, 1, ids expanded) + pos[ids] (gather first, add after)
    torch-copy          clone of a [B, K, D] tensor: the same bytes read and written by one
                        copy, the bandwidth limit. extra_info["bytes"] is the useful traffic
                        (kept rows read + written, pos read) for every impl, so GB/s compare.
  patch_embed: the kept patches' embeddings from the images.
    flipkern            F.linear(fk.gather_patches(images, ids, 16), conv.weight.flatten(1), bias)
    torch-conv-drop     Conv2d on every patch, then drop: conv(images).flatten(2).transpose(1, 2)[arange, ids]
                        (what open_clip's PatchDropout does)
    torch-gather-linear native-best: F.linear(native.gather_patches(...)), the kept patches read by
                        indexing a view of the images, then one GEMM on them (plain PyTorch)
    reference           F.linear(flipkern.reference.gather_patches(...)) (patchify everything, then gather)
    extra_info["flops"] is the useful work (kept patches only) for every impl.

CPU runs float32 and bfloat16; on CUDA (when present) the default flipkern backend
(triton) and "flipkern-cuda" (the CUDA kernels) both run. A reduced run for a sanity
check, e.g. one dtype and keep ratio on the CPU:
  python -m pytest benchmarks/bench_masking.py -k "keep25 and float32 and cpu"
"""
import native
import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, sync

import flipkern as fk
from flipkern.reference import masking as ref

B, N, D, IMG, P, C = 256, 196, 768, 224, 16, 3
KEEPS = {"keep25": 0.25, "keep50": 0.5}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _impls(device, base):
    extra = {"cuda": ["flipkern-cuda"]}.get(device, [])
    return ["flipkern"] + extra + base


def _run(impl, fn):
    """fn under the backend an impl name asks for ("flipkern-cuda" -> the CUDA kernels)."""
    if impl == "flipkern-cuda":
        def forced():
            with fk.use_backend("cuda"):
                return fn()
        return forced
    return fn


def _keep(keep, device):
    g = torch.Generator(device=device).manual_seed(0)
    return fk.random_keep_indices(B, N, keep_ratio=keep, generator=g, device=device)


DROP_PARAMS = [(d, k, t, i) for d in DEVICES for k in KEEPS for t in DTYPES
               for i in _impls(d, ["torch-index", "torch-gather", "torch-gather-add", "torch-copy"])]


@pytest.mark.parametrize("device,keep,dtype,impl", DROP_PARAMS, ids=["-".join(p) for p in DROP_PARAMS])
def test_drop_tokens_pos(benchmark, device, keep, dtype, impl):
    dt = DTYPES[dtype]
    x = torch.randn(B, N, D, device=device, dtype=dt)
    pos = torch.randn(N, D, device=device, dtype=dt)
    ids = _keep(KEEPS[keep], device)
    K = ids.shape[1]
    rows = torch.arange(B, device=device)[:, None]
    index = ids[..., None].expand(-1, -1, D)
    kept = torch.randn(B, K, D, device=device, dtype=dt)
    fns = {
        "flipkern": lambda: fk.drop_tokens(x, ids, pos),
        "flipkern-cuda": lambda: fk.drop_tokens(x, ids, pos),
        "torch-index": lambda: (x + pos)[rows, ids],
        "torch-gather": lambda: torch.gather(x + pos, 1, index),
        "torch-gather-add": lambda: torch.gather(x, 1, index) + pos[ids],
        "torch-copy": lambda: kept.clone(),
    }
    fn = _run(impl, fns[impl])
    if impl != "torch-copy":
        torch.testing.assert_close(fn(), ref.drop_tokens(x, ids, pos), rtol=0, atol=0)

    def step():
        fn()
        sync(device)

    benchmark.group = f"drop_tokens+pos B={B} N={N} D={D} {keep} {dtype} {device}"
    benchmark.extra_info.update(impl=impl, bytes=(2 * B * K * D + N * D) * x.element_size())
    benchmark.pedantic(step, rounds=10 if device == "cpu" else 50, iterations=1, warmup_rounds=2)


EMBED_PARAMS = [(d, k, t, i) for d in DEVICES for k in KEEPS for t in DTYPES
                for i in _impls(d, ["torch-conv-drop", "torch-gather-linear", "reference"])]


@pytest.mark.parametrize("device,keep,dtype,impl", EMBED_PARAMS, ids=["-".join(p) for p in EMBED_PARAMS])
def test_patch_embed(benchmark, device, keep, dtype, impl):
    dt = DTYPES[dtype]
    images = torch.randn(B, C, IMG, IMG, device=device, dtype=dt)
    conv = torch.nn.Conv2d(C, D, P, stride=P).to(device=device, dtype=dt)
    weight = conv.weight.detach().flatten(1)
    bias = conv.bias.detach()
    ids = _keep(KEEPS[keep], device)
    K = ids.shape[1]
    rows = torch.arange(B, device=device)[:, None]
    fns = {
        "flipkern": lambda: F.linear(fk.gather_patches(images, ids, P), weight, bias),
        "flipkern-cuda": lambda: F.linear(fk.gather_patches(images, ids, P), weight, bias),
        "torch-conv-drop": lambda: conv(images).flatten(2).transpose(1, 2)[rows, ids],
        "torch-gather-linear": lambda: F.linear(native.gather_patches(images, ids, P), weight, bias),
        "reference": lambda: F.linear(ref.gather_patches(images, ids, P), weight, bias),
    }
    fn = _run(impl, fns[impl])
    if impl != "torch-conv-drop":  # the gathers feed F.linear the same patches: the same bits
        with torch.no_grad():  # (Conv2d = linear on patches is tests/test_fastpath.py's check)
            torch.testing.assert_close(fn(), fns["torch-gather-linear"](), rtol=0, atol=0)

    def step():
        with torch.no_grad():
            fn()
        sync(device)

    benchmark.group = f"patch_embed B={B} {IMG}px p={P} D={D} {keep} {dtype} {device}"
    benchmark.extra_info.update(impl=impl, flops=2 * B * K * C * P * P * D)
    benchmark.pedantic(step, rounds=3 if device == "cpu" else 20, iterations=1, warmup_rounds=1)
