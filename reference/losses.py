"""Contrastive losses over the global batch: CLIP (softmax) and SigLIP (sigmoid).

Features are what each rank holds locally, already normalized; logit_scale is
the multiplier (already exp'ed), logit_bias SigLIP's additive bias. With a
process group of W ranks (open_clip's local_loss=True, gather_with_grad=True):
features are all-gathered with gradient, each rank computes the loss rows of
its own b samples against all W*b, and the gradients that DDP then averages
equal the gradients of the single-process loss on the concatenated batch.
The full [b, W*b] matrix is materialized here: this is the oracle.
"""
import torch
import torch.distributed as dist
import torch.nn.functional as F


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0; backward: the sum over ranks of the gradient of this
    rank's slice (what the gathered copies on every rank contributed)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        b = grad.shape[0] // world
        return grad[rank * b:(rank + 1) * b], None


def gather_with_grad(x, group=None):
    """(all ranks' x concatenated [W*b, ...], offset of this rank's rows). No-op without a group."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return x, 0
    if dist.get_world_size(group) == 1:
        return x, 0
    return _GatherWithGrad.apply(x, group), dist.get_rank(group) * x.shape[0]


def clip_loss(image_features, text_features, logit_scale, group=None):
    """Mean of the image->text and text->image cross entropies, positives on the diagonal."""
    all_img, offset = gather_with_grad(image_features, group)
    all_txt, _ = gather_with_grad(text_features, group)
    logits_per_image = logit_scale * image_features @ all_txt.t()
    logits_per_text = logit_scale * text_features @ all_img.t()
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(image_features, text_features, logit_scale, logit_bias, group=None):
    """-sum log sigmoid(z_ij * (scale * <I_i, T_j> + bias)) / b, z = +1 on positives, -1 else;
    the rows of this rank's images against every rank's texts."""
    all_txt, offset = gather_with_grad(text_features, group)
    logits = logit_scale * image_features @ all_txt.t() + logit_bias
    b = image_features.shape[0]
    labels = -torch.ones_like(logits)
    labels[torch.arange(b, device=logits.device), torch.arange(b, device=logits.device) + offset] = 1
    return -F.logsigmoid(labels * logits).sum() / b
