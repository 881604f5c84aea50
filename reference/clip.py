"""CLIP: a vision tower with FLIP token dropping, a text tower, a learnable logit scale.

``CLIP(cfg)(images, tokens, ids_keep=None)`` returns a dict of normalized
features and the logit scale (and SigLIP's bias); ``model.loss(out, group)``
is the contrastive loss of cfg.loss over the global batch.
"""
import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from . import losses
from .text import TextConfig, TextTransformer
from .vit import VisionConfig, VisionTransformer, init_weights

MAX_LOGIT_SCALE = 100.0


@dataclasses.dataclass
class CLIPConfig:
    embed_dim: int = 512
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    loss: str = "clip"  # or "siglip"
    init_logit_scale: float = math.log(1 / 0.07)  # CLIP; SigLIP uses log(10)
    init_logit_bias: float = -10.0  # SigLIP only

    def __post_init__(self):
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"loss must be 'clip' or 'siglip', got {self.loss!r}")


class CLIP(nn.Module):
    def __init__(self, cfg: CLIPConfig):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTransformer(cfg.vision, cfg.embed_dim)
        self.text = TextTransformer(cfg.text, cfg.embed_dim)
        init_weights(self)
        nn.init.normal_(self.text.token_embedding.weight, std=0.02)
        self.logit_scale = nn.Parameter(torch.tensor(float(cfg.init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(cfg.init_logit_bias))) if cfg.loss == "siglip" else None

    def set_grad_checkpointing(self, enable=True):
        """Per-block activation checkpointing in both towers (open_clip's method name); the
        fast path (flipkern.fastpath) follows the same flags."""
        self.visual.grad_checkpointing = self.text.grad_checkpointing = enable

    def encode_image(self, images, ids_keep=None, normalize=False):
        f = self.visual(images, ids_keep)
        return F.normalize(f, dim=-1) if normalize else f

    def encode_text(self, tokens, normalize=False):
        f = self.text(tokens)
        return F.normalize(f, dim=-1) if normalize else f

    def scale_and_bias(self):
        """exp(logit_scale) clamped at 100 (CLIP), and the bias or None."""
        return self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE), self.logit_bias

    def head(self, image_features, text_features):
        """The output dict from unnormalized tower outputs."""
        scale, bias = self.scale_and_bias()
        out = dict(image_features=F.normalize(image_features, dim=-1),
                   text_features=F.normalize(text_features, dim=-1), logit_scale=scale)
        if bias is not None:
            out["logit_bias"] = bias
        return out

    def forward(self, images, tokens, ids_keep=None):
        return self.head(self.visual(images, ids_keep), self.text(tokens))

    def loss(self, out, group=None):
        img, txt, scale, bias = loss_inputs(out)
        if self.cfg.loss == "siglip":
            return losses.siglip_loss(img, txt, scale, bias, group=group)
        return losses.clip_loss(img, txt, scale, group=group)


def loss_inputs(out):
    """(image_features, text_features, logit_scale, logit_bias or None) of a forward's dict in
    at least float32: under autocast the loss runs in float32 (as open_clip's does), while a
    float64 model keeps float64."""
    def up(t):
        return None if t is None else t.to(torch.promote_types(t.dtype, torch.float32))
    return (up(out["image_features"]), up(out["text_features"]), up(out["logit_scale"]),
            up(out.get("logit_bias")))


def _preset(embed_dim, image_size, patch_size, vw, vd, vh, tw, td, th, ctx=77, vocab=49408, eot=49407):
    return CLIPConfig(
        embed_dim=embed_dim,
        vision=VisionConfig(image_size=image_size, patch_size=patch_size, width=vw, depth=vd, heads=vh),
        text=TextConfig(context_length=ctx, vocab_size=vocab, width=tw, depth=td, heads=th, eot_id=eot))


# tiny: trains on a 2-core CPU in minutes (the pretraining CLI's default, with its
# byte tokenizer's vocabulary). Its 32 px images are cut into 16 patches of 8 px:
# with 64 patches of 4 px the mean-pooled tiny ViT stayed near chance at telling
# the synthetic shapes apart even when trained supervised (35% on 5 shapes after
# 400 steps, vs 94% with 8 px patches), as each token held too little of a shape.
# The others are the usual GPU-sized towers.
PRESETS = {
    "tiny": _preset(128, 32, 8, 128, 4, 4, 128, 3, 4, ctx=48, vocab=259, eot=258),
    "ViT-Ti/16": _preset(256, 224, 16, 192, 12, 3, 256, 6, 4),
    "ViT-S/16": _preset(384, 224, 16, 384, 12, 6, 384, 12, 6),
    "ViT-B/32": _preset(512, 224, 32, 768, 12, 12, 512, 12, 8),
    "ViT-B/16": _preset(512, 224, 16, 768, 12, 12, 512, 12, 8),
    "ViT-L/16": _preset(768, 224, 16, 1024, 24, 16, 768, 12, 12),
}
