"""End-to-end CLIP training-step time: flipkern vs open_clip stock, the best native PyTorch, the reference.

One training step = forward, contrastive loss, backward, fused AdamW step, on a
ViT-Ti/16 @ 224 image tower + 6-layer width-256 text tower (the "ViT-Ti/16"
preset), 77-token context, at FLIP mask ratios 0 / 0.5 / 0.75. Five cases in
two pairs of the same model, same masks, same data, same optimizer:

  open_clip      open_clip stock: open_clip.CLIP (vision_cfg / text_cfg equal to the
                 preset, pretrained=None) with PatchDropout(mask), ClipLoss. What
                 users run today: conv over all 196 patches, then drop; text padded
                 to 77 with the causal mask; the full-matrix loss.
  open_clip+fk   the same model after flipkern.apply_to_open_clip(model, loss).
  fast           flipkern.fastpath on the reference model (flipkern.reference.clip).
  native         the same reference model in plain PyTorch as a strong engineer would
                 write it: text cut to the batch's longest caption with causal SDPA
                 (is_causal=True), kept patches gathered before a linear embedding,
                 SDPA everywhere, the full-matrix loss with its logits computed once.
  reference      the reference model as written.

Masks: every case draws step i's mask from a generator seeded with i (open_clip's
PatchDropout draws from the default generator, seeded the same), so all cases run
the same masks. Captions: caption_lengths.py ("realistic" is a stated, assumed
lognormal model with a median of 14 tokens and ~3% at 77).

Each (case, mask) runs in its own spawned process; the list of processes runs
--repeats times, interleaved (every repeat runs each case once, in a rotated
order), so a load spike on a shared machine hits every case alike. Per case:
min / median of all timed steps (wall clock and process CPU time), peak memory,
and (first repeat) the FLOPs of one step counted by torch.utils.flop_counter
with formulas for SDPA's CPU kernel and flipkern's ops (flops.py), and with
--profile the top ops of one step by self CPU time.

bf16 (--dtype bfloat16): autocast around forward and loss, fp32 parameters and AdamW.

    python benchmarks/bench_e2e.py --json benchmarks/results/e2e_cpu.json          # the full run
    python benchmarks/bench_e2e.py --device cuda --dtype bfloat16 --json e2e_gpu.json
    python benchmarks/bench_e2e.py --batch 8 --steps 1 --repeats 1 --masks 0.75    # a sanity run
    python benchmarks/report.py --e2e benchmarks/results/e2e_cpu.json
"""
import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import caption_lengths  # noqa: E402
import flops  # noqa: E402
import run_info  # noqa: E402
from native import native_clip_loss, native_forward  # noqa: E402

CASES = ("fast", "native", "reference", "open_clip", "open_clip+fk")
# (flipkern case, baseline case): the ratios the report shows, each within one model
PAIRS = (("open_clip+fk", "open_clip"), ("fast", "native"), ("fast", "reference"))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# ----------------------------------------------------------------------------- the five cases

def open_clip_model(cfg, mask):
    """open_clip.CLIP with the towers of a reference preset and PatchDropout(mask); pretrained=None."""
    import open_clip
    v, t = cfg.vision, cfg.text
    vision_cfg = dict(image_size=v.image_size, patch_size=v.patch_size, width=v.width, layers=v.depth,
                      head_width=v.width // v.heads, mlp_ratio=v.mlp_ratio, patch_dropout=mask)
    text_cfg = dict(context_length=t.context_length, vocab_size=t.vocab_size, width=t.width, heads=t.heads,
                    layers=t.depth, mlp_ratio=t.mlp_ratio)
    return open_clip.CLIP(embed_dim=cfg.embed_dim, vision_cfg=vision_cfg, text_cfg=text_cfg, output_dict=True)


def build(case, cfg, mask, device):
    """(model, forward_loss(images, tokens, step_index)) of one case; every case draws the same masks."""
    from flipkern import fastpath
    from flipkern.reference import clip as rclip
    from flipkern.reference import masking as rmask
    if case not in CASES:
        raise ValueError(f"case must be one of {CASES}, got {case!r}")
    torch.manual_seed(0)
    if case.startswith("open_clip"):
        import open_clip
        model = open_clip_model(cfg, mask).to(device).train()
        loss_fn = open_clip.ClipLoss()
        if case == "open_clip+fk":
            import flipkern
            report = flipkern.apply_to_open_clip(model, loss_fn)
            if set(report.values()) != {"flipkern"}:
                raise RuntimeError(f"apply_to_open_clip left parts unpatched: {report}")

        def forward_loss(images, tokens, i):
            torch.manual_seed(i)  # PatchDropout's torch.randn(B, N).topk draw
            out = model(images, tokens)
            return loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        return model, forward_loss

    model = rclip.CLIP(cfg).to(device)
    g = torch.Generator()

    def keep(B, i):
        if mask == 0:
            return None
        g.manual_seed(i)
        return rmask.random_keep_indices(B, cfg.vision.num_patches, keep_ratio=1 - mask, generator=g).to(device)

    if case == "fast":
        def forward_loss(images, tokens, i):
            out = fastpath.clip_forward(model, images, tokens, keep(images.shape[0], i), fast=True)
            return fastpath.contrastive_loss(model, out, fast=True)
    elif case == "native":
        def forward_loss(images, tokens, i):
            return native_clip_loss(native_forward(model, images, tokens, keep(images.shape[0], i)))
    else:
        def forward_loss(images, tokens, i):
            return model.loss(model(images, tokens, ids_keep=keep(images.shape[0], i)))
    return model, forward_loss


# ----------------------------------------------------------------------------- one process

def make_data(cfg, batch, captions, device, seed=0):
    """Random images and captions whose lengths follow caption_lengths.caption_lengths(captions)."""
    g = torch.Generator().manual_seed(seed)
    v, t = cfg.vision, cfg.text
    images = torch.randn(batch, v.channels, v.image_size, v.image_size, generator=g)
    lengths = caption_lengths.caption_lengths(captions, batch, t.context_length, generator=g)
    tokens = caption_lengths.tokens_from_lengths(lengths, t.context_length, t.eot_id, generator=g)
    return images.to(device), tokens.to(device), lengths


def _rss_bytes():
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r if platform.system() == "Darwin" else r * 1024


def top_ops(step, n=12):
    """[(op, self CPU seconds, calls)] of one step, the n largest (torch.profiler)."""
    from torch.profiler import profile
    with profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:n]
    return [(e.key, e.self_cpu_time_total / 1e6, e.count) for e in rows]


def measure(case, mask, args, count=True):
    """Step times (wall, CPU), peak memory and, when count, FLOPs (and the profile) of one case."""
    from flipkern.reference import clip as rclip
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    device = torch.device(args["device"])
    cfg = rclip.PRESETS[args["model"]]
    model, forward_loss = build(case, cfg, mask, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # fused on CPU too, every case
    images, tokens, lengths = make_data(cfg, args["batch"], args["captions"], device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args["dtype"] == "bfloat16")
    counter = iter(range(10**9))

    def step():
        with autocast:
            loss = forward_loss(images, tokens, next(counter) % args["masks_per_run"])
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
    wall, cpu = [], []
    for _ in range(args["steps"]):
        t0, c0 = time.perf_counter(), time.process_time()
        loss = step()
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = dict(case=case, mask=mask, step_s=wall, cpu_s=cpu, loss=loss.item(), threads=torch.get_num_threads(),
               caption_tokens_mean=float(lengths.float().mean()), caption_tokens_max=int(lengths.max()))
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated()
    else:
        out["peak_mem_bytes"] = _rss_bytes()
        out["peak_mem_growth_bytes"] = _rss_bytes() - rss_before
    if count:
        out["flops"], out["flops_by_op"] = flops.count_flops(step)
        if args["profile"]:
            out["top_ops"] = top_ops(step)
    if case in ("fast", "open_clip+fk"):
        from flipkern import fastpath
        out["backends"] = fastpath.backends_used()
    return out


def _measure_in_child(case, mask, args, count):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    return measure(case, mask, args, count)


# ----------------------------------------------------------------------------- summary

def summarize(runs):
    """Per (case, mask): the timed steps of every repeat pooled, min and median."""
    out = {}
    for r in runs:
        s = out.setdefault((r["case"], r["mask"]), dict(case=r["case"], mask=r["mask"], step_s=[], cpu_s=[]))
        s["step_s"] += r["step_s"]
        s["cpu_s"] += r["cpu_s"]
        for k in ("flops", "flops_by_op", "top_ops", "backends", "peak_mem_bytes", "peak_mem_growth_bytes",
                  "caption_tokens_mean", "caption_tokens_max", "threads"):
            if k in r and k not in s:
                s[k] = r[k]
    for s in out.values():
        for k in ("step_s", "cpu_s"):
            s[k + "_min"], s[k + "_median"] = min(s[k]), statistics.median(s[k])
    return sorted(out.values(), key=lambda s: (s["mask"], CASES.index(s["case"])))


def ratios(summary):
    """[{name, mask, time_min, time_median, cpu_min, flops}]: baseline over flipkern (> 1: flipkern
    faster) for each pair of PAIRS at the same mask, and FLIP's own masking gain native@m / native@0."""
    by = {(s["case"], s["mask"]): s for s in summary}

    def row(name, mask, slow, fast):
        r = dict(name=name, mask=mask, time_min=slow["step_s_min"] / fast["step_s_min"],
                 time_median=slow["step_s_median"] / fast["step_s_median"],
                 cpu_min=slow["cpu_s_min"] / fast["cpu_s_min"])
        if slow.get("flops") and fast.get("flops"):
            r["flops"] = slow["flops"] / fast["flops"]
        return r

    out = []
    for mask in sorted({s["mask"] for s in summary}):
        for fast, base in PAIRS:
            if (fast, mask) in by and (base, mask) in by:
                out.append(row(f"{fast} / {base}", mask, by[(base, mask)], by[(fast, mask)]))
        if mask != 0 and ("native", 0.0) in by and ("native", mask) in by:
            out.append(row("FLIP masking: native@mask / native@0", mask, by[("native", 0.0)], by[("native", mask)]))
    return out


def _save(path, info, args, repeats, runs):
    """The JSON document of the runs so far (written to path when given)."""
    info = dict(info, loadavg_end=run_info.load_average())
    summary = summarize(runs)
    data = dict(run=info, config=args, repeats=repeats, repeats_done=1 + max(r["repeat"] for r in runs),
                summary=summary, ratios=ratios(summary), runs=runs)
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=1)
    return data


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-Ti/16")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--captions", default="realistic", help="caption length kind (caption_lengths.py)")
    p.add_argument("--masks", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--steps", type=int, default=3, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds of one process per case")
    p.add_argument("--masks-per-run", type=int, default=8, help="step i uses the mask seeded with i %% this")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="default: float32 on CPU, bfloat16 (autocast) on CUDA")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--profile", action="store_true", help="record each case's top ops (one step, first repeat)")
    p.add_argument("--jobs", type=int, default=1,
                   help="cases run at once, each in its own process (a shared machine: use --threads 1 and "
                        "read the CPU-time columns)")
    p.add_argument("--same-process", action="store_true", help="no child process per case (tests)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    args = dict(model=a.model, batch=a.batch, captions=a.captions, steps=a.steps, warmup=a.warmup,
                device=a.device, dtype=a.dtype or ("bfloat16" if a.device == "cuda" else "float32"),
                threads=a.threads, profile=a.profile, masks_per_run=a.masks_per_run)
    caption_lengths.caption_lengths(a.captions, 1)  # refuse an unknown kind before spawning anything
    info = run_info.run_info()
    cases = [(case, mask) for mask in a.masks for case in a.cases]
    runs = []

    def done(r):
        runs.append(r)
        print(f"[{r['repeat']}] {r['case']:>13} mask={r['mask']:<4} step min {min(r['step_s']) * 1e3:6.0f} ms  "
              f"cpu {min(r['cpu_s']) * 1e3:6.0f} ms", flush=True)
        _save(a.json, info, args, a.repeats, runs)  # after every process: a cut-short run keeps its data

    # every repeat runs each case once, in a rotated order
    tasks = [(case, mask, rep) for rep in range(a.repeats)
             for case, mask in cases[rep % len(cases):] + cases[:rep % len(cases)]]
    if a.same_process:
        for case, mask, rep in tasks:
            done(dict(measure(case, mask, args, rep == 0), repeat=rep))
    else:
        # a fresh spawned process per case (max_tasks_per_child=1); --jobs of them at once
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=a.jobs, mp_context=ctx, max_tasks_per_child=1) as pool:
            futures = {pool.submit(_measure_in_child, case, mask, args, rep == 0): rep for case, mask, rep in tasks}
            for f in cf.as_completed(futures):
                done(dict(f.result(), repeat=futures[f]))
    data = _save(a.json, info, args, a.repeats, runs)
    import report
    print()
    print(report.e2e_tables(data))
    return data


if __name__ == "__main__":
    main()
