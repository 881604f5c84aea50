"""The fast path: the reference CLIP model's forward and loss, computed with flipkern's kernels.

These are functions over the reference modules (flipkern.reference.clip.CLIP and
its towers), never new modules: the fast and the reference path read the same
parameters, so a checkpoint written by one loads in the other and gives the
same embeddings.

Vision tower: ``gather_patches`` reads only the kept patches, the patch
embedding is one GEMM with the Conv2d weight (a stride-p conv is a linear map of
each patch) whose accumulator starts from the gathered position embedding plus
the conv bias (the position add is fused into the GEMM), the blocks run dense
attention over the K kept tokens (every sample keeps the same K) or varlen
attention when ``keep_lengths`` gives each sample its own K.
Text tower: captions are packed without padding (length = first eot + 1), the
causal blocks run on the packed tokens with varlen attention, and only each
caption's last token goes through ln_final and the projection.
Loss: the chunked all-gather ``clip_loss`` / ``siglip_loss``.
MAE reconstruction (``mae_loss``): restore_tokens, dense decoder blocks, and the
prediction head and targets on the removed patches only.

Every flipkern op picks its backend itself (backends.select): an op with no
kernel usable here (no C++ extension, no GPU) runs its reference
implementation, so the fast path never fails for that, and
``backends_used()`` reports what each op ran on.
"""
import torch
import torch.nn.functional as F

from . import _checks, backends
from .attention import pack
from .blocks import dense_block_forward, dense_blocks_forward, packed_blocks_forward
from .losses import clip_loss, siglip_loss
from .masking import drop_tokens, gather_patches, restore_tokens
from .reference import clip as refclip
from .reference import mae as ref_mae
from .reference import masking as ref_masking
from .reference.text import eot_positions

_composed = {}  # how the fast path composed each tower (the ops record their own backends)


def backends_used():
    """{op: backend} for every op the fast path (and any flipkern op) ran in this process."""
    return {**backends.backends_used(), **_composed}


# ----------------------------------------------------------------------------- vision tower

def patch_embed(images, ids_keep, weight, bias, pos_embed):
    """A stride-p Conv2d patch embedding (weight [width, C, p, p], bias [width] or None)
    plus the position embedding pos_embed [N, width] (or None: no position embedding),
    on the kept patches only: [B, K, width].

    Equals conv -> flatten -> + pos_embed -> keep ids_keep (all patches when
    None) without computing the dropped patches.
    """
    width, p = weight.shape[0], weight.shape[-1]
    if ids_keep is None:
        patches = ref_masking.patchify(images, p)
        pos = None if pos_embed is None else pos_embed.expand(images.shape[0], -1, -1)
    else:
        patches = gather_patches(images, ids_keep, p)
        pos = None if pos_embed is None else F.embedding(ids_keep, pos_embed)
    B, K, _ = patches.shape
    # the (C, p, p) patch order is the order a Conv2d weight flattens in
    w = weight.reshape(width, -1).t()
    if pos is None:
        x = patches.reshape(B * K, -1) @ w if bias is None else torch.addmm(bias, patches.reshape(B * K, -1), w)
        return x.view(B, K, width)
    start = pos if bias is None else pos + bias
    # one GEMM that accumulates onto position + bias: no separate pass for the adds
    x = torch.addmm(start.reshape(B * K, width), patches.reshape(B * K, -1), w)
    return x.view(B, K, width)


def _segment_mean(x, cu_seqlens, lengths):
    """Mean of each packed sequence: x [total, D] -> [B, D]."""
    seg = torch.repeat_interleave(torch.arange(lengths.shape[0], device=x.device), lengths,
                                  output_size=x.shape[0])
    sums = x.new_zeros((lengths.shape[0], x.shape[1])).index_add_(0, seg, x)
    return sums / lengths.clamp(min=1).to(x.dtype)[:, None]


def _embed(visual, images, ids_keep):
    _composed["patch_embed"] = "gather_patches + GEMM on kept patches (position add fused)"
    return visual.with_cls(patch_embed(images, ids_keep, visual.patch_embed.weight, visual.patch_embed.bias,
                                       visual.pos_embed))


def encode_image_tokens(visual, images, ids_keep=None):
    """The reference VisionTransformer's forward_tokens on the fast path: the tokens after
    the last block, [B, (1 +) K, width], every sample keeping the same K."""
    x = _embed(visual, images, ids_keep)
    _composed["vision_attention"] = "sdpa (dense, K shared by the batch)"
    return dense_blocks_forward(visual.blocks, x, checkpoint=visual.grad_checkpointing)


def vision_tokens(visual, images, ids_keep=None, *, fast=True):
    """``visual.forward_tokens(images, ids_keep)``, on the fast path when ``fast``."""
    return encode_image_tokens(visual, images, ids_keep) if fast else visual.forward_tokens(images, ids_keep)


def encode_image(visual, images, ids_keep=None, keep_lengths=None):
    """The reference VisionTransformer's forward on the fast path: [B, C, H, W] -> [B, output_dim].

    keep_lengths (int [B], optional): sample b keeps only ids_keep[b, :keep_lengths[b]];
    the blocks then run varlen attention over the packed tokens.
    """
    if keep_lengths is not None:
        _check_keep_lengths(keep_lengths, ids_keep)
    if keep_lengths is None:
        return visual.pool(encode_image_tokens(visual, images, ids_keep))
    return _encode_image_varlen(visual, _embed(visual, images, ids_keep), keep_lengths)


def _check_keep_lengths(keep_lengths, ids_keep):
    """keep_lengths: integer [B] in [1, K] for ids_keep [B, K]; on both paths, fast and reference."""
    if ids_keep is None:
        _checks.fail("fastpath", "keep_lengths needs ids_keep")
    _checks.tensor("fastpath", "keep_lengths", keep_lengths, dims=1, dtypes=_checks.INTEGER)
    if keep_lengths.shape[0] != ids_keep.shape[0]:
        _checks.fail("fastpath", f"keep_lengths must be [B] = [{ids_keep.shape[0]}], "
                                 f"got shape {tuple(keep_lengths.shape)}")
    # A sample that keeps no patch has no image to encode: its feature would be a mean
    # over nothing (NaN in the reference tower, zeros on the fast path), so 0 is an error.
    _checks.lengths_values("fastpath", "keep_lengths", keep_lengths, ids_keep.shape[1], low=1)


def _encode_image_varlen(visual, x, keep_lengths):
    has_cls = visual.cls_token is not None
    lengths = keep_lengths.to(device=x.device, dtype=torch.int64) + int(has_cls)
    packed, cu = pack(x, lengths)
    _composed["vision_attention"] = "varlen (K per sample)"
    # max_seqlen only bounds the lengths (it sizes the kernel grid): the host knows K + cls
    # without reading lengths back from the device
    packed = packed_blocks_forward(visual.blocks, packed, cu, x.shape[1], causal=False,
                                   checkpoint=visual.grad_checkpointing)
    if has_cls:
        pooled = visual.ln_post(packed[cu[:-1].long()])
    else:
        pooled = _segment_mean(visual.ln_post(packed), cu, lengths)
    return visual.proj(pooled)


def reference_encode_image_varlen(visual, images, ids_keep, keep_lengths):
    """The reference semantics of per-sample K: the reference tower on each sample alone."""
    feats = [visual(images[b:b + 1], ids_keep[b:b + 1, :int(n)]) for b, n in enumerate(keep_lengths.tolist())]
    return torch.cat(feats, 0)


# ----------------------------------------------------------------------------- text tower

def encode_text(text, tokens):
    """The reference TextTransformer's forward on packed tokens: int64 [B, L] -> [B, output_dim].

    Caption b has length eot_b + 1 (its first eot token ends it); causal attention
    means the padding after it never influences it, so dropping the padding
    changes nothing but the work done.
    """
    B, L = tokens.shape
    if L > text.cfg.context_length:
        raise ValueError(f"tokens have length {L} > context_length {text.cfg.context_length}")
    lengths = eot_positions(tokens, text.cfg.eot_id) + 1
    packed_tokens, cu = pack(tokens, lengths)
    positions, _ = pack(torch.arange(L, device=tokens.device).expand(B, L), lengths)
    x = text.token_embedding(packed_tokens) + F.embedding(positions, text.pos_embed)
    _composed["text_attention"] = "varlen causal (packed, no padding)"
    # max_seqlen: the token width L bounds every caption's length and is known on the host
    # since tokenization; int(lengths.max()) would sync with the device every step
    x = packed_blocks_forward(text.blocks, x, cu, L, causal=True, checkpoint=text.grad_checkpointing)
    last = x[cu[1:].long() - 1]  # each caption's eot token; ln_final is per token, so only these need it
    return text.proj(text.ln_final(last))


# ----------------------------------------------------------------------------- CLIP

def clip_forward(model, images, tokens, ids_keep=None, *, fast=True, keep_lengths=None, image_tokens=False):
    """``model(images, tokens, ids_keep)`` (a reference CLIP), on the fast path when ``fast``.

    Returns the same dict: normalized image_features and text_features,
    logit_scale (exp'ed, clamped) and, for SigLIP, logit_bias; with ``image_tokens``
    also the vision tower's tokens after its last block (``visual.forward_tokens``,
    what an MAE decoder reads), which needs a K shared by the batch.
    """
    if keep_lengths is not None:
        _check_keep_lengths(keep_lengths, ids_keep)
    if keep_lengths is not None and image_tokens:
        raise ValueError("flipkern.fastpath: image_tokens needs a K shared by the batch (no keep_lengths)")
    if keep_lengths is not None:
        if not fast:
            img = reference_encode_image_varlen(model.visual, images, ids_keep, keep_lengths)
            return model.head(img, model.text(tokens))
        return model.head(encode_image(model.visual, images, ids_keep, keep_lengths), encode_text(model.text, tokens))
    x = vision_tokens(model.visual, images, ids_keep, fast=fast)
    out = model.head(model.visual.pool(x), encode_text(model.text, tokens) if fast else model.text(tokens))
    if image_tokens:
        out["image_tokens"] = x
    return out


def mae_loss(decoder, visual, x, images, ids_keep, *, fast=True):
    """MAE's reconstruction loss (flipkern.reference.mae) of ``decoder`` (a reference
    MAEDecoder) from the vision tower's tokens x = ``vision_tokens(visual, images,
    ids_keep)``, on the fast path when ``fast``: restore_tokens puts the visible tokens
    back among mask tokens, the decoder blocks run dense SDPA, and only the removed
    patches go through the norm and prediction head (drop_tokens) and are read as
    targets (gather_patches); the reference predicts every patch and masks the loss.
    """
    encoded = visual.patch_tokens(x)
    p = visual.cfg.patch_size
    if not fast:
        return ref_mae.reconstruction_loss(decoder(encoded, ids_keep), images, ids_keep, p)
    y = decoder.embed(encoded)
    y = restore_tokens(y, ids_keep, decoder.num_patches, decoder.mask_token.to(y.dtype)) + decoder.pos_embed.to(y.dtype)
    for block in decoder.blocks:
        y = dense_block_forward(block, y)
    ids_removed = ref_masking.removed_indices(ids_keep, decoder.num_patches)
    pred = decoder.pred(decoder.norm(drop_tokens(y, ids_removed)))
    target = ref_mae.norm_pix_target(gather_patches(images, ids_removed, p))
    return (pred.to(target.dtype) - target).pow(2).mean()


def contrastive_loss(model, out, *, fast=True, group=None, chunk_size=None):
    """``model.loss(out, group)``; on the fast path the chunked all-gather flipkern loss."""
    if not fast:
        return model.loss(out, group=group)
    img, txt, scale, bias = refclip.loss_inputs(out)  # the same dtypes as the reference's loss
    # The features are float32 (or float64) from here on, and the loss stays so on every
    # backend: the kernels ignore autocast already, the reference fallback's matmuls would not.
    with torch.autocast(img.device.type, enabled=False):
        if model.cfg.loss == "siglip":
            return siglip_loss(img, txt, scale, bias, chunk_size=chunk_size, group=group)
        return clip_loss(img, txt, scale, chunk_size=chunk_size, group=group)


__all__ = ["clip_forward", "contrastive_loss", "mae_loss", "backends_used", "encode_image", "encode_image_tokens",
           "vision_tokens", "encode_text", "patch_embed"]
