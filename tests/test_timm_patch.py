"""flipkern.apply_to_timm / forward_with_keep against unpatched timm (VisionTransformer and
Eva), same weights, same kept patches.

timm's PatchDropout draws its kept patches with ``argsort(randn(B, N))`` on the
default generator; the patched forward makes the same draw, so re-seeding before
each forward gives both sides the same patches. For per-sample keep counts
(which timm's PatchDropout never draws) the oracle is unpatched timm on each
sample alone with its kept patches injected in place of PatchDropout (KeepGiven).
Models are built small from timm's registry with pretrained=False.
"""
import copy

import pytest
import torch
from _tolerance import assert_close_to_reference

import flipkern
from flipkern import fastpath

timm = pytest.importorskip("timm")

# the SigLIP tower (no class token, 'map' attention pool), the classic ViT (class token,
# 'token'), registers without position rows for the prefix and 'avg', no position embedding
TOWERS = {
    "siglip-map": dict(name="vit_base_patch16_siglip_224"),
    "cls-token": dict(name="vit_base_patch16_224", global_pool="token"),
    "reg-avg": dict(name="vit_base_patch16_224", reg_tokens=2, no_embed_class=True, global_pool="avg",
                    init_values=0.1),
    "nopos-avg-ordered": dict(name="vit_base_patch16_224", class_token=False, global_pool="avg",
                              pos_embed="none", pre_norm=True),
    # 7 px patches on 32 px images, as SigLIP's 14 px patches on 384 px: the conv skips the last 4 px
    "siglip-uneven-grid": dict(name="vit_base_patch16_siglip_224", patch_size=7),
    # EVA-CLIP's EVA02 tower (open_clip's EVA02-B/L): rotary embedding, separate q/k/v projections
    # with q and v bias, attention scale norm, SwiGLU with its norm, class token, 'token' pool
    "eva02-clip": dict(name="eva02_base_patch16_clip_224"),
    # fused qkv with q_bias/v_bias, packed SwiGLU (GluMlp), layer scale, rotate-half rope, 'avg'
    "eva02-fused-ls-avg": dict(name="eva02_base_patch16_clip_224", qkv_fused=True, scale_mlp=False,
                               scale_attn_inner=False, init_values=0.1, rope_rotate_half=True, global_pool="avg"),
    # EVA02-E's post-norm blocks, no rope (as EVA01-g), with an attention pool over every token
    "eva-post-norm-map": dict(name="eva02_enormous_patch14_clip_224", patch_size=8, global_pool="map",
                              mlp_ratio=2.0),
    # timm's SBB rope ViT: no class token, a register token, no absolute position embedding
    "eva-rope-reg-avg": dict(name="vit_medium_patch16_rope_reg1_gap_256"),
}
EVA = [k for k in TOWERS if k.startswith("eva")]


def tower(kind, patch_drop=0.5, dtype=torch.float64, **over):
    torch.manual_seed(0)
    kw = dict(dict(patch_size=8), **TOWERS[kind], **over)
    m = timm.create_model(kw.pop("name"), pretrained=False, depth=2, embed_dim=64, num_heads=2, img_size=32,
                          patch_drop_rate=patch_drop, num_classes=10, **kw)
    if kind.endswith("ordered") and patch_drop:
        m.patch_drop.ordered = True
    with torch.no_grad():  # timm inits the biases, cls/reg tokens and layer scales to constants: make them count
        for name, p in m.named_parameters():
            if p.dim() < 2 or "token" in name:
                p.normal_(0, 0.2)
    return m.to(dtype)


def images(B=4, dtype=torch.float64, seed=3):
    return torch.randn(B, 3, 32, 32, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def run(model, x, seed=11):
    torch.manual_seed(seed)  # PatchDropout's draw
    return model(x)


def patched_copy(model):
    m = copy.deepcopy(model)
    assert flipkern.apply_to_timm(m) == "flipkern"
    return m


def outputs_and_grads(model, x, seed=11):
    model.zero_grad()
    out = run(model, x, seed)
    out.square().sum().backward()
    return [out] + [p.grad for p in model.parameters()]


def tight(got, want):
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"tensor {i}")


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("patch_drop", [0.0, 0.5, 0.75])
def test_patched_tower_matches_timm_in_float64(kind, patch_drop):
    model = tower(kind, patch_drop).train()
    patched = patched_copy(model)
    x = images()
    tight(outputs_and_grads(patched, x), outputs_and_grads(model, x))
    assert fastpath.backends_used()["timm.visual"].startswith("gather_patches")
    model.eval(), patched.eval()
    tight([patched(x)], [model(x)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["siglip-map", "cls-token", "eva02-clip"])
def test_patched_tower_low_precision_by_the_tolerance_rule(kind, dtype):
    model64 = tower(kind, 0.5).train()
    model_lowp = copy.deepcopy(model64).to(dtype)
    patched = patched_copy(model_lowp)
    x = images()
    ref64 = outputs_and_grads(model64, x)
    ref_lowp = outputs_and_grads(model_lowp, x.to(dtype))
    got = outputs_and_grads(patched, x.to(dtype))
    for i, (g, r64, rl) in enumerate(zip(got, ref64, ref_lowp)):
        assert_close_to_reference(g, r64, rl, name=f"tensor {i}")


@pytest.mark.parametrize("kind", ["cls-token", "eva02-clip"])
def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(kind):
    model = tower(kind, 0.5).train()
    patched = patched_copy(model)
    for m in (model, patched):
        m.set_grad_checkpointing(True)
    x = images()
    tight(outputs_and_grads(patched, x), outputs_and_grads(model, x))


class KeepGiven(torch.nn.Module):
    """PatchDropout with the kept patches given: prefix tokens, then the patches at ids;
    with_indices: also the ids, as Eva's PatchDropoutWithIndices returns them (for the rope)."""

    def __init__(self, ids, num_prefix, with_indices=False):
        super().__init__()
        self.ids, self.num_prefix, self.with_indices = ids, num_prefix, with_indices

    def forward(self, x):
        P = self.num_prefix
        kept = x[:, P:].gather(1, self.ids[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :P], kept], dim=1)
        return (x, self.ids) if self.with_indices else x


def per_sample_reference(model, x, ids_keep, keep_lengths):
    """Unpatched timm on each sample alone with its own kept patches."""
    m = copy.copy(model)  # shares the parameters; only patch_drop differs
    eva = type(model).__name__ == "Eva"
    outs = []
    for b, n in enumerate(keep_lengths.tolist()):
        m.patch_drop = KeepGiven(ids_keep[b:b + 1, :n], model.num_prefix_tokens, with_indices=eva)
        outs.append(m(x[b:b + 1]))
    return torch.cat(outs)


@pytest.mark.parametrize("kind", TOWERS)
@pytest.mark.parametrize("keep", [1.0, 0.5, 0.25])
def test_per_sample_keep_counts_match_each_sample_alone(kind, keep):
    model = tower(kind, 0.0).train()
    patched = patched_copy(model)
    x = images(B=4)
    N = model.patch_embed.num_patches
    K = max(1, int(N * keep))
    ids_keep = torch.rand(4, N, generator=torch.Generator().manual_seed(7)).argsort(-1)[:, :K]
    keep_lengths = torch.tensor([K, 1, max(1, K // 2), max(1, K - 1)])

    def both(fn, m):
        m.zero_grad()
        out = fn(m)
        out.square().sum().backward()
        return [out] + [p.grad.clone() for p in m.parameters()]

    got = both(lambda m: flipkern.forward_with_keep(m, x, ids_keep, keep_lengths), patched)
    want = both(lambda m: per_sample_reference(m, x, ids_keep, keep_lengths), model)
    tight(got, want)
    assert "varlen" in fastpath.backends_used()["timm.visual"]
    # the same keep count for every sample: the dense path, equal to the whole batch in timm
    full = torch.full((4,), K)
    tight([flipkern.forward_with_keep(patched, x, ids_keep)],
          [flipkern.forward_with_keep(patched, x, ids_keep, full)])


@pytest.mark.parametrize("kind", ["siglip-map", "eva02-clip"])
def test_adamw_steps_follow_the_same_trajectory_and_the_state_dict_is_unchanged(kind):
    model = tower(kind, 0.5).train()
    keys = {k: v.clone() for k, v in model.state_dict().items()}
    patched = patched_copy(model)
    assert list(patched.state_dict()) == list(keys)
    for k, v in patched.state_dict().items():
        assert torch.equal(v, keys[k]), k
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (model, patched)]
    for step in range(4):
        x = images(seed=step)
        for m, opt in zip((model, patched), opts):
            opt.zero_grad()
            run(m, x, seed=100 + step).square().mean().backward()
            opt.step()
    for (name, a), b in zip(model.named_parameters(), patched.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-9, msg=name)


def test_the_draw_is_timm_patch_dropouts():
    model = tower("cls-token", 0.75).train()
    seen = {}
    original = type(model.patch_drop).forward

    def spy(pd, x):  # timm's own PatchDropout, recording the kept patches it gathered
        out = original(pd, x)
        seen["patches"] = out[:, 1:]
        return out

    x = images()
    torch.manual_seed(5)
    ids = flipkern.timm_patch.keep_indices(model, x)
    assert ids.shape == (4, 4)
    type(model.patch_drop).forward = spy
    try:
        torch.manual_seed(5)
        model.forward_features(x)
    finally:
        type(model.patch_drop).forward = original
    tokens = model.patch_embed(x) + model.pos_embed[:, 1:]
    torch.testing.assert_close(seen["patches"], tokens.gather(1, ids[..., None].expand(-1, -1, 64)),
                               rtol=0, atol=0)


@pytest.mark.parametrize("name, over, why", [
    ("cls-token", dict(attn_drop_rate=0.1), "attention dropout"),
    ("cls-token", dict(qk_norm=True), "qk_norm"),
    ("cls-token", dict(drop_path_rate=0.1), "stochastic depth"),
    ("cls-token", dict(pos_drop_rate=0.1), "position dropout"),
    ("cls-token", dict(dynamic_img_size=True), "dynamic image size"),
    ("eva02-clip", dict(rope_type="mixed"), "rotary embedding RotaryEmbeddingMixed"),
    ("eva02-clip", dict(rope_shift_coords=0.5), "rotary coordinate augmentation"),
    ("eva02-clip", dict(attn_type="rope"), "not timm's EvaAttention"),
    ("eva02-clip", dict(qk_norm=True), "qk_norm"),
    ("eva02-clip", dict(drop_path_rate=0.1), "stochastic depth"),
    ("eva02-clip", dict(attn_drop_rate=0.1), "attention dropout"),
    ("eva02-clip", dict(dynamic_img_size=True), "dynamic image size"),
])
def test_uncovered_towers_are_left_unpatched_and_say_why(name, over, why):
    model = tower(name, **over)
    report = flipkern.apply_to_timm(model)
    assert why in report
    assert "forward_features" not in vars(model)


def test_a_model_that_is_not_a_vision_transformer_is_left_unpatched():
    model = timm.create_model("resnet18", pretrained=False, num_classes=0)
    assert "not timm's VisionTransformer" in flipkern.apply_to_timm(model)


def test_bad_input_names_the_argument():
    patched = patched_copy(tower("siglip-map", 0.0))
    with pytest.raises(ValueError, match="images"):
        patched(torch.randn(2, 3, 48, 48, dtype=torch.float64))
    with pytest.raises(ValueError, match="images"):
        flipkern.forward_with_keep(patched, torch.randn(3, 32, 32, dtype=torch.float64), torch.zeros(3, 1).long())
    x = images(B=2)
    ids = torch.arange(8).expand(2, 8)
    with pytest.raises(ValueError, match="ids_keep"):
        flipkern.forward_with_keep(patched, x, ids[:1])
    with pytest.raises(ValueError, match="keep_lengths"):
        flipkern.forward_with_keep(patched, x, ids, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="keep_lengths"):
        flipkern.forward_with_keep(patched, x, ids, torch.tensor([9, 3]))
    with pytest.raises(ValueError, match="keep_lengths"):
        flipkern.forward_with_keep(patched, x, ids, torch.tensor([3]))
