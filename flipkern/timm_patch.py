"""flipkern's fast path in a timm VisionTransformer: ``apply_to_timm(model)``.

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
- the blocks are flipkern.blocks' one block forward through the adapter below:
  fused attention over the kept tokens.

``forward_with_keep(model, images, ids_keep, keep_lengths)`` is the same tower
with explicit kept patches and, optionally, a keep count per sample: then the
blocks run varlen attention over the packed tokens and pooling ('token', 'avg',
'map') sees only each sample's own tokens.

A model the patch does not cover is left unpatched and ``apply_to_timm`` returns
why; nothing ever fails for being unsupported.
"""
import types

import torch

from . import fastpath
from .attention import pack, unpack
from .blocks import BlockParts, dense_block_forward, packed_block_forward, register_block_adapter, run_blocks

_VIT = "timm.models.vision_transformer.VisionTransformer"
_BLOCK = "timm.models.vision_transformer.Block"


def _type_name(obj):
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _is_identity(module):
    return isinstance(module, torch.nn.Identity)


def _dropout_p(module):
    return module.p if isinstance(module, torch.nn.Dropout) else 0.0


# ----------------------------------------------------------------------------- the block adapter

def _uncovered_block(block):
    """Why a timm Block is not what the block forward computes, or None when it is."""
    from timm.layers import Attention
    if _type_name(block) != _BLOCK:
        return f"block type {type(block).__name__} is not timm's plain vision_transformer.Block"
    a = block.attn
    if type(a) is not Attention:
        return f"attention type {type(a).__name__} is not timm's plain Attention"
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
    """Why ``model`` is not a timm VisionTransformer the patch covers, or None when it is."""
    from timm.layers import PatchDropout
    if _type_name(model) != _VIT:
        return f"model is {type(model).__name__}, not timm's VisionTransformer"
    why = _uncovered_patch_embed(model)
    if why:
        return why
    if _dropout_p(model.pos_drop):  # drawn over all tokens in timm: a different draw on fewer tokens
        return f"position dropout ({model.pos_drop.p}) is not covered"
    pd = model.patch_drop
    if not _is_identity(pd) and (type(pd) is not PatchDropout or pd.num_prefix_tokens != model.num_prefix_tokens):
        return f"patch dropout {type(pd).__name__} is not timm's PatchDropout over the patches"
    for block in model.blocks:
        why = _uncovered_block(block)
        if why:
            return why
    return None


# ----------------------------------------------------------------------------- the tower

def keep_indices(model, images):
    """timm PatchDropout's own draw for ``images`` (same generator calls, same order),
    or None when it is off (eval, prob 0, no PatchDropout)."""
    from timm.layers import PatchDropout
    pd = model.patch_drop
    if type(pd) is not PatchDropout or not pd.training or pd.prob == 0.0:
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


def _forward_features(model, x, attn_mask=None, is_causal=False):
    if attn_mask is not None or is_causal:  # an explicit mask: timm's own path
        return type(model).forward_features(model, x, attn_mask=attn_mask, is_causal=is_causal)
    return _dense_features(model, x, keep_indices(model, x))


def _dense_features(model, images, ids_keep):
    x = _embed(model, images, None if ids_keep is None else ids_keep.to(images.device))
    fastpath._composed["timm.visual"] = "gather_patches + GEMM, sdpa over the kept tokens"
    x = run_blocks(model.blocks, dense_block_forward, x, checkpoint=model.grad_checkpointing)
    return model.norm(x)


def forward_with_keep(model, images, ids_keep, keep_lengths=None):
    """``model(images)`` of a timm VisionTransformer (patched or not) with the kept patches
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
    x = _embed(model, images, ids_keep.to(images.device))
    P = model.num_prefix_tokens
    lengths = keep_lengths.to(device=x.device, dtype=torch.int64) + P
    packed, cu = pack(x, lengths)
    fastpath._composed["timm.visual"] = "gather_patches + GEMM, varlen attention (K per sample)"
    max_len = int(lengths.max()) if B else 0
    packed = run_blocks(model.blocks, packed_block_forward, packed, cu, max_len, False,
                        checkpoint=model.grad_checkpointing)
    return _packed_head(model, model.norm(packed), cu, lengths, max_len)


def _packed_head(model, packed, cu, lengths, max_len):
    """timm's forward_head on packed tokens: each sample pools over its own tokens only."""
    from timm.layers import AttentionPoolLatent
    P = model.num_prefix_tokens
    x = unpack(packed, cu, max_len)  # [B, max_len, D], zeros after each sample's tokens
    valid = torch.arange(max_len, device=x.device) < lengths[:, None]
    if not model.pool_include_prefix:
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
    """Patch a timm VisionTransformer in place to run on flipkern's kernels.
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
