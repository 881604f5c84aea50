"""End-to-end CLIP training-step throughput: the fast path vs the reference vs PyTorch-native.

One training step = forward, contrastive loss, backward, AdamW step, on a
ViT-Ti/16 @ 224 image tower + 6-layer width-256 text tower (the "ViT-Ti/16"
preset), 77-token context, captions of ~16 real tokens, at FLIP mask ratios
0 / 0.5 / 0.75. Three ways to run the same model (same parameters, same data):

  fast       flipkern.fastpath: gather_patches + GEMM on the kept patches with the
             position add fused, fused attention over the K kept tokens, packed
             text (no padding) with causal varlen attention, chunked loss.
  native     the best PyTorch-native way: conv patch embedding over every patch
             then torch.gather, SDPA everywhere, text padded to 77 (is_causal),
             the full-matrix loss (what open_clip computes).
  reference  the reference model as written (flipkern.reference.clip).

Each (path, mask) runs in its own spawned process so that peak memory is its
own: peak RSS on CPU (whole process: Python, torch, model, optimizer state and
activations; "act" is the growth over the RSS before the first step), the
CUDA allocator's peak on CUDA.

    python benchmarks/bench_e2e.py --json e2e.json        # the full run (quiet machine)
    python benchmarks/bench_e2e.py --batch 8 --steps 1 --warmup 1 --masks 0.75   # a sanity run
    python benchmarks/plot_e2e.py e2e.json --png e2e.png
"""
import argparse
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import sys
import time

import torch

PATHS = ("fast", "native", "reference")


# ----------------------------------------------------------------------------- the three paths

def native_forward(model, images, tokens, ids_keep):
    """SDPA everywhere, padded text, conv patch embedding of every patch then a gather."""
    from flipkern.blocks import dense_block_forward
    from flipkern.reference.text import eot_positions
    v, t = model.visual, model.text
    x = v.with_cls(v.embed(images, ids_keep))  # conv over all N patches, + pos, torch.gather
    for block in v.blocks:
        x = dense_block_forward(block, x)
    img = v.pool(x)
    y = t.embed(tokens)  # [B, 77, width]: padding included
    for block in t.blocks:
        y = dense_block_forward(block, y, causal=True)
    y = t.ln_final(y)
    txt = t.proj(y[torch.arange(y.shape[0], device=y.device), eot_positions(tokens, t.cfg.eot_id)])
    return model.head(img, txt)


def make_step(path, model):
    from flipkern import fastpath

    if path == "fast":
        def forward_loss(images, tokens, ids):
            return fastpath.contrastive_loss(model, fastpath.clip_forward(model, images, tokens, ids, fast=True),
                                             fast=True)
    elif path == "native":
        def forward_loss(images, tokens, ids):
            return model.loss(native_forward(model, images, tokens, ids))  # the full [B, B] logits
    elif path == "reference":
        def forward_loss(images, tokens, ids):
            return model.loss(model(images, tokens, ids_keep=ids))
    else:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    return forward_loss


# ----------------------------------------------------------------------------- one measurement

def make_data(cfg, batch, caption_tokens, device, seed=0):
    """Random images and captions of ~caption_tokens real tokens (sot .. eot), padded to the context."""
    g = torch.Generator().manual_seed(seed)
    v, t = cfg.vision, cfg.text
    images = torch.randn(batch, v.channels, v.image_size, v.image_size, generator=g)
    tokens = torch.zeros(batch, t.context_length, dtype=torch.int64)
    spread = max(1, caption_tokens // 4)
    lengths = torch.randint(caption_tokens - spread, caption_tokens + spread + 1, (batch,), generator=g)
    for b, n in enumerate(lengths.clamp(2, t.context_length).tolist()):
        tokens[b, 0] = t.eot_id - 1  # sot
        tokens[b, 1:n - 1] = torch.randint(1, t.eot_id - 1, (n - 2,), generator=g)
        tokens[b, n - 1] = t.eot_id
    return images.to(device), tokens.to(device), lengths


def _rss_bytes():
    # ru_maxrss: KiB on Linux, bytes on macOS
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if platform.system() == "Darwin" else r * 1024


def measure(path, mask, args):
    """img/s and peak memory of training steps of one path at one mask ratio."""
    from flipkern.reference import clip as rclip
    from flipkern.reference import masking as rmask
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    cfg = dataclasses.replace(rclip.PRESETS[args["model"]], loss=args["loss"])
    torch.manual_seed(0)
    model = rclip.CLIP(cfg).to(device)
    # fused AdamW for every path (CPU too: ~7x faster than foreach on CPU for this model),
    # so the fixed per-step cost does not flatter or hide any path
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    B = args["batch"]
    images, tokens, lengths = make_data(cfg, B, args["caption_tokens"], device)
    N = cfg.vision.num_patches
    g = torch.Generator().manual_seed(1)
    forward_loss = make_step(path, model)
    precision = args["precision"]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def step():
        ids = None if mask == 0 else rmask.random_keep_indices(B, N, keep_ratio=1 - mask, generator=g).to(device)
        with autocast:
            loss = forward_loss(images, tokens, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss_before = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args["warmup"]):
        step()
    sync()
    times, cpu = [], []
    for _ in range(args["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    median = sorted(times)[len(times) // 2]
    cpu_median = sorted(cpu)[len(cpu) // 2]
    # process CPU time: with --threads 1 on a busy machine it counts only the time this
    # process ran, a steadier yardstick than the wall clock (which is what --threads 0 measures)
    out = dict(path=path, mask=mask, img_per_s=B / median, step_s=median, step_s_all=times,
               cpu_s=cpu_median, img_per_cpu_s=B / cpu_median,
               loss=loss.item(), batch=B, caption_tokens_mean=float(lengths.float().mean()),
               device=device.type, precision=precision, threads=torch.get_num_threads())
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["peak_mem_bytes"] = _rss_bytes()
        out["peak_mem_growth_bytes"] = _rss_bytes() - rss_before
    if path == "fast":
        from flipkern import fastpath
        out["backends"] = fastpath.backends_used()
    return out


def _measure_in_child(path, mask, args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    return measure(path, mask, args)


# ----------------------------------------------------------------------------- report

def ratios(results, key="img_per_s"):
    """The issue's goals: fast vs native unmasked, and fast vs native at the same mask."""
    by = {(r["path"], r["mask"]): r[key] for r in results}
    out = {}
    base = by.get(("native", 0.0))
    for (path, mask), ips in sorted(by.items()):
        if path != "fast":
            continue
        if base and mask != 0:
            out[f"fast@{mask} / native@0"] = ips / base
        if ("native", mask) in by:
            out[f"fast@{mask} / native@{mask}"] = ips / by[("native", mask)]
        if ("reference", mask) in by:
            out[f"fast@{mask} / reference@{mask}"] = ips / by[("reference", mask)]
    return out


GOALS = {"fast@0.5 / native@0": 2.0, "fast@0.75 / native@0": 3.5,
         "fast@0.5 / native@0.5": 1.3, "fast@0.75 / native@0.75": 1.3}


def table(results):
    lines = ["| path | mask | img/s | step | CPU time/step | peak mem |", "|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["mask"], PATHS.index(r["path"]))):
        mem = f"{r['peak_mem_bytes'] / 2**20:.0f} MiB"
        if "peak_mem_growth_bytes" in r:
            mem += f" (act {r['peak_mem_growth_bytes'] / 2**20:.0f} MiB)"
        lines.append(f"| {r['path']} | {r['mask']} | {r['img_per_s']:.1f} | {r['step_s'] * 1e3:.0f} ms | "
                     f"{r['cpu_s'] * 1e3:.0f} ms | {mem} |")
    lines += ["", "| ratio | wall clock | CPU time | goal |", "|---|---|---|---|"]
    by_cpu = ratios(results, "img_per_cpu_s")
    for name, value in ratios(results).items():
        goal = GOALS.get(name)
        verdict = "" if goal is None else f">= {goal}x (wall: {'met' if value >= goal else 'NOT met'})"
        lines.append(f"| {name} | {value:.2f}x | {by_cpu[name]:.2f}x | {verdict} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-Ti/16")
    p.add_argument("--loss", default="clip", choices=["clip", "siglip"])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--caption-tokens", type=int, default=16, help="mean real tokens per caption (sot..eot)")
    p.add_argument("--masks", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                   help="default: fp32 on CPU, bf16 autocast on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--same-process", action="store_true", help="no child process per case (peak memory is shared)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    args = dict(model=a.model, loss=a.loss, batch=a.batch, caption_tokens=a.caption_tokens, steps=a.steps,
                warmup=a.warmup, device=a.device, precision=a.precision or ("bf16" if a.device == "cuda" else "fp32"),
                threads=a.threads)
    cases = [(path, mask) for mask in a.masks for path in a.paths]
    results = []
    for path, mask in cases:
        if a.same_process:
            r = measure(path, mask, args)
        else:
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                r = pool.submit(_measure_in_child, path, mask, args).result()
        results.append(r)
        print(f"{path:>9} mask={mask:<4} {r['img_per_s']:8.1f} img/s  step {r['step_s'] * 1e3:7.0f} ms  "
              f"peak {r['peak_mem_bytes'] / 2**20:6.0f} MiB", flush=True)
    print()
    print(table(results))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(config=args, torch=torch.__version__, results=results, ratios=ratios(results),
                           ratios_cpu_time=ratios(results, "img_per_cpu_s")), f, indent=2)
    return results


if __name__ == "__main__":
    main()
