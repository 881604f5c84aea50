"""Argument checks at the front door of every public op.

They look at shapes, dtypes and devices only, so they run unchanged under
torch.compile(fullgraph=True). Checks that need the values (index ranges)
run inside the ops, before any kernel writes: in C++ (csrc/checks.h) for the
cpu/cuda backends and ``check_index_range`` here for the triton backend.
Every message names the op and the argument.
"""
import torch

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def fail(op, msg):
    raise ValueError(f"flipkern.{op}: {msg}")


def tensor(op, name, t, *, dims=None, dtypes=None, device=None):
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() != dims:
        fail(op, f"{name} must be {dims}-D, got {t.dim()}-D with shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        fail(op, f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        fail(op, f"{name} is on {t.device} but the input is on {device}")


def floating(op, name, t, *, dims=None, device=None):
    tensor(op, name, t, dims=dims, dtypes=_FLOAT, device=device)


def keep_indices(op, ids_keep, batch, device, name="ids_keep"):
    tensor(op, name, ids_keep, dims=2, dtypes=(torch.int64,), device=device)
    if ids_keep.shape[0] != batch:
        fail(op, f"{name} has batch {ids_keep.shape[0]} but the input has batch {batch}")


def check_index_range(op, ids, num_tokens, name="ids_keep"):
    """Values of ``ids`` in [0, num_tokens); eager only (reads the values)."""
    if ids.numel() == 0:
        return
    lo, hi = torch.aminmax(ids)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi >= num_tokens:
        raise RuntimeError(f"flipkern.{op}: {name} has values in [{lo}, {hi}], outside the valid "
                           f"range [0, {num_tokens})")


def keep_inverse(op, ids, num_tokens, name="ids_keep"):
    """int64 [B, num_tokens]: the k with ids[b, k] == n at each position n, or -1.

    Values must already be in range. A position kept twice would have two owners,
    so that is an error: scattering k over the positions lets one owner win, and
    the losers no longer read their own k back (as csrc/checks.h keep_inverse).
    """
    B, K = ids.shape
    inv = torch.full((B, num_tokens), -1, dtype=torch.int64, device=ids.device)
    if ids.numel() == 0:
        return inv
    k = torch.arange(K, device=ids.device).expand(B, K)
    inv.scatter_(1, ids, k)
    if not bool(inv.gather(1, ids).eq(k).all()):
        raise RuntimeError(f"flipkern.{op}: {name} repeats a position within a sample; "
                           f"each kept position must be unique")
    return inv
