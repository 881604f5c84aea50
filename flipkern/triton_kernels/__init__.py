"""Triton kernels (the GPU path; run on CPU tensors with TRITON_INTERPRET=1).

Imported lazily by the op modules, so flipkern imports without triton.
"""
