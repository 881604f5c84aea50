"""open_clip_train's own samples/s: stock ``python -m open_clip_train.main`` vs
``python -m flipkern.open_clip_train``, the same arguments.

Model: ViT-Ti/16 @ 224 image tower (width 192, 12 layers, 3 heads) + 6-layer width-256
text tower (4 heads), 77-token context, embed 256 (a local-dir: open_clip config, random
init). Data: a CSV of generated 224 px JPEGs with captions of realistic, varying length:
word counts drawn lognormal (median 12 words, sigma 1.0), which open_clip's tokenizer makes
a median of ~14 tokens with sot/eot and a few % cut at 77 (the JSON records the measured
token lengths). fp32, --workers 0 (data loading in the training process, the same for both
commands), --threads torch threads per run (OMP_NUM_THREADS; default 1: on a machine shared
with other jobs, 2 threads that wait on each other at every barrier made both commands 20x
slower). Every (command, patch dropout) run is its own process;
runs are interleaved (the order of the two commands alternates each repeat) because other
jobs share the machine, and the load average is recorded before each run.

samples/s is what open_clip_train logs each step (``--log-every-n-steps 1``); the first
``--skip`` steps of each run are warm-up and dropped, a run's figure is the median of the
rest, and a case's figure is the median over its repeats.

    python benchmarks/bench_open_clip_train.py --json benchmarks/results/open_clip_train.json
    python benchmarks/bench_open_clip_train.py --steps 3 --skip 1 --repeats 1 --batch 4 --dropouts 0.5  # sanity
    python benchmarks/bench_open_clip_train.py --accum-freq 4 --steps 3 --repeats 1 --dropouts 0.5 \
        --json benchmarks/results/open_clip_train_accum4.json   # open_clip's accumulation, both commands
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMANDS = {"stock": ["-m", "open_clip_train.main"], "flipkern": ["-m", "flipkern.open_clip_train"]}
MODEL_CFG = {"embed_dim": 256,
             "vision_cfg": {"image_size": 224, "layers": 12, "width": 192, "head_width": 64, "patch_size": 16},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 256, "heads": 4, "layers": 6}}
WORDS = ("a photo of the red green blue yellow small large old new dog cat car house tree man woman "
         "on in with at near beside two three white black wooden street beach park table sky").split()
# open_clip_train's step line: "... Batch (t): 1.234, 25.9311/s, 25.9311/s/gpu LR: ..."
STEP_LINE = re.compile(r"Batch \(t\): [0-9.]+, ([0-9.eE+-]+)/s,")


def caption_word_counts(n, rng, median_words=12, sigma=1.0):
    return np.clip(np.rint(rng.lognormal(np.log(median_words), sigma, n)), 1, 200).astype(int)


def write_dataset(root, samples, seed=0):
    """model/open_clip_config.json and train.csv (filepath, title) of ``samples`` JPEGs."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "model"))
    with open(os.path.join(root, "model", "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": MODEL_CFG}, f)
    yy, xx = np.mgrid[0:224, 0:224]
    rows = ["filepath\ttitle"]
    for i, words in enumerate(caption_word_counts(samples, rng)):
        # smooth colour fields: JPEGs of a realistic size (noise would decode far slower)
        phase = rng.uniform(0, 2 * np.pi, 3)
        image = np.stack([127 + 120 * np.sin(xx / (20 + 9 * c) + yy / 31 + phase[c]) for c in range(3)], -1)
        path = os.path.join(root, f"{i}.jpg")
        Image.fromarray(image.astype(np.uint8)).save(path, quality=90)
        rows.append(f"{path}\t{' '.join(rng.choice(WORDS, words))}")
    with open(os.path.join(root, "train.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def token_lengths(csv_path, context_length=77):
    """Tokens per caption (sot .. eot) as open_clip's tokenizer makes them, truncation included."""
    import open_clip
    import pandas as pd
    tokens = open_clip.get_tokenizer("ViT-B-16", context_length=context_length)(
        pd.read_csv(csv_path, sep="\t")["title"].tolist())
    lengths = (tokens != 0).sum(1).numpy()
    return {"median": float(np.median(lengths)), "mean": float(lengths.mean()),
            "p90": float(np.percentile(lengths, 90)), "fraction_at_77": float((lengths == context_length).mean())}


def samples_per_s(log_text):
    return [float(m.group(1)) for m in STEP_LINE.finditer(log_text)]


def run_once(command, dropout, root, args, name):
    argv = [sys.executable, *COMMANDS[command], "--train-data", os.path.join(root, "train.csv"),
            "--dataset-type", "csv", "--model", f"local-dir:{os.path.join(root, 'model')}",
            "--device", "cpu", "--precision", "fp32", "--batch-size", str(args.batch), "--workers", "0",
            "--epochs", "1", "--force-patch-dropout", str(dropout), "--seed", "0", "--warmup", "1",
            "--log-every-n-steps", "1", "--report-to", "none", "--logs", os.path.join(root, "logs"),
            "--name", name, "--accum-freq", str(args.accum_freq)]
    load = os.getloadavg()
    start = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=root,
                          env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        raise RuntimeError(f"{command} dropout {dropout} failed:\n{proc.stderr[-3000:]}")
    log = open(os.path.join(root, "logs", name, "out.log")).read()
    steps = samples_per_s(log)
    if len(steps) != args.steps:
        raise RuntimeError(f"{command} dropout {dropout}: expected {args.steps} logged steps, got {len(steps)}")
    report = [line.split("| INFO | ", 1)[1] for line in log.splitlines() if "| INFO | flipkern: " in line]
    return dict(command=command, dropout=dropout, samples_per_s=statistics.median(steps[args.skip:]),
                steps_samples_per_s=steps, loadavg_before=load, wall_s=round(time.time() - start, 1),
                flipkern_report=report)


def summarize(runs):
    """{dropout: {stock, flipkern (median over repeats), speedup}}."""
    out = {}
    for dropout in sorted({r["dropout"] for r in runs}):
        med = {c: statistics.median(r["samples_per_s"] for r in runs if r["dropout"] == dropout and r["command"] == c)
               for c in COMMANDS}
        out[str(dropout)] = dict(stock=round(med["stock"], 2), flipkern=round(med["flipkern"], 2),
                                 speedup=round(med["flipkern"] / med["stock"], 2))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=4, help="logged steps per run (one epoch)")
    p.add_argument("--skip", type=int, default=1, help="warm-up steps dropped from each run")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run")
    p.add_argument("--dropouts", type=float, nargs="+", default=[0.0, 0.5, 0.75])
    p.add_argument("--accum-freq", type=int, default=1,
                   help="open_clip_train's --accum-freq: a contrastive batch of --batch x this per step")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory() as root:
        write_dataset(root, args.batch * args.accum_freq * args.steps)  # one epoch = --steps optimizer steps
        lengths = token_lengths(os.path.join(root, "train.csv"))
        for repeat in range(args.repeats):
            for dropout in args.dropouts:
                order = list(COMMANDS) if repeat % 2 == 0 else list(COMMANDS)[::-1]
                for command in order:
                    r = run_once(command, dropout, root, args, f"{command}-{dropout}-{repeat}")
                    runs.append(dict(r, repeat=repeat))
                    print(f"repeat {repeat} dropout {dropout} {command}: {r['samples_per_s']:.2f} samples/s "
                          f"(load {r['loadavg_before'][0]:.1f})", flush=True)
    summary = summarize(runs)
    for dropout, s in summary.items():
        print(f"patch dropout {dropout}: stock {s['stock']} samples/s, flipkern {s['flipkern']} ({s['speedup']}x)")
    if args.json:
        import torch
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(dict(command="python benchmarks/bench_open_clip_train.py " + " ".join(argv or sys.argv[1:]),
                           config=vars(args), model_cfg=MODEL_CFG, caption_tokens=lengths,
                           torch=torch.__version__, cpu=platform.processor(),
                           cpus=os.cpu_count(), summary=summary, runs=runs), f, indent=2)
    return summary


if __name__ == "__main__":
    main()
