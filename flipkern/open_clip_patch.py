"""flipkern's kernels in an existing open_clip model: ``apply_to_open_clip(model, loss=...)``.

open_clip stays the owner of the model: nothing is re-created and no parameter
changes name, so its checkpoints load as before. What changes is how three
methods compute, through instance attributes that shadow the class's methods:

- ``model.visual.forward`` (open_clip's VisionTransformer): PatchDropout's
  drawing of kept patches is kept as it is (``torch.randn(B, N).topk(K)`` on the
  default generator, so a seeded run drops the same patches as unpatched
  open_clip), but the patches are gathered *before* the embedding
  (flipkern.gather_patches + one GEMM with conv1's weight, position add fused),
  and the blocks run fused attention over the kept tokens.
- ``model.visual`` an open_clip TimmModel (SigLIP, EVA-CLIP, ...): its timm trunk
  through flipkern.apply_to_timm.
- ``model.encode_text`` (open_clip's CLIP): captions are packed without the
  padding after their end-of-text token and run through causal varlen
  attention; only the pooled token goes through ln_final and the projection.
- the ``forward`` of an open_clip ClipLoss / SigLipLoss passed as ``loss``:
  flipkern.clip_loss / siglip_loss, chunked, all-gathered over the default
  process group when world_size > 1.

A part whose configuration the patch does not cover (attentional pooling,
custom blocks, a non-causal text tower, a CLIP loss without local_loss and
gather_with_grad on several ranks, ...) is left unpatched and the returned dict
says why; nothing ever fails for being unsupported.
"""
import types

import torch
import torch.nn.functional as F

from . import fastpath
from .attention import pack
from .blocks import BlockParts, dense_block_forward, packed_block_forward, register_block_adapter, run_blocks
from .losses import clip_loss, siglip_loss
from .timm_patch import apply_to_timm


def _uncovered_blocks(transformer):
    """Why the resblocks are not all open_clip's plain ResidualAttentionBlock
    (nn.MultiheadAttention self-attention), or None when they are."""
    from open_clip.transformer import ResidualAttentionBlock
    if not getattr(transformer, "batch_first", True):
        return "the transformer is not batch_first"
    for b in transformer.resblocks:
        if type(b) is not ResidualAttentionBlock or hasattr(b, "ln_1_kv"):
            return f"block type {type(b).__name__} is not a plain ResidualAttentionBlock"
        why = _uncovered_attention(b.attn)
        if why:
            return why
    return None


def _uncovered_attention(attn):
    """Why an nn.MultiheadAttention is not the plain self-attention the block forward
    computes, or None when it is."""
    if not attn._qkv_same_embed_dim or attn.in_proj_bias is None or attn.bias_k is not None or attn.add_zero_attn:
        return "the attention is not a plain self-attention with one fused in_proj"
    if attn.dropout:  # the fused attention applies none: dropping it would change training silently
        return f"attention dropout ({attn.dropout}) is not covered"
    return None


def _install(obj, name, fn, transformer):
    """obj.<name> = fn bound to obj, when the blocks of ``transformer`` are covered."""
    why = _uncovered_blocks(transformer)
    if why:
        return why
    setattr(obj, name, types.MethodType(fn, obj))
    return "flipkern"


def _block_parts(block):
    """open_clip's ResidualAttentionBlock: nn.MultiheadAttention's fused in_proj rows are
    (q, k, v) x (H, Dh), the layout BlockParts.qkv needs; its scale is 1/sqrt(Dh)."""
    a = block.attn
    why = _uncovered_attention(a)
    if why:
        raise ValueError(f"flipkern: an open_clip ResidualAttentionBlock the block forward does not cover: {why}")
    return BlockParts(ln_1=block.ln_1, qkv=lambda x: F.linear(x, a.in_proj_weight, a.in_proj_bias),
                      num_heads=a.num_heads, scale=None, out_proj=a.out_proj, ln_2=block.ln_2, mlp=block.mlp,
                      ls_1=block.ls_1, ls_2=block.ls_2)


register_block_adapter("open_clip.transformer.ResidualAttentionBlock", _block_parts)


def _run_blocks(transformer, block_fn, x, *args):
    """open_clip's Transformer.forward over our block forward, honouring its grad_checkpointing."""
    return run_blocks(transformer.resblocks, block_fn, x, *args, checkpoint=transformer.grad_checkpointing)


# ----------------------------------------------------------------------------- vision

def _keep_indices(visual, batch, num_patches):
    """PatchDropout's own draw (same generator calls, same order), or None when it is off."""
    from open_clip.transformer import PatchDropout
    pd = visual.patch_dropout
    if not isinstance(pd, PatchDropout) or not pd.training or pd.prob == 0.0:
        return None
    keep = max(1, int(num_patches * (1 - pd.prob)))
    return torch.randn(batch, num_patches).topk(keep, dim=-1).indices


def _visual_forward(visual, x):
    B = x.shape[0]
    num_patches = visual.grid_size[0] * visual.grid_size[1]
    ids_keep = _keep_indices(visual, B, num_patches)
    if ids_keep is not None:
        ids_keep = ids_keep.to(x.device)
    pos = visual.positional_embedding.to(x.dtype)
    tokens = fastpath.patch_embed(x, ids_keep, visual.conv1.weight, visual.conv1.bias, pos[1:])
    cls = (visual.class_embedding.to(x.dtype) + pos[0]).to(tokens.dtype).expand(B, 1, -1)
    x = visual.ln_pre(torch.cat([cls, tokens], dim=1))
    fastpath._composed["open_clip.visual"] = "gather_patches + GEMM, sdpa over the kept tokens"
    x = _run_blocks(visual.transformer, dense_block_forward, x)
    pooled, tokens = visual._pool(x)
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    return (pooled, tokens) if visual.output_tokens else pooled


def _patch_visual(visual):
    from open_clip.timm_model import TimmModel
    from open_clip.transformer import PatchDropout, VisionTransformer
    if type(visual) is TimmModel:  # its trunk is a timm model; the head stays open_clip's
        return apply_to_timm(visual.trunk)
    if type(visual) is not VisionTransformer:
        return f"visual is {type(visual).__name__}, not open_clip's VisionTransformer"
    if visual.attn_pool is not None:
        return "attentional pooling is not covered"
    if isinstance(visual.patch_dropout, PatchDropout) and not visual.patch_dropout.exclude_first_token:
        return "PatchDropout(exclude_first_token=False) is not covered"
    if (visual.grid_size[0] * visual.patch_size[0] != visual.image_size[0]
            or visual.patch_size[0] != visual.patch_size[1]):
        return "non-square patches or an image size the patch size does not divide"
    return _install(visual, "forward", _visual_forward, visual.transformer)


# ----------------------------------------------------------------------------- text

def _text_end(model, text):
    """Index of each caption's pooled token: what open_clip's text_global_pool picks."""
    if model.text_pool_type == "argmax":
        return text.argmax(dim=-1)
    return (text == model.text_eos_id).int().argmax(dim=-1)  # 'eos'


def _encode_text(model, text, normalize=False):
    cast_dtype = model.transformer.get_cast_dtype()
    B, L = text.shape
    lengths = _text_end(model, text) + 1  # causal: nothing after the pooled token reaches it
    packed_tokens, cu = pack(text, lengths)
    positions, _ = pack(torch.arange(L, device=text.device).expand(B, L), lengths)
    x = (model.token_embedding(packed_tokens).to(cast_dtype)
         + F.embedding(positions, model.positional_embedding).to(cast_dtype))
    fastpath._composed["open_clip.text"] = "packed, varlen causal attention"
    # max_seqlen: L bounds every length and needs no device sync (as fastpath.encode_text)
    x = _run_blocks(model.transformer, packed_block_forward, x, cu, L, True)
    x = model.ln_final(x[cu[1:].long() - 1])
    if model.text_projection is not None:
        proj = model.text_projection
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return F.normalize(x, dim=-1) if normalize else x


def _uncovered_custom_text(text):
    """Why a separate text tower (``model.text``: CustomTextCLIP, CoCa) is left as it is."""
    from open_clip.transformer import TextTransformer
    if type(text) is not TextTransformer:
        return f"text tower {type(text).__name__} is not open_clip's TextTransformer"
    if text.attn_mask is None and not text.use_pad_mask:
        # SigLIP's text: every position, padding included, is a key of every query, and pool
        # type 'last' pools the last position (padding unless the caption fills the context)
        return (f"bidirectional text without a pad mask (pool type {text.pool_type!r}): the padding takes part "
                "in the attention, so packing it away would change the output")
    return "a separate TextTransformer text tower is not covered (only open_clip's CLIP text is)"


def _patch_text(model):
    if isinstance(getattr(model, "text", None), torch.nn.Module):
        return _uncovered_custom_text(model.text)
    if not hasattr(model, "transformer") or not hasattr(model, "token_embedding"):
        return f"{type(model).__name__} keeps its text tower elsewhere (only open_clip's CLIP is covered)"
    if model.text_pool_type not in ("argmax", "eos"):
        return f"text pool type {model.text_pool_type!r} is not covered"
    mask = model.attn_mask
    L = model.positional_embedding.shape[0]
    causal = torch.full((L, L), float("-inf")).triu(1)
    if mask is None or mask.shape != (L, L) or not torch.equal(mask.cpu().float(), causal):
        return "the text attention mask is not the causal mask"
    return _install(model, "encode_text", _encode_text, model.transformer)


# ----------------------------------------------------------------------------- loss

def _group(world_size):
    if world_size <= 1:
        return None
    import torch.distributed as dist
    return dist.group.WORLD


def _clip_loss_forward(loss, image_features, text_features, logit_scale, logit_bias=None, output_dict=False):
    if logit_bias is not None:  # open_clip's CLIP loss with a bias: not the flipkern op's math
        return type(loss).forward(loss, image_features, text_features, logit_scale, logit_bias, output_dict)
    value = clip_loss(image_features, text_features, logit_scale, group=_group(loss.world_size))
    return {"contrastive_loss": value} if output_dict else value


def _siglip_loss_forward(loss, image_features, text_features, logit_scale, logit_bias, output_dict=False):
    value = siglip_loss(image_features, text_features, logit_scale, logit_bias, group=_group(loss.world_size))
    return {"contrastive_loss": value} if output_dict else value


def _patch_loss(loss):
    from open_clip.loss import ClipLoss, SigLipLoss
    if type(loss) is ClipLoss:
        if loss.world_size > 1 and not (loss.local_loss and loss.gather_with_grad):
            return "a multi-rank ClipLoss needs local_loss=True and gather_with_grad=True"
        if getattr(loss, "use_horovod", False):
            return "horovod is not covered"
        loss.forward = types.MethodType(_clip_loss_forward, loss)
        return "flipkern"
    if type(loss) is SigLipLoss:
        loss.forward = types.MethodType(_siglip_loss_forward, loss)
        return "flipkern"
    return f"{type(loss).__name__} is not covered (ClipLoss and SigLipLoss are)"


# ----------------------------------------------------------------------------- entry point

def apply_to_open_clip(model, loss=None):
    """Patch an open_clip CLIP model (and optionally its ClipLoss/SigLipLoss) in place to run
    on flipkern's kernels. Returns {part: "flipkern" or why it was left as it was}."""
    try:
        import open_clip  # noqa: F401
    except ImportError as e:
        raise ImportError(f"flipkern.apply_to_open_clip: open_clip is not importable ({e}); "
                          "pip install open_clip_torch") from None
    report = {"visual": _patch_visual(model.visual) if hasattr(model, "visual") else "no visual tower",
              "text": _patch_text(model)}
    if loss is not None:
        report["loss"] = _patch_loss(loss)
    for part, status in report.items():
        fastpath._composed[f"open_clip.{part}"] = status
    return report


__all__ = ["apply_to_open_clip"]
