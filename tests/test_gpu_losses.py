"""Both contrastive losses on a GPU beyond the per-dtype accuracy tests
(test_losses.py::test_on_cuda: both backends, every dtype): bitwise-reproducible
backward and tensors on a non-current device. Skipped without CUDA;
benchmarks/run_gpu.sh runs them."""
import pytest
import test_losses as cpu
import torch
from _gpu import bitwise_equal, gpu_backends, needs_cuda, needs_two_gpus, on_cuda

import flipkern as fk
from flipkern import losses

pytestmark = needs_cuda
BACKENDS = gpu_backends(losses.ALL_BACKENDS)


def _inputs(dtype, B, D):
    """Features [B, D] in dtype; scale and bias float32 (autocast keeps parameters there), float64 for float64."""
    return (*cpu._features(B, D, dtype), *cpu._params(torch.float64 if dtype == torch.float64 else torch.float32))


def _step(backend, name, inputs, chunk):
    with fk.use_backend(backend):
        return cpu._run(lambda *a: cpu._loss(name, *a, chunk_size=chunk), *inputs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", cpu.LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_bitwise_reproducible(backend, name, dtype):
    with on_cuda():
        inputs = _inputs(dtype, 1024, 512)
        a = _step(backend, name, inputs, chunk=256)  # several chunks: partial results are merged
        b = _step(backend, name, inputs, chunk=256)
    bitwise_equal(a, b)


@needs_two_gpus
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", cpu.LOSSES)
def test_tensors_on_a_non_current_device(backend, name):
    torch.cuda.set_device(0)
    with on_cuda(1):
        inputs = _inputs(torch.float64, 300, 64)
        got = _step(backend, name, inputs, chunk=128)
        want = cpu._run(lambda *a: cpu._ref_loss(name, *a), *inputs)
    torch.cuda.synchronize(1)
    for n, a, b in zip(cpu.NAMES, got, want):
        assert a.device == torch.device("cuda", 1), n
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=n)
