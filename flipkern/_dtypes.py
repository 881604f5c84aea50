"""The dtype statistics are kept in, shared by every backend and its fake kernels."""
import torch


def stat_dtype(dtype):
    """Logsumexps and accumulators of fp16/bf16/fp32 inputs are fp32 (half precision would
    lose the softmax's normalizer); fp64 inputs keep fp64 so the reference check stays tight."""
    return torch.float64 if dtype == torch.float64 else torch.float32
