"""CLIP contrastive loss, forward + backward: flipkern's chunked loss vs the naive
full-matrix loss (open_clip style: a [B, B] logits matrix, F.cross_entropy both ways).

Single process, D=512, unit-norm features, logit_scale 14 (a learnable 0-d tensor).
CPU (float32): B = 4,096 and 16,384; CUDA (bfloat16, when present) adds B = 131,072,
where the naive loss is skipped when its logits alone would not fit.
Goal at B=16,384 on CPU: peak memory <= 1/10 of the naive loss, time <= 1.2x.

Peak memory (extra_info["peak_mem_bytes"]) is measured once per case, apart from the
timing: on CPU in a fresh subprocess as the peak RSS (VmHWM) increase of one fwd+bwd
(see loss_memory.py), on CUDA as torch.cuda.max_memory_allocated above the baseline.
The 65,536 check (flipkern completes within 24 GB on CPU, where the naive loss's
matrices alone would take ~70 GB) is `python benchmarks/loss_memory.py --batch 65536`.
"""
import pytest
import torch
from conftest import DEVICES
from loss_memory import cpu_peak, cuda_peak, make_step

DIM = 512


def _batches(device):
    return [4096, 16384] if device == "cpu" else [4096, 16384, 131072]


def _fits_naive(device, batch):
    if device == "cpu":
        return True
    # the naive loss keeps ~4 [B, B] float32-sized matrices alive at its peak
    return 4 * 4 * batch * batch < 0.8 * torch.cuda.get_device_properties(0).total_memory


PARAMS = [(d, b, i) for d in DEVICES for b in _batches(d) for i in ("flipkern", "torch-naive")
          if i == "flipkern" or _fits_naive(d, b)]


@pytest.mark.parametrize("device,batch,impl", PARAMS, ids=[f"{d}-B{b}-{i}" for d, b, i in PARAMS])
def test_clip_loss_fwd_bwd(benchmark, device, batch, impl):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    step = make_step(impl, batch, DIM, device, dtype)
    if device == "cpu":
        peak = cpu_peak(impl, batch, DIM)["peak_delta_bytes"]
    else:
        step()  # warm-up (Triton compilation) outside the measured peak
        peak = cuda_peak(step)
    benchmark.group = f"clip_loss fwd+bwd B={batch} D={DIM} {str(dtype)[6:]} {device}"
    # fwd: 1 product B x B x D (2 flops each) for the naive loss; bwd: 2 more
    benchmark.extra_info.update(impl=impl, peak_mem_bytes=int(peak), flops=3 * 2 * batch * batch * DIM)
    rounds = 3 if device == "cpu" else 10
    benchmark.pedantic(step, rounds=rounds, iterations=1, warmup_rounds=1)
