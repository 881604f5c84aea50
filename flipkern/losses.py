"""Contrastive losses over the global batch (CLIP softmax, SigLIP sigmoid): the
public functions, the distributed gather, their torch.library registration (fake
kernels, autograd) and the dispatch to a backend.

Semantics are open_clip's ClipLoss(local_loss=True, gather_with_grad=True) and
SigLipLoss (flipkern.reference.losses is the oracle). With a process group of W
ranks holding b samples each, the features are all-gathered (CLIP: image and
text in one [W*b, 2D] buffer, one collective; SigLIP: the texts), every rank
computes the loss rows of its own b samples against all W*b, and the backward
returns the gradient of every gathered row to its owner with one reduce-scatter.
The loss a rank returns is the mean over its own rows, so the mean over ranks,
and the gradients once DDP averages them, are those of the single-process loss
on the concatenated batch.

The kernels never hold the [b, W*b] logits: they compute it chunk by chunk with
an online logsumexp in the forward, keep only per-row statistics, and recompute
the chunks in the backward. Backends: ``cpu``/``cuda`` are the C++ ops
``flipkern::{clip,siglip}_loss_{fwd,bwd}`` (csrc/loss_*.{cpp,cu}); ``triton`` the
Python custom ops ``flipkern::*_triton`` (triton_kernels/losses.py);
``reference`` is flipkern.reference.losses.
"""
import torch
import torch.distributed as dist

from . import _checks, _extension, backends
from ._dtypes import stat_dtype
from .reference import losses as ref

ALL_BACKENDS = ("reference", "cpu", "cuda", "triton")


# ----------------------------------------------------------------------------- chunk size

@torch.compiler.assume_constant_result
def _cpu_threads():
    return max(torch.get_num_threads(), 1)


def default_chunk_size(device, rows, dim):
    """The chunk (rows of logits computed at once) when ``chunk_size=None``.

    CPU: tiles of chunk x chunk logits per thread, 512 (a 1 MiB float32 tile stays in
    cache and one [512, D] @ [D, 512] product keeps BLAS efficient), but no more than
    ceil(rows / threads) rounded up to 64 so that every thread gets a chunk, and no
    less than 64. CUDA: whole rows of chunk x N logits, chunk = 2**26 / N elements (a
    256 MiB float32 buffer) rounded down to a multiple of 256, between 256 and 8192.
    Triton tiles by its own blocks and ignores the chunk.
    ``rows`` is the number of logits rows of one pass (the local batch), ``dim`` the
    number of columns (the global batch).
    """
    if torch.device(device).type == "cuda":
        return int(min(8192, max(256, (2 ** 26 // max(dim, 1)) // 256 * 256)))
    per_thread = -(-rows // _cpu_threads())
    return int(min(512, max(64, -(-per_thread // 64) * 64)))


# ----------------------------------------------------------------------------- checks

def _check_features(op, image_features, text_features):
    _checks.floating(op, "image_features", image_features, dims=2)
    _checks.floating(op, "text_features", text_features, dims=2, device=image_features.device)
    if text_features.shape != image_features.shape:
        _checks.fail(op, f"text_features has shape {list(text_features.shape)} but image_features "
                         f"has shape {list(image_features.shape)} (both must be [batch, dim])")
    if text_features.dtype != image_features.dtype:
        _checks.fail(op, f"text_features dtype {text_features.dtype} differs from image_features "
                         f"dtype {image_features.dtype}")
    if image_features.shape[0] < 1:
        _checks.fail(op, "image_features must have at least one row (the loss is a mean over them)")


def _as_scalar(op, name, value, like):
    """A 0-d floating tensor on the features' device (a Python number becomes one, in
    float32, or float64 for float64 features: not rounded to 16 bits)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=stat_dtype(like.dtype), device=like.device)
    _checks.floating(op, name, value, device=like.device)
    if value.dim() != 0:
        _checks.fail(op, f"{name} must be a 0-d tensor (a scalar), got shape {tuple(value.shape)}")
    return value


def _check_chunk(op, chunk_size):
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, torch.SymInt)):
        _checks.fail(op, f"chunk_size must be an int or None, got {type(chunk_size).__name__}")
    if chunk_size < 1:
        _checks.fail(op, f"chunk_size must be >= 1, got {chunk_size}")


# ----------------------------------------------------------------------------- distributed

def _world(group):
    """(world size, rank) of ``group``; (1, 0) without an initialized process group."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


class _GatherRows(torch.autograd.Function):
    """all_gather along dim 0 into one [W*b, ...] tensor; backward: reduce-scatter
    (the sum over ranks of the gradient each rank computed for our rows)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((dist.get_world_size(group) * x.shape[0],) + tuple(x.shape[1:]))
        dist.all_gather_into_tensor(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        world = dist.get_world_size(ctx.group)
        out = grad.new_empty((grad.shape[0] // world,) + tuple(grad.shape[1:]))
        dist.reduce_scatter_single(out, grad.contiguous(), group=ctx.group)
        return out, None


# ----------------------------------------------------------------------------- clip_loss

def clip_loss(image_features, text_features, logit_scale, *, chunk_size=None, group=None):
    """Mean of the image->text and text->image cross entropies; positives share a row.

    image_features, text_features [b, D] (this rank's, already normalized);
    logit_scale: 0-d tensor or number (the multiplier, already exp'ed); group: a
    torch.distributed process group (None: a single process). Every rank must hold
    the same b. float16/bfloat16 features are computed with float32 accumulation.
    Returns a 0-d tensor in the features' dtype.
    """
    op = "clip_loss"
    _check_features(op, image_features, text_features)
    logit_scale = _as_scalar(op, "logit_scale", logit_scale, image_features)
    _check_chunk(op, chunk_size)
    backend = backends.select(op, image_features.device, ALL_BACKENDS)
    if backend == "reference":
        return ref.clip_loss(image_features, text_features, logit_scale, group)
    world, rank = _world(group)
    b, D = image_features.shape
    if world == 1:
        all_image, all_text = image_features, text_features
    else:
        both = _GatherRows.apply(torch.cat([image_features, text_features], 1), group)
        all_image, all_text = both[:, :D], both[:, D:]
    if chunk_size is None:
        chunk_size = default_chunk_size(image_features.device, b, world * b)
    args = (all_image, all_text, logit_scale, rank * b, b, chunk_size)
    if backend == "triton":
        return clip_loss_forward_triton(*args)[0]
    return torch.ops.flipkern.clip_loss_forward(*args)[0]


def _clip_forward_fake(all_image, all_text, logit_scale, offset, local_batch, chunk_size):
    lse = all_image.new_empty((local_batch,), dtype=stat_dtype(all_image.dtype))
    return all_image.new_empty(()), lse, torch.empty_like(lse)


def _clip_backward_fake(grad, all_image, all_text, logit_scale, lse_image, lse_text, offset,
                   local_batch, chunk_size):
    return (all_image.new_empty(all_image.shape), all_text.new_empty(all_text.shape),
            logit_scale.new_empty(()))


def _clip_setup(ctx, inputs, output):
    all_image, all_text, logit_scale, offset, local_batch, chunk_size = inputs
    _, lse_image, lse_text = output
    ctx.save_for_backward(all_image, all_text, logit_scale, lse_image, lse_text)
    ctx.rows = (offset, local_batch, chunk_size)
    ctx.mark_non_differentiable(lse_image, lse_text)


def _clip_autograd(backward_op):
    def backward(ctx, grad, grad_lse_image, grad_lse_text):
        all_image, all_text, logit_scale, lse_image, lse_text = ctx.saved_tensors
        d_image, d_text, d_scale = backward_op(grad, all_image, all_text, logit_scale,
                                               lse_image, lse_text, *ctx.rows)
        need = ctx.needs_input_grad
        return (d_image if need[0] else None, d_text if need[1] else None,
                d_scale if need[2] else None, None, None, None)
    return backward


@torch.library.custom_op("flipkern::clip_loss_forward_triton", mutates_args=())
def clip_loss_forward_triton(all_image: torch.Tensor, all_text: torch.Tensor, logit_scale: torch.Tensor,
                         offset: int, local_batch: int,
                         chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_kernels import losses as tk
    return tk.clip_loss_forward(all_image, all_text, logit_scale, offset, local_batch)


@torch.library.custom_op("flipkern::clip_loss_backward_triton", mutates_args=())
def clip_loss_backward_triton(grad: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
                         logit_scale: torch.Tensor, lse_image: torch.Tensor, lse_text: torch.Tensor,
                         offset: int, local_batch: int,
                         chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from .triton_kernels import losses as tk
    return tk.clip_loss_backward(grad, all_image, all_text, logit_scale, lse_image, lse_text, offset,
                            local_batch)


clip_loss_forward_triton.register_fake(_clip_forward_fake)
clip_loss_backward_triton.register_fake(_clip_backward_fake)
torch.library.register_autograd("flipkern::clip_loss_forward_triton", _clip_autograd(clip_loss_backward_triton),
                                setup_context=_clip_setup)


# ----------------------------------------------------------------------------- siglip_loss

def siglip_loss(image_features, text_features, logit_scale, logit_bias, *, chunk_size=None,
                group=None):
    """-sum_ij log sigmoid(z_ij (logit_scale <I_i, T_j> + logit_bias)) / b, z = +1 on the
    positive pairs and -1 elsewhere: this rank's images against every rank's texts.

    Arguments as in clip_loss; logit_bias: 0-d tensor or number.
    """
    op = "siglip_loss"
    _check_features(op, image_features, text_features)
    logit_scale = _as_scalar(op, "logit_scale", logit_scale, image_features)
    logit_bias = _as_scalar(op, "logit_bias", logit_bias, image_features)
    _check_chunk(op, chunk_size)
    backend = backends.select(op, image_features.device, ALL_BACKENDS)
    if backend == "reference":
        return ref.siglip_loss(image_features, text_features, logit_scale, logit_bias, group)
    world, rank = _world(group)
    b = image_features.shape[0]
    all_text = text_features if world == 1 else _GatherRows.apply(text_features, group)
    if chunk_size is None:
        chunk_size = default_chunk_size(image_features.device, b, world * b)
    args = (image_features, all_text, logit_scale, logit_bias, rank * b, chunk_size)
    if backend == "triton":
        return siglip_loss_forward_triton(*args)
    return torch.ops.flipkern.siglip_loss_forward(*args)


def _siglip_forward_fake(image, all_text, logit_scale, logit_bias, offset, chunk_size):
    return image.new_empty(())


def _siglip_backward_fake(grad, image, all_text, logit_scale, logit_bias, offset, chunk_size):
    return (image.new_empty(image.shape), all_text.new_empty(all_text.shape),
            logit_scale.new_empty(()), logit_bias.new_empty(()))


def _siglip_setup(ctx, inputs, output):
    image, all_text, logit_scale, logit_bias, offset, chunk_size = inputs
    ctx.save_for_backward(image, all_text, logit_scale, logit_bias)
    ctx.rows = (offset, chunk_size)


def _siglip_autograd(backward_op):
    def backward(ctx, grad):
        image, all_text, logit_scale, logit_bias = ctx.saved_tensors
        grads = backward_op(grad, image, all_text, logit_scale, logit_bias, *ctx.rows)
        return tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad)) + (None, None)
    return backward


@torch.library.custom_op("flipkern::siglip_loss_forward_triton", mutates_args=())
def siglip_loss_forward_triton(image: torch.Tensor, all_text: torch.Tensor, logit_scale: torch.Tensor,
                           logit_bias: torch.Tensor, offset: int, chunk_size: int) -> torch.Tensor:
    from .triton_kernels import losses as tk
    return tk.siglip_loss_forward(image, all_text, logit_scale, logit_bias, offset)


@torch.library.custom_op("flipkern::siglip_loss_backward_triton", mutates_args=())
def siglip_loss_backward_triton(grad: torch.Tensor, image: torch.Tensor, all_text: torch.Tensor,
                           logit_scale: torch.Tensor, logit_bias: torch.Tensor, offset: int,
                           chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                     torch.Tensor]:
    from .triton_kernels import losses as tk
    return tk.siglip_loss_backward(grad, image, all_text, logit_scale, logit_bias, offset)


siglip_loss_forward_triton.register_fake(_siglip_forward_fake)
siglip_loss_backward_triton.register_fake(_siglip_backward_fake)
torch.library.register_autograd("flipkern::siglip_loss_forward_triton",
                                _siglip_autograd(siglip_loss_backward_triton), setup_context=_siglip_setup)


# ----------------------------------------------------------------------------- registration

def _register_cpp_ops():
    """Fake kernels and autograd for the C++ ops; runs once the extension is loaded."""
    torch.library.register_fake("flipkern::clip_loss_forward")(_clip_forward_fake)
    torch.library.register_fake("flipkern::clip_loss_backward")(_clip_backward_fake)
    torch.library.register_fake("flipkern::siglip_loss_forward")(_siglip_forward_fake)
    torch.library.register_fake("flipkern::siglip_loss_backward")(_siglip_backward_fake)
    torch.library.register_autograd("flipkern::clip_loss_forward",
                                    _clip_autograd(torch.ops.flipkern.clip_loss_backward),
                                    setup_context=_clip_setup)
    torch.library.register_autograd("flipkern::siglip_loss_forward",
                                    _siglip_autograd(torch.ops.flipkern.siglip_loss_backward),
                                    setup_context=_siglip_setup)


_extension.on_load(_register_cpp_ops)
