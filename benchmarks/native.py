"""The native-best baseline: the reference CLIP in plain PyTorch, written as a strong engineer would.

Text: the batch cut to its longest caption (the tower is causal, so the cut changes
no valid position), causal SDPA (is_causal=True: no mask tensor, SDPA skips the upper
triangle), ln_final and the projection on each caption's end token only. Vision: only
the kept patches are read (index a view of the images) and embedded by one linear
with the conv weight; SDPA everywhere. Loss: the full-matrix CLIP loss, its [B, B]
logits computed once. No flipkern kernel is used.
"""
import torch
import torch.nn.functional as F


def gather_patches(images, ids_keep, p):
    """The kept patches [B, K, C*p*p] ((C, p, p) order, a Conv2d weight's), reading only them:
    index the kept (row, col) cells of a [B, g, g, C, p, p] view of the images (square grid)."""
    B, C, H, W = images.shape
    g = W // p
    grid = images.view(B, C, H // p, p, g, p).permute(0, 2, 4, 1, 3, 5)  # a view, no copy
    return grid[torch.arange(B, device=images.device)[:, None], ids_keep // g, ids_keep % g].flatten(2)


def native_patch_embed(visual, images, ids_keep):
    """Kept patches gathered, one linear with the conv weight, + their position embedding;
    Conv2d over every patch when nothing is dropped."""
    if ids_keep is None:
        return visual.embed(images)
    w = visual.patch_embed.weight
    x = F.linear(gather_patches(images, ids_keep, visual.cfg.patch_size), w.flatten(1), visual.patch_embed.bias)
    return x + visual.pos_embed.to(w.dtype)[ids_keep]


def native_encode_text(text, tokens):
    """The batch cut to its longest caption (causal: the cut changes nothing), causal SDPA,
    ln_final and the projection on each caption's end token only."""
    from flipkern.fastpath import dense_block_forward
    from flipkern.reference.text import eot_positions
    eot = eot_positions(tokens, text.cfg.eot_id)
    x = text.embed(tokens[:, :int(eot.max()) + 1])
    for block in text.blocks:
        x = dense_block_forward(block, x, causal=True)  # SDPA is_causal=True, no mask tensor
    return text.proj(text.ln_final(x[torch.arange(x.shape[0], device=x.device), eot]))


def native_forward(model, images, tokens, ids_keep):
    """The reference CLIP's forward in plain PyTorch, written for speed (module docstring)."""
    from flipkern.fastpath import dense_block_forward
    v = model.visual
    x = v.with_cls(native_patch_embed(v, images, ids_keep))
    for block in v.blocks:
        x = dense_block_forward(block, x)
    return model.head(v.pool(x), native_encode_text(model.text, tokens))


def native_clip_loss(out):
    """The full-matrix CLIP loss, its [B, B] logits computed once (the text direction is its transpose)."""
    from flipkern.reference.clip import loss_inputs
    img, txt, scale, _ = loss_inputs(out)
    logits = scale * img @ txt.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
