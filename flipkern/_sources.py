"""Where the C++/CUDA sources are and how to compile them.

Used by setup.py (ahead-of-time build) and by _extension.py (build on first
use), so both builds compile the same files with the same flags. Imports
only the standard library and (lazily) torch.
"""
import glob
import hashlib
import os
import shutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CSRC = os.path.join(ROOT, "csrc")

CXX_FLAGS = ["-O3", "-fopenmp"]  # torch.utils.cpp_extension picks the C++ standard torch needs
LD_FLAGS = ["-fopenmp"]
# FLIPKERN_SANITIZE=1: the CPU kernels under AddressSanitizer + UndefinedBehaviorSanitizer
# (tests/run_sanitized.sh). -O1 keeps stack traces usable; undefined behaviour aborts at the
# first finding instead of printing and going on, so no finding can pass unnoticed.
SANITIZE_CXX_FLAGS = ["-O1", "-g", "-fno-omit-frame-pointer", "-fopenmp",
                      "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined"]
SANITIZE_LD_FLAGS = ["-fopenmp", "-fsanitize=address,undefined"]


def sanitize():
    """True when FLIPKERN_SANITIZE=1: build (on first use, CPU only) the sanitized extension."""
    return os.environ.get("FLIPKERN_SANITIZE", "").strip() == "1"


def cxx_flags():
    return SANITIZE_CXX_FLAGS if sanitize() else CXX_FLAGS


def ld_flags():
    return SANITIZE_LD_FLAGS if sanitize() else LD_FLAGS
# Architectures compiled when no GPU is visible to ask (CI, this machine): Ampere and Hopper.
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def nvcc_flags():
    # No --use_fast_math: it flushes fp32 denormals to zero (drop_tokens' position add must
    # be exact, subnormals included) and swaps exp/log/division for approximations that the
    # attention and loss kernels would have to fit into the tolerance rule. These kernels are
    # memory-bound or are the plain fallback (Triton is the fast path), so it buys nothing.
    return ["-O3", "-lineinfo"]


def _find_nvcc():
    if os.environ.get("CUDA_HOME"):
        cand = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
        if os.path.exists(cand):
            return cand
    if os.path.exists("/usr/local/cuda/bin/nvcc"):
        return "/usr/local/cuda/bin/nvcc"
    return shutil.which("nvcc")


def cuda_status():
    """(want_cuda, reason): whether the CUDA sources should be compiled, and why (not)."""
    flag = os.environ.get("FLIPKERN_CUDA", "").strip()
    nvcc = _find_nvcc()
    if nvcc is not None:
        # torch.utils.cpp_extension finds the toolkit through CUDA_HOME (read when it is
        # first imported): point it at the nvcc we found.
        os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    if flag == "0":
        return False, "FLIPKERN_CUDA=0"
    if sanitize():
        return False, "FLIPKERN_SANITIZE=1 builds the CPU kernels only"
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU-only build"
    if nvcc is None:
        return False, "nvcc not found (set CUDA_HOME)"
    if not torch.cuda.is_available():  # no GPU to ask for its architecture

        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    if flag == "1":
        return True, "FLIPKERN_CUDA=1"
    return True, f"torch CUDA {torch.version.cuda} and {nvcc}"


def want_cuda():
    return cuda_status()[0]


def include_dirs():
    """Header folders of the CUDA libraries that pip installed beside torch (nvidia/*/include).

    A CUDA build of torch from pip brings cuBLAS/cuSPARSE/... headers there rather than in
    the system toolkit; ATen's CUDA headers include them.
    """
    try:
        import torch
    except ImportError:
        return []
    site = os.path.dirname(os.path.dirname(torch.__file__))
    return sorted(glob.glob(os.path.join(site, "nvidia", "*", "include")))


def source_files(with_cuda):
    cpp = sorted(glob.glob(os.path.join(CSRC, "*.cpp")))
    cu = sorted(glob.glob(os.path.join(CSRC, "*.cu"))) if with_cuda else []
    return cpp + cu


BUILD_INFO = os.path.join(ROOT, "flipkern", "_build_info.json")


def content_hash():
    """Hash of every file under csrc/: tells whether a build is of the current sources."""
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(CSRC, "*"))):
        h.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def sources_hash(with_cuda):
    """The sources, the flags and the CUDA choice: the key of a build-on-first-use cache."""
    h = hashlib.sha256(content_hash().encode())
    h.update(repr((cxx_flags(), ld_flags(), nvcc_flags(), with_cuda,
                   os.environ.get("TORCH_CUDA_ARCH_LIST"))).encode())
    return h.hexdigest()[:16]


def write_build_info(with_cuda):
    import json
    with open(BUILD_INFO, "w") as f:
        json.dump({"content_hash": content_hash(), "cuda": bool(with_cuda)}, f)


def prebuilt_is_current():
    """(current, reason) for the ahead-of-time build recorded in BUILD_INFO."""
    import json
    try:
        with open(BUILD_INFO) as f:
            recorded = json.load(f)["content_hash"]
    except (OSError, ValueError, KeyError):
        return False, "no build record"
    if recorded != content_hash():
        return False, "csrc/ changed since it was built"
    return True, ""
