"""flipkern.reference: the pure-PyTorch oracle.

Readable, obviously correct, never clever: every flipkern kernel is tested
against these functions, and the models here are the parameter layout that the
fast path shares (a checkpoint of one loads in the other). Imports torch only;
never imports flipkern.

Installed as ``flipkern.reference`` (setup.py package_dir).
"""
from . import attention, clip, losses, mae, masking, text, vit  # noqa: F401

__all__ = ["masking", "attention", "losses", "vit", "text", "clip", "mae"]
