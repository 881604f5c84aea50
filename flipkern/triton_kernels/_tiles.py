"""What every flipkern Triton kernel decides the same way: accumulator type, dot
precision, tile sizes for the target, the launch device, and the tile product itself."""
import contextlib
import functools
import inspect

import torch
import triton
import triton.language as tl

from ..backends import triton_interpret

_force_gpu_tiles = False


def acc_type(dtype):
    """Accumulate in fp32 for fp16/bf16/fp32 inputs; fp64 stays fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype):
    # fp32 inputs: tf32x3 = three TF32 tensor-core products (hi*hi + hi*lo + lo*hi of
    # each operand split into a TF32 head and its remainder), about as accurate as fp32
    # FMA (the dropped lo*lo term is ~2**-22 relative) and several times faster; plain
    # TF32 (2**-11) would break the tolerance rule. fp64: full fp64 FMA (no tensor cores
    # for fp64 in Triton). bf16/fp16: the target's default (tensor cores).
    if dtype == torch.float32:
        return "tf32x3"
    return "ieee" if dtype == torch.float64 else None


def interpreter_upcast(x):
    """Whether bf16 tiles must be upcast before tl.dot (the CPU interpreter, see mm)."""
    return x.dtype == torch.bfloat16 and triton_interpret()


def gpu_tiles(device):
    """Whether a launch on ``device`` uses the GPU tile sizes: always, except in the
    interpreter on CPU tensors, which runs small tiles much faster (unless a test asks
    for the GPU ones with gpu_tile_sizes())."""
    return device.type == "cuda" or not triton_interpret() or _force_gpu_tiles


@contextlib.contextmanager
def gpu_tile_sizes():
    """Launches inside the block use the GPU tile sizes on any device (interpreter tests)."""
    global _force_gpu_tiles
    previous, _force_gpu_tiles = _force_gpu_tiles, True
    try:
        yield
    finally:
        _force_gpu_tiles = previous


def launcher(op):
    """Decorator for every function that launches Triton kernels.

    Its tensor arguments must share one device (else a ValueError naming the argument),
    and the kernels launch with that device current: Triton launches on
    torch.cuda.current_device() and its current stream, whatever device the pointers
    belong to, so tensors on cuda:1 with cuda:0 current would fault or run on the wrong
    GPU and stream.
    """
    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def launch(*args, **kwargs):
            tensors = [(name, value) for name, value in signature.bind(*args, **kwargs).arguments.items()
                       if isinstance(value, torch.Tensor)]
            first, device = tensors[0][0], tensors[0][1].device
            for name, t in tensors[1:]:
                if t.device != device:
                    raise ValueError(f"flipkern.{op}: {name} is on {t.device} but {first} is on {device}; "
                                     f"all tensors of one call must be on the same device")
            with device_guard(device):
                return fn(*args, **kwargs)
        return launch
    return wrap


def device_guard(device):
    """torch.cuda.device(device) for a CUDA device, else a no-op."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


@triton.jit
def mm(a, b, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the Triton interpreter multiplies bf16 tiles wrongly; bf16 products are
    # exact in fp32, so upcasting first computes the same thing a GPU's MMA does.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=ACC)
    else:
        return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
