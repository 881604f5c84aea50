"""The five masking ops on a GPU, forward and backward, on the Triton and the CUDA C++
kernels in every dtype: the CPU tests' bodies (test_masking_*.py) run with CUDA as the
default device, plus what only a GPU can show (grid-stride loops past the 65535-block
grid, bitwise-reproducible backward, tensors on a non-current device). Skipped without
CUDA; benchmarks/run_gpu.sh runs them."""
import pytest
import torch
import test_masking_indices as indices
import test_masking_ops as drop
import test_masking_patches as patches
import test_masking_restore as restore
from _gpu import DTYPES, bitwise_equal, gpu_backends, grads_of, needs_cuda, needs_two_gpus, on_cuda

import flipkern as fk
from flipkern.reference import masking as ref

pytestmark = needs_cuda
BACKENDS = gpu_backends(fk.masking.ALL_BACKENDS)


# ----------------------------------------------------------------------------- the CPU tests, on CUDA

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_drop_tokens(backend, dtype):
    with on_cuda():
        for with_pos in (True, False):
            drop.test_drop_tokens_matches_reference(backend, dtype, with_pos)
        # exact position add, subnormals included (no fast-math flush to zero on CUDA)
        drop.test_drop_tokens_position_add_special_values(backend, dtype)
        if dtype != torch.float64:
            drop.test_drop_tokens_backward_low_precision(backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_drop_tokens_layouts_float64_backward_and_gradcheck(backend):
    with on_cuda():
        for layout in ("transposed", "sliced"):
            for shape in ((2, 9, 8, 9), (2, 9, 8, 1), (0, 9, 8, 3), (2, 9, 8, 0)):
                drop.test_drop_tokens_shapes_and_strides(backend, layout, shape)
        for duplicates in (False, True):  # float64 gradients stay float64 (rtol 1e-12)
            drop.test_drop_tokens_backward_matches_reference(backend, duplicates)
        drop.test_drop_tokens_gradcheck(backend)
        drop.test_drop_tokens_bad_input(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_patches(backend, dtype):
    with on_cuda():
        patches.test_gather_patches_matches_reference(backend, dtype)
        if dtype in (torch.bfloat16, torch.float16):
            patches.test_gather_patches_backward_low_precision(backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gather_patches_layouts_float64_backward_and_gradcheck(backend):
    with on_cuda():
        for layout in ("channels_last", "sliced"):
            for shape in ((2, 6, 6), (2, 6, 1), (0, 6, 2), (2, 6, 0), (2, 6, 9)):
                patches.test_gather_patches_shapes_and_strides(backend, layout, shape)
        for duplicates in (False, True):
            patches.test_gather_patches_backward_matches_reference(backend, duplicates)
        patches.test_gather_patches_then_linear_equals_conv_then_drop(backend)
        patches.test_gather_patches_gradcheck(backend)
        patches.test_gather_patches_bad_input(backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_restore_tokens(backend, dtype):
    with on_cuda():
        for fill_kind in ("tensor", "scalar", "number"):
            restore.test_restore_tokens_matches_reference(backend, dtype, fill_kind)
        if dtype != torch.float64:
            restore.test_restore_tokens_fill_grad_low_precision(backend, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_restore_tokens_layouts_backward_and_gradcheck(backend):
    with on_cuda():
        for shape in ((2, 7, 7), (2, 7, 1), (0, 7, 3), (2, 7, 0)):
            restore.test_restore_tokens_shapes_and_strides(backend, shape)
        for fill_kind in ("tensor", "scalar"):
            restore.test_restore_tokens_backward_matches_reference(backend, fill_kind)
        restore.test_restore_tokens_gradcheck(backend)
        restore.test_restore_tokens_bad_input(backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_keep_indices(backend, monkeypatch):
    # random_keep_indices draws on the device of its generator: a CUDA generator here
    monkeypatch.setattr(indices, "_gen", lambda seed: torch.Generator("cuda").manual_seed(seed))
    with on_cuda():
        for sorted_ in (True, False):
            for B, N, K in ((5, 16, 4), (3, 196, 49), (4, 7, 7), (0, 7, 3), (3, 7, 0)):
                indices.test_random_keep_matches_reference(backend, sorted_, B, N, K)
            for dtype in DTYPES:
                indices.test_topk_keep_matches_reference(backend, dtype, sorted_)
        indices.test_random_keep_valid_and_reproducible(backend)
        indices.test_topk_keep_with_ties_keeps_a_valid_top_k(backend)


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.parametrize("backend", BACKENDS)
def test_more_rows_than_one_grid(backend):
    # 70,000 kept rows and 2^17+ (b, e) pairs: past the CUDA kernels' 65,535-block grid,
    # so their grid-stride loops and Triton's program ids past 2^16 are exercised.
    with on_cuda():
        x, pos = torch.randn(700, 120, 8), torch.randn(120, 8)
        ids = torch.rand(700, 120).argsort(dim=1)[:, :100]
        g = torch.randn(700, 100, 8)
        with fk.use_backend(backend):
            got = grads_of(lambda a, p: fk.drop_tokens(a, ids, p), (x, pos), g)
        want = grads_of(lambda a, p: ref.drop_tokens(a, ids, p), (x, pos), g)
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)  # dx: one add per element
        torch.testing.assert_close(got[2], want[2], rtol=1e-5, atol=1e-5)  # dpos: sums of 700

        images = torch.randn(600, 3, 32, 32)
        pids = torch.rand(600, 64).argsort(dim=1)[:, :16]
        gp = torch.randn(600, 16, 3 * 16)
        with fk.use_backend(backend):
            got = grads_of(lambda a: fk.gather_patches(a, pids, 4), (images,), gp)
        want = grads_of(lambda a: ref.gather_patches(a, pids, 4), (images,), gp)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def _masking_step(backend, dtype):
    """Forward and backward of the three kernels with duplicate indices (accumulating gradients)."""
    x, pos = torch.randn(64, 197, 96, dtype=dtype), torch.randn(197, 96, dtype=dtype)
    ids = torch.randint(0, 197, (64, 120))
    images = torch.randn(16, 3, 64, 64, dtype=dtype)
    pids = torch.randint(0, 256, (16, 100))
    uids = torch.rand(64, 197).argsort(dim=1)[:, :50]
    fill = torch.randn(96, dtype=dtype)
    with fk.use_backend(backend):
        return (grads_of(lambda a, p: fk.drop_tokens(a, ids, p), (x, pos), torch.randn(64, 120, 96, dtype=dtype))
                + grads_of(lambda a: fk.gather_patches(a, pids, 4), (images,),
                           torch.randn(16, 100, 48, dtype=dtype))
                + grads_of(lambda a, f: fk.restore_tokens(a, uids, 197, f), (x[:, :50], fill),
                           torch.randn(64, 197, 96, dtype=dtype)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_bitwise_reproducible(backend, dtype):
    # No kernel uses atomics: two runs on the same inputs give the same bits.
    with on_cuda():
        torch.manual_seed(0)
        a = _masking_step(backend, dtype)
        torch.manual_seed(0)
        b = _masking_step(backend, dtype)
    bitwise_equal(a, b)


@needs_two_gpus
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_on_a_non_current_device(backend):
    # Device 0 current, tensors on device 1: the kernels must run on device 1 (and its
    # stream), not take the current device.
    torch.cuda.set_device(0)
    with on_cuda(1):
        x, pos = torch.randn(4, 9, 8), torch.randn(9, 8)
        ids = torch.rand(4, 9).argsort(dim=1)[:, :5]
        images = torch.randn(2, 3, 8, 8)
        with fk.use_backend(backend):
            got = (grads_of(lambda a, p: fk.drop_tokens(a, ids, p), (x, pos), torch.ones(4, 5, 8))
                   + grads_of(lambda a: fk.gather_patches(a, ids[:2, :3], 2), (images,), torch.ones(2, 3, 12))
                   + [fk.restore_tokens(x[:, :5], ids, 9, pos[0])])
        want = (grads_of(lambda a, p: ref.drop_tokens(a, ids, p), (x, pos), torch.ones(4, 5, 8))
                + grads_of(lambda a: ref.gather_patches(a, ids[:2, :3], 2), (images,), torch.ones(2, 3, 12))
                + [ref.restore_tokens(x[:, :5], ids, 9, pos[0])])
    torch.cuda.synchronize(1)
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda", 1)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
