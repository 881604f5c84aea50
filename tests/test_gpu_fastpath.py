"""The fast path, apply_to_open_clip and flipkern-pretrain on a GPU, on each GPU backend:
the same models, batches and tolerance rule as test_fastpath.py, test_open_clip_patch.py
and test_pretrain.py, moved to CUDA. Skipped without CUDA; benchmarks/run_gpu.sh runs them."""
import contextlib
import json
import os

import pytest
import test_fastpath as fp
import test_open_clip_patch as ocp
import test_pretrain as tp
import torch
from _gpu import gpu_backends, needs_cuda
from _tolerance import assert_close_to_reference

import flipkern as fk
from flipkern import fastpath

pytestmark = needs_cuda
BACKENDS = gpu_backends()


def _cuda(*tensors):
    return [t.cuda() if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", fp.CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_fast_path_float64_matches_reference(backend, case):
    cfg = fp.make_config(**case)
    model = fp.make_model(cfg).cuda()
    images, tokens = _cuda(*fp.make_batch(cfg))
    for ratio in (0.0, 0.75):
        ids = fp.keep(cfg, images.shape[0], ratio)
        ids = ids.cuda() if ids is not None else None
        ref, ref_loss = fp.run(model, images, tokens, ids, fast=False)
        with fk.use_backend(backend):
            out, loss = fp.run(model, images, tokens, ids, fast=True)
        for k in ref:
            torch.testing.assert_close(out[k], ref[k], rtol=1e-9, atol=1e-10, msg=k)
        torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    # per-sample K: the vision tower runs varlen attention on the packed kept tokens
    ids = fp.keep(cfg, images.shape[0], 0.5).cuda()
    keep_lengths = torch.tensor([1, 8, 7, 2, 8, 3], device="cuda")
    ref, _ = fp.run(model, images, tokens, ids, fast=False, keep_lengths=keep_lengths)
    with fk.use_backend(backend):
        out, _ = fp.run(model, images, tokens, ids, fast=True, keep_lengths=keep_lengths)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-9, atol=1e-10, msg=k)
    assert fastpath.backends_used()["varlen_attention"] == backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_fast_path_float32_gradients_within_tolerance(backend, loss):
    # every parameter's gradient against float64, within 3x the reference's own float32 error
    cfg = fp.make_config(loss=loss)
    model64, model32 = fp.make_model(cfg).cuda(), fp.make_model(cfg, torch.float32).cuda()
    images, tokens = _cuda(*fp.make_batch(cfg))
    ids = fp.keep(cfg, images.shape[0], 0.75).cuda()
    _, ref64 = fp._grads(model64, images, tokens, ids, fast=False)
    _, ref32 = fp._grads(model32, images.float(), tokens, ids, fast=False)
    with fk.use_backend(backend):
        _, fast32 = fp._grads(model32, images.float(), tokens, ids, fast=True)
    assert set(fast32) == set(ref64)
    for n in ref64:
        assert_close_to_reference(fast32[n], ref64[n], ref32[n], atol=1e-6, name=f"grad {n}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fast_path_bf16_autocast_within_tolerance(backend):
    # What a GPU user runs: bf16 autocast, masked, the loss in float32. Errors over three
    # batches (one scalar loss can cancel by luck), as test_fastpath's CPU version.
    cfg = fp.make_config()
    model64, model = fp.make_model(cfg).cuda(), fp.make_model(cfg, torch.float32).cuda()
    got = {"ref64": [], "ref": [], "fast": []}
    for seed in (1, 2, 3):
        images, tokens = _cuda(*fp.make_batch(cfg, seed=seed))
        ids = fp.keep(cfg, images.shape[0], 0.5, seed=seed).cuda()
        got["ref64"].append(fp.run(model64, images, tokens, ids, fast=False))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got["ref"].append(fp.run(model, images.float(), tokens, ids, fast=False))
            with fk.use_backend(backend):
                got["fast"].append(fp.run(model, images.float(), tokens, ids, fast=True))
    for k in ("image_features", "text_features"):
        ref64, ref, fast = (torch.stack([o[k] for o, _ in got[n]]) for n in ("ref64", "ref", "fast"))
        assert_close_to_reference(fast, ref64, ref, atol=1e-4, name=k)
    ref64, ref, fast = (torch.stack([loss for _, loss in got[n]]) for n in ("ref64", "ref", "fast"))
    assert_close_to_reference(fast, ref64, ref, atol=1e-4, name="loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_open_clip_patched_matches_unpatched(backend, kind):
    # float64: the patched forward, loss and every gradient equal stock open_clip's
    model = ocp.tiny_model().train().cuda()
    make_loss = ocp.ClipLoss if kind == "clip" else ocp.SigLipLoss
    loss_ref, loss_fast = make_loss(), make_loss()
    patched, report = ocp.patched_copy(model, loss=loss_fast)
    assert report["visual"] == report["text"] == report["loss"] == "flipkern"
    images, text = _cuda(*ocp.batch())
    results = []
    for m, loss_fn in ((model, loss_ref), (patched, loss_fast)):
        with fk.use_backend(backend) if m is patched else contextlib.nullcontext():
            out = ocp.forward(m, images, text)
            value = loss_fn(*out[:3]) if kind == "clip" else loss_fn(*out)
            m.zero_grad(set_to_none=True)
            value.backward()
        results.append((out, value.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (ref_out, ref_value, ref_grads), (out, value, grads) = results
    for a, b in zip(out, ref_out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(value, ref_value, rtol=1e-9, atol=1e-10)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-7, atol=1e-9, msg=n)


@pytest.mark.parametrize("backend", BACKENDS)
def test_open_clip_patched_bf16_autocast_within_tolerance(backend):
    model64 = ocp.tiny_model().train().cuda()
    model32 = ocp.tiny_model().train().float().cuda()
    patched32, _ = ocp.patched_copy(model32)
    images, text = _cuda(*ocp.batch())
    ref64 = ocp.forward(model64, images, text)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref = ocp.forward(model32, images.float(), text)
        with fk.use_backend(backend):
            out = ocp.forward(patched32, images.float(), text)
    for name, o, r64, r in zip(("image", "text"), out, ref64, ref):
        assert_close_to_reference(o.float(), r64, r.float(), atol=1e-4, name=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_pretrain_runs_on_cuda(tmp_path, precision):
    # A short flipkern-pretrain on the GPU with the default (fastest usable) backends.
    out = str(tmp_path / "run")
    assert tp.main(tp.MICRO + ["--steps", "4", "--device", "cuda", "--precision", precision,
                               "--output-dir", out, "--eval-every", "4"]) == 0
    records = tp._train_records(out)
    assert len(records) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["steps"] == 4 and summary["backends"].get("varlen_attention") in ("triton", "cuda")
    assert tp._read_config(out)["device"].startswith("cuda")
