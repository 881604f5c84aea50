"""Every bad input gets the same error on every backend (issue 16).

Each case runs on every backend usable here (reference, cpu, triton under
TRITON_INTERPRET=1, cuda on a GPU) and must raise the pinned exception with the
pinned message: the same text whichever backend runs, since the Python checks
(flipkern/_checks.py) and the C++ ones (csrc/checks.h, csrc/attention_checks.h)
word them alike. Shape/dtype errors are ValueError at the front door; errors
found by reading values are RuntimeError, as TORCH_CHECK raises them.
"""
import re

import pytest
import torch
from conftest import usable_backends

import flipkern as fk
from flipkern import _checks, fastpath

BACKENDS = usable_backends()
I32 = torch.int32


def _x():
    return torch.randn(2, 5, 4)


def _ids(rows):
    return torch.tensor(rows, dtype=torch.long)


def _q():
    return torch.randn(8, 2, 16)


def _attn(cu, max_seqlen=6):
    q = _q()
    return lambda: fk.varlen_attention(q, q, q, torch.tensor(cu, dtype=I32), max_seqlen)


CASES = {
    # masking
    "drop_tokens index too large": (lambda: fk.drop_tokens(_x(), _ids([[0, 5], [1, 2]])), RuntimeError,
                                    "flipkern.drop_tokens: ids_keep has values in [0, 5], "
                                    "outside the valid range [0, 5)"),
    "drop_tokens negative index": (lambda: fk.drop_tokens(_x(), _ids([[0, -1], [1, 2]])), RuntimeError,
                                   "flipkern.drop_tokens: ids_keep has values in [-1, 2], "
                                   "outside the valid range [0, 5)"),
    "drop_tokens int32 ids": (lambda: fk.drop_tokens(_x(), _ids([[0, 1], [1, 2]]).int()), ValueError,
                              "flipkern.drop_tokens: ids_keep must have dtype in ['torch.int64'], got torch.int32"),
    "gather_patches index too large": (lambda: fk.gather_patches(torch.randn(2, 3, 8, 8), _ids([[0, 4], [1, 2]]), 4),
                                       RuntimeError, "flipkern.gather_patches: ids_keep has values in [0, 4], "
                                                     "outside the valid range [0, 4)"),
    "gather_patches patch 0": (lambda: fk.gather_patches(torch.randn(2, 3, 8, 8), _ids([[0, 1], [1, 2]]), 0),
                               ValueError, "flipkern.gather_patches: patch_size must be >= 1, got 0"),
    "restore_tokens repeated position": (lambda: fk.restore_tokens(_x()[:, :2], _ids([[0, 0], [1, 2]]), 5, 0.0),
                                         RuntimeError, "flipkern.restore_tokens: ids_keep repeats a position within "
                                                       "a sample; each kept position must be unique"),
    "restore_tokens index too large": (lambda: fk.restore_tokens(_x()[:, :2], _ids([[0, 5], [1, 2]]), 5, 0.0),
                                       RuntimeError, "flipkern.restore_tokens: ids_keep has values in [0, 5], "
                                                     "outside the valid range [0, 5)"),
    "random_keep_indices ratio nan": (lambda: fk.random_keep_indices(2, 5, keep_ratio=float("nan")), ValueError,
                                      "flipkern.random_keep_indices: keep_ratio must be in (0, 1], got nan"),
    "topk_keep_indices num_keep > N": (lambda: fk.topk_keep_indices(torch.randn(2, 3), 4), ValueError,
                                       "flipkern.topk_keep_indices: num_keep must be <= N = 3, got 4"),
    # attention (the reference used to return 7 or 9 rows for these three)
    "varlen_attention cu_seqlens[0] != 0": (_attn([1, 3, 3, 8]), RuntimeError,
                                            "flipkern.varlen_attention: cu_seqlens[0] must be 0, got 1"),
    "varlen_attention decreasing cu_seqlens": (_attn([0, 3, 2, 8]), RuntimeError,
                                               "flipkern.varlen_attention: cu_seqlens must be non-decreasing, but "
                                               "cu_seqlens[2] = 2 < cu_seqlens[1] = 3"),
    "varlen_attention cu_seqlens[-1] != total": (_attn([0, 3, 3, 7]), RuntimeError,
                                                 "flipkern.varlen_attention: cu_seqlens[-1] = 7 must equal the "
                                                 "number of packed rows of q (8)"),
    "varlen_attention decreasing before too long": (_attn([0, 9, 2, 8], 5), RuntimeError,
                                                    "flipkern.varlen_attention: sequence 0 has length 9 > "
                                                    "max_seqlen = 5"),
    "varlen_attention length > max_seqlen": (_attn([0, 3, 8], 4), RuntimeError,
                                             "flipkern.varlen_attention: sequence 1 has length 5 > max_seqlen = 4"),
    # packing (pack packed 5 rows with cu = [0, 2, 3] for float lengths [2.7, 1.2])
    "pack float lengths": (lambda: fk.pack(_x(), torch.tensor([2.7, 1.2])), ValueError,
                           "flipkern.pack: lengths must have dtype in ['torch.uint8', 'torch.int8', 'torch.int16', "
                           "'torch.int32', 'torch.int64'], got torch.float32"),
    "pack negative length": (lambda: fk.pack(_x(), torch.tensor([-1, 1])), RuntimeError,
                             "flipkern.pack: lengths has values in [-1, 1], outside the valid range [0, 5]"),
    "cu_seqlens_from_lengths float": (lambda: fk.cu_seqlens_from_lengths(torch.tensor([2.5])), ValueError,
                                      "flipkern.cu_seqlens_from_lengths: lengths must have dtype in ['torch.uint8', "
                                      "'torch.int8', 'torch.int16', 'torch.int32', 'torch.int64'], got torch.float32"),
    "unpack cu_seqlens[-1] != total": (lambda: fk.unpack(torch.randn(5, 3), torch.tensor([0, 2, 4]), 3),
                                       RuntimeError, "flipkern.unpack: cu_seqlens[-1] = 4 must equal the number of "
                                                     "packed rows of packed (5)"),
    # losses
    "clip_loss chunk 0": (lambda: fk.clip_loss(torch.randn(4, 8), torch.randn(4, 8), 1.0, chunk_size=0),
                          ValueError, "flipkern.clip_loss: chunk_size must be >= 1, got 0"),
    "siglip_loss 1-D scale": (lambda: fk.siglip_loss(torch.randn(4, 8), torch.randn(4, 8), torch.ones(1), 0.0),
                              ValueError, "flipkern.siglip_loss: logit_scale must be a 0-d tensor (a scalar), "
                                          "got shape (1,)"),
    "clip_loss no rows": (lambda: fk.clip_loss(torch.randn(0, 8), torch.randn(0, 8), 1.0), ValueError,
                          "flipkern.clip_loss: image_features must have at least one row (the loss is a mean over "
                          "them)"),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_same_error_on_every_backend(case, backend):
    fn, exc, message = CASES[case]
    with fk.use_backend(backend), pytest.raises(exc) as info:
        fn()
    assert str(info.value).splitlines()[0] == message


def test_fastpath_keep_lengths_zero_is_an_error_naming_it():
    # keep_lengths 0 gave all-zero image features on the fast path and NaN on the reference.
    from test_fastpath import keep, make_batch, make_config, make_model
    cfg = make_config()
    model = make_model(cfg)
    images, tokens = make_batch(cfg)
    ids = keep(cfg, images.shape[0], 0.5)
    zero = torch.tensor([0] + [ids.shape[1]] * (images.shape[0] - 1))
    for fast in (True, False):
        with pytest.raises(RuntimeError, match=re.escape(f"flipkern.fastpath: keep_lengths has values in "
                                                         f"[0, {ids.shape[1]}], outside the valid range "
                                                         f"[1, {ids.shape[1]}]")):
            fastpath.clip_forward(model, images, tokens, ids, fast=fast, keep_lengths=zero)


# ----------------------------------------------------------------------------- checks run once

@pytest.fixture
def reads(monkeypatch):
    """Counts the value checks' reads of a tensor (each one a host-device sync on CUDA)."""
    count = []
    real = _checks.read_values

    def counted(t):
        count.append(tuple(t.shape))
        return real(t)

    monkeypatch.setattr(_checks, "read_values", counted)
    return count


@pytest.mark.parametrize("backend", [b for b in ("reference", "triton") if b in BACKENDS])
def test_index_checks_read_each_index_tensor_once(backend, reads):
    """What this proves: the forward and backward of two steps with the same ids_keep read
    its values once (on CUDA: one sync, not four); an in-place write or a new tensor with
    the same values is read again. The cpu/cuda backends check in C++ (csrc/checks.h)."""
    x = torch.randn(2, 6, 4, requires_grad=True)
    ids = _ids([[0, 5], [1, 2]])
    with fk.use_backend(backend):
        for _ in range(2):
            fk.drop_tokens(x, ids).sum().backward()
        assert len(reads) == 1
        ids[0, 0] = 3  # bumps the version: the values must be read again
        fk.drop_tokens(x, ids).sum().backward()
        assert len(reads) == 2
        fk.drop_tokens(x, ids.clone()).sum().backward()
        assert len(reads) == 3
        ids[0, 0] = 6
        with pytest.raises(RuntimeError, match="outside the valid range"):
            fk.drop_tokens(x, ids)


@pytest.mark.parametrize("backend", [b for b in ("reference", "triton") if b in BACKENDS])
def test_cu_seqlens_read_once_for_every_layer(backend, reads):
    q = _q().requires_grad_()
    cu = torch.tensor([0, 3, 8], dtype=I32)
    with fk.use_backend(backend):
        out = q
        for _ in range(3):  # three layers sharing the offsets, forward and backward
            out = fk.varlen_attention(out, out, out, cu, 5)
        out.sum().backward()
        assert len(reads) == 1
        # a smaller max_seqlen than the longest sequence still fails, with the exact message
        with pytest.raises(RuntimeError, match="sequence 1 has length 5 > max_seqlen = 4"):
            fk.varlen_attention(q, q, q, cu, 4)


def test_checks_of_inference_tensors_run_every_time(reads):
    # no version counter to tell an in-place write, so no caching
    with torch.inference_mode():
        ids = _ids([[0, 1]])
        x = torch.randn(1, 3, 2)
        with fk.use_backend("reference"):
            fk.drop_tokens(x, ids)
            fk.drop_tokens(x, ids)
    assert len(reads) == 2
