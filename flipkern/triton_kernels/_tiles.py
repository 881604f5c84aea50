"""What every flipkern Triton kernel decides the same way: accumulator type, dot
precision, and the tile product itself."""
import torch
import triton
import triton.language as tl


def acc_type(dtype):
    """Accumulate in fp32 for fp16/bf16/fp32 inputs; fp64 stays fp64."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def dot_precision(dtype):
    # fp32 inputs: full fp32 products (no TF32), so the error stays that of fp32 math;
    # bf16/fp16: the target's default (tensor cores).
    return "ieee" if dtype in (torch.float32, torch.float64) else None


def interpreter_upcast(x):
    """Whether bf16 tiles must be upcast before tl.dot (the CPU interpreter, see mm)."""
    return x.dtype == torch.bfloat16 and x.device.type != "cuda"


@triton.jit
def mm(a, b, PREC: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: the Triton interpreter multiplies bf16 tiles wrongly; bf16 products are
    # exact in fp32, so upcasting first computes the same thing a GPU's MMA does.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee", out_dtype=ACC)
    else:
        return tl.dot(a, b, input_precision=PREC, out_dtype=ACC)
