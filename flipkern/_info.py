"""Versions, and which backends are built and usable (and why not): ``flipkern.info()`` and
``python -m flipkern.info``."""
import json
import platform
import sys


def collect():
    import torch

    from . import _extension, backends
    from .backends import BACKENDS

    try:
        import triton
        triton_version = triton.__version__
    except Exception as e:
        triton_version = f"not importable ({type(e).__name__})"
    ext = _extension.status()
    info = {
        "flipkern": __import__("flipkern").__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton_version,
        "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "extension": ext["how"] if ext["loaded"] else f"unavailable: {ext['error']}",
        "cuda_kernels_compiled": ext["cuda_compiled"],
        "cuda_kernels_reason": ext["cuda_reason"],
        "backends": {},
    }
    for name in BACKENDS:
        usable, why = backends.backend_status(name)
        info["backends"][name] = {"usable": usable, "why": why}
    return info


def main(argv=None):
    args = sys.argv[1:] if argv is None else argv
    data = collect()
    if "--json" in args:
        print(json.dumps(data, indent=2))
        return 0
    for key, value in data.items():
        if key != "backends":
            print(f"{key:>22}: {value}")
    print("backends:")
    for name, st in data["backends"].items():
        print(f"  {name:<10} {'usable' if st['usable'] else 'not usable':<11} {st['why']}")
    return 0

