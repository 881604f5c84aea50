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

Every flipkern op picks its backend itself (backends.select): an op with no
kernel usable here (no C++ extension, no GPU) runs its reference
implementation, so the fast path never fails for that, and
``backends_used()`` reports what each op ran on.
"""
import torch
import torch.nn.functional as F

from . import backends
from .attention import pack
from .blocks import dense_blocks_forward, packed_blocks_forward
from .losses import clip_loss, siglip_loss
from .masking import gather_patches
from .reference import clip as refclip
from .reference import masking as ref_masking
from .reference.text import eot_positions

_composed = {}  # how the fast path composed each tower (the ops record their own backends)


def backends_used():
    """{op: backend} for every op the fast path (and any flipkern op) ran in this process."""
    return {**backends.backends_used(), **_composed}


# ----------------------------------------------------------------------------- vision tower

def patch_embed(images, ids_keep, weight, bias, pos_embed):
    """A stride-p Conv2d patch embedding (weight [width, C, p, p], bias [width] or None)
    plus the position embedding pos_embed [N, width], on the kept patches only: [B, K, width].

    Equals conv -> flatten -> + pos_embed -> keep ids_keep (all patches when
    None) without computing the dropped patches.
    """
    width, p = weight.shape[0], weight.shape[-1]
    if ids_keep is None:
        patches = ref_masking.patchify(images, p)
        pos = pos_embed.expand(images.shape[0], -1, -1)
    else:
        patches = gather_patches(images, ids_keep, p)
        pos = F.embedding(ids_keep, pos_embed)
    start = pos if bias is None else pos + bias
    B, K, _ = patches.shape
    # one GEMM that accumulates onto position + bias: no separate pass for the adds;
    # the (C, p, p) patch order is the order a Conv2d weight flattens in
    x = torch.addmm(start.reshape(B * K, width), patches.reshape(B * K, -1), weight.reshape(width, -1).t())
    return x.view(B, K, width)


def _segment_mean(x, cu_seqlens, lengths):
    """Mean of each packed sequence: x [total, D] -> [B, D]."""
    seg = torch.repeat_interleave(torch.arange(lengths.shape[0], device=x.device), lengths,
                                  output_size=x.shape[0])
    sums = x.new_zeros((lengths.shape[0], x.shape[1])).index_add_(0, seg, x)
    return sums / lengths.clamp(min=1).to(x.dtype)[:, None]


def encode_image(visual, images, ids_keep=None, keep_lengths=None):
    """The reference VisionTransformer's forward on the fast path: [B, C, H, W] -> [B, output_dim].

    keep_lengths (int [B], optional): sample b keeps only ids_keep[b, :keep_lengths[b]];
    the blocks then run varlen attention over the packed tokens.
    """
    x = visual.with_cls(patch_embed(images, ids_keep, visual.patch_embed.weight, visual.patch_embed.bias,
                                    visual.pos_embed))
    if keep_lengths is None:
        _composed["vision_attention"] = "sdpa (dense, K shared by the batch)"
        return visual.pool(dense_blocks_forward(visual.blocks, x, checkpoint=visual.grad_checkpointing))
    return _encode_image_varlen(visual, x, keep_lengths)


def _encode_image_varlen(visual, x, keep_lengths):
    has_cls = visual.cls_token is not None
    if keep_lengths.dim() != 1 or keep_lengths.shape[0] != x.shape[0]:
        raise ValueError(f"flipkern.fastpath: keep_lengths must be [B] = [{x.shape[0]}], "
                         f"got shape {tuple(keep_lengths.shape)}")
    if keep_lengths.numel() and not 0 <= int(keep_lengths.min()) <= int(keep_lengths.max()) <= x.shape[1] - has_cls:
        raise ValueError(f"flipkern.fastpath: keep_lengths must lie in [0, K={x.shape[1] - has_cls}]")
    lengths = keep_lengths.to(device=x.device, dtype=torch.int64) + int(has_cls)
    packed, cu = pack(x, lengths)
    _composed["vision_attention"] = "varlen (K per sample)"
    packed = packed_blocks_forward(visual.blocks, packed, cu, int(lengths.max()), causal=False,
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
    x = packed_blocks_forward(text.blocks, x, cu, int(lengths.max()) if B else 0, causal=True,
                              checkpoint=text.grad_checkpointing)
    last = x[cu[1:].long() - 1]  # each caption's eot token; ln_final is per token, so only these need it
    return text.proj(text.ln_final(last))


# ----------------------------------------------------------------------------- CLIP

def clip_forward(model, images, tokens, ids_keep=None, *, fast=True, keep_lengths=None):
    """``model(images, tokens, ids_keep)`` (a reference CLIP), on the fast path when ``fast``.

    Returns the same dict: normalized image_features and text_features,
    logit_scale (exp'ed, clamped) and, for SigLIP, logit_bias.
    """
    if keep_lengths is not None and ids_keep is None:
        raise ValueError("flipkern.fastpath: keep_lengths needs ids_keep")
    if not fast:
        if keep_lengths is None:
            return model(images, tokens, ids_keep=ids_keep)
        img = reference_encode_image_varlen(model.visual, images, ids_keep, keep_lengths)
        return model.head(img, model.text(tokens))
    _composed["patch_embed"] = "gather_patches + GEMM on kept patches (position add fused)"
    img = encode_image(model.visual, images, ids_keep, keep_lengths)
    return model.head(img, encode_text(model.text, tokens))


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


__all__ = ["clip_forward", "contrastive_loss", "backends_used", "encode_image", "encode_text",
           "patch_embed"]
