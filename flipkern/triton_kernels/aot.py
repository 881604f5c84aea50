"""Compile every flipkern Triton kernel ahead of time for a GPU architecture, on any
machine (no GPU needed): what a GPU run would compile, with its shared memory,
registers and spills, so a tile or register regression shows on a CPU.

The launchers run for real on CPU tensors (GPU tile sizes, the GPU dot precision)
with a stand-in driver whose target is the chosen architecture; a Triton JIT hook
records each launch's specialization (tensor pointers and ints divisible by 16
marked `tt.divisibility=16`, ints equal to 1 made constexpr, exactly as Triton does
at launch) and stops it before it compiles or runs. compile_launch() then compiles
the recorded launch through ptxas and reads its log.

    python -m flipkern.triton_kernels.aot [--arch 80 90] [--dtypes ...] [--only NAME]   (a JSON row a kernel)
"""
import contextlib
import io
import re
import sys

import torch

from .._dtypes import stat_dtype

# Largest dynamic shared memory per block a kernel can opt in to (cudaDevAttrMaxSharedMemoryPerBlockOptin):
# sm_80 (A100) 163 KiB, sm_90 (H100/H200) 227 KiB.
SHARED_LIMIT = {80: 166912, 90: 232448}


class _TargetOnly:
    """The part of a Triton driver JITFunction.run asks for before it compiles. The
    architecture doubles as the device number, so each architecture gets its own binder."""

    def __init__(self, arch):
        from triton.backends.compiler import GPUTarget
        self.arch = arch
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return self.target


@contextlib.contextmanager
def recorded_launches(arch):
    """Triton launches inside the block are recorded (a list of dicts), not compiled or run."""
    from triton import knobs
    from triton.runtime.driver import driver

    from . import _tiles
    launches = []

    def record(*, fn, compile, **_):
        launches.append(dict(fn=fn.jit_function, signature=compile["signature"],
                             constants=compile["constants"], attrs=compile["configs"][0],
                             options=dict(num_warps=compile["num_warps"], num_stages=compile["num_stages"],
                                          num_ctas=compile["num_ctas"],
                                          enable_fp_fusion=compile["enable_fp_fusion"])))
        return True  # handled: Triton neither compiles nor launches

    previous_hook, previous_driver = knobs.runtime.jit_cache_hook, driver._active
    knobs.runtime.jit_cache_hook = record
    driver.set_active(_TargetOnly(arch))
    try:
        with _tiles.gpu_tile_sizes():
            yield launches
    finally:
        driver._active = previous_driver  # None on a machine without a GPU: no reset_active()
        knobs.runtime.jit_cache_hook = previous_hook


_PTXAS_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def compile_launch(launch, arch):
    """Compile one recorded launch for sm_<arch> -> {shared, registers, spill_stores, spill_loads} (bytes
    per block for shared memory, per thread for spills)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(launch["fn"], launch["signature"], launch["constants"], launch["attrs"])
    log = io.StringIO()
    # always_compile: a cached kernel would skip ptxas and with it the log we read.
    with knobs.compilation.scope(), knobs.nvidia.scope():
        knobs.compilation.always_compile = True
        knobs.nvidia.dump_ptxas_log = True
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=launch["options"])
    text = log.getvalue()
    spills, regs = _PTXAS_SPILLS.search(text), _PTXAS_REGS.search(text)
    if spills is None or regs is None:
        raise RuntimeError(f"no register/spill line in the ptxas log of {launch['fn'].__name__}:\n{text}")
    return dict(shared=kernel.metadata.shared, registers=int(regs.group(1)),
                spill_stores=int(spills.group(1)), spill_loads=int(spills.group(2)))


def _describe(launch):
    consts = {launch["fn"].arg_names[path[0]]: value for path, value in launch["constants"].items()}
    tiles = {k: str(v) for k, v in consts.items() if k.isupper() and k != "UPCAST"}
    ptr = next(t for t in launch["signature"].values() if t.startswith("*"))
    floats = {k: t for k, t in launch["signature"].items() if t.startswith(("fp", "bf"))}  # scalar args
    return dict(kernel=launch["fn"].__name__, dtype=ptr[1:], num_warps=launch["options"]["num_warps"],
                num_stages=launch["options"]["num_stages"], float_args=floats, **tiles)


# ----------------------------------------------------------------------------- the variants

def _attention(dtype, Dh, causal):
    from . import attention
    total, H = 64, 4
    q, k, v, g = (torch.randn(total, H, Dh).to(dtype) for _ in range(4))
    cu = torch.tensor([0, 20, total], dtype=torch.int32)
    max_seqlen = 1000  # nothing runs; only the grid would see it (1 block would make it constexpr)
    out, lse = attention.varlen_attention_forward(q, k, v, cu, max_seqlen, causal, Dh ** -0.5)
    attention.varlen_attention_backward(g, q, k, v, out, lse, cu, max_seqlen, causal, Dh ** -0.5)


def _losses(dtype, D):
    from . import losses
    N = 64
    image, text = torch.randn(N, D).to(dtype), torch.randn(N, D).to(dtype)
    scale, bias, grad = (torch.tensor(x, dtype=dtype) for x in (10.0, -10.0, 1.0))
    lse = torch.zeros(N, dtype=stat_dtype(dtype))
    # CLIP on one process (both softmaxes: the superset of a rank's kernels) and SigLIP
    losses.clip_loss_forward(image, text, scale, 0, N)
    losses.clip_loss_backward(grad, image, text, scale, lse, lse, 0, N)
    losses.siglip_loss_forward(image, text, scale, bias, 0)
    losses.siglip_loss_backward(grad, image, text, scale, bias, 0)


def _masking(dtype, D):
    from . import masking
    B, N, K, p = 2, 16, 8, 16
    x, pos = torch.randn(B, N, D).to(dtype), torch.randn(N, D).to(dtype)
    ids = torch.stack([torch.randperm(N)[:K] for _ in range(B)])
    masking.drop_tokens(x, ids, pos)
    masking.drop_tokens_backward(x[:, :K], ids, N)
    images = torch.randn(B, 3, 4 * p, 4 * p).to(dtype)
    patches = masking.gather_patches(images, ids, p)
    masking.gather_patches_backward(patches, ids, list(images.shape), p)
    inverse = torch.full((B, N), -1, dtype=torch.int64)
    masking.restore_tokens(x[:, :K], inverse, pos[0])


DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def variants(dtypes=DTYPES):
    """(name, run) for every dtype and tile choice the launchers make: attention (causal:
    the full-attention kernels are the same tiles without the mask) at Dh 256, 128 and
    64, where its tile brackets end; the losses with D blocks of 256 (8 warps) and 128
    (4 warps); the masking kernels at their widest block."""
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        for Dh in (256, 128, 64):
            yield f"attention-{name}-Dh{Dh}", lambda d=dtype, h=Dh: _attention(d, h, True)
        for D in (512, 128):
            yield f"losses-{name}-D{D}", lambda d=dtype, n=D: _losses(d, n)
        yield f"masking-{name}", lambda d=dtype: _masking(d, 768)


def compile_all(arch, only=None, dtypes=DTYPES):
    """Yield one row per distinct kernel of every variant. Variants go from the widest head
    dim down, and a kernel whose tiles and warps match one already compiled except for a
    narrower BLOCK_D is skipped: the wider one bounds its registers and shared memory."""
    seen = set()
    for name, run in variants(dtypes):
        if only and only not in name:
            continue
        with recorded_launches(arch) as launches:
            run()
        for launch in launches:
            row = _describe(launch)
            key = str({k: v for k, v in row.items() if k not in ("BLOCK_D", "float_args")})
            if key in seen:
                continue
            seen.add(key)
            yield dict(variant=name, arch=arch, **row, **compile_launch(launch, arch))


def main(argv=None):
    import argparse
    import json
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--only", default=None, help="variants whose name contains this")
    parser.add_argument("--dtypes", nargs="+", default=[str(d).removeprefix("torch.") for d in DTYPES])
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, name) for name in args.dtypes]
    for arch in args.arch:
        for row in compile_all(arch, args.only, dtypes):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    sys.exit(main())
