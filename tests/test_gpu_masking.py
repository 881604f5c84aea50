"""The five masking ops on a GPU, forward and backward, on the Triton and the CUDA C++
kernels in every dtype: the CPU tests' bodies (test_masking_*.py) run with CUDA as the
default device, plus what only a GPU can show (grid-stride loops past the 65535-block
grid, bitwise-reproducible backward, tensors on a non-current device). Skipped without
CUDA; benchmarks/run_gpu.sh runs them."""
import pytest
import test_masking_indices as indices
import test_masking_ops as drop
import test_masking_patches as patches
import test_masking_restore as restore
import torch
from _gpu import bitwise_equal, gpu_backends, grads_of, needs_cuda, needs_two_gpus, on_cuda, run_cpu_tests_on_cuda

import flipkern as fk
from flipkern.reference import masking as ref

pytestmark = needs_cuda
BACKENDS = gpu_backends(fk.masking.ALL_BACKENDS)


# ----------------------------------------------------------------------------- the CPU tests, on CUDA

# Every parametrization of these (dtypes, layouts, shapes, duplicates, float64 gradients,
# gradcheck, opcheck, torch.compile, bad input) runs with the GPU backend and CUDA tensors.
CPU_TESTS = {
    "drop_tokens": [drop.test_drop_tokens_matches_reference,
                    drop.test_drop_tokens_position_add_special_values,  # exact, subnormals too: no fast math
                    drop.test_drop_tokens_shapes_and_strides, drop.test_drop_tokens_backward_matches_reference,
                    drop.test_drop_tokens_backward_low_precision, drop.test_drop_tokens_gradcheck,
                    drop.test_drop_tokens_opcheck, drop.test_drop_tokens_compiles_fullgraph,
                    drop.test_drop_tokens_bad_input],
    "gather_patches": [patches.test_gather_patches_matches_reference, patches.test_gather_patches_shapes_and_strides,
                       patches.test_gather_patches_then_linear_equals_conv_then_drop,
                       patches.test_gather_patches_backward_matches_reference,
                       patches.test_gather_patches_backward_low_precision, patches.test_gather_patches_gradcheck,
                       patches.test_gather_patches_opcheck, patches.test_gather_patches_bad_input],
    "restore_tokens": [restore.test_restore_tokens_matches_reference, restore.test_restore_tokens_shapes_and_strides,
                       restore.test_restore_tokens_backward_matches_reference,
                       restore.test_restore_tokens_fill_grad_low_precision, restore.test_restore_tokens_gradcheck,
                       restore.test_restore_tokens_opcheck, restore.test_restore_tokens_bad_input],
    "keep_indices": [indices.test_random_keep_matches_reference, indices.test_random_keep_valid_and_reproducible,
                     indices.test_topk_keep_matches_reference, indices.test_topk_keep_with_ties_keeps_a_valid_top_k],
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", list(CPU_TESTS))
def test_cpu_tests_on_cuda(backend, op, monkeypatch):
    # random_keep_indices draws on the device of its generator: a CUDA generator here
    monkeypatch.setattr(indices, "_gen", lambda seed: torch.Generator("cuda").manual_seed(seed))
    run_cpu_tests_on_cuda(CPU_TESTS[op], backend=backend)


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.parametrize("backend", BACKENDS)
def test_more_work_than_one_grid(backend):
    # Forward rows and backward (b, d) / (b, e) threads past the CUDA kernels' grid of
    # 65,535 blocks (x 256 threads for the backward): their grid-stride loops run, and
    # Triton's program ids go past 2^16. Float64: exact, and the d(pos_embed) sums too.
    with on_cuda():
        x, pos = torch.randn(70000, 4, 256, dtype=torch.float64), torch.randn(4, 256, dtype=torch.float64)
        ids = torch.rand(70000, 4).argsort(dim=1)[:, :2]  # 140,000 rows; 17.9M (b, d) in the backward
        g = torch.randn(70000, 2, 256, dtype=torch.float64)
        with fk.use_backend(backend):
            got = grads_of(lambda a, p: fk.drop_tokens(a, ids, p), (x, pos), g)
        want = grads_of(lambda a, p: ref.drop_tokens(a, ids, p), (x, pos), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        del x, g, got, want

        images = torch.randn(22000, 3, 32, 32)  # 88,000 kept patches; 16.9M (b, e) in the backward
        pids = torch.rand(22000, 4).argsort(dim=1)
        gp = torch.randn(22000, 4, 3 * 16 * 16)
        with fk.use_backend(backend):
            got = grads_of(lambda a: fk.gather_patches(a, pids, 16), (images,), gp)
        want = grads_of(lambda a: ref.gather_patches(a, pids, 16), (images,), gp)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # copies, each patch kept once


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
