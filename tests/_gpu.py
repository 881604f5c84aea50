"""What the GPU tests (tests/test_gpu_*.py) share.

The GPU tests reuse the CPU tests' bodies: ``on_cuda()`` makes CUDA the default device
of every tensor factory (torch.randn, torch.tensor, ...), so a CPU test body run inside
it builds its inputs, runs the kernel and its reference on the GPU. Each test skips,
with the reason, where no CUDA device (or not the backend) is there; benchmarks/run_gpu.sh
runs them all on a GPU machine.
"""
import contextlib
import itertools

import pytest
import torch

from flipkern import backends

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device (benchmarks/run_gpu.sh runs these)")
needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                                    reason="needs two CUDA devices (tensors on a non-current device)")


def _why_not(name):
    if not HAS_CUDA:
        return "no CUDA device"
    usable, why = backends.backend_status(name)
    return None if usable else why


def gpu_backends(implemented=("cuda", "triton")):
    """pytest params: each GPU backend of ``implemented``, skipped with the reason where it cannot run."""
    out = []
    for name in ("cuda", "triton"):
        if name in implemented:
            why = _why_not(name)
            marks = pytest.mark.skipif(why is not None, reason=f"backend {name}: {why}")
            out.append(pytest.param(name, marks=marks))
    return out


@contextlib.contextmanager
def on_cuda(index=None):
    """CUDA (device ``index``, else the current one) as the default device of tensor factories."""
    device = torch.device("cuda", torch.cuda.current_device() if index is None else index)
    with torch.device(device):
        yield device


def cpu_cases(test, **fixed):
    """Every keyword-argument set that a CPU test's own @pytest.mark.parametrize marks
    produce, with ``fixed`` (e.g. backend="cuda") in place of those arguments."""
    axes = []
    for mark in getattr(test, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        names, values = mark.args[0], mark.args[1]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if set(names) <= set(fixed):
            continue
        values = [v.values if hasattr(v, "values") else v for v in values]  # pytest.param(...)
        axes.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in values])
    for combo in itertools.product(*axes):
        kwargs = dict(fixed)
        for part in combo:
            kwargs.update(part)
        yield kwargs


def run_cpu_tests_on_cuda(tests, **fixed):
    """Each CPU test function, every parametrization, on the current CUDA device."""
    with on_cuda():
        for test in tests:
            for kwargs in cpu_cases(test, **fixed):
                try:
                    test(**kwargs)
                except Exception as e:
                    raise AssertionError(f"{test.__module__}.{test.__name__}({kwargs}) on CUDA: {e}") from e


def bitwise_equal(a, b, name="gradient"):
    """Two runs' results, bit for bit (NaNs in the same places count as equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.dtype == y.dtype and x.shape == y.shape, f"{name} {i}"
        assert torch.equal(x.view(-1).view(torch.uint8) if x.is_floating_point() else x,
                           y.view(-1).view(torch.uint8) if y.is_floating_point() else y), \
            f"{name} {i}: two runs differ (max diff {(x.double() - y.double()).abs().max().item():.3e})"


def grads_of(fn, inputs, upstream):
    """fn(*inputs) and the gradients of its inputs for ``upstream``, on fresh leaf copies."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(upstream)
    return [out.detach()] + [t.grad for t in leaves if t.requires_grad]
