"""Token dropping ops: the public functions, their torch.library registration
(fake kernels, autograd) and the dispatch to a backend.

Backends: ``cpu``/``cuda`` are the C++ ops ``flipkern::<name>`` of the extension
(csrc/masking_*.{cpp,cu}); ``triton`` are the Python custom ops
``flipkern::<name>_triton`` (triton_kernels/masking.py); ``reference`` is
flipkern.reference.masking.
"""
import torch

from . import _checks, _extension, backends
from .reference import masking as ref

ALL_BACKENDS = ("reference", "cpu", "cuda", "triton")


# ----------------------------------------------------------------------------- drop_tokens

def drop_tokens(x, ids_keep, pos_embed=None):
    """x [B, N, D] -> x[b, ids_keep[b]] (+ pos_embed[ids_keep[b]]) as [B, K, D].

    The position add happens in the same pass as the gather, so no [B, N, D]
    intermediate is written. Backward: dx is zero where a token was dropped;
    d(pos_embed) is dx summed over the batch.
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
    _checks.check_index_range("drop_tokens", ids_keep, x.shape[1])
    return tk.drop_tokens(x, ids_keep, pos_embed)


@torch.library.custom_op("flipkern::drop_tokens_backward_triton", mutates_args=())
def drop_tokens_backward_triton(grad_out: torch.Tensor, ids_keep: torch.Tensor,
                                num_tokens: int) -> torch.Tensor:
    from .triton_kernels import masking as tk
    _checks.check_index_range("drop_tokens_backward", ids_keep, num_tokens)
    return tk.drop_tokens_backward(grad_out, ids_keep, num_tokens)


drop_tokens_triton.register_fake(_drop_tokens_fake)
drop_tokens_backward_triton.register_fake(_drop_tokens_backward_fake)
torch.library.register_autograd("flipkern::drop_tokens_triton",
                                _drop_tokens_autograd(drop_tokens_backward_triton),
                                setup_context=_drop_tokens_setup)


# ----------------------------------------------------------------------------- registration

def _register_cpp_ops():
    """Fake kernels and autograd for the C++ ops; runs once the extension is loaded."""
    torch.library.register_fake("flipkern::drop_tokens")(_drop_tokens_fake)
    torch.library.register_fake("flipkern::drop_tokens_backward")(_drop_tokens_backward_fake)
    torch.library.register_autograd(
        "flipkern::drop_tokens", _drop_tokens_autograd(torch.ops.flipkern.drop_tokens_backward),
        setup_context=_drop_tokens_setup)


_extension.on_load(_register_cpp_ops)
