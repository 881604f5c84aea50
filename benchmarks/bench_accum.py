"""Contrastive batch vs memory and img/s: accumulation with full-batch negatives
(flipkern.contrastive_backward) at a fixed micro-batch, with and without
per-block activation checkpointing.

One optimizer step (both passes, the chunked loss over the whole contrastive
batch, AdamW) of the ViT-Ti/16 preset (224 px, 196 patches, FLIP mask 0.75,
captions of realistic lengths, benchmarks/caption_lengths.py), fast path, fp32, each case in its own process: peak RSS
(whole process: Python, torch, model, AdamW state, activations, features) and
img/s over all the samples of the step. Each micro-batch's inputs are made
when the step reads them (a Sequence that generates them from their index), so
memory is the model's, not a tensor of every image of the step: a training
loop that holds the step's images holds 3*224*224*4 B = 588 KiB more per sample
(flipkern-pretrain and open_clip's --accum-freq both do).

    python benchmarks/bench_accum.py --threads 1 --micro-batch 8 --accum 1 4 16 64 \\
        --checkpointing off --json benchmarks/results/accum_off.json      # and "on" -> accum_on.json
    python benchmarks/bench_accum.py --threads 1 --model tiny --micro-batch 128 --accum 1 128 \\
        --checkpointing on --json benchmarks/results/accum_largest_tiny.json   # contrastive batch 16,384

--threads 1 on a shared machine: with 2 threads and other jobs on the cores, the
OpenMP threads spin-wait, and the CPU time counted the waiting (ten times the work here).
"""
import argparse
import collections.abc
import concurrent.futures as cf
import dataclasses
import json
import multiprocessing
import os
import sys
import time

import torch

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:  # not again in front: a test importing this must keep tests/ (its conftest) first
    sys.path.insert(0, _HERE)
from bench_e2e import _rss_bytes, make_data  # noqa: E402


class MicroBatches(collections.abc.Sequence):
    """accum micro-batches of ``batch`` samples, each generated on access from its index
    (the same tensors every time: contrastive_backward reads each one twice)."""

    def __init__(self, cfg, batch, accum, mask, captions):
        self.cfg, self.batch, self.accum, self.mask, self.captions = cfg, batch, accum, mask, captions

    def __len__(self):
        return self.accum

    def __getitem__(self, i):
        from flipkern.reference import masking as rmask
        i = i + self.accum if i < 0 else i
        if not 0 <= i < self.accum:
            raise IndexError(i)
        images, tokens, _ = make_data(self.cfg, self.batch, self.captions, "cpu", seed=i)
        g = torch.Generator().manual_seed(1_000_000 + i)
        ids = rmask.random_keep_indices(self.batch, self.cfg.vision.num_patches, keep_ratio=1 - self.mask,
                                        generator=g)
        return images, tokens, ids


def measure(case, args):
    import flipkern as fk
    from flipkern import fastpath
    from flipkern.reference import clip as rclip
    torch.set_num_threads(args["threads"])
    cfg = dataclasses.replace(rclip.PRESETS[args["model"]], loss=args["loss"])
    torch.manual_seed(0)
    model = rclip.CLIP(cfg)
    model.set_grad_checkpointing(case["checkpointing"])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def forward(images, tokens, ids_keep):
        return fastpath.clip_forward(model, images, tokens, ids_keep)

    def loss_fn(out):
        return fastpath.contrastive_loss(model, out)

    micro = MicroBatches(cfg, case["micro_batch"], case["accum"], args["mask"], args["captions"])
    # warm-up: one micro-batch step (allocator, thread pools, kernels' first calls)
    fk.contrastive_backward(forward, [micro[0]], loss_fn)
    opt.zero_grad(set_to_none=True)
    rss_before = _rss_bytes()
    load_before = os.getloadavg()
    t0, c0 = time.perf_counter(), time.process_time()
    loss, _ = fk.contrastive_backward(forward, micro, loss_fn)
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    n = case["micro_batch"] * case["accum"]
    return dict(case, contrastive_batch=n, step_s=step_s, cpu_s=cpu_s, img_per_s=n / step_s,
                img_per_cpu_s=n / cpu_s, loss=loss.item(), peak_rss_bytes=_rss_bytes(),
                rss_before_step_bytes=rss_before, load_before=load_before, load_after=os.getloadavg(),
                threads=torch.get_num_threads(), backends=fastpath.backends_used())


def _measure_in_child(case, args):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if repo not in sys.path:
        sys.path.insert(0, repo)
    return measure(case, args)


def table(results):
    lines = ["| micro-batch x accum = contrastive batch | checkpointing | peak RSS | step | img/s | img/CPU-s | load |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['micro_batch']} x {r['accum']} = {r['contrastive_batch']} | "
                     f"{'on' if r['checkpointing'] else 'off'} | {r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                     f"{r['step_s']:.1f} s | {r['img_per_s']:.1f} | {r['img_per_cpu_s']:.1f} | "
                     f"{r['load_before'][0]:.0f} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="ViT-Ti/16")
    p.add_argument("--loss", default="clip", choices=["clip", "siglip"])
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--accum", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument("--mask", type=float, default=0.75)
    p.add_argument("--captions", default="realistic", help="caption length kind (benchmarks/caption_lengths.py)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    args = dict(model=a.model, loss=a.loss, mask=a.mask, captions=a.captions, threads=a.threads,
                precision="fp32", device="cpu")
    results = []
    for ckpt in a.checkpointing:
        for accum in a.accum:
            case = dict(micro_batch=a.micro_batch, accum=accum, checkpointing=ckpt == "on")
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
                r = pool.submit(_measure_in_child, case, args).result()
            results.append(r)
            print(table([r]).splitlines()[-1], flush=True)
    print(table(results))
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(dict(command="python benchmarks/bench_accum.py " + " ".join(argv or sys.argv[1:]),
                           config=args, torch=torch.__version__, cpus=os.cpu_count(), results=results),
                      f, indent=2)
    return results


if __name__ == "__main__":
    main()
