"""The oracle itself (flipkern.reference): shapes, gradients, masking properties,
attention against torch's SDPA, losses against an independent float64 computation,
and the models."""
import math

import pytest
import torch
import torch.nn.functional as F

from flipkern.reference import attention, clip, losses, masking, text, vit

# ----------------------------------------------------------------------------- masking

def test_random_keep_indices_unique_sorted_in_range():
    ids = masking.random_keep_indices(64, 49, keep_ratio=0.25)
    assert ids.shape == (64, 12) and ids.dtype == torch.int64
    assert int(ids.min()) >= 0 and int(ids.max()) < 49
    assert (ids[:, 1:] > ids[:, :-1]).all()  # sorted and so unique


def test_random_keep_indices_uniform_marginal():
    # Each position is kept with probability K/N. Over n samples the count per position
    # is Binomial(n, K/N); with 6 standard deviations no position may be off.
    n, N, K = 20000, 16, 4
    g = torch.Generator().manual_seed(1)
    counts = torch.bincount(masking.random_keep_indices(n, N, num_keep=K, generator=g).flatten(), minlength=N)
    p = K / N
    sd = math.sqrt(n * p * (1 - p))
    assert (counts.double() - n * p).abs().max() < 6 * sd
    # and pairs are kept together as often as a uniform K-subset implies: P = K(K-1)/(N(N-1))
    g = torch.Generator().manual_seed(2)
    ids = masking.random_keep_indices(n, N, num_keep=K, generator=g)
    both = ((ids == 0).any(1) & (ids == 1).any(1)).sum().item()
    q = K * (K - 1) / (N * (N - 1))
    assert abs(both - n * q) < 6 * math.sqrt(n * q * (1 - q))


def test_random_keep_indices_reproducible_with_generator():
    a = masking.random_keep_indices(4, 20, keep_ratio=0.5, generator=torch.Generator().manual_seed(3))
    b = masking.random_keep_indices(4, 20, keep_ratio=0.5, generator=torch.Generator().manual_seed(3))
    c = masking.random_keep_indices(4, 20, keep_ratio=0.5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_num_keep_arguments():
    assert masking.num_keep_from(196, keep_ratio=0.25) == 49
    assert masking.num_keep_from(10, keep_ratio=0.01) == 1
    with pytest.raises(ValueError, match="exactly one"):
        masking.num_keep_from(10)
    with pytest.raises(ValueError, match="num_keep"):
        masking.num_keep_from(10, num_keep=11)


def test_topk_keep_indices():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [4.0, 3.0, 2.0, 1.0]])
    assert masking.topk_keep_indices(scores, 2).tolist() == [[1, 3], [0, 1]]


def test_drop_tokens_values_and_gradient():
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    pos = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[5, 0], [2, 3]])
    out = masking.drop_tokens(x, ids, pos)
    for b in range(2):
        for k in range(2):
            assert torch.equal(out[b, k], x[b, ids[b, k]] + pos[ids[b, k]])
    assert torch.autograd.gradcheck(lambda a, p: masking.drop_tokens(a, ids, p), (x, pos))


def test_gather_patches_equals_conv_patch_embedding_then_drop():
    B, C, H, W, p, D = 2, 3, 8, 12, 4, 5
    images = torch.randn(B, C, H, W, dtype=torch.float64)
    conv = torch.nn.Conv2d(C, D, p, p).double()
    ids = masking.random_keep_indices(B, (H // p) * (W // p), num_keep=4)
    want = masking.drop_tokens(conv(images).flatten(2).transpose(1, 2), ids)
    got = F.linear(masking.gather_patches(images, ids, p), conv.weight.flatten(1), conv.bias)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="patch_size"):
        masking.patchify(images, 5)


def test_restore_tokens_inverts_drop():
    x = torch.randn(3, 7, 4, dtype=torch.float64, requires_grad=True)
    fill = torch.randn(4, dtype=torch.float64, requires_grad=True)
    ids = masking.random_keep_indices(3, 7, num_keep=3)
    full = masking.restore_tokens(masking.drop_tokens(x, ids), ids, 7, fill)
    kept = torch.zeros(3, 7, dtype=torch.bool).scatter(1, ids, True)
    assert torch.equal(full[kept], x[kept])
    assert torch.equal(full[~kept], fill.expand(3, 7, 4)[~kept])
    vis = masking.drop_tokens(x, ids).detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda v, f: masking.restore_tokens(v, ids, 7, f), (vis, fill))


# ----------------------------------------------------------------------------- attention

@pytest.mark.parametrize("causal", [False, True])
def test_attention_equals_sdpa(causal):
    q, k, v = torch.randn(3, 2, 4, 9, 16, dtype=torch.float64)
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[1, 6:] = True
    got = attention.attention(q, k, v, key_padding_mask=pad, causal=causal)
    mask = ~pad[:, None, None, :]
    if causal:
        mask = mask & torch.ones(9, 9, dtype=torch.bool).tril()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_attention_gradcheck():
    q, k, v = (t.requires_grad_() for t in torch.randn(3, 1, 2, 5, 4, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: attention.attention(a, b, c, causal=True), (q, k, v))


def test_varlen_attention_equals_per_sequence_sdpa():
    lengths = torch.tensor([5, 0, 1, 8])
    cu = attention.cu_seqlens_from_lengths(lengths)
    assert cu.tolist() == [0, 5, 5, 6, 14] and cu.dtype == torch.int32
    q, k, v = torch.randn(3, 14, 2, 8, dtype=torch.float64)
    out = attention.varlen_attention(q, k, v, cu, 8, causal=True)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if e > s:
            want = F.scaled_dot_product_attention(*(t[s:e].transpose(0, 1) for t in (q, k, v)), is_causal=True)
            torch.testing.assert_close(out[s:e], want.transpose(0, 1), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="max_seqlen"):
        attention.varlen_attention(q, k, v, cu, 7)


def test_pack_unpack_roundtrip():
    x = torch.randn(3, 5, 2)
    lengths = torch.tensor([5, 0, 2])
    packed, cu = attention.pack(x, lengths)
    assert packed.shape == (7, 2)
    back = attention.unpack(packed, cu, 5)
    valid = torch.arange(5)[None] < lengths[:, None]
    assert torch.equal(back[valid], x[valid]) and (back[~valid] == 0).all()
    assert attention.lengths_from_padding_mask(~valid).tolist() == [5, 0, 2]


# ----------------------------------------------------------------------------- losses

def _clip_loss_by_hand(img, txt, scale):
    """An independent float64 computation: explicit log-softmax sums, no F.cross_entropy."""
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        row = [scale * float(img[i] @ txt[j]) for j in range(n)]
        col = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += math.log(sum(math.exp(r) for r in row)) - row[i]
        total += math.log(sum(math.exp(c) for c in col)) - col[i]
    return total / (2 * n)


def _siglip_loss_by_hand(img, txt, scale, bias):
    n = img.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += math.log1p(math.exp(-z * (scale * float(img[i] @ txt[j]) + bias)))
    return total / n


def _features(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1),
            F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1))


def test_clip_loss_equals_independent_computation():
    img, txt = _features(6, 5)
    got = losses.clip_loss(img, txt, torch.tensor(7.0, dtype=torch.float64))
    assert abs(got.item() - _clip_loss_by_hand(img, txt, 7.0)) < 1e-12


def test_siglip_loss_equals_independent_computation():
    img, txt = _features(5, 4)
    got = losses.siglip_loss(img, txt, torch.tensor(10.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64))
    assert abs(got.item() - _siglip_loss_by_hand(img, txt, 10.0, -3.0)) < 1e-12


@pytest.mark.parametrize("which", ["clip", "siglip"])
def test_losses_gradcheck(which):
    img, txt = (t.requires_grad_() for t in _features(4, 3))
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.0, dtype=torch.float64, requires_grad=True)
    if which == "clip":
        assert torch.autograd.gradcheck(losses.clip_loss, (img, txt, scale))
    else:
        assert torch.autograd.gradcheck(losses.siglip_loss, (img, txt, scale, bias))


def _distributed_worker(rank, world, init_file, which, img, txt, queue):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    b = img.shape[0] // world
    mine_i = img[rank * b:(rank + 1) * b].clone().requires_grad_()
    mine_t = txt[rank * b:(rank + 1) * b].clone().requires_grad_()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    if which == "clip":
        loss = losses.clip_loss(mine_i, mine_t, scale, group=dist.group.WORLD)
    else:
        loss = losses.siglip_loss(mine_i, mine_t, scale, bias, group=dist.group.WORLD)
    loss.backward()
    # DDP would all-reduce-average the parameter gradients (scale, bias) and the loss for logging;
    # feature gradients stay with their owners, averaged likewise by DDP through the towers.
    bias_grad = bias.grad if bias.grad is not None else torch.zeros((), dtype=torch.float64)
    stats = torch.stack([loss.detach(), scale.grad, bias_grad])
    dist.all_reduce(stats)
    queue.put((rank, (stats / world).tolist(), (mine_i.grad / world).tolist(), (mine_t.grad / world).tolist()))
    dist.destroy_process_group()


@pytest.mark.parametrize("which", ["clip", "siglip"])
@pytest.mark.parametrize("world", [2, 3])
def test_losses_over_gloo_equal_single_process(tmp_path, which, world):
    import torch.multiprocessing as mp
    img, txt = _features(2 * world, 4, seed=world)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_distributed_worker, args=(r, world, str(tmp_path / "init"), which, img, txt, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = sorted(queue.get(timeout=120) for _ in range(world))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    gi, gt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    if which == "clip":
        want = losses.clip_loss(gi, gt, scale)
    else:
        want = losses.siglip_loss(gi, gt, scale, bias)
    want.backward()
    stats = results[0][1]
    assert abs(stats[0] - want.item()) < 1e-12
    assert abs(stats[1] - scale.grad.item()) < 1e-12
    if which == "siglip":
        assert abs(stats[2] - bias.grad.item()) < 1e-12
    got_i = torch.tensor([row for r in results for row in r[2]], dtype=torch.float64)
    got_t = torch.tensor([row for r in results for row in r[3]], dtype=torch.float64)
    torch.testing.assert_close(got_i, gi.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_t, gt.grad, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- models

def _tiny_cfg(**vision):
    return clip.CLIPConfig(
        embed_dim=8,
        vision=vit.VisionConfig(image_size=8, patch_size=4, width=8, depth=1, heads=2, **vision),
        text=text.TextConfig(context_length=6, vocab_size=11, width=8, depth=1, heads=2, eot_id=10))


def _tokens(B, L=6, eot_at=(3, 5, 1)):
    tok = torch.randint(1, 10, (B, L))
    for b in range(B):
        e = eot_at[b % len(eot_at)]
        tok[b, e] = 10
        tok[b, e + 1:] = 0
    return tok


@pytest.mark.parametrize("vision", [dict(), dict(cls_token=True, pos_embed="sincos")])
def test_clip_shapes_and_gradcheck(vision):
    torch.manual_seed(0)
    model = clip.CLIP(_tiny_cfg(**vision)).double()
    images = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    tokens = _tokens(3)
    ids = masking.random_keep_indices(3, 4, num_keep=2)
    out = model(images, tokens, ids_keep=ids)
    assert out["image_features"].shape == (3, 8) and out["text_features"].shape == (3, 8)
    torch.testing.assert_close(out["image_features"].norm(dim=-1), torch.ones(3, dtype=torch.float64))
    # gradcheck of the loss through both towers w.r.t. a parameter of each and the logit scale
    names = ["visual.pos_embed" if not vision else "visual.cls_token", "text.proj.weight", "logit_scale"]
    from torch.func import functional_call
    base = dict(model.named_parameters())

    def g(*ps):
        return model.loss(functional_call(model, {**base, **dict(zip(names, ps))}, (images, tokens),
                                          {"ids_keep": ids}))

    assert torch.autograd.gradcheck(g, tuple(base[n].detach().clone().requires_grad_() for n in names), fast_mode=True)


def test_text_pools_at_first_eot_and_ignores_padding():
    torch.manual_seed(0)
    tower = text.TextTransformer(text.TextConfig(context_length=6, vocab_size=11, width=8, depth=2, heads=2,
                                                 eot_id=10), 4).double()
    tok = _tokens(2, eot_at=(3,))
    other = tok.clone()
    other[:, 4:] = 7  # different content after the eot: causal attention never sees it
    torch.testing.assert_close(tower(tok), tower(other), rtol=0, atol=0)
    assert text.eot_positions(tok, 10).tolist() == [3, 3]
    assert text.eot_positions(torch.ones(1, 6, dtype=torch.long), 10).tolist() == [5]


def test_vision_keep_all_equals_no_mask():
    torch.manual_seed(0)
    tower = vit.VisionTransformer(_tiny_cfg().vision, 4).double()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    ids = torch.arange(4).expand(2, 4)
    torch.testing.assert_close(tower(images, ids), tower(images), rtol=1e-12, atol=1e-12)


def test_logit_scale_is_clamped_at_100():
    model = clip.CLIP(_tiny_cfg())
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1000.0))
    assert model.scale_and_bias()[0].item() == 100.0


def test_presets_build():
    for name, cfg in clip.PRESETS.items():
        assert cfg.vision.image_size % cfg.vision.patch_size == 0, name
    tiny = clip.CLIP(clip.PRESETS["tiny"])
    assert sum(p.numel() for p in tiny.parameters()) < 3_000_000


def test_config_validation():
    with pytest.raises(ValueError, match="patch_size"):
        vit.VisionConfig(image_size=10, patch_size=4)
    with pytest.raises(ValueError, match="loss"):
        clip.CLIPConfig(loss="triplet")
