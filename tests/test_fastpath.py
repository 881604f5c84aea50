"""The fast path (flipkern.fastpath) against the reference CLIP model, from the same weights and data.

Float64 runs of both paths must agree to rounding; float32 and bf16-autocast
runs follow the tolerance discipline (error against the float64 reference at
most 3x the reference's own error in that precision). Gradients, a 20-step
AdamW trajectory and checkpoint round trips are checked the same way.
"""
import dataclasses
import io

import pytest
import torch
from _tolerance import assert_close_to_reference

import flipkern
from flipkern import fastpath
from flipkern.reference import clip as rclip
from flipkern.reference import masking as rmask
from flipkern.reference.text import eot_positions

TINY = rclip.PRESETS["tiny"]
EOT = TINY.text.eot_id
# the "tiny" preset scaled down further (same vocabulary and structure) so that
# float64 training runs stay quick on a shared 2-core CPU
MICRO = dataclasses.replace(
    TINY, embed_dim=32,
    vision=dataclasses.replace(TINY.vision, image_size=16, patch_size=4, width=32, depth=2, heads=2),
    text=dataclasses.replace(TINY.text, context_length=16, width=32, depth=2, heads=2))


def make_config(loss="clip", cls_token=False, pos_embed="learned", base=MICRO):
    vision = dataclasses.replace(base.vision, cls_token=cls_token, pos_embed=pos_embed)
    return dataclasses.replace(base, loss=loss, vision=vision)


def make_model(cfg, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return rclip.CLIP(cfg).to(dtype)


def make_batch(cfg, batch=6, seed=1, dtype=torch.float64):
    """Images, captions of varied length ending in eot then padding (one with no eot at all)."""
    g = torch.Generator().manual_seed(seed)
    v, t = cfg.vision, cfg.text
    images = torch.randn(batch, v.channels, v.image_size, v.image_size, generator=g, dtype=dtype)
    tokens = torch.randint(1, EOT, (batch, t.context_length), generator=g)
    lengths = torch.randint(2, t.context_length - 1, (batch,), generator=g)
    for b in range(batch - 1):  # the last caption runs to the end of the context: no eot
        tokens[b, lengths[b]] = EOT
        tokens[b, lengths[b] + 1:] = t.pad_id
    return images, tokens


def keep(cfg, batch, ratio, seed=2):
    if ratio == 0.0:
        return None
    g = torch.Generator().manual_seed(seed)
    return rmask.random_keep_indices(batch, cfg.vision.num_patches, keep_ratio=1 - ratio, generator=g)


def run(model, images, tokens, ids_keep, fast, **kw):
    out = fastpath.clip_forward(model, images, tokens, ids_keep, fast=fast, **kw)
    return out, fastpath.contrastive_loss(model, out, fast=fast)


CASES = [dict(loss="clip"), dict(loss="siglip"), dict(loss="clip", cls_token=True),
         dict(loss="clip", pos_embed="sincos")]


@pytest.mark.parametrize("ratio", [0.0, 0.5, 0.75])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c.values())))
def test_forward_and_loss_float64_match_reference(case, ratio):
    cfg = make_config(**case, base=TINY)
    model = make_model(cfg)
    images, tokens = make_batch(cfg)
    ids = keep(cfg, images.shape[0], ratio)
    ref, ref_loss = run(model, images, tokens, ids, fast=False)
    out, loss = run(model, images, tokens, ids, fast=True)
    assert set(out) == set(ref)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-12, msg=k)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)


def _grads(model, images, tokens, ids, fast):
    model.zero_grad(set_to_none=True)
    _, loss = run(model, images, tokens, ids, fast=fast)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("loss", ["clip", "siglip"])
@pytest.mark.parametrize("ratio", [0.0, 0.75])
def test_gradients_match_reference(loss, ratio):
    cfg = make_config(loss=loss)
    model64 = make_model(cfg)
    images, tokens = make_batch(cfg)
    ids = keep(cfg, images.shape[0], ratio)
    _, ref64 = _grads(model64, images, tokens, ids, fast=False)
    _, fast64 = _grads(model64, images, tokens, ids, fast=True)
    assert set(fast64) == set(ref64) == {n for n, _ in model64.named_parameters()}
    for n in ref64:
        torch.testing.assert_close(fast64[n], ref64[n], rtol=1e-9, atol=1e-12, msg=n)

    model32 = make_model(cfg, torch.float32)
    _, ref32 = _grads(model32, images.float(), tokens, ids, fast=False)
    _, fast32 = _grads(model32, images.float(), tokens, ids, fast=True)
    for n in ref64:
        assert_close_to_reference(fast32[n], ref64[n], ref32[n], atol=1e-6, name=f"grad {n}")


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_float32_and_bf16_autocast_within_dtype_tolerance(ratio, autocast):
    """Errors are taken over three batches: the error of one scalar loss can cancel by luck."""
    cfg = make_config()
    model64, model = make_model(cfg), make_model(cfg, torch.float32)
    got = {"ref64": [], "ref": [], "fast": []}
    for seed in (1, 2, 3):
        images, tokens = make_batch(cfg, seed=seed)
        ids = keep(cfg, images.shape[0], ratio, seed=seed)
        got["ref64"].append(run(model64, images, tokens, ids, fast=False))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            got["ref"].append(run(model, images.float(), tokens, ids, fast=False))
            got["fast"].append(run(model, images.float(), tokens, ids, fast=True))
    atol = 1e-4 if autocast else 1e-6
    for k in ("image_features", "text_features"):
        assert got["fast"][0][0][k].dtype == got["ref"][0][0][k].dtype
        ref64, ref, fast = (torch.stack([o[k] for o, _ in got[n]]) for n in ("ref64", "ref", "fast"))
        assert_close_to_reference(fast, ref64, ref, atol=atol, name=k)
    ref64, ref, fast = (torch.stack([loss for _, loss in got[n]]) for n in ("ref64", "ref", "fast"))
    assert_close_to_reference(fast, ref64, ref, atol=atol, name="loss")


def _train(cfg, dtype, fast, steps=20, batch=8):
    model = make_model(cfg, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    losses = []
    for step in range(steps):
        images, tokens = make_batch(cfg, batch=batch, seed=100 + step, dtype=dtype)
        ids = keep(cfg, batch, 0.5 if step % 2 else 0.75, seed=200 + step)
        _, loss = run(model, images, tokens, ids, fast=fast)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64), model


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_twenty_adamw_steps_follow_the_reference_trajectory(loss):
    cfg = make_config(loss=loss)
    ref64, _ = _train(cfg, torch.float64, fast=False)
    fast64, _ = _train(cfg, torch.float64, fast=True)
    torch.testing.assert_close(fast64, ref64, rtol=1e-9, atol=1e-9)
    ref32, _ = _train(cfg, torch.float32, fast=False)
    fast32, _ = _train(cfg, torch.float32, fast=True)
    assert ref64[-1] < ref64[0], "the tiny run should learn something"
    assert_close_to_reference(fast32, ref64, ref32, atol=1e-5, name="loss trajectory")


@pytest.mark.parametrize("trained_with_fast", [True, False])
def test_checkpoint_from_one_path_gives_same_embeddings_in_the_other(trained_with_fast):
    cfg = make_config()
    _, model = _train(cfg, torch.float64, fast=trained_with_fast, steps=3)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    fresh = make_model(cfg, seed=123)
    fresh.load_state_dict(torch.load(buf))  # strict: same names and shapes
    images, tokens = make_batch(cfg, seed=7)
    ids = keep(cfg, images.shape[0], 0.5)
    before = fastpath.clip_forward(model, images, tokens, ids, fast=trained_with_fast)
    after = fastpath.clip_forward(fresh, images, tokens, ids, fast=not trained_with_fast)
    for k in ("image_features", "text_features", "logit_scale"):
        torch.testing.assert_close(after[k], before[k], rtol=1e-12, atol=1e-12, msg=k)


def test_state_dict_is_the_reference_models():
    cfg = make_config(loss="siglip", cls_token=True)
    model = make_model(cfg)
    names = set(model.state_dict())
    fastpath.clip_forward(model, *make_batch(cfg), None, fast=True)
    assert set(model.state_dict()) == names  # the fast path adds no modules, buffers or parameters


@pytest.mark.parametrize("cls_token", [False, True])
def test_per_sample_keep_lengths_run_varlen_and_match_each_sample_alone(cls_token):
    cfg = make_config(cls_token=cls_token)
    model = make_model(cfg)
    images, tokens = make_batch(cfg)
    ids = keep(cfg, images.shape[0], 0.5)
    keep_lengths = torch.tensor([1, 8, 7, 2, 8, 3])
    ref, ref_loss = run(model, images, tokens, ids, fast=False, keep_lengths=keep_lengths)
    out, loss = run(model, images, tokens, ids, fast=True, keep_lengths=keep_lengths)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-12, atol=1e-12, msg=k)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
    assert fastpath.backends_used()["vision_attention"].startswith("varlen")
    # every sample at the full K is the shared-K dense path
    full = torch.full((images.shape[0],), ids.shape[1])
    dense, _ = run(model, images, tokens, ids, fast=True)
    varlen, _ = run(model, images, tokens, ids, fast=True, keep_lengths=full)
    torch.testing.assert_close(varlen["image_features"], dense["image_features"], rtol=1e-12, atol=1e-12)


def test_backends_used_names_every_fast_path_op():
    cfg = make_config()
    model = make_model(cfg)
    images, tokens = make_batch(cfg)
    run(model, images, tokens, keep(cfg, images.shape[0], 0.5), fast=True)
    used = fastpath.backends_used()
    for op in ("patch_embed", "vision_attention", "text_attention", "varlen_attention", "clip_loss",
               "gather_patches"):
        assert op in used, op
    for op, backend in flipkern.backends_used().items():  # the ops' own choices are passed on as they are
        assert used[op] == backend


def test_text_tower_spends_nothing_on_padding(monkeypatch):
    """The packed blocks see exactly sum(eot + 1) tokens."""
    cfg = make_config()
    model = make_model(cfg)
    images, tokens = make_batch(cfg)
    seen = []
    real = flipkern.varlen_attention

    def spy(q, k, v, cu_seqlens, max_seqlen, **kw):
        seen.append((q.shape[0], cu_seqlens.clone(), kw.get("causal")))
        return real(q, k, v, cu_seqlens, max_seqlen, **kw)

    monkeypatch.setattr("flipkern.blocks.varlen_attention", spy)
    fastpath.clip_forward(model, images, tokens, None, fast=True)
    expected = eot_positions(tokens, EOT) + 1
    assert len(seen) == cfg.text.depth
    for total, cu, causal in seen:
        assert causal is True
        assert total == int(expected.sum())
        torch.testing.assert_close(cu[1:] - cu[:-1], expected.to(torch.int32))


def test_bad_arguments_name_themselves():
    cfg = make_config()
    model = make_model(cfg)
    images, tokens = make_batch(cfg)
    ids = keep(cfg, images.shape[0], 0.5)
    with pytest.raises(ValueError, match="keep_lengths"):
        fastpath.clip_forward(model, images, tokens, ids, keep_lengths=torch.ones(3, dtype=torch.int64))
    for fast in (True, False):
        with pytest.raises(RuntimeError, match=r"keep_lengths has values in \[99, 99\]"):
            fastpath.clip_forward(model, images, tokens, ids, fast=fast, keep_lengths=torch.full((6,), 99))
        # a sample that keeps nothing has no image feature (was zeros fast, NaN reference)
        with pytest.raises(RuntimeError, match=r"keep_lengths has values in \[0, 8\], "
                                                 r"outside the valid range \[1, 8\]"):
            fastpath.clip_forward(model, images, tokens, ids, fast=fast,
                                  keep_lengths=torch.tensor([0, 8, 7, 2, 8, 3]))
        with pytest.raises(ValueError, match="keep_lengths must have dtype"):
            fastpath.clip_forward(model, images, tokens, ids, fast=fast, keep_lengths=torch.full((6,), 2.5))
    with pytest.raises(ValueError, match="keep_lengths needs ids_keep"):
        fastpath.clip_forward(model, images, tokens, None, keep_lengths=torch.ones(6, dtype=torch.int64))
    long_tokens = torch.cat([tokens, tokens], dim=1)
    with pytest.raises(ValueError, match="context_length"):
        fastpath.clip_forward(model, images, long_tokens, ids)


def test_reference_path_is_the_model_itself():
    cfg = make_config()
    model = make_model(cfg)
    images, tokens = make_batch(cfg)
    ids = keep(cfg, images.shape[0], 0.75)
    out = fastpath.clip_forward(model, images, tokens, ids, fast=False)
    direct = model(images, tokens, ids_keep=ids)
    for k in out:
        assert torch.equal(out[k], direct[k])
    assert torch.equal(fastpath.contrastive_loss(model, out, fast=False), model.loss(direct))
