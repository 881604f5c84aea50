"""Loading the C++/CUDA extension: built ahead of time, or compiled on first use.

State machine, run once per process (``load()``):
1. ``import flipkern._C`` (built by setup.py). A build for another torch, or of
   sources that have changed since (flipkern/_build_info.json records their
   hash), is skipped and we go on to 2.
2. Otherwise compile csrc/ with torch.utils.cpp_extension + ninja into
   ``$FLIPKERN_CACHE`` (default ~/.cache/flipkern)/<torch version>-<cpu|cuda>-<source hash>
   and load it, printing one line while it compiles. FLIPKERN_SANITIZE=1 always takes
   this path, into <torch version>-asan-ubsan-<hash> (CPU only; see .ci/sanitize).
3. If that fails too, remember why; ops then use the reference backend and
   warn once. Importing flipkern never fails because of the extension.

Op modules call ``on_load(fn)`` to register fake kernels and autograd for the
C++ ops once the library (and so the op schemas) exists.
"""
import importlib
import importlib.util
import os
import sys
import threading
import warnings

from . import _sources

_lock = threading.RLock()
_state = {"loaded": None, "how": None, "error": None, "cuda_compiled": False, "cuda_reason": None}
_callbacks = []


def cache_root():
    return os.environ.get("FLIPKERN_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "flipkern"))


def _import_prebuilt():
    if _sources.sanitize():  # the prebuilt library is not instrumented: build the sanitized one
        raise ImportError("FLIPKERN_SANITIZE=1 uses its own build")
    spec = importlib.util.find_spec("flipkern._C")
    if spec is None:
        raise ImportError("not built")
    if os.path.isdir(_sources.CSRC):  # a source checkout: is the build of these sources?
        current, why = _sources.prebuilt_is_current()
        if not current:
            raise ImportError(f"stale: {why}")
    mod = importlib.import_module("flipkern._C")
    return getattr(mod, "__file__", "flipkern._C")


def _compile_jit(with_cuda):
    import torch
    from torch.utils.cpp_extension import load

    sources = _sources.source_files(with_cuda)
    if not sources:
        raise RuntimeError(f"no C++ sources found under {_sources.CSRC}")
    kind = "asan-ubsan" if _sources.sanitize() else "cuda" if with_cuda else "cpu"
    tag = f"torch{torch.__version__.replace('+', '_')}-{kind}-" \
          f"{_sources.sources_hash(with_cuda)}"
    build_dir = os.path.join(cache_root(), tag)
    os.makedirs(build_dir, exist_ok=True)
    built = os.path.exists(os.path.join(build_dir, "flipkern_C.so"))
    if not built:
        print(f"flipkern: compiling the C++{'/CUDA' if with_cuda else ''} extension into "
              f"{build_dir} (first use only, takes a minute or two)...", file=sys.stderr, flush=True)
    load(
        name="flipkern_C",
        sources=sources,
        extra_cflags=_sources.cxx_flags(),
        extra_cuda_cflags=_sources.nvcc_flags(),
        extra_ldflags=_sources.ld_flags(),
        extra_include_paths=_sources.include_dirs() if with_cuda else None,
        build_directory=build_dir,
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=False,
    )
    return os.path.join(build_dir, "flipkern_C.so")


def _first_error(exc):
    """The first compiler 'error:' line of a failed build, else the exception's last line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errs = [ln for ln in lines if "error:" in ln]
    return (errs or lines or [type(exc).__name__])[0][:500]


def load():
    """Load the extension once; returns True when its ops are registered."""
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        want_cuda, reason = _sources.cuda_status()
        _state["cuda_reason"] = reason
        errors = []
        if os.environ.get("FLIPKERN_NO_EXTENSION") == "1":
            errors.append("FLIPKERN_NO_EXTENSION=1")
        else:
            try:
                _state["how"] = f"prebuilt {_import_prebuilt()}"
            except ImportError as e:
                errors.append(f"no prebuilt flipkern._C ({e})")
                try:
                    _state["how"] = f"compiled on first use: {_compile_jit(want_cuda)}"
                except Exception as e:  # a compiler error must not take the process down
                    errors.append(f"build on first use failed: {_first_error(e)}")
        ok = _state["how"] is not None
        _state["loaded"] = ok
        if ok:
            import torch
            _state["cuda_compiled"] = _has_cuda_kernels(torch)
            for fn in _callbacks:
                fn()
        else:
            _state["error"] = "; ".join(errors)
            warnings.warn(f"flipkern: C++ extension unavailable, using the reference ops "
                          f"({_state['error']})", RuntimeWarning, stacklevel=2)
        return ok


def _has_cuda_kernels(torch):
    # The CUDA kernels register a CUDA implementation of this op; ask the dispatcher.
    return torch._C._dispatch_has_kernel_for_dispatch_key("flipkern::drop_tokens", "CUDA")


def on_load(fn):
    """Run ``fn`` once the extension is loaded (now, if it already is)."""
    with _lock:
        _callbacks.append(fn)
        if _state["loaded"]:
            fn()


def status():
    load()
    return dict(_state)
