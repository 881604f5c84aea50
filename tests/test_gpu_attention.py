"""Varlen attention on a GPU, on the Triton and the CUDA C++ kernels: head dims that are not
powers of two (40/80/96/112), strided q/k/v, float64, the head-dim limit, the CPU tests'
edge cases run on CUDA, no host sync in a steady-state step, bitwise-reproducible
backward and tensors on a non-current device. (test_attention_ops.py::test_varlen_attention_cuda
covers bf16/fp16/fp32 at Dh 32-256.) Skipped without CUDA; benchmarks/run_gpu.sh runs them."""
import pytest
import test_attention_ops as cpu
import torch
from _gpu import bitwise_equal, gpu_backends, grads_of, needs_cuda, needs_two_gpus, on_cuda, run_cpu_tests_on_cuda

import flipkern as fk
from flipkern.reference import attention as ref

pytestmark = needs_cuda
BACKENDS = gpu_backends(fk.attention.ALL_BACKENDS)
LENGTHS = [0, 1, 300, 77, 5, 0, 128, 64, 1000]  # empty, single-row, partial and many-block sequences


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Dh", [40, 80, 96, 112])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_head_dims_not_a_power_of_two(backend, Dh, dtype):
    cpu._check_against_reference(backend, LENGTHS, 3, Dh, dtype, True, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_float64(backend, causal):
    cpu._check_against_reference(backend, LENGTHS, 2, 64, torch.float64, causal, device="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_strided_qkv(backend, dtype):
    # q, k, v as views of one [total, 3, H, Dh] projection, an explicit scale
    cpu._check_against_reference(backend, LENGTHS, 4, 64, dtype, True, scale=0.37, layout="qkv", device="cuda")


# Every parametrization of these runs with the GPU backend and CUDA tensors. (Left out:
# random_lengths draws from a CPU generator; the CPU-only block split; autocast on "cpu".)
CPU_TESTS = [cpu.test_varlen_attention_matches_reference, cpu.test_varlen_attention_head_dims,
             cpu.test_varlen_attention_strided_qkv_and_scale, cpu.test_varlen_attention_saves_no_score_matrix,
             cpu.test_varlen_attention_empty, cpu.test_varlen_attention_max_seqlen_may_exceed_lengths,
             cpu.test_varlen_attention_strided_cu_seqlens, cpu.test_varlen_attention_gradcheck,
             cpu.test_varlen_attention_opcheck, cpu.test_varlen_attention_compiles_fullgraph,
             cpu.test_varlen_attention_bad_input, cpu.test_varlen_attention_backward_op_bad_input,
             cpu.test_varlen_attention_in_inference_mode, cpu.test_varlen_equals_padded_attention_with_mask,
             cpu.test_packed_block_equals_reference_block]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("test", CPU_TESTS, ids=lambda t: t.__name__.removeprefix("test_"))
def test_cpu_tests_on_cuda(backend, test):
    run_cpu_tests_on_cuda([test], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_dim_limit(backend):
    # The CUDA C++ kernel holds Dh <= 256 in registers; past any kernel's limit the op must
    # raise an error naming the head dim, never launch a kernel that cannot fit.
    with on_cuda():
        cu = cpu._cu([3, 5])
        for Dh, dtype in ((257, torch.float16), (512, torch.float32)):
            q, k, v = cpu._qkv(8, 1, Dh, dtype)
            try:
                with fk.use_backend(backend):
                    got = fk.varlen_attention(q, k, v, cu, 5)
            except (RuntimeError, ValueError) as e:
                assert "head dim" in str(e) or "Dh" in str(e), str(e)
                continue
            assert backend != "cuda", f"the CUDA C++ kernel ran Dh = {Dh}"
            want = ref.varlen_attention(q.double(), k.double(), v.double(), cu, 5)
            torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cu_seqlens_rechecked_after_an_in_place_change(backend):
    # The per-call value check is cached per (tensor, version): an in-place change is seen.
    with on_cuda():
        cu = cpu._cu([3, 5])
        q, k, v = cpu._qkv(8, 1, 16, torch.float32)
        with fk.use_backend(backend):
            fk.varlen_attention(q, k, v, cu, 5)
            cu[1] = 9
            with pytest.raises(RuntimeError, match="non-decreasing"):
                fk.varlen_attention(q, k, v, cu, 9)
            cu[1] = 3
            fk.varlen_attention(q, k, v, cu, 5)  # valid again: checked and cached
            with pytest.raises(RuntimeError, match="length 5 > max_seqlen = 4"):
                fk.varlen_attention(q, k, v, cu, 4)  # same version, a max_seqlen below the cached check


def _layer_step(backend, q, k, v, cu, g, layers=4):
    """``layers`` attention calls on the same offsets, forward and backward, as a model's blocks make."""
    with fk.use_backend(backend):
        return grads_of(lambda a, b, c: sum(fk.varlen_attention(a, b, c, cu, 1000, causal=True)
                                            for _ in range(layers)), (q, k, v), g)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steady_state_does_not_sync(backend):
    # cu_seqlens is read on the host once per tensor (version); the layers after the first
    # and the backward must not copy it back again (finding 9 of issue 11).
    with on_cuda():
        cu = cpu._cu(LENGTHS)
        q, k, v = cpu._qkv(sum(LENGTHS), 4, 64, torch.bfloat16)
        g = torch.randn_like(q)
        with fk.use_backend(backend):
            fk.varlen_attention(q, k, v, cu, 1000, causal=True)  # the one check of this cu
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            _layer_step(backend, q, k, v, cu, g)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_bitwise_reproducible(backend, dtype):
    with on_cuda():
        cu = cpu._cu(LENGTHS)
        q, k, v = cpu._qkv(sum(LENGTHS), 4, 64, dtype)
        g = torch.randn_like(q)
        bitwise_equal(_layer_step(backend, q, k, v, cu, g, layers=1), _layer_step(backend, q, k, v, cu, g, layers=1))


@needs_two_gpus
@pytest.mark.parametrize("backend", BACKENDS)
def test_tensors_on_a_non_current_device(backend):
    torch.cuda.set_device(0)
    with on_cuda(1):
        lengths = [5, 0, 70, 33]
        cu = cpu._cu(lengths)
        q, k, v = cpu._qkv(sum(lengths), 2, 64, torch.float32)
        g = torch.randn_like(q)
        with fk.use_backend(backend):
            got = grads_of(lambda a, b, c: fk.varlen_attention(a, b, c, cu, 70, causal=True), (q, k, v), g)
        want = grads_of(lambda a, b, c: ref.varlen_attention(a, b, c, cu, 70, causal=True),
                        [t.double() for t in (q, k, v)], g.double())
    torch.cuda.synchronize(1)
    for a, b in zip(got, want):
        assert a.device == torch.device("cuda", 1)
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)
