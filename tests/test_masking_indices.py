"""random_keep_indices / topk_keep_indices: equality with flipkern.reference, validity,
reproducibility, and the uniformity of the random subsets (statistical, fixed seeds)."""
import math

import pytest
import torch
from conftest import usable_backends

import flipkern as fk
from flipkern.reference import masking as ref

# triton has no key-selection kernel (its tensors take the cpu/cuda torch path): its cases
# would repeat the cpu ones.
BACKENDS = [b for b in usable_backends(fk.masking.ALL_BACKENDS) if b != "triton"]
KERNELS = [b for b in BACKENDS if b != "reference"]  # reference vs reference checks nothing


def _gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("sorted_", [True, False])
@pytest.mark.parametrize("B,N,K", [(5, 16, 4), (3, 196, 49), (4, 7, 7), (4, 7, 1), (0, 7, 3), (3, 7, 0)])
def test_random_keep_matches_reference(backend, sorted_, B, N, K):
    with fk.use_backend(backend):
        ids = fk.random_keep_indices(B, N, num_keep=K, generator=_gen(3), sorted=sorted_)
    expect = ref.random_keep_indices(B, N, num_keep=K, generator=_gen(3), sorted=sorted_)
    assert ids.dtype == torch.int64 and ids.shape == (B, K)
    assert torch.equal(ids, expect)


@pytest.mark.parametrize("sorted_", [True, False])
def test_keep_smallest_breaks_ties_like_a_stable_sort(sorted_):
    # Few distinct noise values, so most rows tie across the K boundary.
    noise = torch.randint(0, 4, (64, 12)).float() / 4
    assert torch.equal(fk.masking._keep_smallest(noise, 5, sorted_), ref.keep_smallest(noise, 5, sorted_))


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_keep_valid_and_reproducible(backend):
    B, N = 64, 50
    with fk.use_backend(backend):
        a = fk.random_keep_indices(B, N, keep_ratio=0.25, generator=_gen(7))
        b = fk.random_keep_indices(B, N, keep_ratio=0.25, generator=_gen(7))
        c = fk.random_keep_indices(B, N, keep_ratio=0.25, generator=_gen(8))
        unsorted = fk.random_keep_indices(B, N, keep_ratio=0.25, generator=_gen(7), sorted=False)
    assert a.shape == (B, 12)  # K = int(50 * 0.25)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < N
    assert bool((a[:, 1:] > a[:, :-1]).all())  # sorted and therefore unique
    assert torch.equal(unsorted.sort(dim=1).values, a)  # the same subset, another order


def test_random_keep_marginals_are_uniform():
    """Each position is kept with probability K/N. With a fixed seed this is
    deterministic; the bound is a union bound over the N positions at a total
    false-alarm probability of 1e-6 under the normal approximation to the binomial
    (B = 20000 samples, so the approximation is accurate at this tail)."""
    B, N, K = 20000, 16, 4
    ids = fk.random_keep_indices(B, N, num_keep=K, generator=_gen(0))
    counts = torch.bincount(ids.flatten(), minlength=N).double()
    q = K / N
    z = (counts - B * q) / math.sqrt(B * q * (1 - q))
    z_crit = float(torch.special.ndtri(torch.tensor(1 - 1e-6 / (2 * N), dtype=torch.float64)))
    assert float(z.abs().max()) < z_crit, (z, z_crit)


def test_random_keep_subsets_are_uniform():
    """Every K-subset is equally likely (not just the marginals): chi-square test over the
    C(5, 2) = 10 subsets, p-value from the chi-square survival function (9 dof) > 1e-6."""
    B, N, K = 10000, 5, 2
    ids = fk.random_keep_indices(B, N, num_keep=K, generator=_gen(1))
    code = ids[:, 0] * N + ids[:, 1]
    counts = torch.bincount(code, minlength=N * N).double()
    counts = counts[counts > 0]
    assert counts.numel() == math.comb(N, K)
    expected = B / math.comb(N, K)
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    dof = counts.numel() - 1
    p_value = float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                            torch.tensor(chi2 / 2, dtype=torch.float64)))
    assert p_value > 1e-6, (chi2, p_value)


def test_random_keep_bad_input():
    with pytest.raises(ValueError, match="random_keep_indices.*exactly one of keep_ratio and num_keep"):
        fk.random_keep_indices(2, 10, keep_ratio=0.5, num_keep=3)
    with pytest.raises(ValueError, match="num_keep must be in"):
        fk.random_keep_indices(2, 10, num_keep=11)
    with pytest.raises(ValueError, match="keep_ratio must be in"):
        fk.random_keep_indices(2, 10, keep_ratio=0.0)
    with pytest.raises(ValueError, match="batch must be >= 0"):
        fk.random_keep_indices(-1, 10, num_keep=3)
    with pytest.raises(ValueError, match="num_tokens must be an int"):
        fk.random_keep_indices(2, 10.0, num_keep=3)
    with pytest.raises(ValueError, match="generator is on cpu but device is meta"):
        fk.random_keep_indices(2, 10, num_keep=3, generator=_gen(0), device="meta")


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sorted_", [True, False])
def test_topk_keep_matches_reference(backend, dtype, sorted_):
    scores = torch.randperm(3 * 40).reshape(3, 40).to(dtype)  # distinct values, exact in every dtype
    scores = scores.t().contiguous().t()  # and a strided view
    with fk.use_backend(backend):
        ids = fk.topk_keep_indices(scores, 10, sorted=sorted_)
    assert torch.equal(ids, ref.topk_keep_indices(scores, 10, sorted=sorted_))
    if not sorted_:
        kept = scores.gather(1, ids)
        assert bool((kept[:, 1:] <= kept[:, :-1]).all())  # decreasing score


@pytest.mark.parametrize("backend", BACKENDS)
def test_topk_keep_with_ties_keeps_a_valid_top_k(backend):
    scores = torch.randint(0, 3, (8, 20)).float()
    with fk.use_backend(backend):
        ids = fk.topk_keep_indices(scores, 7)
    assert bool((ids[:, 1:] > ids[:, :-1]).all())
    kept = scores.gather(1, ids).sort(dim=1, descending=True).values
    assert torch.equal(kept, scores.topk(7, dim=1).values)


def test_topk_keep_bad_input():
    with pytest.raises(ValueError, match="scores must be 2-D"):
        fk.topk_keep_indices(torch.randn(10), 3)
    with pytest.raises(ValueError, match="scores must have dtype"):
        fk.topk_keep_indices(torch.zeros(2, 10, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="num_keep must be <= N = 10"):
        fk.topk_keep_indices(torch.randn(2, 10), 11)
    with pytest.raises(ValueError, match="num_keep must be >= 0"):
        fk.topk_keep_indices(torch.randn(2, 10), -1)
