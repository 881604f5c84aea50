"""Every Triton kernel compiled ahead of time for sm_80 and sm_90, as a GPU run would
compile it (flipkern/triton_kernels/aot.py: the launchers' GPU tiles for every dtype and
tile choice, Triton's launch-time specialization), with no GPU: a tile or register
regression fails here, on a CPU.

Bounds:
- shared memory per block within the architecture's opt-in limit (aot.SHARED_LIMIT:
  163 KiB on sm_80, 227 KiB on sm_90), else the launch fails on that GPU;
- register spills (ptxas "bytes spill stores" per thread) at most SPILL_BOUND for
  every kernel: a spill goes to local memory (L1/L2-cached DRAM) and costs the speed
  these kernels exist for. The worst today (ptxas 13, Triton 3.8): a few hundred bytes
  for the 16-bit kernels at Dh 128-256, 0.8-1.4 KB for the fp32 ones, whose tf32x3 dots
  hold a TF32 head and remainder of each operand, 1.5 KB for the fp64 dQ at Dh 256. The
  FMA-only fp32 path before spilled 16-31 KB; 2 KB catches a tile or layout regression
  of that kind and leaves room for another ptxas/Triton version to allocate registers
  a little differently.

The compiles run without TRITON_INTERPRET (interpreted kernels cannot compile), one
subprocess per architecture, side by side. fp16 is left to the full CLI run
(`python -m flipkern.triton_kernels.aot`): its kernels take bf16's tiles and MMA shape,
and compile to the same shared memory and spills (registers within 4), so it would
only double the time of this test.
"""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")
from flipkern.triton_kernels import aot  # noqa: E402

ARCHS = (80, 90)
DTYPES = ("bfloat16", "float32", "float64")
SPILL_BOUND = 2048
KERNELS = {"_fwd_kernel", "_bwd_delta_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel",  # attention
           "_bwd_rows_kernel", "_bwd_cols_kernel",  # losses (their _fwd_kernel shares the name)
           "_drop_tokens_fwd", "_drop_tokens_bwd", "_gather_patches_fwd", "_gather_patches_bwd",
           "_restore_tokens_fwd"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-m", "flipkern.triton_kernels.aot", "--arch", str(arch),
                               "--dtypes", *DTYPES],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for arch in ARCHS]
    rows = []
    for proc in procs:
        out, err = proc.communicate(timeout=3600)  # ~3 min on a quiet 2-core machine
        assert proc.returncode == 0, err[-3000:]
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    return rows


def _label(row):
    return (f"sm_{row['arch']} {row['kernel']} {row['dtype']} ({row['variant']}, warps {row['num_warps']}, "
            f"{ {k: v for k, v in row.items() if k.startswith('BLOCK')} })")


def test_every_kernel_compiles_for_every_arch_and_dtype(compiled):
    for arch in ARCHS:
        got = {(r["kernel"], r["dtype"]) for r in compiled if r["arch"] == arch}
        for dtype in ("bf16", "fp32", "fp64"):
            assert KERNELS <= {k for k, d in got if d == dtype}, (arch, dtype, sorted(got))


def test_shared_memory_fits_the_arch(compiled):
    over = [f"{_label(r)}: {r['shared']} B > {aot.SHARED_LIMIT[r['arch']]} B" for r in compiled
            if r["shared"] > aot.SHARED_LIMIT[r["arch"]]]
    assert not over, "\n".join(over)


def test_register_spills_within_bound(compiled):
    over = [f"{_label(r)}: {r['spill_stores']} B spill stores, {r['spill_loads']} B spill loads "
            f"({r['registers']} registers) > {SPILL_BOUND} B" for r in compiled if r["spill_stores"] > SPILL_BOUND]
    assert not over, "\n".join(over)


def test_attention_scale_is_an_fp64_argument(compiled):
    # Triton passes a plain Python float as fp32, which would round the fp64 kernels' scale.
    scales = {(r["kernel"], r["dtype"]): r["float_args"] for r in compiled if "qk_scale" in r["float_args"]}
    assert {k for k, _ in scales} == {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"}
    assert all(set(args.values()) == {"fp64"} for args in scales.values()), scales
