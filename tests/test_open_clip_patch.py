"""flipkern.apply_to_open_clip against unpatched open_clip, same weights, same masking indices.

open_clip's PatchDropout draws its kept patches from the default generator; the
patched model makes the same draw, so re-seeding before each forward gives both
the same indices. Models are built from configs, no weights are downloaded.
"""
import copy

import pytest
import torch
from _tolerance import assert_close_to_reference

import flipkern
from flipkern import fastpath

open_clip = pytest.importorskip("open_clip")
from open_clip.loss import ClipLoss, SigLipLoss  # noqa: E402
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg  # noqa: E402

VOCAB, CTX = 100, 16
EOT, SOT = VOCAB - 1, VOCAB - 2  # open_clip pools at the argmax token: eot is the largest id


def tiny_model(patch_dropout=0.5, **vision):
    torch.manual_seed(0)
    v = CLIPVisionCfg(layers=2, width=64, head_width=32, image_size=32, patch_size=8,
                      patch_dropout=patch_dropout, **vision)
    t = CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=64, heads=2, layers=2)
    return CLIP(embed_dim=32, vision_cfg=v, text_cfg=t, init_logit_bias=-10.0).double()


def batch(B=5, image_size=32, ctx=CTX, dtype=torch.float64, seed=3):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(B, 3, image_size, image_size, generator=g, dtype=dtype)
    text = torch.zeros(B, ctx, dtype=torch.int64)
    for b in range(B):
        n = int(torch.randint(3, ctx + 1, (1,), generator=g))
        text[b, 0] = SOT
        text[b, 1:n - 1] = torch.randint(1, SOT, (n - 2,), generator=g)
        text[b, n - 1] = EOT
    return images, text


def forward(model, images, text, seed=11):
    torch.manual_seed(seed)  # PatchDropout's draw
    return model(images, text)  # (image_features, text_features, logit_scale, logit_bias), normalized


def patched_copy(model, loss=None):
    m = copy.deepcopy(model)
    report = flipkern.apply_to_open_clip(m, loss=loss)
    return m, report


@pytest.mark.parametrize("train", [True, False], ids=["patch-dropout", "eval"])
def test_patched_tiny_model_matches_unpatched(train):
    model = tiny_model().train(train)
    patched, report = patched_copy(model)
    assert report == {"visual": "flipkern", "text": "flipkern"}
    images, text = batch()
    ref = forward(model, images, text)
    out = forward(patched, images, text)
    for name, a, b in zip(("image", "text", "scale", "bias"), out, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    used = fastpath.backends_used()
    assert used["open_clip.text"].startswith("packed") and used["varlen_attention"] in ("cpu", "reference")


def test_patching_keeps_the_state_dict_and_the_drawn_indices_are_patch_dropouts():
    model = tiny_model()
    patched, _ = patched_copy(model)
    assert list(patched.state_dict()) == list(model.state_dict())
    # the same draw as PatchDropout: 50% of the 16 patches
    torch.manual_seed(5)
    from flipkern.open_clip_patch import _keep_indices
    ids = _keep_indices(patched.visual, 4, 16)
    torch.manual_seed(5)
    expected = torch.randn(4, 16).topk(8, dim=-1).indices
    assert torch.equal(ids, expected)


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_patched_loss_values_and_gradients_match(kind):
    model = tiny_model().train()
    make_loss = ClipLoss if kind == "clip" else SigLipLoss
    loss_ref, loss_fast = make_loss(), make_loss()
    patched, report = patched_copy(model, loss=loss_fast)
    assert report["loss"] == "flipkern"
    images, text = batch()
    results = []
    for m, loss_fn in ((model, loss_ref), (patched, loss_fast)):
        out = forward(m, images, text)
        value = loss_fn(*out[:3]) if kind == "clip" else loss_fn(*out)
        m.zero_grad(set_to_none=True)
        value.backward()
        results.append((value.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}))
    (ref_value, ref_grads), (value, grads) = results
    torch.testing.assert_close(value, ref_value, rtol=1e-12, atol=1e-12)
    assert set(grads) == set(ref_grads)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-9, atol=1e-12, msg=n)
    as_dict = loss_fast(*(out[:3] if kind == "clip" else out), output_dict=True)
    torch.testing.assert_close(as_dict["contrastive_loss"].detach(), value, rtol=0, atol=0)


def test_float32_patched_is_within_dtype_tolerance():
    model64 = tiny_model().train()
    model32 = copy.deepcopy(model64).float()
    patched32, _ = patched_copy(model32)
    images, text = batch()
    ref64 = forward(model64, images, text)
    ref32 = forward(model32, images.float(), text)
    out32 = forward(patched32, images.float(), text)
    for name, o, r64, r32 in zip(("image", "text"), out32, ref64, ref32):
        assert_close_to_reference(o, r64, r32, atol=1e-6, name=name)


def test_uncovered_parts_are_left_alone_and_reported():
    model = tiny_model(attentional_pool=True).train()
    patched, report = patched_copy(model, loss=torch.nn.MSELoss())
    assert report["visual"] == "attentional pooling is not covered"
    assert report["text"] == "flipkern"
    assert "not covered" in report["loss"]
    images, text = batch()
    for a, b in zip(forward(patched, images, text), forward(model, images, text)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_attention_dropout_is_left_alone_and_reported():
    # the fused attention applies no dropout: patching would silently train another model
    model = tiny_model()
    model.transformer.resblocks[1].attn.dropout = 0.1
    _, report = patched_copy(model)
    assert report["text"] == "attention dropout (0.1) is not covered"
    assert report["visual"] == "flipkern"


def test_open_clip_vit_b_32_from_its_config():
    """The stock ViT-B-32 config (random init, no weights), patch dropout 0.5, float32."""
    model = open_clip.create_model("ViT-B-32", pretrained=None, force_patch_dropout=0.5).train()
    patched, report = patched_copy(model)
    assert report == {"visual": "flipkern", "text": "flipkern"}
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 224, 224, generator=g)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    text = tokenizer(["a photo of a red circle", "two small blue squares on a textured background"])
    ref32 = forward(model, images, text)
    out32 = forward(patched, images, text)
    ref64 = forward(copy.deepcopy(model).double(), images.double(), text)
    for name, o, r64, r32 in zip(("image", "text"), out32, ref64, ref32):
        assert_close_to_reference(o, r64, r32, atol=1e-6, name=name)
