"""MAE reconstruction: the fast path's loss and gradients (fastpath.mae_loss) against
flipkern.reference.mae on every masking backend, and the reference loss against
MAE's formula (norm_pix_loss on the removed patches)."""
import dataclasses

import pytest
import torch
from _tolerance import assert_close_to_reference
from conftest import usable_backends
from test_fastpath import MICRO, make_batch

import flipkern as fk
from flipkern import fastpath
from flipkern.reference import mae as rmae
from flipkern.reference import masking as rmask
from flipkern.reference import vit as rvit

BACKENDS = usable_backends(fk.masking.ALL_BACKENDS)


def _models(cls_token=False, dtype=torch.float64, depth=2):
    v = dataclasses.replace(MICRO.vision, cls_token=cls_token)
    torch.manual_seed(0)
    visual = rvit.VisionTransformer(v, MICRO.embed_dim)
    rvit.init_weights(visual)
    decoder = rmae.MAEDecoder(rmae.MAEDecoderConfig(width=16, depth=depth, heads=2), v.width, v.grid,
                              v.channels * v.patch_size ** 2)
    return visual.to(dtype), decoder.to(dtype)


def _ids(batch, num_patches, keep, seed=3):
    g = torch.Generator().manual_seed(seed)
    return rmask.random_keep_indices(batch, num_patches, num_keep=keep, generator=g)


def _loss_and_grads(visual, decoder, images, ids, fast):
    for m in (visual, decoder):
        m.zero_grad(set_to_none=True)
    x = fastpath.vision_tokens(visual, images, ids, fast=fast)
    loss = fastpath.mae_loss(decoder, visual, x, images, ids, fast=fast)
    loss.backward()
    params = {**{f"visual.{n}": p for n, p in visual.named_parameters()},
              **{f"decoder.{n}": p for n, p in decoder.named_parameters()}}
    return loss.detach(), {n: p.grad.detach().clone() for n, p in params.items() if p.grad is not None}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls_token", [False, True])
@pytest.mark.parametrize("keep", [4, 12])
def test_fast_path_loss_and_gradients_match_reference(backend, cls_token, keep):
    visual64, decoder64 = _models(cls_token)
    images, _ = make_batch(MICRO)
    ids = _ids(images.shape[0], MICRO.vision.num_patches, keep)
    ref_loss64, ref64 = _loss_and_grads(visual64, decoder64, images, ids, fast=False)
    with fk.use_backend(backend):
        loss64, fast64 = _loss_and_grads(visual64, decoder64, images, ids, fast=True)
    # float64: the same math in another order, so equal to rounding; every parameter but the
    # projection to the joint space (MAE reads the tokens, not the pooled embedding) gets a gradient
    names = {f"visual.{n}" for n, _ in visual64.named_parameters()} | {f"decoder.{n}" for n, _ in
                                                                          decoder64.named_parameters()}
    assert set(fast64) == set(ref64) == names - {"visual.proj.weight"}
    assert all(g.abs().sum() > 0 for g in ref64.values()), "a dead gradient"
    torch.testing.assert_close(loss64, ref_loss64, rtol=1e-12, atol=1e-12)
    for n in ref64:
        torch.testing.assert_close(fast64[n], ref64[n], rtol=1e-9, atol=1e-12, msg=n)
    # float32: the tolerance rule against the float64 reference
    visual32, decoder32 = _models(cls_token, torch.float32)
    ref_loss32, ref32 = _loss_and_grads(visual32, decoder32, images.float(), ids, fast=False)
    with fk.use_backend(backend):
        loss32, fast32 = _loss_and_grads(visual32, decoder32, images.float(), ids, fast=True)
    assert_close_to_reference(loss32, ref_loss64, ref_loss32, atol=1e-6, name="loss")
    for n in ref64:
        assert_close_to_reference(fast32[n], ref64[n], ref32[n], atol=1e-6, name=f"grad {n}")


def test_bf16_autocast_loss_within_dtype_tolerance():
    visual64, decoder64 = _models()
    visual, decoder = _models(dtype=torch.float32)
    got = {"ref64": [], "ref": [], "fast": []}
    for seed in (1, 2, 3):  # three batches: one scalar's error can cancel by luck
        images, _ = make_batch(MICRO, seed=seed)
        ids = _ids(images.shape[0], MICRO.vision.num_patches, 4, seed)
        got["ref64"].append(_loss_and_grads(visual64, decoder64, images, ids, fast=False)[0])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got["ref"].append(_loss_and_grads(visual, decoder, images.float(), ids, fast=False)[0])
            got["fast"].append(_loss_and_grads(visual, decoder, images.float(), ids, fast=True)[0])
    assert got["fast"][0].dtype == torch.float32  # the loss is taken in float32 under autocast
    ref64, ref, fast = (torch.stack(got[k]) for k in ("ref64", "ref", "fast"))
    assert_close_to_reference(fast, ref64, ref, atol=1e-4, name="loss")


def test_reference_loss_is_norm_pix_loss_on_removed_patches():
    g = torch.Generator().manual_seed(0)
    B, N, p = 3, 16, 4
    images = torch.randn(B, 3, 16, 16, generator=g, dtype=torch.float64)
    pred = torch.randn(B, N, 3 * p * p, generator=g, dtype=torch.float64)
    ids = _ids(B, N, 5)
    # MAE's formula, written out: per-patch normalized target, mean over pixels, mean over removed
    patches = images.reshape(B, 3, 4, p, 4, p).permute(0, 2, 4, 1, 3, 5).reshape(B, N, -1)
    target = (patches - patches.mean(-1, keepdim=True)) / (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    mask = torch.ones(B, N, dtype=torch.float64)
    for b in range(B):
        mask[b, ids[b]] = 0
    expected = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    loss = rmae.reconstruction_loss(pred, images, ids, p)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0)
    # the kept patches' predictions do not count
    pred2 = pred.clone()
    pred2[torch.arange(B)[:, None], ids] += 100.0
    torch.testing.assert_close(rmae.reconstruction_loss(pred2, images, ids, p), loss, rtol=0, atol=0)


def test_removed_indices_are_the_complement_in_order():
    ids = _ids(4, 16, 6)
    removed = rmask.removed_indices(ids, 16)
    assert removed.shape == (4, 10)
    for b in range(4):
        assert sorted(ids[b].tolist() + removed[b].tolist()) == list(range(16))
        assert removed[b].tolist() == sorted(removed[b].tolist())


@pytest.mark.parametrize("kw, message", [(dict(width=30, heads=4), "divisible by heads"),
                                         (dict(width=18, heads=3), "divisible by 4")])
def test_decoder_config_errors_name_the_field(kw, message):
    with pytest.raises(ValueError, match=message):
        rmae.MAEDecoderConfig(**kw)


def test_image_tokens_of_clip_forward_are_the_towers_tokens():
    from test_fastpath import make_model
    model = make_model(MICRO)
    images, tokens = make_batch(MICRO)
    ids = _ids(images.shape[0], MICRO.vision.num_patches, 8)
    for fast in (False, True):
        out = fastpath.clip_forward(model, images, tokens, ids, fast=fast, image_tokens=True)
        torch.testing.assert_close(out["image_tokens"], model.visual.forward_tokens(images, ids),
                                   rtol=1e-12, atol=1e-12)
        plain = fastpath.clip_forward(model, images, tokens, ids, fast=fast)
        assert "image_tokens" not in plain
        torch.testing.assert_close(plain["image_features"], out["image_features"], rtol=0, atol=0)
    with pytest.raises(ValueError, match="image_tokens"):
        fastpath.clip_forward(model, images, tokens, ids, image_tokens=True,
                              keep_lengths=torch.full((images.shape[0],), 4))
