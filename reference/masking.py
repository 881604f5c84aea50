"""Token dropping (FLIP random masking, A-CLIP style top-k masking, MAE restore).

Shapes: x [B, N, D] tokens, ids_keep int64 [B, K] kept positions per sample,
images [B, C, H, W], patches [B, N, C*p*p] in the (C, p, p) order that a
Conv2d patch embedding's weight flattens to; patch n sits at grid row
n // (W/p), column n % (W/p).
"""
import torch


def num_keep_from(num_tokens, keep_ratio=None, num_keep=None):
    """K from exactly one of keep_ratio (K = int(N * keep_ratio), at least 1) or num_keep."""
    if (keep_ratio is None) == (num_keep is None):
        raise ValueError("give exactly one of keep_ratio and num_keep")
    if num_keep is None:
        if not 0.0 < keep_ratio <= 1.0:
            raise ValueError(f"keep_ratio must be in (0, 1], got {keep_ratio}")
        num_keep = max(1, int(num_tokens * keep_ratio))
    if not 0 <= num_keep <= num_tokens:
        raise ValueError(f"num_keep must be in [0, num_tokens={num_tokens}], got {num_keep}")
    return int(num_keep)


def keep_smallest(noise, num_keep, sorted=True):
    """int64 [B, K]: per row of ``noise`` [B, N], the positions of its K smallest values.

    Ties go to the lower position (a stable sort), so the result is a function
    of the noise alone. ``sorted`` returns positions ascending; otherwise they
    come in order of increasing noise.
    """
    ids = noise.argsort(dim=1, stable=True)[:, :num_keep]
    return ids.sort(dim=1).values if sorted else ids


def random_keep_indices(batch, num_tokens, keep_ratio=None, num_keep=None, *, generator=None,
                        device=None, sorted=True):
    """int64 [B, K]: per sample, a uniformly random K-subset of range(num_tokens).

    The MAE recipe: rank i.i.d. uniform float32 noise and keep the K smallest,
    which makes every K-subset equally likely. ``sorted`` returns positions
    ascending. The noise is drawn on ``device`` (default: the generator's
    device, else the CPU) from ``generator``.
    """
    K = num_keep_from(num_tokens, keep_ratio, num_keep)
    return keep_smallest(uniform_noise(batch, num_tokens, generator, device), K, sorted)


def uniform_noise(batch, num_tokens, generator=None, device=None):
    """float32 [B, N] i.i.d. uniform in [0, 1) from ``generator`` (default: the global
    RNG) on ``device`` (default: the generator's device, else the CPU)."""
    if device is None:
        device = generator.device if generator is not None else "cpu"
    if generator is None:  # torch.rand's generator overload takes no symbolic sizes (torch.compile)
        return torch.rand(batch, num_tokens, device=device, dtype=torch.float32)
    return torch.rand(batch, num_tokens, generator=generator, device=device, dtype=torch.float32)


def topk_keep_indices(scores, num_keep, sorted=True):
    """int64 [B, K]: the positions of the K largest scores [B, N] of each sample.

    Which of several equal scores is kept is unspecified (as for torch.topk).
    """
    ids = scores.topk(num_keep, dim=1).indices
    return ids.sort(dim=1).values if sorted else ids


def drop_tokens(x, ids_keep, pos_embed=None):
    """x [B, N, D] (+ pos_embed [N, D]) -> the kept tokens [B, K, D]."""
    if pos_embed is not None:
        x = x + pos_embed
    index = ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1])
    return torch.gather(x, 1, index)


def patchify(images, patch_size):
    """images [B, C, H, W] -> every patch [B, N, C*p*p], (C, p, p) order."""
    B, C, H, W = images.shape
    p = patch_size
    if H % p or W % p:
        raise ValueError(f"patch_size {p} does not divide the image size {H}x{W}")
    x = images.reshape(B, C, H // p, p, W // p, p)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)


def gather_patches(images, ids_keep, patch_size):
    """images [B, C, H, W] -> the kept patches [B, K, C*p*p]."""
    return drop_tokens(patchify(images, patch_size), ids_keep)


def restore_tokens(x_vis, ids_keep, num_tokens, fill):
    """x_vis [B, K, D] -> [B, num_tokens, D]: kept tokens back at their positions,
    ``fill`` (a [D] tensor such as a mask token, or a number) everywhere else.

    ids_keep must not repeat within a sample (a position has one owner).
    """
    B, K, D = x_vis.shape
    if not isinstance(fill, torch.Tensor):
        fill = torch.tensor(fill, dtype=x_vis.dtype, device=x_vis.device)
    base = fill.to(x_vis.dtype).expand(B, num_tokens, D)
    index = ids_keep.unsqueeze(-1).expand(-1, -1, D)
    return base.scatter(1, index, x_vis)


def removed_indices(ids_keep, num_tokens):
    """int64 [B, N - K]: each sample's positions not in ids_keep, ascending (the patches
    an MAE decoder reconstructs). ids_keep must not repeat a position within a sample."""
    B, K = ids_keep.shape
    removed = torch.ones(B, num_tokens, dtype=torch.bool, device=ids_keep.device)
    removed.scatter_(1, ids_keep, False)
    return removed.nonzero()[:, 1].view(B, num_tokens - K)
