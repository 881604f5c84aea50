"""open_clip timm-tower training-step throughput: flipkern.apply_to_open_clip vs stock open_clip.

One training step = forward (open_clip's own ``model(images, text)``), the model's
loss (SigLipLoss when it has a logit bias, else ClipLoss), backward, AdamW step, on
--model, by default ViT-B-16-SigLIP (timm vit_base_patch16_siglip_224
image tower, width 768, 224 px, 16 px patches; its 64-token bidirectional text
tower, width 768) with both towers cut to --layers layers so that a step fits
this CPU. Captions have 16 real tokens (or --captions realistic: caption_lengths.py's
lengths, capped at the 64-token context) padded to 64 with the pad id, as SigLIP's
tokenizer writes them (the stock text tower attends over all 64, and so does the
patched model by default: packing them away would change SigLIP's output).

EVA02-B-16 (timm eva02_base_patch16_clip_224 image tower, width 768, rotary
embedding, SwiGLU; 77-token causal CLIP text tower, width 512) runs with
--captions realistic: caption lengths from caption_lengths.py, captions
[sot, words, eot, 0...] as open_clip's tokenizer writes them.

  stock     open_clip as users run it: timm's PatchDropout (conv over every patch,
            then the draw), timm's blocks with fused SDPA, open_clip's SigLipLoss.
  flipkern  the same model after flipkern.apply_to_open_clip(model, loss):
            kept patches gathered before the embedding, the one block forward
            with SDPA over the kept tokens, flipkern.siglip_loss; the text tower
            dense and exact through the block forward.
  flipkern-drop  the same with text_padding="drop" (opt-in, changes the model's
            function): the text runs packed over the real tokens only.

Each (path, patch dropout) runs in its own spawned process; both draw the same
kept patches. img/s from process CPU time (steadier than the wall clock on a
shared machine with --threads 1) and from the wall clock.

    python benchmarks/bench_open_clip_timm.py --captions realistic --paths stock flipkern flipkern-drop \
        --steps 8 --warmup 2 --json benchmarks/results/open_clip_siglip_text_cpu.json
    python benchmarks/bench_open_clip_timm.py --model EVA02-B-16 --captions realistic \
        --json benchmarks/results/open_clip_eva02_cpu.json
"""
import argparse
import concurrent.futures as cf
import json
import multiprocessing
import os
import platform
import sys
import time

import torch

PATHS = ("stock", "flipkern", "flipkern-drop")  # flipkern-drop: apply_to_open_clip(..., text_padding="drop")


def measure(path, patch_dropout, args):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import caption_lengths
    import open_clip_coverage
    from open_clip.loss import ClipLoss, SigLipLoss

    import flipkern
    torch.set_num_threads(args["threads"])
    torch.manual_seed(0)
    model = open_clip_coverage.build_cut(args["model"], values=True, layers=args["layers"],
                                         force_patch_dropout=patch_dropout).train()
    if getattr(model.visual.trunk.patch_drop, "prob", 0.0) != patch_dropout:  # what the row claims
        raise RuntimeError(f"{args['model']}: timm's patch dropout is not {patch_dropout} in the built model")
    loss = SigLipLoss() if getattr(model, "logit_bias", None) is not None else ClipLoss()
    report = None if path == "stock" else flipkern.apply_to_open_clip(
        model, loss=loss, text_padding="drop" if path == "flipkern-drop" else "keep")
    B, ctx = args["batch"], model.text.context_length
    g = torch.Generator().manual_seed(1)
    images = torch.randn(B, 3, 224, 224, generator=g)
    lengths = (caption_lengths.caption_lengths(args["captions"], B, ctx, generator=g) if args["captions"]
               else torch.full((B,), args["caption_tokens"]))
    if model.text.attn_mask is not None:  # causal text: [sot, words, eot, 0...] as open_clip's tokenizer
        text = caption_lengths.tokens_from_lengths(lengths, ctx, model.text.vocab_size - 1, generator=g)
    else:  # SigLIP: the real tokens, then its pad id to the context length
        pad = model.text.pad_id
        text = torch.full((B, ctx), pad, dtype=torch.int64)
        for b, n in enumerate(lengths.tolist()):
            text[b, :n] = pad + 1 + torch.randint(0, 1000, (n,), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step(i):
        torch.manual_seed(100 + i)  # the same kept patches on both paths
        out = model(images, text)  # (image, text, logit_scale[, logit_bias])
        opt.zero_grad(set_to_none=True)
        loss(*out).backward()
        opt.step()

    for i in range(args["warmup"]):
        step(i)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for i in range(args["steps"]):
        step(args["warmup"] + i)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    n = B * args["steps"]
    return dict(path=path, patch_dropout=patch_dropout, img_per_s_cpu=n / cpu, img_per_s_wall=n / wall,
                report=report, threads=torch.get_num_threads())


def _in_child(path, pd, args):
    with cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as ex:
        return ex.submit(measure, path, pd, args).result()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="ViT-B-16-SigLIP")
    p.add_argument("--layers", type=int, default=2, help="layers of each tower (the config's depth cut)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--caption-tokens", type=int, default=16, help="real tokens of every caption")
    p.add_argument("--captions", help="caption length kind of caption_lengths.py, in place of --caption-tokens")
    p.add_argument("--paths", nargs="+", choices=PATHS, default=["stock", "flipkern"])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--patch-dropout", type=float, nargs="+", default=[0.5, 0.75])
    p.add_argument("--json")
    a = p.parse_args(argv)
    args = dict(model=a.model, layers=a.layers, batch=a.batch, caption_tokens=a.caption_tokens, steps=a.steps,
                warmup=a.warmup, threads=a.threads, captions=a.captions)
    results = []
    for pd in a.patch_dropout:
        for path in a.paths:
            r = _in_child(path, pd, args)
            results.append(r)
            print(f"{a.model} layers={a.layers} patch_dropout={pd} {path:9s} "
                  f"{r['img_per_s_cpu']:7.2f} img/s (CPU time)  {r['img_per_s_wall']:7.2f} img/s (wall)", flush=True)
    for pd in a.patch_dropout:
        s, *fs = (next(r for r in results if r["path"] == q and r["patch_dropout"] == pd) for q in a.paths)
        for f in fs:
            print(f"patch_dropout={pd}: {f['path']} / {s['path']} = "
                  f"{f['img_per_s_cpu'] / s['img_per_s_cpu']:.2f}x (CPU time)")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"command": "python " + " ".join(sys.argv), "args": args, "torch": torch.__version__,
                       "machine": platform.processor() or platform.machine(), "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
