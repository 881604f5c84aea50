"""flipkern: kernels for FLIP-style CLIP pretraining.

Token dropping, variable-length attention and chunked contrastive losses as
torch ops, with C++ (CPU), CUDA and Triton kernels and a pure-PyTorch
reference (flipkern.reference) that every kernel is tested against.
"""
import importlib.util as _ilu
import os as _os
import sys as _sys

__version__ = "0.1.0"


def _alias_reference():
    # reference/ sits at the top of the repository and is installed as flipkern.reference
    # (setup.py package_dir). In a source checkout, flipkern/ has no reference/ inside it:
    # load the top-level folder under the installed name so imports are the same either way.
    # The checkout's own reference/ wins over an editable install's mapping of the name,
    # which points at the checkout that was installed (another worktree's, say).
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.join(_os.path.dirname(here), "reference")
    if "flipkern.reference" in _sys.modules or _os.path.isdir(_os.path.join(here, "reference")):
        return
    if not _os.path.isfile(_os.path.join(root, "__init__.py")):
        return  # installed as a package: the import system finds it
    spec = _ilu.spec_from_file_location("flipkern.reference", _os.path.join(root, "__init__.py"),
                                        submodule_search_locations=[root])
    module = _ilu.module_from_spec(spec)
    _sys.modules["flipkern.reference"] = module
    spec.loader.exec_module(module)


_alias_reference()

from . import (
    fastpath,
    reference,
)
from .accumulate import contrastive_backward
from .attention import cu_seqlens_from_lengths, pack, packed_from_padding_mask, unpack, varlen_attention
from .backends import backends_used, use_backend
from .losses import clip_loss, siglip_loss
from .masking import drop_tokens, gather_patches, random_keep_indices, restore_tokens, topk_keep_indices
from .open_clip_patch import apply_to_open_clip
from .timm_patch import apply_to_timm, forward_with_keep


def info():
    """A dict of versions and backend status (what ``python -m flipkern.info`` prints)."""
    from ._info import collect
    return collect()


__all__ = ["reference", "use_backend", "backends_used", "info", "drop_tokens", "gather_patches", "random_keep_indices",
           "restore_tokens", "topk_keep_indices",
           "clip_loss", "siglip_loss",
           "varlen_attention", "pack", "unpack", "cu_seqlens_from_lengths", "packed_from_padding_mask",
           "fastpath", "contrastive_backward", "apply_to_open_clip", "apply_to_timm", "forward_with_keep"]
