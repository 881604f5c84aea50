"""Argument checks at the front door of every public op: one implementation for
every backend, so a bad input gets the same error whichever backend runs.

Structural checks (``tensor``, ``floating``, ``keep_indices``, ...) look at
shapes, dtypes and devices only, so they run unchanged under
torch.compile(fullgraph=True). Value checks (``index_range``, ``keep_inverse``,
``cu_seqlens_values``, ``lengths_values``) read the values, so they run eagerly:
in front of the reference backend and inside the Triton custom ops. The C++
backends check the same values with the same messages in csrc/checks.h and
csrc/attention_checks.h (they must also guard direct torch.ops calls).
Every message names the op and the argument.

Reading values from a CUDA tensor syncs the host with the device. The same
index tensor serves the forward and backward of a step, and the same
cu_seqlens every layer, so a value check runs once per tensor and version
(``_once``): a steady-state training step does not sync for validation.
"""
import torch
from torch.utils.weak import WeakIdKeyDictionary

_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTEGER = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def fail(op, msg):
    raise ValueError(f"flipkern.{op}: {msg}")


def fail_value(op, msg):
    """A bad value found by reading a tensor: RuntimeError, as TORCH_CHECK raises in C++."""
    raise RuntimeError(f"flipkern.{op}: {msg}")


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


# ----------------------------------------------------------------------------- value checks

# {tensor: {check: (data_ptr, version, shape, result)}}: the value checks a tensor passed.
# Keyed weakly by the tensor object (not by data_ptr alone: the caching allocator hands a
# freed block to the next tensor, which must be checked afresh); an in-place write bumps
# the version and so invalidates the entry.
_passed = WeakIdKeyDictionary()


def _once(t, check, run):
    """``run()`` (which raises on bad values, else returns a result) once per tensor,
    version and ``check``; later calls return the cached result without reading ``t``.
    Inference tensors have no version counter to tell an in-place write: always run."""
    if t.is_inference():
        return run()
    key = (t.data_ptr(), t._version, tuple(t.shape), tuple(t.stride()))
    seen = _passed.get(t)
    if seen is not None and check in seen and seen[check][:4] == key:
        return seen[check][4]
    result = run()
    _passed.setdefault(t, {})[check] = key + (result,)
    return result


def read_values(t):
    """The one place the value checks read a tensor (one sync on CUDA); tests count calls."""
    return t.tolist()


def index_range(op, ids, num_tokens, name="ids_keep"):
    """Values of ``ids`` in [0, num_tokens)."""
    def run():
        if ids.numel() == 0:
            return None
        lo, hi = read_values(torch.stack(torch.aminmax(ids)))
        if lo < 0 or hi >= num_tokens:
            fail_value(op, f"{name} has values in [{lo}, {hi}], outside the valid range [0, {num_tokens})")
    _once(ids, ("index_range", name, int(num_tokens)), run)


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

    def run():
        if not read_values(inv.gather(1, ids).eq(k).all()):
            fail_value(op, f"{name} repeats a position within a sample; each kept position must be unique")
    _once(ids, ("unique", name, int(num_tokens)), run)
    return inv


def cu_seqlens_values(op, cu, total, max_seqlen, rows_of="q"):
    """0 = cu[0] <= cu[1] <= ... <= cu[-1] = total, every length <= max_seqlen.

    Reports the first bad entry in the order csrc/attention_checks.h walks them, so
    every backend gives the same message for the same input. ``rows_of``: the tensor
    whose rows cu_seqlens indexes (for the message).
    """
    def run():
        c = read_values(cu)
        if c[0] != 0:
            fail_value(op, f"cu_seqlens[0] must be 0, got {c[0]}")
        for i in range(1, len(c)):
            if c[i] < c[i - 1]:
                fail_value(op, f"cu_seqlens must be non-decreasing, but cu_seqlens[{i}] = {c[i]} < "
                               f"cu_seqlens[{i - 1}] = {c[i - 1]}")
            if c[i] - c[i - 1] > max_seqlen:
                fail_value(op, f"sequence {i - 1} has length {c[i] - c[i - 1]} > max_seqlen = {max_seqlen}")
        if c[-1] != total:
            fail_value(op, f"cu_seqlens[-1] = {c[-1]} must equal the number of packed rows of "
                           f"{rows_of} ({total})")
        return max((b - a for a, b in zip(c, c[1:])), default=0)

    # The longest length is what passed; a later call with a smaller max_seqlen than that
    # runs the whole check again, which then raises naming the first sequence too long.
    if _once(cu, ("cu_seqlens", int(total)), run) > max_seqlen:
        run()


def lengths_values(op, name, lengths, high, low=0):
    """Integer lengths [B] (dtype checked by the caller) with values in [low, high]."""
    def run():
        if lengths.numel() == 0:
            return None
        lo, hi = read_values(torch.stack(torch.aminmax(lengths)))
        if lo < low or hi > high:
            fail_value(op, f"{name} has values in [{lo}, {hi}], outside the valid range [{low}, {high}]")
    _once(lengths, ("lengths", name, int(low), int(high)), run)
