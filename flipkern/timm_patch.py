"""flipkern's fast path in a timm VisionTransformer or Eva: ``apply_to_timm(model)``.

timm stays the owner of the model: no parameter changes name, so its
checkpoints load as before. What changes is ``model.forward_features``, an
instance attribute that shadows the class's method (``forward``,
``forward_head`` and the pooling, the 'map' attention pool included, are
timm's own):

- PatchDropout's drawing of kept patches is kept as it is (timm's
  ``argsort(randn(B, N))[:, :K]`` on the default generator and the images'
  device, sorted when ``ordered``), so a seeded run drops the same patches as
  unpatched timm; but the patches are gathered *before* the embedding
  (flipkern.gather_patches + one GEMM with the patch conv's weight, position add
  fused) and the prefix tokens (class, registers) are prepended after it;
- the blocks are flipkern.blocks' one block forward through the adapters below:
  fused attention over the kept tokens.

Eva (EVA-02, EVA-CLIP) is the same tower with its own parts: PatchDropoutWithIndices
(the same draw), rotary position embedding gathered for the kept patches (the
prefix tokens get the identity rotation, as timm leaves them unrotated), q/k/v
projections with q and v bias only, SwiGLU MLP with or without its norm, layer
scale gamma_1/gamma_2, pre- or post-norm blocks.

``forward_with_keep(model, images, ids_keep, keep_lengths)`` is the same tower
with explicit kept patches and, optionally, a keep count per sample: then the
blocks run varlen attention over the packed tokens and pooling ('token', 'avg',
'map') sees only each sample's own tokens.

A model the patch does not cover is left unpatched and ``apply_to_timm`` returns
why; nothing ever fails for being unsupported.
"""
import types

import torch
import torch.nn.functional as F

from . import fastpath
from .attention import pack, unpack
from .blocks import BlockParts, dense_block_forward, packed_block_forward, register_block_adapter, run_blocks

_VIT = "timm.models.vision_transformer.VisionTransformer"
_BLOCK = "timm.models.vision_transformer.Block"
_EVA = "timm.models.eva.Eva"
_EVA_BLOCK = "timm.models.eva.EvaBlock"
_EVA_POST_NORM_BLOCK = "timm.models.eva.EvaBlockPostNorm"
_EVA_ROPE = "timm.layers.pos_embed_sincos.RotaryEmbeddingCat"


def _type_name(obj):
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _is_identity(module):
    return isinstance(module, torch.nn.Identity)


def _dropout_p(module):
    return module.p if isinstance(module, torch.nn.Dropout) else 0.0


# ----------------------------------------------------------------------------- the block adapter

def _uncovered_attention_and_drop_path(block):
    """What the block forward does not compute of a covered attention type's options."""
    a = block.attn
    if not (_is_identity(a.q_norm) and _is_identity(a.k_norm)):
        return "qk_norm is not covered"
    if getattr(a, "gate", None) is not None:
        return "gated attention is not covered"
    if _dropout_p(a.attn_drop):  # the fused attention applies none: dropping it would change training silently
        return f"attention dropout ({a.attn_drop.p}) is not covered"
    for dp in (block.drop_path1, block.drop_path2):
        # stochastic depth drops whole samples; packed tokens have no sample axis
        if not _is_identity(dp) and getattr(dp, "drop_prob", 0.0):
            return "stochastic depth (drop_path) is not covered"
    return None


def _uncovered_block(block):
    """Why a timm Block is not what the block forward computes, or None when it is."""
    from timm.layers import Attention
    if _type_name(block) != _BLOCK:
        return f"block type {type(block).__name__} is not timm's plain vision_transformer.Block"
    if type(block.attn) is not Attention:
        return f"attention type {type(block.attn).__name__} is not timm's plain Attention"
    return _uncovered_attention_and_drop_path(block)


def _block_parts(block):
    """timm's Block: attn.qkv's rows are (3, num_heads, head_dim), the layout BlockParts.qkv
    needs; attn.norm (scale_norm, token-wise) and proj_drop wrap the output projection."""
    why = _uncovered_block(block)
    if why:
        raise ValueError(f"flipkern: a timm Block the block forward does not cover: {why}")
    a = block.attn
    return BlockParts(ln_1=block.norm1, qkv=a.qkv, num_heads=a.num_heads, scale=a.scale,
                      out_proj=lambda x: a.proj_drop(a.proj(a.norm(x))), ln_2=block.norm2, mlp=block.mlp,
                      ls_1=block.ls1, ls_2=block.ls2)


register_block_adapter(_BLOCK, _block_parts)


def _uncovered_eva_block(block):
    """Why an Eva block is not what the block forward computes, or None when it is."""
    from timm.models.eva import EvaAttention
    if _type_name(block) not in (_EVA_BLOCK, _EVA_POST_NORM_BLOCK):
        return f"block type {type(block).__name__} is not timm's EvaBlock or EvaBlockPostNorm"
    if type(block.attn) is not EvaAttention:  # AttentionRope: grouped-query heads, other rope layouts
        return f"attention type {type(block.attn).__name__} is not timm's EvaAttention"
    return _uncovered_attention_and_drop_path(block)


def _eva_qkv(a):
    """EvaAttention's q, k, v projections as one [..., 3*D] projection laid out (3, H, Dh).
    There is no k bias (k_bias is a zero buffer in the fused layout); separate projections
    (EVA02-CLIP) run as one GEMM over their stacked weights."""
    if a.qkv is not None:
        if a.q_bias is None:
            return a.qkv
        return lambda x: F.linear(x, a.qkv.weight, torch.cat((a.q_bias, a.k_bias, a.v_bias)))
    projections = (a.q_proj, a.k_proj, a.v_proj)

    def qkv(x):
        weight = torch.cat([p.weight for p in projections])
        if all(p.bias is None for p in projections):
            return F.linear(x, weight)
        bias = torch.cat([p.weight.new_zeros(p.out_features) if p.bias is None else p.bias for p in projections])
        return F.linear(x, weight, bias)
    return qkv


def _eva_block_parts(block):
    """timm's EvaBlock (pre-norm, optional layer scale gamma_1/gamma_2) and EvaBlockPostNorm
    (x + norm1(attn(x)): no pre-norm, the norm where the layer scale is)."""
    from timm.layers import apply_rot_embed_cat
    why = _uncovered_eva_block(block)
    if why:
        raise ValueError(f"flipkern: a timm Eva block the block forward does not cover: {why}")
    a = block.attn
    parts = dict(qkv=_eva_qkv(a), num_heads=a.num_heads, scale=a.scale,
                 out_proj=lambda x: a.proj_drop(a.proj(a.norm(x))), mlp=block.mlp,
                 rotary=lambda t, rope: apply_rot_embed_cat(t, rope, half=a.rotate_half))
    if _type_name(block) == _EVA_POST_NORM_BLOCK:
        return BlockParts(ln_1=torch.nn.Identity(), ln_2=torch.nn.Identity(), ls_1=block.norm1, ls_2=block.norm2,
                          **parts)
    g1, g2 = block.gamma_1, block.gamma_2
    return BlockParts(ln_1=block.norm1, ln_2=block.norm2, **parts,
                      **({} if g1 is None else dict(ls_1=lambda x: g1 * x)),
                      **({} if g2 is None else dict(ls_2=lambda x: g2 * x)))


register_block_adapter(_EVA_BLOCK, _eva_block_parts)
register_block_adapter(_EVA_POST_NORM_BLOCK, _eva_block_parts)


# ----------------------------------------------------------------------------- coverage

def _uncovered_patch_embed(model):
    from timm.layers import PatchEmbed
    pe = model.patch_embed
    if type(pe) is not PatchEmbed:
        return f"patch embedding {type(pe).__name__} is not timm's PatchEmbed"
    conv = pe.proj
    p = pe.patch_size
    if (not isinstance(conv, torch.nn.Conv2d) or p[0] != p[1] or tuple(conv.kernel_size) != tuple(p)
            or tuple(conv.stride) != tuple(p) or conv.padding not in ((0, 0), "valid") or conv.groups != 1
            or tuple(conv.dilation) != (1, 1)):
        return "the patch embedding is not a square stride-p convolution"
    if not _is_identity(pe.norm) or not pe.flatten or pe.dynamic_img_pad or model.dynamic_img_size:
        return "a patch-embedding norm, dynamic image size or padding is not covered"
    if pe.img_size is None:
        return "a patch embedding without a fixed image size is not covered"
    return None


def _uncovered(model):
    """Why ``model`` is not a timm VisionTransformer or Eva the patch covers, or None when it is."""
    from timm.layers import PatchDropout, PatchDropoutWithIndices
    family = _type_name(model)
    if family not in (_VIT, _EVA):
        return f"model is {type(model).__name__}, not timm's VisionTransformer or Eva"
    why = _uncovered_patch_embed(model)
    if why:
        return why
    if _dropout_p(model.pos_drop):  # drawn over all tokens in timm: a different draw on fewer tokens
        return f"position dropout ({model.pos_drop.p}) is not covered"
    pd = model.patch_drop  # no patch dropout: Identity in VisionTransformer, None in Eva
    dropout_type = PatchDropout if family == _VIT else PatchDropoutWithIndices
    if not (pd is None or _is_identity(pd)) and (type(pd) is not dropout_type
                                                 or pd.num_prefix_tokens != model.num_prefix_tokens):
        return f"patch dropout {type(pd).__name__} is not timm's {dropout_type.__name__} over the patches"
    why = _uncovered_rope(model) if family == _EVA else None
    if why:
        return why
    uncovered_block = _uncovered_block if family == _VIT else _uncovered_eva_block
    for block in model.blocks:
        why = uncovered_block(block)
        if why:
            return why
    return None


def _uncovered_rope(model):
    """Why an Eva's rotary position embedding is not covered, or None (also when it has none)."""
    rope = model.rope
    if rope is None:
        return None
    if model.rope_mixed or _type_name(rope) != _EVA_ROPE:
        return f"rotary embedding {type(rope).__name__} is not covered (only RotaryEmbeddingCat, rope_type 'cat')"
    if rope.pos_embed is None:
        return "a rotary embedding without a fixed grid (dynamic size) is not covered"
    if rope.aug_active:  # train-time coordinate shift/jitter/rescale: a random draw per forward
        return "rotary coordinate augmentation (rope_shift/jitter/rescale_coords) is not covered"
    return None


# ----------------------------------------------------------------------------- the tower

def keep_indices(model, images):
    """timm PatchDropout's (or Eva's PatchDropoutWithIndices') own draw for ``images``
    (same generator calls, same order), or None when it is off (eval, prob 0, none)."""
    from timm.layers import PatchDropout, PatchDropoutWithIndices
    pd = model.patch_drop
    if type(pd) not in (PatchDropout, PatchDropoutWithIndices) or not pd.training or pd.prob == 0.0:
        return None
    N = model.patch_embed.num_patches
    keep = max(1, int(N * (1.0 - pd.prob)))
    ids = torch.argsort(torch.randn(images.shape[0], N, device=images.device), dim=-1)[:, :keep]
    return ids.sort(dim=-1)[0] if pd.ordered else ids


def _embed(model, images, ids_keep):
    """Prefix tokens + the kept patches' embeddings, position added, norm_pre: [B, P + K, D]."""
    pe = model.patch_embed
    if images.dim() != 4 or tuple(images.shape[-2:]) != tuple(pe.img_size):
        raise ValueError(f"flipkern.apply_to_timm: images must be [B, C, {pe.img_size[0]}, {pe.img_size[1]}], "
                         f"got shape {tuple(images.shape)}")
    gh, gw = pe.grid_size
    p = pe.patch_size[0]
    # a stride-p conv without padding never reads the rows and columns past the grid
    if tuple(images.shape[-2:]) != (gh * p, gw * p):
        images = images[..., :gh * p, :gw * p].contiguous()
    P = model.num_prefix_tokens
    pos = None if model.pos_embed is None else model.pos_embed[0]
    shared_pos = pos is not None and not model.no_embed_class  # pos_embed has rows for the prefix tokens
    tokens = fastpath.patch_embed(images, ids_keep, pe.proj.weight, pe.proj.bias, pos[P:] if shared_pos else pos)
    prefix = [t for t in (model.cls_token, model.reg_token) if t is not None]
    if prefix:
        prefix = torch.cat(prefix, dim=1)
        if shared_pos:
            prefix = prefix + pos[:P]
        tokens = torch.cat([prefix.to(tokens.dtype).expand(tokens.shape[0], -1, -1), tokens], dim=1)
    return model.norm_pre(tokens)


def _rope_tokens(model, B, ids_keep):
    """Each token's rotary sin|cos [B, P + K, 2*head_dim]: timm's embedding rows of the kept
    patches after P prefix rows of sin 0, cos 1, the identity rotation (timm leaves the prefix
    tokens unrotated; x * 1 + rot(x) * 0 is x exactly). None when the model has no rope."""
    rope = getattr(model, "rope", None)
    if rope is None:
        return None
    emb = rope.get_embed()  # [N, 2*head_dim], the very tensor timm's forward uses
    rows = emb.expand(B, -1, -1) if ids_keep is None else emb[ids_keep]
    P = model.num_prefix_tokens
    if not P:
        return rows
    sin, cos = emb.new_zeros(P, emb.shape[-1] // 2), emb.new_ones(P, emb.shape[-1] // 2)
    return torch.cat([torch.cat([sin, cos], -1).expand(B, -1, -1), rows], dim=1)


def _forward_features(model, x, attn_mask=None, is_causal=False):
    if attn_mask is not None or is_causal:  # an explicit mask: timm's own path
        return type(model).forward_features(model, x, attn_mask=attn_mask, is_causal=is_causal)
    return _dense_features(model, x, keep_indices(model, x))


def _dense_features(model, images, ids_keep):
    ids_keep = None if ids_keep is None else ids_keep.to(images.device)
    x = _embed(model, images, ids_keep)
    fastpath._composed["timm.visual"] = "gather_patches + GEMM, sdpa over the kept tokens"
    rope = _rope_tokens(model, x.shape[0], ids_keep)
    x = run_blocks(model.blocks, dense_block_forward, x, False, rope, checkpoint=model.grad_checkpointing)
    return model.norm(x)


def forward_with_keep(model, images, ids_keep, keep_lengths=None):
    """``model(images)`` of a timm VisionTransformer or Eva (patched or not) with the kept patches
    ids_keep int64 [B, K] in place of PatchDropout's draw; sample b keeps
    ids_keep[b, :keep_lengths[b]] when keep_lengths (int [B], each in [1, K]) is given.

    With keep_lengths the blocks run varlen attention over the packed tokens and the
    pooling sees each sample's own tokens only: the result equals the model run on
    each sample alone with its own kept patches.
    """
    why = _uncovered(model)
    if why:
        raise ValueError(f"flipkern.forward_with_keep: model is not covered: {why}")
    if ids_keep is None or ids_keep.dim() != 2 or ids_keep.shape[0] != images.shape[0]:
        raise ValueError(f"flipkern.forward_with_keep: ids_keep must be [B, K] with B = {images.shape[0]}, "
                         f"got {None if ids_keep is None else tuple(ids_keep.shape)}")
    if keep_lengths is None:
        return model.forward_head(_dense_features(model, images, ids_keep))
    B, K = ids_keep.shape
    if keep_lengths.dim() != 1 or keep_lengths.shape[0] != B:
        raise ValueError(f"flipkern.forward_with_keep: keep_lengths must be [B] = [{B}], "
                         f"got shape {tuple(keep_lengths.shape)}")
    if B and not 1 <= int(keep_lengths.min()) <= int(keep_lengths.max()) <= K:
        raise ValueError(f"flipkern.forward_with_keep: keep_lengths must lie in [1, K={K}]")
    ids_keep = ids_keep.to(images.device)
    x = _embed(model, images, ids_keep)
    P = model.num_prefix_tokens
    lengths = keep_lengths.to(device=x.device, dtype=torch.int64) + P
    packed, cu = pack(x, lengths)
    rope = _rope_tokens(model, B, ids_keep)
    rope = None if rope is None else pack(rope, lengths)[0]
    fastpath._composed["timm.visual"] = "gather_patches + GEMM, varlen attention (K per sample)"
    max_len = int(lengths.max()) if B else 0
    packed = run_blocks(model.blocks, packed_block_forward, packed, cu, max_len, False, rope,
                        checkpoint=model.grad_checkpointing)
    return _packed_head(model, model.norm(packed), cu, lengths, max_len)


def _pool_includes_prefix(model):
    """VisionTransformer: its pool_include_prefix. Eva has none: its attention pool sees every
    token, its 'avg' the patches only."""
    if hasattr(model, "pool_include_prefix"):
        return model.pool_include_prefix
    return model.attn_pool is not None


def _packed_head(model, packed, cu, lengths, max_len):
    """timm's forward_head on packed tokens: each sample pools over its own tokens only."""
    from timm.layers import AttentionPoolLatent
    P = model.num_prefix_tokens
    x = unpack(packed, cu, max_len)  # [B, max_len, D], zeros after each sample's tokens
    valid = torch.arange(max_len, device=x.device) < lengths[:, None]
    if not _pool_includes_prefix(model):
        x, valid = x[:, P:], valid[:, P:]
    if model.attn_pool is not None:
        pool = model.attn_pool
        if type(pool) is not AttentionPoolLatent or pool.pos_embed is not None:
            raise ValueError(f"flipkern.forward_with_keep: keep_lengths with the {type(pool).__name__} "
                             "pool is not covered")
        # an additive mask works on both of its paths (fused SDPA and the explicit softmax)
        mask = torch.zeros(valid.shape, dtype=x.dtype, device=x.device).masked_fill(~valid, float("-inf"))
        pooled = pool(x, attn_mask=mask[:, None, None, :])
    elif model.global_pool == "token":
        pooled = packed[cu[:-1].long()]
    elif model.global_pool == "avg":
        pooled = (x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True).to(x.dtype)
    else:
        raise ValueError(f"flipkern.forward_with_keep: keep_lengths with global_pool={model.global_pool!r} "
                         "is not covered ('token', 'avg', 'map' are)")
    return model.head(model.head_drop(model.fc_norm(pooled)))


# ----------------------------------------------------------------------------- entry point

def apply_to_timm(model):
    """Patch a timm VisionTransformer or Eva in place to run on flipkern's kernels.
    Returns "flipkern", or why the model was left as it was."""
    try:
        import timm  # noqa: F401
    except ImportError as e:
        raise ImportError(f"flipkern.apply_to_timm: timm is not importable ({e}); pip install timm") from None
    why = _uncovered(model)
    if why:
        return why
    model.forward_features = types.MethodType(_forward_features, model)
    return "flipkern"


__all__ = ["apply_to_timm", "forward_with_keep", "keep_indices"]
