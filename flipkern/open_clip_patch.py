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
- ``model.encode_text`` (open_clip's CLIP) or ``model.text.forward`` (a
  TextTransformer tower of CustomTextCLIP: EVA-CLIP, ViTamin, SigLIP, ...), one
  encode for both: causal text is packed without the padding after each
  caption's pooled token and run through causal varlen attention; bidirectional
  text (SigLIP) runs dense and exact by default, or packed without its padding
  with ``text_padding="drop"`` (see apply_to_open_clip); only the pooled token
  goes through ln_final and the projection.
- the ``forward`` of an open_clip ClipLoss / SigLipLoss passed as ``loss``:
  flipkern.clip_loss / siglip_loss, chunked, all-gathered over the default
  process group when world_size > 1.

A part whose configuration the patch does not cover (attentional pooling,
custom blocks, a text tower with a class token, a CLIP loss without local_loss and
gather_with_grad on several ranks, ...) is left unpatched and the returned dict
says why; nothing ever fails for being unsupported.
"""
import functools
import types
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from . import _checks, fastpath
from .attention import cu_seqlens_from_lengths
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
#
# One encode for both places open_clip keeps a text transformer: CLIP's own text
# (its parts are attributes of the CLIP model) and a TextTransformer tower
# (CustomTextCLIP's ``model.text``: EVA-CLIP, ViTamin, SigLIP, ...). _TextParts reads
# the parts from whichever holds them; everything after that is shared.

TEXT_PADDING = ("keep", "drop")
_TEXT_OP = "apply_to_open_clip (text)"  # errors read "flipkern.apply_to_open_clip (text): ..."


class _TextParts(NamedTuple):
    token_embedding: torch.nn.Module
    positional_embedding: torch.Tensor
    transformer: torch.nn.Module
    ln_final: torch.nn.Module
    projection: object  # None, an nn.Linear or a [width, dim] parameter
    pool_type: str
    eos_id: Optional[int]
    pad_id: Optional[int]  # None: the holder does not keep it (open_clip's CLIP)
    attn_mask: Optional[torch.Tensor]  # the causal mask, or None: bidirectional
    pad_mask: bool  # bidirectional with padding keys masked (TextTransformer's use_pad_mask)


def _text_parts(holder):
    from open_clip.transformer import TextTransformer
    if isinstance(holder, TextTransformer):
        return _TextParts(holder.token_embedding, holder.positional_embedding, holder.transformer,
                          holder.ln_final, holder.text_projection, holder.pool_type, holder.eos_id,
                          holder.pad_id, holder.attn_mask, holder.use_pad_mask)
    return _TextParts(holder.token_embedding, holder.positional_embedding, holder.transformer, holder.ln_final,
                      holder.text_projection, holder.text_pool_type, getattr(holder, "text_eos_id", None),
                      None, holder.attn_mask, False)


def _pooled_index(parts, text, real=None):
    """int64 [B]: each caption's pooled position, as open_clip's text_global_pool picks it;
    given ``real`` (the real-token mask of text_padding="drop"), pool 'last' is the last
    real token instead of the last position."""
    B, L = text.shape
    if parts.pool_type == "first":
        return torch.zeros(B, dtype=torch.int64, device=text.device)
    if parts.pool_type == "last":
        if real is None:
            return torch.full((B,), L - 1, dtype=torch.int64, device=text.device)
        return L - 1 - real.flip(1).int().argmax(dim=-1)
    if parts.pool_type == "argmax":
        return text.argmax(dim=-1)
    return (text == parts.eos_id).int().argmax(dim=-1)  # 'eos'


def _embed(parts, tokens, positions, cast_dtype):
    return (parts.token_embedding(tokens).to(cast_dtype)
            + F.embedding(positions, parts.positional_embedding).to(cast_dtype))


def _packed_pooled(parts, text, keep, pooled, causal, cast_dtype):
    """Only the tokens where ``keep`` [B, L] is True (in order, with their own positions)
    through the blocks as packed sequences, varlen attention within each caption; returns
    the pooled rows [B, D] (each pooled position must be kept)."""
    B, L = text.shape
    positions = torch.arange(L, device=text.device).expand(B, L)
    x = _embed(parts, text[keep], positions[keep], cast_dtype)
    cu = cu_seqlens_from_lengths(keep.sum(dim=-1))
    # max_seqlen: L bounds every length and needs no device sync (as fastpath.encode_text)
    x = _run_blocks(parts.transformer, packed_block_forward, x, cu, L, causal)
    rank = keep.cumsum(dim=-1).gather(1, pooled[:, None])[:, 0] - 1  # kept tokens before the pooled one
    return x[cu[:-1].long() + rank]


def _dense_pooled(parts, text, pooled, cast_dtype):
    """Every position (padding included) through the blocks, bidirectional: stock's math."""
    B, L = text.shape
    x = _embed(parts, text, torch.arange(L, device=text.device).expand(B, L), cast_dtype)
    x = _run_blocks(parts.transformer, dense_block_forward, x, False)
    return x[torch.arange(B, device=text.device), pooled]


def _pooled_is_real(real, pooled):
    """[B] bool: each caption's pooled position is a real token (not padding)."""
    return real.gather(1, pooled[:, None])[:, 0]


def _real_tokens(parts, text):
    """[B, L] bool: not the pad id. text_padding="drop": every caption needs a real token to pool."""
    real = text != parts.pad_id
    pooled = _pooled_index(parts, text, real)
    is_real = _pooled_is_real(real, pooled)
    if not bool(is_real.all()):  # one sync: a clear error rather than a garbage row
        b = int((~is_real).nonzero()[0])
        _checks.fail(_TEXT_OP, f"text row {b} pools at a padding token (text_padding='drop', pad id "
                               f"{parts.pad_id}, pool type {parts.pool_type!r}); an all-padding caption has no "
                               "real token to pool")
    return real, pooled


def _encode_text(holder, text, mode):
    """Text features [B, dim] of ``holder`` (a CLIP model or a TextTransformer) in ``mode``
    (see _text_mode), or None where mode "pad_mask" cannot be exact for this batch."""
    parts = _text_parts(holder)
    _checks.tensor(_TEXT_OP, "text", text, dims=2, dtypes=_checks.INTEGER)
    if text.shape[1] > parts.positional_embedding.shape[0]:
        _checks.fail(_TEXT_OP, f"text has {text.shape[1]} positions, more than the tower's context length "
                               f"{parts.positional_embedding.shape[0]}")
    cast_dtype = parts.transformer.get_cast_dtype()
    if mode == "causal":  # nothing after the pooled token reaches it: keep tokens up to it
        pooled = _pooled_index(parts, text)
        keep = torch.arange(text.shape[1], device=text.device) <= pooled[:, None]
        x = _packed_pooled(parts, text, keep, pooled, True, cast_dtype)
        fastpath._composed["open_clip.text"] = "packed, varlen causal attention"
    elif mode == "dense":
        x = _dense_pooled(parts, text, _pooled_index(parts, text), cast_dtype)
        fastpath._composed["open_clip.text"] = "dense, sdpa bidirectional over every position"
    elif mode == "pad_mask":
        real, pooled = text != parts.pad_id, _pooled_index(parts, text)
        if not bool(_pooled_is_real(real, pooled).all()):
            return None  # a pooled padding token: stock computes it from the real keys; not packed
        x = _packed_pooled(parts, text, real, pooled, False, cast_dtype)
        fastpath._composed["open_clip.text"] = "packed by pad id, varlen bidirectional attention"
    else:  # "drop"
        real, pooled = _real_tokens(parts, text)
        x = _packed_pooled(parts, text, real, pooled, False, cast_dtype)
        fastpath._composed["open_clip.text"] = "packed by pad id (text_padding='drop'), varlen bidirectional"
    x = parts.ln_final(x)  # token-wise: on the pooled rows only
    proj = parts.projection
    if proj is not None:
        x = proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj
    return x


def _clip_encode_text(model, text, normalize=False, mode="causal"):
    """open_clip CLIP.encode_text."""
    x = _encode_text(model, text, mode)
    return F.normalize(x, dim=-1) if normalize else x


def _text_tower_forward(tower, text, mode="causal"):
    """open_clip TextTransformer.forward (output_tokens=False, no class token)."""
    x = _encode_text(tower, text, mode)
    if x is None:
        fastpath._composed["open_clip.text"] = "stock (use_pad_mask and a pooled padding token)"
        return type(tower).forward(tower, text)
    return x


def _text_mode(parts, text_padding):
    """How the text runs ("causal", "dense", "pad_mask", "drop"), or why it cannot."""
    if parts.pool_type not in ("first", "last", "argmax", "eos"):
        return None, f"text pool type {parts.pool_type!r} is not covered"
    mask = parts.attn_mask
    if mask is not None:
        L = parts.positional_embedding.shape[0]
        causal = torch.full((L, L), float("-inf")).triu(1)
        if mask.shape != (L, L) or not torch.equal(mask.cpu().float(), causal):
            return None, "the text attention mask is not the causal mask"
        return "causal", None  # exact, and already drops every token after the pooled one
    if text_padding == "keep":
        return ("pad_mask" if parts.pad_mask else "dense"), None
    if parts.pad_id is None:
        return None, "text_padding='drop' needs the pad id, which open_clip's CLIP text does not keep"
    return "drop", None


def _uncovered_text_tower(text):
    """Why a separate text tower (``model.text``: CustomTextCLIP, CoCa) is not covered, or None."""
    from open_clip.transformer import TextTransformer
    if type(text) is not TextTransformer:
        return f"text tower {type(text).__name__} is not open_clip's TextTransformer"
    if text.cls_emb is not None:
        return "a class token appended to the text (embed_cls, CoCa) is not covered"
    if text.output_tokens:
        return "a text tower with output_tokens=True is not covered (it returns every position)"
    return None


def _patch_text(model, text_padding):
    tower = getattr(model, "text", None)
    if isinstance(tower, torch.nn.Module):  # CustomTextCLIP: its encode_text calls model.text
        why = _uncovered_text_tower(tower)
        holder, name, fn = tower, "forward", _text_tower_forward
    elif hasattr(model, "transformer") and hasattr(model, "token_embedding"):
        why, holder, name, fn = None, model, "encode_text", _clip_encode_text
    else:
        return f"{type(model).__name__} keeps its text tower elsewhere"
    if why:
        return why
    mode, why = _text_mode(_text_parts(holder), text_padding)
    if why:
        return why
    return _install(holder, name, functools.partial(fn, mode=mode), holder.transformer)


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

def apply_to_open_clip(model, loss=None, text_padding="keep"):
    """Patch an open_clip CLIP model (and optionally its ClipLoss/SigLipLoss) in place to run
    on flipkern's kernels. Returns {part: "flipkern" or why it was left as it was}.

    text_padding says what a bidirectional text tower (SigLIP's: no causal mask) does with
    the padding after each caption:

    - "keep" (default, exact: the text features equal stock open_clip's). Without a pad
      mask every position, padding included, is a key of every query and pool 'last'
      reads the last position, so nothing can be dropped: the tower runs dense (all
      positions, one SDPA call per block, flipkern's block forward). With the tower's
      use_pad_mask (padding keys masked) the real tokens are packed (found by the pad id)
      and run through bidirectional varlen attention, which is exact at every real
      token; a batch where a pooled position is a padding token (pool 'last' and a
      caption shorter than the context) runs stock's forward instead, since stock
      computes that token as a query over the real keys.
    - "drop" (opt-in, for training from scratch): the padding (tokens equal to the pad
      id) is dropped: bidirectional varlen attention over the real tokens only, pooled
      at the last real token for pool 'last' (first / argmax / eos pool where they
      did). This CHANGES the model's function (padding is no longer a key), so a
      pretrained SigLIP gives other features; an all-padding caption is an error.

    A causal text tower (CLIP, EVA-CLIP, ViTamin, ...) is exact in both: each caption is
    packed up to its pooled token (nothing after it reaches the pooled token).
    """
    if text_padding not in TEXT_PADDING:
        raise ValueError(f"flipkern.apply_to_open_clip: text_padding must be one of {TEXT_PADDING}, "
                         f"got {text_padding!r}")
    try:
        import open_clip  # noqa: F401
    except ImportError as e:
        raise ImportError(f"flipkern.apply_to_open_clip: open_clip is not importable ({e}); "
                          "pip install open_clip_torch") from None
    report = {"visual": _patch_visual(model.visual) if hasattr(model, "visual") else "no visual tower",
              "text": _patch_text(model, text_padding)}
    if loss is not None:
        report["loss"] = _patch_loss(loss)
    for part, status in report.items():
        fastpath._composed[f"open_clip.{part}"] = status
    return report


__all__ = ["apply_to_open_clip"]
