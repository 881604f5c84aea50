"""Build and install flipkern.

The C++/CUDA extension ``flipkern._C`` is built here ahead of time when a
compiler is available. CUDA sources are added when torch has CUDA and nvcc
is found; FLIPKERN_CUDA=1 forces them (compile and link with no GPU),
FLIPKERN_CUDA=0 skips them. If the build cannot run at all, the package
still installs and compiles the extension on first use instead
(flipkern/_extension.py), or falls back to the reference ops.

Install with ``pip install --no-build-isolation -e .`` so the build uses the
torch already in the environment.
"""
import importlib.util
import os
import sys

from setuptools import find_packages, setup

# The one list of sources and flags, shared with the build-on-first-use path. Loaded by
# path because importing the flipkern package itself here would need torch and more.
_spec = importlib.util.spec_from_file_location(
    "flipkern_sources", os.path.join(os.path.dirname(os.path.abspath(__file__)), "flipkern", "_sources.py"))
_sources = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_sources)

ext_modules = []
cmdclass = {}
try:
    import torch  # noqa: F401

    # Before importing cpp_extension: cuda_status() points CUDA_HOME at the toolkit, which
    # cpp_extension reads once, at import.
    with_cuda = _sources.want_cuda()
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = _sources.source_files(with_cuda)
    ext_cls = CUDAExtension if with_cuda else CppExtension
    ext_modules.append(
        ext_cls(
            name="flipkern._C",
            sources=[os.path.relpath(s) for s in sources],
            extra_compile_args={"cxx": _sources.cxx_flags(), "nvcc": _sources.nvcc_flags()},
            extra_link_args=_sources.ld_flags(),
            include_dirs=_sources.include_dirs() if with_cuda else [],
            py_limited_api=False,
        )
    )

    class BuildExt(BuildExtension.with_options(use_ninja=True)):
        def run(self):
            super().run()
            # Record which sources this build is of: the loader skips a stale prebuilt
            # _C (csrc/ edited after `pip install -e .`) and compiles the current sources.
            _sources.write_build_info(with_cuda)

    cmdclass["build_ext"] = BuildExt
except ImportError:
    print("flipkern setup: torch not importable at build time; the extension will be "
          "compiled on first use", file=sys.stderr)

# Metadata, dependencies and console scripts are in pyproject.toml; here only what needs
# code: the extension and the package layout (reference/ installs as flipkern.reference).
setup(
    packages=find_packages(include=["flipkern", "flipkern.*"]) + ["flipkern.reference"],
    package_dir={"flipkern.reference": "reference"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
