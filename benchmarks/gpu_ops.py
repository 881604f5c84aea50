"""Each flipkern GPU op, forward + backward, beside torch's best native way to do the same work.

    python benchmarks/gpu_ops.py --json gpu-results/gpu_ops.json          # every case, one process each
    python benchmarks/gpu_ops.py --table gpu-results/gpu_ops.json --e2e gpu-results/e2e_gpu.json

Cases (bfloat16 unless named; ViT-B/16 at 224 px with FLIP's 75% mask, CLIP text, H=12, Dh=64):
  drop_tokens     x [256, 196, 768] -> 49 kept tokens + their position rows; native:
                  torch.gather + an indexed position add
  gather_patches  images [256, 3, 224, 224] -> 49 kept 16x16 patches; native: the patch
                  view of the images (no copy) then torch.gather
  restore_tokens  [256, 49, 768] back to 196 positions, a mask token elsewhere; native:
                  expand the mask token, scatter the kept rows
  attn_vision     256 sequences of 50 tokens (49 kept + cls), full attention; native: SDPA
                  flash backend on [256, 12, 50, 64] (equal lengths: no padding to waste)
  attn_text       256 captions of 5..77 tokens (seeded), causal; native: SDPA flash backend
                  on the batch padded to 77 (is_causal), what a padded text tower runs
  attn_long       8 sequences of 2048 tokens, causal: the kernels at a length where
                  attention dominates; native: SDPA flash backend
  clip_loss       4096 pairs of 512-d float32 features (the fast path's loss dtype);
                  native: the full [4096, 4096] logits matrix and two cross-entropies
Impls: flipkern's triton and cuda backends, and native. Metrics: GB/s for the masking ops
(bytes stated in ``_bytes``; the same count for every impl), TFLOP/s of useful work for
attention (real tokens only, causal halves it, backward = 2.5x forward) and the loss
(6 B^2 D). Each (case, impl) runs in its own process; its time is the median of
triton.testing.do_bench (25 ms warm-up, 200 ms of repeats, L2 flushed between).
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

CASES = ("drop_tokens", "gather_patches", "restore_tokens", "attn_vision", "attn_text", "attn_long", "clip_loss")
IMPLS = ("triton", "cuda", "native")
NATIVE = {"drop_tokens": "torch.gather + position add", "gather_patches": "patch view + torch.gather",
          "restore_tokens": "expand + scatter", "attn_vision": "SDPA flash", "attn_text": "SDPA flash, padded to 77",
          "attn_long": "SDPA flash", "clip_loss": "full-matrix logits + cross-entropy"}

B, IMG, P, K, D = 256, 224, 16, 49, 768  # ViT-B/16 at 224 px, 75% of the 196 patches dropped
N = (IMG // P) ** 2
H, DH = 12, 64
LONG_B, LONG_L = 8, 2048
LOSS_N, LOSS_D = 4096, 512


def use_small_shapes():
    """Tiny shapes for the CPU smoke test of this script (tests/test_gpu_ops.py)."""
    global B, IMG, P, K, D, N, H, DH, LONG_B, LONG_L, LOSS_N, LOSS_D
    B, IMG, P, K, D, H, DH, LONG_B, LONG_L, LOSS_N, LOSS_D = 2, 16, 4, 5, 8, 2, 16, 1, 40, 16, 8
    N = (IMG // P) ** 2


# ----------------------------------------------------------------------------- the cases

def _masking(case, impl, device, dtype):
    """(step, bytes): forward + backward of one masking op, and the bytes it must move."""
    import flipkern as fk
    e = torch.finfo(dtype).bits // 8
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.rand(B, N, device=device, generator=g).argsort(dim=1)[:, :K].sort(dim=1).values
    if case == "gather_patches":
        images = torch.randn(B, 3, IMG, IMG, device=device, dtype=dtype, requires_grad=True)
        E, G = 3 * P * P, IMG // P
        grad = torch.randn(B, K, E, device=device, dtype=dtype)
        if impl == "native":
            def fwd():
                patches = images.view(B, 3, G, P, G, P).permute(0, 2, 4, 1, 3, 5).reshape(B, N, E)
                return patches.gather(1, ids[..., None].expand(B, K, E))
        else:
            def fwd():
                return fk.gather_patches(images, ids, P)
        leaves = (images,)
        nbytes = e * (2 * B * K * E + images.numel() + B * K * E)  # fwd read+write, bwd zero-fill + scatter
    elif case == "drop_tokens":
        x = torch.randn(B, N, D, device=device, dtype=dtype, requires_grad=True)
        pos = torch.randn(N, D, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(B, K, D, device=device, dtype=dtype)
        if impl == "native":
            def fwd():
                return x.gather(1, ids[..., None].expand(B, K, D)) + pos[ids]
        else:
            def fwd():
                return fk.drop_tokens(x, ids, pos)
        leaves = (x, pos)
        nbytes = e * (2 * B * K * D + x.numel() + B * K * D)
    else:  # restore_tokens
        x = torch.randn(B, K, D, device=device, dtype=dtype, requires_grad=True)
        fill = torch.randn(D, device=device, dtype=dtype, requires_grad=True)
        grad = torch.randn(B, N, D, device=device, dtype=dtype)
        if impl == "native":
            def fwd():
                return fill.expand(B, N, D).scatter(1, ids[..., None].expand(B, K, D), x)
        else:
            def fwd():
                return fk.restore_tokens(x, ids, N, fill)
        leaves = (x, fill)
        nbytes = e * (B * N * D + B * K * D + B * N * D)  # fwd write all + read kept, bwd read all

    def step():
        for t in leaves:
            t.grad = None
        fwd().backward(grad)
    return step, nbytes


def _attention_lengths(case):
    if case == "attn_vision":
        return torch.full((B,), K + 1), K + 1, False
    if case == "attn_text":
        g = torch.Generator().manual_seed(0)
        return torch.randint(5, 78, (B,), generator=g), 77, True
    return torch.full((LONG_B,), LONG_L), LONG_L, True  # attn_long


def _attention(case, impl, device, dtype):
    """(step, flops): forward + backward of attention over the case's sequences, its useful FLOPs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flipkern as fk
    lengths, width, causal = _attention_lengths(case)
    flops = 4 * H * DH * sum(n * n for n in lengths.tolist()) * (0.5 if causal else 1.0) * 3.5
    if impl == "native":
        shape = (lengths.shape[0], H, width, DH)  # padded to the width; flash takes no mask
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(shape, device=device, dtype=dtype)

        def fwd():
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    else:
        cu = fk.cu_seqlens_from_lengths(lengths).to(device)
        total = int(lengths.sum())
        q, k, v = (torch.randn(total, H, DH, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn(total, H, DH, device=device, dtype=dtype)

        def fwd():
            return fk.varlen_attention(q, k, v, cu, width, causal=causal)

    def step():
        q.grad = k.grad = v.grad = None
        fwd().backward(grad)
    return step, flops


def _loss(impl, device, dtype):
    import flipkern as fk
    n, d = LOSS_N, LOSS_D
    img, txt = (F.normalize(torch.randn(n, d, device=device), dim=-1).to(dtype).requires_grad_() for _ in range(2))
    scale = torch.tensor(100.0, device=device, requires_grad=True)
    labels = torch.arange(n, device=device)

    def loss():
        if impl == "native":
            logits = scale * img @ txt.t()
            return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
        return fk.clip_loss(img, txt, scale)

    def step():
        img.grad = txt.grad = scale.grad = None
        loss().backward()
    return step, 6 * n * n * d


def measure(case, impl, device="cuda"):
    """One (case, impl) in this process -> a result dict (ms, and GB/s or TFLOP/s)."""
    import flipkern as fk
    dtype = torch.float32 if case == "clip_loss" else torch.bfloat16
    if case.startswith("attn"):
        step, flops = _attention(case, impl, device, dtype)
        work = dict(metric="TFLOP/s", amount=flops / 1e12)
    elif case == "clip_loss":
        step, flops = _loss(impl, device, dtype)
        work = dict(metric="TFLOP/s", amount=flops / 1e12)
    else:
        step, nbytes = _masking(case, impl, device, dtype)
        work = dict(metric="GB/s", amount=nbytes / 1e9)
    if impl == "native":
        ms = _time_ms(step, device)
    else:
        with fk.use_backend(impl):
            ms = _time_ms(step, device)
    return dict(case=case, impl=impl, dtype=str(dtype).replace("torch.", ""), ms=ms, metric=work["metric"],
                value=work["amount"] / (ms / 1e3), native=NATIVE[case] if impl == "native" else None)


def _time_ms(step, device):
    if device == "cuda":
        from triton.testing import do_bench
        return do_bench(step, warmup=25, rep=200, return_mode="median")
    step()  # CPU: one warm call, then the median of a few (the test suite's smoke run)
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[1]


# ----------------------------------------------------------------------------- the table

def _e2e_rows(e2e):
    """(mask, fast_ms, open_clip_ms) from bench_e2e's JSON: its per-case summary (step_s_min)."""
    by = {}
    for s in e2e.get("summary", []):
        by[(s["case"], s["mask"])] = s["step_s_min"] * 1e3
    out = []
    for mask in sorted({m for _, m in by}):
        if ("fast", mask) in by and ("open_clip", mask) in by:
            out.append((mask, by[("fast", mask)], by[("open_clip", mask)], by.get(("open_clip+fk", mask))))
    return out


def table(results, e2e=None):
    """Markdown: each op's flipkern backends beside native, and the e2e fast path vs open_clip stock."""
    by = {(r["case"], r["impl"]): r for r in results}
    lines = ["| op | dtype | triton | cuda (C++) | torch native | native way | best flipkern / native |",
             "|---|---|---|---|---|---|---|"]
    for case in CASES:
        rows = {impl: by.get((case, impl)) for impl in IMPLS}
        if not any(rows.values()):
            continue
        dtype = next((r["dtype"] for r in rows.values() if r and "dtype" in r), "?")
        cells = []
        for impl in IMPLS:
            r = rows[impl]
            cells.append(f"{r['value']:.1f} {r['metric']} ({r['ms']:.3f} ms)" if r and "value" in r
                         else (f"failed: {r['error']}" if r else "n/a"))
        fk_vals = [rows[i]["value"] for i in ("triton", "cuda") if rows[i] and "value" in rows[i]]
        nat = rows["native"]
        ratio = f"{max(fk_vals) / nat['value']:.2f}x" if fk_vals and nat and "value" in nat else "n/a"
        lines.append(f"| {case} | {dtype} | {' | '.join(cells)} | {NATIVE[case]} | {ratio} |")
    if e2e is not None:
        lines += ["", "| end to end (bf16 train step) | mask | flipkern fast path | open_clip stock | "
                  "open_clip + apply_to_open_clip | fast / stock speedup |", "|---|---|---|---|---|---|"]
        rows = _e2e_rows(e2e)
        for mask, fast, stock, patched in rows:
            pat = f"{patched:.1f} ms" if patched is not None else "n/a"
            lines.append(f"| step time (min) | {mask} | {fast:.1f} ms | {stock:.1f} ms | {pat} | {stock / fast:.2f}x |")
        if not rows:
            lines.append("| (no fast and open_clip cases in the e2e JSON) | | | | | |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main

def _run_case(case, impl, device, small=False):
    """Run one case in a fresh process; a failure becomes an ``error`` entry, not a crash."""
    cmd = [sys.executable, os.path.abspath(__file__), "--one", case, impl, "--device", device]
    cmd += ["--small"] if small else []
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
        return dict(case=case, impl=impl, error=tail[0][:300])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", help="measure every case and write the results here")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--one", nargs=2, metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--small", action="store_true", help=argparse.SUPPRESS)  # the CPU smoke test's shapes
    p.add_argument("--table", metavar="JSON", help="print the table of a results JSON")
    p.add_argument("--e2e", metavar="JSON", help="with --table: bench_e2e's JSON for the end-to-end rows")
    a = p.parse_args(argv)
    if a.small:
        use_small_shapes()
    if a.one:
        print(json.dumps(measure(*a.one, device=a.device)))
        return 0
    if a.table:
        results = json.load(open(a.table))["results"]
        e2e = json.load(open(a.e2e)) if a.e2e and os.path.exists(a.e2e) else None
        print(table(results, e2e))
        return 1 if any("error" in r for r in results) else 0
    results = []
    for case in a.cases:
        for impl in a.impls:
            r = _run_case(case, impl, a.device, a.small)
            results.append(r)
            print(json.dumps(r), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name() if a.device == "cuda" else a.device,
                           torch=torch.__version__, results=results), f, indent=2)
    print(table(results))
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
