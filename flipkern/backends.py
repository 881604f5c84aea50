"""Backend selection: which implementation of an op runs.

Every op has up to four implementations:
  reference  pure PyTorch (flipkern.reference), always available
  cpu        C++ kernels of flipkern._C, CPU tensors
  cuda       CUDA kernels of flipkern._C, CUDA tensors
  triton     Triton kernels, CUDA tensors (or CPU tensors with TRITON_INTERPRET=1)

The default follows the tensor's device: CPU -> cpu, CUDA -> triton, then cuda,
each falling back to reference when unavailable (the extension's loader warns
once). ``use_backend(name)`` forces one; forcing a backend that the op does not
implement, or that cannot run here, is an error naming both, never a silent
substitute.
"""
import contextlib
import functools
import os

import torch

from . import _extension

BACKENDS = ("reference", "cpu", "cuda", "triton")

_forced = None  # set by use_backend(); a plain global so torch.compile can guard on it
_used = {}  # op name -> backend that ran it last (reported by the pretraining summary)


@contextlib.contextmanager
def use_backend(name):
    """Force every flipkern op inside the block to use backend ``name``."""
    global _forced
    if name not in BACKENDS:
        raise ValueError(f"use_backend: name must be one of {BACKENDS}, got {name!r}")
    previous, _forced = _forced, name
    try:
        yield
    finally:
        _forced = previous


def triton_interpret():
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _triton_status():
    try:
        import triton  # noqa: F401
    except Exception as e:  # an import error of any kind means "not usable"
        return False, f"triton is not importable ({type(e).__name__}: {e})"
    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    if triton_interpret():
        return True, f"triton {triton.__version__} in the interpreter (TRITON_INTERPRET=1), CPU tensors"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the Triton kernels on CPU tensors)"


@torch.compiler.assume_constant_result
def backend_status(name):
    """(usable, reason) for a backend on this machine. Loads the extension if needed."""
    if name == "reference":
        return True, "pure PyTorch"
    if name == "triton":
        return _triton_status()
    loaded = _extension.load()
    if not loaded:
        return False, f"C++ extension unavailable: {_extension._state['error']}"
    if name == "cpu":
        return True, _extension._state["how"]
    if name == "cuda":
        if not _extension._state["cuda_compiled"]:
            return False, f"CUDA kernels not compiled ({_extension._state['cuda_reason']})"
        if not torch.cuda.is_available():
            return False, "CUDA kernels compiled, but no CUDA device to run them"
        return True, "CUDA kernels compiled and a CUDA device present"
    raise ValueError(f"unknown backend {name!r}")


def _usable(name):
    return backend_status(name)[0]


def _runs_on(name, device_type):
    if name == "reference":
        return True
    if name == "cpu":
        return device_type == "cpu"
    if name == "cuda":
        return device_type == "cuda"
    return device_type == "cuda" or (device_type == "cpu" and triton_interpret())


def select(op, device, implemented):
    """The backend that runs ``op`` on tensors on ``device``.

    ``implemented``: the backends this op has kernels for.
    """
    device_type = torch.device(device).type
    if _forced is not None:
        name = _forced
        if name not in implemented:
            raise RuntimeError(f"flipkern.{op}: no {name!r} kernel; this op implements {implemented}")
        if not _runs_on(name, device_type):
            raise RuntimeError(f"flipkern.{op}: backend {name!r} cannot run on {device_type} tensors")
        usable, why = backend_status(name)
        if not usable:
            raise RuntimeError(f"flipkern.{op}: backend {name!r} is not usable here: {why}")
    else:
        order = ("triton", "cuda") if device_type == "cuda" else ("cpu",)
        name = next((b for b in order if b in implemented and _usable(b)), "reference")
    _used[op] = name
    return name


def backends_used():
    """{op: backend} for the ops that ran in this process, the last choice for each."""
    return dict(_used)
