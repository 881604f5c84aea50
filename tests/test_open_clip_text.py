"""apply_to_open_clip on a separate open_clip TextTransformer tower (CustomTextCLIP):
EVA-CLIP's causal text and SigLIP's bidirectional text, against unpatched open_clip.

Small configs built offline from the real ones (pretrained=None): the text tower cut to
2 layers of width 64, a 16-token context and a 100-token vocabulary; the vision tower
(not under test) cut to one narrow layer. Captions have realistic lengths
(benchmarks/caption_lengths.py), padded with the pad id 0 after their end token.
"""
import copy
import os
import sys

import pytest
import torch
from _tolerance import assert_close_to_reference

import flipkern
from flipkern import fastpath

open_clip = pytest.importorskip("open_clip")
pytest.importorskip("timm")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import open_clip_coverage  # noqa: E402
from caption_lengths import caption_lengths  # noqa: E402

VOCAB, CTX, PAD = 100, 16, 0
EOT = VOCAB - 1  # the largest id: pool 'argmax' finds it
SIGLIP, EVA02 = "ViT-B-16-SigLIP", "EVA02-B-16"


def small_model(name, dtype=torch.float64, use_pad_mask=False, patch_dropout=None, **text):
    torch.manual_seed(0)
    # patch_dropout: a whole-model step; the vision trunk's width (32) is then the joint embedding's
    extra = {} if patch_dropout is None else dict(force_patch_dropout=patch_dropout, embed_dim=32)
    model = open_clip_coverage.build_cut(
        name, values=True, layers=2, vocab=VOCAB, timm_overrides=dict(embed_dim=32, num_heads=2),
        text_overrides=dict(width=64, heads=2, context_length=CTX, **text), **extra)
    # CLIPTextCfg has no use_pad_mask (no open_clip config sets it); TextTransformer reads the attribute
    model.text.use_pad_mask = use_pad_mask
    with torch.no_grad():  # open_clip inits biases to zero: make them count
        for p in model.text.parameters():
            if p.dim() < 2:
                p.normal_(0, 0.2)
    return model.to(dtype).train()


def captions(B=6, kind="realistic", seed=3):
    """[B, CTX] ids: random tokens, EOT last, then padding; one caption fills the context."""
    g = torch.Generator().manual_seed(seed)
    lengths = caption_lengths(kind, B, context=CTX, generator=g)
    lengths[0] = CTX
    text = torch.full((B, CTX), PAD, dtype=torch.int64)
    for b, n in enumerate(lengths.tolist()):
        text[b, :n - 1] = torch.randint(1, EOT, (n - 1,), generator=g)
        text[b, n - 1] = EOT
    return text


def patched_copy(model, **kw):
    m = copy.deepcopy(model)
    return m, flipkern.apply_to_open_clip(m, **kw)


def features_and_grads(model, text):
    model.zero_grad(set_to_none=True)
    out = model.encode_text(text)
    (out * torch.linspace(-1, 1, out.shape[-1], dtype=out.dtype)).sum().backward()
    return [out.detach()] + [p.grad for p in model.text.parameters()]


def assert_same(a_list, b_list, tol):
    assert len(a_list) == len(b_list)
    for i, (a, b) in enumerate(zip(a_list, b_list)):
        assert a is not None and b is not None, f"tensor {i}: no gradient"
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"tensor {i}")


CASES = {  # name -> (config, text_cfg overrides, what the text runs as)
    "eva02-causal": (EVA02, {}, "packed, varlen causal"),
    "siglip-dense": (SIGLIP, {}, "dense, sdpa bidirectional"),
    "siglip-dense-argmax": (SIGLIP, dict(pool_type="argmax"), "dense, sdpa bidirectional"),
    "siglip-padmask-argmax": (SIGLIP, dict(use_pad_mask=True, pool_type="argmax"), "packed by pad id, varlen"),
    "siglip-padmask-last-short": (SIGLIP, dict(use_pad_mask=True), "stock (use_pad_mask"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_text_features_and_gradients_match_stock_float64(case):
    name, text_cfg, runs_as = CASES[case]
    model = small_model(name, **text_cfg)
    patched, report = patched_copy(model)
    assert report["text"] == "flipkern"
    text = captions()
    out = features_and_grads(patched, text)
    assert fastpath.backends_used()["open_clip.text"].startswith(runs_as)
    assert_same(out, features_and_grads(model, text), 1e-10)


def test_pad_mask_with_pool_last_packs_when_every_caption_fills_the_context():
    # pool 'last' reads position CTX-1: a real token only when the caption fills the context
    model = small_model(SIGLIP, use_pad_mask=True)
    patched, _ = patched_copy(model)
    text = captions(kind="full")
    out = features_and_grads(patched, text)
    assert fastpath.backends_used()["open_clip.text"].startswith("packed by pad id, varlen")
    assert_same(out, features_and_grads(model, text), 1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", [EVA02, SIGLIP])
def test_low_precision_text_is_within_dtype_tolerance(name, dtype):
    model64 = small_model(name)
    model_lp = copy.deepcopy(model64).to(dtype)
    patched, _ = patched_copy(model_lp)
    text = captions()
    ref64, ref_lp, out = (features_and_grads(m, text) for m in (model64, model_lp, patched))
    for i, (o, r64, rlp) in enumerate(zip(out, ref64, ref_lp)):
        assert_close_to_reference(o, r64, rlp, atol=1e-5, name=f"tensor {i}")


def key_padding_reference(tower, text):
    """SigLIP's tower with its padding masked out of the keys (open_clip's own use_pad_mask
    mask) and pooled at each caption's last real token: what text_padding='drop' means."""
    real = text != tower.pad_id
    last_real = text.shape[1] - 1 - real.flip(1).int().argmax(dim=-1)
    t = copy.copy(tower)
    t.use_pad_mask = True
    x, mask = t._embeds(text)
    x = t.ln_final(t.transformer(x, attn_mask=mask))
    return t.text_projection(x[torch.arange(text.shape[0]), last_real])


def test_padding_drop_matches_its_key_padding_reference():
    model = small_model(SIGLIP)
    patched, report = patched_copy(model, text_padding="drop")
    assert report["text"] == "flipkern"
    text = captions()
    out = features_and_grads(patched, text)
    assert fastpath.backends_used()["open_clip.text"].startswith("packed by pad id (text_padding='drop')")
    model.zero_grad(set_to_none=True)
    ref = key_padding_reference(model.text, text)
    (ref * torch.linspace(-1, 1, ref.shape[-1], dtype=ref.dtype)).sum().backward()
    assert_same(out, [ref.detach()] + [p.grad for p in model.text.parameters()], 1e-10)
    # and it is another function than stock's, which attends to the padding
    assert not torch.allclose(out[0], model.encode_text(text), atol=1e-4)


def test_padding_drop_of_a_causal_tower_is_the_exact_causal_packing():
    model = small_model(EVA02)
    patched, report = patched_copy(model, text_padding="drop")
    text = captions()
    assert_same(features_and_grads(patched, text), features_and_grads(model, text), 1e-10)


def test_state_dict_unchanged():
    model = small_model(SIGLIP)
    patched, _ = patched_copy(model)
    assert list(patched.state_dict()) == list(model.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(patched.state_dict()[k], v), k


def test_refusals_name_the_reason():
    reports = {
        "embed_cls": patched_copy(small_model(EVA02, embed_cls=True))[1]["text"],
        "output_tokens": patched_copy(small_model(EVA02, output_tokens=True))[1]["text"],
        "pool none": patched_copy(small_model(SIGLIP, pool_type="none"))[1]["text"],
    }
    assert reports["embed_cls"] == "a class token appended to the text (embed_cls, CoCa) is not covered"
    assert reports["output_tokens"].startswith("a text tower with output_tokens=True is not covered")
    assert reports["pool none"] == "text pool type 'none' is not covered"
    attn_dropout = small_model(SIGLIP)
    attn_dropout.text.transformer.resblocks[0].attn.dropout = 0.1
    assert patched_copy(attn_dropout)[1]["text"] == "attention dropout (0.1) is not covered"


def test_bad_text_padding_and_bad_text_are_clear_errors():
    model = small_model(SIGLIP)
    with pytest.raises(ValueError, match="text_padding must be one of"):
        flipkern.apply_to_open_clip(copy.deepcopy(model), text_padding="trim")
    patched, _ = patched_copy(model, text_padding="drop")
    text = captions()
    text[2] = PAD
    with pytest.raises(ValueError, match="text row 2 pools at a padding token"):
        patched.encode_text(text)
    with pytest.raises(ValueError, match="text must have dtype in"):
        patched.encode_text(text.float())
    with pytest.raises(ValueError, match="text must be 2-D"):
        patched.encode_text(text[0])
    with pytest.raises(ValueError, match="text has 17 positions, more than the tower's context length 16"):
        patched.encode_text(torch.ones(2, CTX + 1, dtype=torch.int64))


def test_clip_bidirectional_text_runs_dense_and_refuses_drop_without_a_pad_id():
    # open_clip's CLIP keeps no pad id: its bidirectional text (no_causal_mask) is exact
    # dense by default, and text_padding="drop" is refused rather than guessing the pad id
    from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    model = CLIP(embed_dim=32, vision_cfg=CLIPVisionCfg(layers=1, width=64, head_width=32, image_size=32,
                                                        patch_size=8),
                 text_cfg=CLIPTextCfg(context_length=CTX, vocab_size=VOCAB, width=64, heads=2, layers=2,
                                      no_causal_mask=True, pool_type="last")).double()
    patched, report = patched_copy(model)
    assert report["text"] == "flipkern"
    text = captions()
    torch.testing.assert_close(patched.encode_text(text), model.encode_text(text), rtol=1e-10, atol=1e-10)
    assert fastpath.backends_used()["open_clip.text"].startswith("dense")
    assert patched_copy(model, text_padding="drop")[1]["text"].startswith("text_padding='drop' needs the pad id")


@pytest.mark.parametrize("name", [SIGLIP, EVA02])
def test_whole_model_adamw_steps_follow_stock(name):
    """Both towers and the loss patched: 3 AdamW steps of open_clip's own training step
    (model(images, text) -> loss -> backward -> step) at patch dropout 0.5 give stock's
    parameters after every step (float64)."""
    from open_clip.loss import ClipLoss, SigLipLoss
    model = small_model(name, patch_dropout=0.5)
    assert model.visual.trunk.patch_drop.prob == 0.5  # timm's PatchDropout is in the model
    patched = copy.deepcopy(model)
    loss_type = SigLipLoss if getattr(model, "logit_bias", None) is not None else ClipLoss
    loss = loss_type()
    report = flipkern.apply_to_open_clip(patched, loss=loss)
    assert report == {"visual": "flipkern", "text": "flipkern", "loss": "flipkern"}
    runs = [(m, f, torch.optim.AdamW(m.parameters(), lr=1e-3)) for m, f in ((model, loss_type()), (patched, loss))]
    g = torch.Generator().manual_seed(5)
    for step in range(3):
        images = torch.randn(6, 3, 224, 224, dtype=torch.float64, generator=g)
        text = captions(seed=10 + step)
        for m, f, opt in runs:
            opt.zero_grad(set_to_none=True)
            torch.manual_seed(100 + step)  # the same kept patches (timm's PatchDropout draw) on both
            f(*m(images, text)).backward()
            opt.step()
        for (ka, a), (kb, b) in zip(model.state_dict().items(), patched.state_dict().items()):
            assert ka == kb
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=f"step {step}: {ka}")
