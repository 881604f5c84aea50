"""Peak memory of one contrastive-loss forward + backward, measured honestly.

CPU: in a fresh subprocess, after the inputs exist and one tiny warm-up call has
loaded the extension and started the thread pool, we reset the kernel's resident
set high-water mark (writing 5 to /proc/self/clear_refs sets VmHWM to the current
VmRSS), run fwd+bwd once and read VmHWM from /proc/self/status: every page the
allocator actually touched counts. Peak minus the RSS before the call is the extra
memory the loss needed, its gradients included. (Not getrusage's ru_maxrss: Linux
carries it over fork + exec, so a subprocess of a big parent starts with the
parent's peak.)
CUDA: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus what
was allocated before the call (in-process: the CUDA caching allocator's stats are
exact and per process).

As a script it is the check that flipkern's clip_loss completes at a batch the
naive loss cannot hold, within a memory limit:
    python benchmarks/loss_memory.py --batch 65536 --limit-gb 24
exits non-zero if the process peak exceeds the limit (or the run fails).
"""
import argparse
import json
import os
import subprocess
import sys
import time

IMPLS = ("flipkern", "torch-naive", "reference")


def make_step(impl, batch, dim, device, dtype):
    """(fn that runs fwd+bwd once, the tensors it uses)."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator(device="cpu").manual_seed(0)
    img = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device, dtype).requires_grad_()
    txt = F.normalize(torch.randn(batch, dim, generator=g), dim=-1).to(device, dtype).requires_grad_()
    scale = torch.tensor(14.0, device=device, requires_grad=True)

    if impl == "flipkern":
        import flipkern as fk

        def loss():
            return fk.clip_loss(img, txt, scale)
    elif impl == "reference":
        from flipkern.reference import losses as ref

        def loss():
            return ref.clip_loss(img, txt, scale)
    elif impl == "torch-naive":
        # open_clip's ClipLoss on one process: one logits matrix, its transpose for the
        # text->image direction, F.cross_entropy both ways.
        labels = torch.arange(batch, device=device)

        def loss():
            logits = scale * img @ txt.t()
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
    else:
        raise ValueError(f"unknown impl {impl!r}")

    def step():
        torch.autograd.grad(loss(), (img, txt, scale))
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()

    return step


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _child(impl, batch, dim):
    """Runs in the fresh subprocess: prints {"peak_delta_bytes", "peak_bytes", "seconds"}
    (peak_bytes: the whole process's peak RSS during the call)."""
    import torch
    make_step(impl, 8, dim, "cpu", torch.float32)()  # load the extension, start the threads
    step = make_step(impl, batch, dim, "cpu", torch.float32)
    before = _status_bytes("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = _status_bytes("VmHWM")
    print(json.dumps({"peak_delta_bytes": peak - before, "peak_bytes": peak, "seconds": seconds}))


def cpu_peak(impl, batch, dim):
    """Peak RSS increase (bytes) of one fwd+bwd on CPU, measured in a fresh subprocess."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--impl", impl,
                          "--batch", str(batch), "--dim", str(dim)],
                         capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{impl} B={batch}: the measuring subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def cuda_peak(step):
    """Peak extra CUDA memory (bytes) of one call of step()."""
    import torch
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    return torch.cuda.max_memory_allocated() - base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--impl", default="flipkern", choices=IMPLS)
    p.add_argument("--batch", type=int, default=65536)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--limit-gb", type=float, default=24.0, help="fail above this process peak")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        _child(a.impl, a.batch, a.dim)
        return 0
    r = cpu_peak(a.impl, a.batch, a.dim)
    print(f"{a.impl} clip_loss fwd+bwd, B={a.batch}, D={a.dim}, float32, CPU: {r['seconds']:.1f} s, "
          f"peak RSS {r['peak_bytes'] / 2**30:.2f} GiB (+{r['peak_delta_bytes'] / 2**30:.2f} GiB for "
          f"the loss), limit {a.limit_gb} GB")
    return 0 if r["peak_bytes"] <= a.limit_gb * 1e9 else 1


if __name__ == "__main__":
    sys.exit(main())
