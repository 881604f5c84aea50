"""Token dropping ops: the public functions, their torch.library registration
(fake kernels, autograd) and the dispatch to a backend.

Backends: ``cpu``/``cuda`` are the C++ ops ``flipkern::<name>`` of the extension
(csrc/masking_*.{cpp,cu}); ``triton`` are the Python custom ops
``flipkern::<name>_triton`` (triton_kernels/masking.py); ``reference`` is
flipkern.reference.masking.

Index choice (random_keep_indices, topk_keep_indices) is a few whole-tensor torch
ops on any device, so it has no kernels of its own: the non-reference backends
share one implementation, which traces under torch.compile like any torch code.

Value checks (index range, repeated positions) read the indices, so they run
inside the ops: in C++ for cpu/cuda, in the custom op for triton, and in eager
mode in front of the reference (under torch.compile the reference relies on
torch's own index checks); the Python ones are flipkern._checks', the same
messages as the C++ ones, and run once per index tensor and version.
"""
import numbers

import torch

from . import _checks, _extension, backends
from .reference import masking as ref

ALL_BACKENDS = ("reference", "cpu", "cuda", "triton")


def _reference_value_checks(op, ids_keep, num_tokens, *, unique=False):
    if torch.compiler.is_compiling():
        return
    _checks.index_range(op, ids_keep, num_tokens)
    if unique:
        _checks.keep_inverse(op, ids_keep, num_tokens)


def _int_arg(op, name, value, low):
    # SymInt: a size traced by torch.compile with dynamic shapes (x.shape[0] of a varying batch)
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, torch.SymInt)):
        _checks.fail(op, f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        _checks.fail(op, f"{name} must be >= {low}, got {value}")
    return value


# ----------------------------------------------------------------------------- index choice

def random_keep_indices(batch, num_tokens, keep_ratio=None, num_keep=None, *, generator=None,
                        device=None, sorted=True):
    """int64 [B, K]: per sample, a uniformly random K-subset of range(num_tokens).

    K comes from exactly one of keep_ratio (K = max(1, int(N * keep_ratio))) or
    num_keep. Draws the same float32 noise as flipkern.reference
    (ref.uniform_noise: torch.rand with ``generator``) and keeps the K smallest, ties to the lower position, so the
    result equals the reference's bit for bit given the same generator state.
    ``sorted``: positions ascending (default), else in order of increasing noise.
    """
    op = "random_keep_indices"
    batch = _int_arg(op, "batch", batch, 0)
    num_tokens = _int_arg(op, "num_tokens", num_tokens, 1)
    try:
        K = ref.num_keep_from(num_tokens, keep_ratio, num_keep)
    except ValueError as e:
        _checks.fail(op, str(e))
    if device is None:
        device = generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        _checks.fail(op, f"generator is on {generator.device} but device is {device}")
    backend = backends.select(op, device, ALL_BACKENDS)
    if backend == "reference":
        return ref.random_keep_indices(batch, num_tokens, num_keep=K, generator=generator,
                                       device=device, sorted=sorted)
    return _keep_smallest(ref.uniform_noise(batch, num_tokens, generator, device), K, sorted)


def _keep_smallest(noise, K, sorted):
    """ref.keep_smallest (a stable argsort of the noise) with one partial top-k instead.

    torch.rand's float32 values are >= +0.0, and for those the int32 bit pattern
    orders like the value, so key = bits * N + position is unique per row and
    orders like (noise, position): top-k on it breaks ties exactly as the stable
    sort does, and costs about half of the full sort.
    """
    N = noise.shape[1]
    key = noise.view(torch.int32).to(torch.int64) * N + torch.arange(N, device=noise.device)
    ids = key.topk(K, dim=1, largest=False, sorted=not sorted).indices
    return ids.sort(dim=1).values if sorted else ids


def topk_keep_indices(scores, num_keep, *, sorted=True):
    """int64 [B, K]: the positions of the K largest scores [B, N] of each sample
    (attentive, A-CLIP style masking). ``sorted``: positions ascending (default),
    else in order of decreasing score. Which of several equal scores is kept is
    unspecified, as for torch.topk.
    """
    op = "topk_keep_indices"
    _checks.floating(op, "scores", scores, dims=2)
    K = _int_arg(op, "num_keep", num_keep, 0)
    if K > scores.shape[1]:
        _checks.fail(op, f"num_keep must be <= N = {scores.shape[1]}, got {K}")
    backend = backends.select(op, scores.device, ALL_BACKENDS)
    if backend == "reference":
        return ref.topk_keep_indices(scores, K, sorted=sorted)
    # An unsorted top-k, then a sort of K positions: cheaper than ordering by score.
    ids = scores.topk(K, dim=1, sorted=not sorted).indices
    return ids.sort(dim=1).values if sorted else ids


# ----------------------------------------------------------------------------- drop_tokens

def drop_tokens(x, ids_keep, pos_embed=None):
    """x [B, N, D] -> x[b, ids_keep[b]] (+ pos_embed[ids_keep[b]]) as [B, K, D].

    The position add happens in the same pass as the gather, so no [B, N, D]
    intermediate is written. Repeated indices are allowed (a gather). Backward:
    dx is zero where a token was dropped (repeats accumulate); d(pos_embed) is
    dx summed over the batch, a plain reduction (no atomics).
    """
    op = "drop_tokens"
    _checks.floating(op, "x", x, dims=3)
    _checks.keep_indices(op, ids_keep, x.shape[0], x.device)
    if pos_embed is not None:
        _checks.floating(op, "pos_embed", pos_embed, dims=2, device=x.device)
        if tuple(pos_embed.shape) != (x.shape[1], x.shape[2]):
            _checks.fail(op, f"pos_embed must be [N, D] = [{x.shape[1]}, {x.shape[2]}], "
                             f"got {list(pos_embed.shape)}")
        if pos_embed.dtype != x.dtype:
            _checks.fail(op, f"pos_embed dtype {pos_embed.dtype} differs from x dtype {x.dtype}")
    backend = backends.select(op, x.device, ALL_BACKENDS)
    if backend == "reference":
        _reference_value_checks(op, ids_keep, x.shape[1])
        return ref.drop_tokens(x, ids_keep, pos_embed)
    if backend == "triton":
        return drop_tokens_triton(x, ids_keep, pos_embed)
    return torch.ops.flipkern.drop_tokens(x, ids_keep, pos_embed)


def _drop_tokens_fake(x, ids_keep, pos_embed):
    return x.new_empty((x.shape[0], ids_keep.shape[1], x.shape[2]))


def _drop_tokens_backward_fake(grad_out, ids_keep, num_tokens):
    return grad_out.new_empty((grad_out.shape[0], num_tokens, grad_out.shape[2]))


def _drop_tokens_setup(ctx, inputs, output):
    x, ids_keep, pos_embed = inputs
    ctx.save_for_backward(ids_keep)
    ctx.num_tokens = x.shape[1]


def _drop_tokens_autograd(backward_op):
    def backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        dx = backward_op(grad, ids_keep, ctx.num_tokens)
        # d(pos_embed) = sum over the batch of dx: a plain reduction, no atomics.
        dpos = dx.sum(0) if ctx.needs_input_grad[2] else None
        return (dx if ctx.needs_input_grad[0] else None), None, dpos
    return backward


@torch.library.custom_op("flipkern::drop_tokens_triton", mutates_args=())
def drop_tokens_triton(x: torch.Tensor, ids_keep: torch.Tensor,
                       pos_embed: torch.Tensor | None) -> torch.Tensor:
    from .triton_kernels import masking as tk
    _checks.index_range("drop_tokens", ids_keep, x.shape[1])
    return tk.drop_tokens(x, ids_keep, pos_embed)


@torch.library.custom_op("flipkern::drop_tokens_backward_triton", mutates_args=())
def drop_tokens_backward_triton(grad_out: torch.Tensor, ids_keep: torch.Tensor,
                                num_tokens: int) -> torch.Tensor:
    from .triton_kernels import masking as tk
    _checks.index_range("drop_tokens_backward", ids_keep, num_tokens)
    return tk.drop_tokens_backward(grad_out, ids_keep, num_tokens)


drop_tokens_triton.register_fake(_drop_tokens_fake)
drop_tokens_backward_triton.register_fake(_drop_tokens_backward_fake)
torch.library.register_autograd("flipkern::drop_tokens_triton",
                                _drop_tokens_autograd(drop_tokens_backward_triton),
                                setup_context=_drop_tokens_setup)


# ----------------------------------------------------------------------------- gather_patches

def gather_patches(images, ids_keep, patch_size):
    """images [B, C, H, W] -> the kept patches [B, K, C*p*p], reading only those.

    Patch n sits at grid row n // (W/p), column n % (W/p); each patch is
    flattened in (C, p, p) order, the order of a Conv2d patch embedding's
    weight, so ``F.linear(gather_patches(x, ids, p), conv.weight.flatten(1),
    conv.bias)`` equals ``conv(x).flatten(2).transpose(1, 2)`` then dropping.
    Repeated indices are allowed; backward scatters into zeros and repeats
    accumulate (each sample's patches are summed by one thread, in order: no
    atomics).
    """
    op = "gather_patches"
    _checks.floating(op, "images", images, dims=4)
    p = _int_arg(op, "patch_size", patch_size, 1)
    H, W = images.shape[2], images.shape[3]
    if H % p or W % p:
        _checks.fail(op, f"patch_size {p} does not divide the image size {H}x{W}")
    _checks.keep_indices(op, ids_keep, images.shape[0], images.device)
    backend = backends.select(op, images.device, ALL_BACKENDS)
    if backend == "reference":
        _reference_value_checks(op, ids_keep, (H // p) * (W // p))
        return ref.gather_patches(images, ids_keep, p)
    if backend == "triton":
        return gather_patches_triton(images, ids_keep, p)
    return torch.ops.flipkern.gather_patches(images, ids_keep, p)


def _gather_patches_fake(images, ids_keep, patch_size):
    B, C = images.shape[0], images.shape[1]
    return images.new_empty((B, ids_keep.shape[1], C * patch_size * patch_size))


def _gather_patches_backward_fake(grad_out, ids_keep, image_shape, patch_size):
    return grad_out.new_empty(image_shape)


def _gather_patches_setup(ctx, inputs, output):
    images, ids_keep, patch_size = inputs
    ctx.save_for_backward(ids_keep)
    ctx.image_shape = list(images.shape)
    ctx.patch_size = patch_size


def _gather_patches_autograd(backward_op):
    def backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        return backward_op(grad, ids_keep, ctx.image_shape, ctx.patch_size), None, None
    return backward


def _patch_count(image_shape, patch_size):
    return (image_shape[-2] // patch_size) * (image_shape[-1] // patch_size)


@torch.library.custom_op("flipkern::gather_patches_triton", mutates_args=())
def gather_patches_triton(images: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    from .triton_kernels import masking as tk
    _checks.index_range("gather_patches", ids_keep, _patch_count(images.shape, patch_size))
    return tk.gather_patches(images, ids_keep, patch_size)


@torch.library.custom_op("flipkern::gather_patches_backward_triton", mutates_args=())
def gather_patches_backward_triton(grad_out: torch.Tensor, ids_keep: torch.Tensor,
                                   image_shape: list[int], patch_size: int) -> torch.Tensor:
    from .triton_kernels import masking as tk
    _checks.index_range("gather_patches_backward", ids_keep, _patch_count(image_shape, patch_size))
    return tk.gather_patches_backward(grad_out, ids_keep, image_shape, patch_size)


gather_patches_triton.register_fake(_gather_patches_fake)
gather_patches_backward_triton.register_fake(_gather_patches_backward_fake)
torch.library.register_autograd("flipkern::gather_patches_triton",
                                _gather_patches_autograd(gather_patches_backward_triton),
                                setup_context=_gather_patches_setup)


# ----------------------------------------------------------------------------- restore_tokens

def restore_tokens(x_vis, ids_keep, num_tokens, fill):
    """x_vis [B, K, D] -> [B, num_tokens, D]: the kept tokens back at positions
    ids_keep, ``fill`` everywhere else (MAE-style decoders).

    fill: a number, a 0-d tensor or a [D] tensor (a mask token) of x_vis's dtype.
    ids_keep must not repeat a position within a sample (it would have two
    owners): that raises. Backward: d(x_vis) gathers the output gradient at the
    kept positions (the drop_tokens kernel); d(fill) sums it over the others.
    """
    op = "restore_tokens"
    _checks.floating(op, "x_vis", x_vis, dims=3)
    B, K, D = x_vis.shape
    _checks.keep_indices(op, ids_keep, B, x_vis.device)
    if ids_keep.shape[1] != K:
        _checks.fail(op, f"ids_keep has K = {ids_keep.shape[1]} but x_vis has {K} rows")
    num_tokens = _int_arg(op, "num_tokens", num_tokens, K)
    if isinstance(fill, torch.Tensor):
        _checks.floating(op, "fill", fill, device=x_vis.device)
        if fill.dtype != x_vis.dtype:
            _checks.fail(op, f"fill dtype {fill.dtype} differs from x_vis dtype {x_vis.dtype}")
        if fill.dim() == 0:
            fill = fill.expand(D)
        elif tuple(fill.shape) != (D,):
            _checks.fail(op, f"fill must be a number, a 0-d tensor or [D] = [{D}], got {list(fill.shape)}")
    elif isinstance(fill, numbers.Real) and not isinstance(fill, bool):
        fill = torch.full((D,), fill, dtype=x_vis.dtype, device=x_vis.device)
    else:
        _checks.fail(op, f"fill must be a number or a tensor, got {type(fill).__name__}")
    backend = backends.select(op, x_vis.device, ALL_BACKENDS)
    if backend == "reference":
        _reference_value_checks(op, ids_keep, num_tokens, unique=True)
        return ref.restore_tokens(x_vis, ids_keep, num_tokens, fill)
    if backend == "triton":
        return restore_tokens_triton(x_vis, ids_keep, num_tokens, fill)
    return torch.ops.flipkern.restore_tokens(x_vis, ids_keep, num_tokens, fill)


def _restore_tokens_fake(x_vis, ids_keep, num_tokens, fill):
    return x_vis.new_empty((x_vis.shape[0], num_tokens, x_vis.shape[2]))


def _restore_tokens_setup(ctx, inputs, output):
    x_vis, ids_keep, num_tokens, fill = inputs
    ctx.save_for_backward(ids_keep)


def _restore_tokens_autograd(gather_op):
    def backward(ctx, grad):
        (ids_keep,) = ctx.saved_tensors
        dx = gather_op(grad, ids_keep, None)
        dfill = None
        if ctx.needs_input_grad[3]:
            # Sum over the positions no token owns = everything minus the kept rows; in
            # float64, so the difference loses nothing that rounding to grad's dtype keeps.
            dfill = (grad.sum((0, 1), dtype=torch.float64) - dx.sum((0, 1), dtype=torch.float64)).to(grad.dtype)
        return (dx if ctx.needs_input_grad[0] else None), None, None, dfill
    return backward


@torch.library.custom_op("flipkern::restore_tokens_triton", mutates_args=())
def restore_tokens_triton(x_vis: torch.Tensor, ids_keep: torch.Tensor, num_tokens: int,
                          fill: torch.Tensor) -> torch.Tensor:
    from .triton_kernels import masking as tk
    _checks.index_range("restore_tokens", ids_keep, num_tokens)
    inverse = _checks.keep_inverse("restore_tokens", ids_keep, num_tokens)
    return tk.restore_tokens(x_vis, inverse, fill)


restore_tokens_triton.register_fake(_restore_tokens_fake)
torch.library.register_autograd("flipkern::restore_tokens_triton",
                                _restore_tokens_autograd(drop_tokens_triton),
                                setup_context=_restore_tokens_setup)


# ----------------------------------------------------------------------------- registration

def _register_cpp_ops():
    """Fake kernels and autograd for the C++ ops; runs once the extension is loaded."""
    ops = torch.ops.flipkern
    torch.library.register_fake("flipkern::drop_tokens")(_drop_tokens_fake)
    torch.library.register_fake("flipkern::drop_tokens_backward")(_drop_tokens_backward_fake)
    torch.library.register_autograd("flipkern::drop_tokens", _drop_tokens_autograd(ops.drop_tokens_backward),
                                    setup_context=_drop_tokens_setup)
    torch.library.register_fake("flipkern::gather_patches")(_gather_patches_fake)
    torch.library.register_fake("flipkern::gather_patches_backward")(_gather_patches_backward_fake)
    torch.library.register_autograd("flipkern::gather_patches",
                                    _gather_patches_autograd(ops.gather_patches_backward),
                                    setup_context=_gather_patches_setup)
    torch.library.register_fake("flipkern::restore_tokens")(_restore_tokens_fake)
    torch.library.register_autograd("flipkern::restore_tokens", _restore_tokens_autograd(ops.drop_tokens),
                                    setup_context=_restore_tokens_setup)


_extension.on_load(_register_cpp_ops)
