"""Masking papers in the training loop, measured: zero-shot top-1 and step time of
random (FLIP) vs attentive (A-CLIP) masking, and of CLIP vs CLIP + MAE loss, on the
built-in synthetic shapes data at mask ratio 0.75, the tiny preset, seed-averaged.

Arms (each run is its own ``flipkern-pretrain`` process with --threads T; --parallel P
runs P of them at once, the arms of one seed side by side, so that the arms they
compare share the machine's load):

  random        --masking random                      (CLIP, FLIP's masking)
  attentive     --masking attentive                   (A-CLIP's, EMA decay 0.99)
  clip+mae      --masking random --mae-weight W        (FLIP's CLIP + MAE loss)

Equal steps: every arm runs --steps S (the last T = S/5 unmasked). Equal wall time:
``random`` again with the masked steps it could run in the time each slower arm takes:
S - T masked steps x r, plus the same T unmasked ones (the arms differ only in their
masked steps: no EMA forward and no MAE loss on unmasked ones), where r is the arm's
masked-step cost over random's. r comes from short timing runs (--timing-steps, every
step masked, each arm in turn on its own, seed 0): their CPU seconds per step, since a
shared machine's load inflates the wall clock of one run and not another's.

    python benchmarks/pretrain_masking.py --steps 600 --seeds 0 1 \\
        --json benchmarks/results/pretrain_masking.json

--runs-dir DIR keeps each run's output directory there and reuses a run whose
summary.json is already there (a benchmark stopped half-way resumes; runs
launched in batches are collected into one JSON).
"""
import argparse
import concurrent.futures as cf
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def arms(mae_weight):
    return {"random": ["--masking", "random"], "attentive": ["--masking", "attentive"],
            "clip+mae": ["--masking", "random", "--mae-weight", str(mae_weight)]}


def run_one(flags, steps, seed, mask_ratio, out_dir, unmasked_tune_steps, threads):
    """One pretraining process (unless out_dir holds its finished run); its summary,
    masked-step time and command."""
    cmd = [sys.executable, "-m", "flipkern.pretrain", "--steps", str(steps), "--seed", str(seed),
           "--mask-ratio", str(mask_ratio), "--unmasked-tune-steps", str(unmasked_tune_steps),
           "--threads", str(threads),
           "--output-dir", out_dir, "--no-plot", "--no-progress", "--checkpoint-every", "0", *flags]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    if not os.path.exists(os.path.join(out_dir, "summary.json")):
        subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    summary = json.load(open(os.path.join(out_dir, "summary.json")))
    records = [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]
    batch = json.load(open(os.path.join(out_dir, "config.json")))["args"]["batch_size"]
    # the masked steps' time (the unmasked tuning steps run all 16 patches and no EMA forward);
    # the first logged step includes warm-up, so it is left out
    masked = [batch / r["img_per_s"] for r in records if r["type"] == "train" and r["masked"] and r["step"] > 1]
    return dict(steps=steps, seed=seed, zeroshot_top1=summary["eval"].get("zeroshot_top1"),
                train_s=summary["train_s"], train_cpu_s=summary.get("train_cpu_s"),
                step_ms=1e3 * summary["train_s"] / summary["trained_steps"],
                masked_step_ms=1e3 * statistics.median(masked),
                ema_forward_ms_per_step=summary.get("ema_forward_ms_per_step"),
                cmd=" ".join(["python", "-m", "flipkern.pretrain"] + cmd[3:]).replace(out_dir, "<tmp>"))


def mean_of(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.mean(values) if values else None


def aggregate(runs):
    return {k: mean_of(runs, k) for k in ("zeroshot_top1", "train_s", "train_cpu_s", "step_ms", "masked_step_ms",
                                          "ema_forward_ms_per_step")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--mask-ratio", type=float, default=0.75)
    ap.add_argument("--mae-weight", type=float, default=1.0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--parallel", type=int, default=1, help="runs at once")
    ap.add_argument("--runs-dir", default=None, help="keep (and reuse) the runs here; default: a temporary dir")
    ap.add_argument("--timing-steps", type=int, default=40, help="steps of each arm's timing run")
    ap.add_argument("--no-equal-time", dest="equal_time", action="store_false", default=True,
                    help="only the equal-step runs")
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    tune = args.steps // 5  # the pretraining default: the last fifth unmasked, for every arm alike
    results = dict(steps=args.steps, seeds=args.seeds, mask_ratio=args.mask_ratio, mae_weight=args.mae_weight,
                   unmasked_tune_steps=tune, threads=args.threads, parallel=args.parallel,
                   machine=platform.platform(), cpu_count=os.cpu_count(), load_avg_start=os.getloadavg(),
                   command=" ".join(["python"] + sys.argv), started=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                   equal_steps={}, equal_time={})
    with tempfile.TemporaryDirectory() as tmp, cf.ThreadPoolExecutor(args.parallel) as pool:
        tmp = args.runs_dir or tmp
        def run_arms(specs):
            """specs: {key: (flags, steps, unmasked tune steps)} -> {key: dict(runs, mean)}, every
            seed of every arm; the arms of one seed are submitted together."""
            jobs = {(key, seed): pool.submit(run_one, flags, steps, seed, args.mask_ratio,
                                             os.path.join(tmp, f"{key}-{steps}-{seed}".replace(" ", "_")
                                                  .replace(",", "")),
                                             tune_steps, args.threads)
                    for seed in args.seeds for key, (flags, steps, tune_steps) in specs.items()}
            out = {}
            for key in specs:
                runs = [jobs[key, seed].result() for seed in args.seeds]
                for r in runs:
                    print(f"{key}: {json.dumps(r)}", flush=True)
                out[key] = dict(runs=runs, mean=aggregate(runs))
            return out

        results["equal_steps"] = run_arms({name: (flags, args.steps, tune)
                                           for name, flags in arms(args.mae_weight).items()})
        if not args.equal_time:
            return _write(results, args.json)
        results["timing"] = {name: run_one(flags + ["--no-eval"], args.timing_steps, 0, args.mask_ratio,
                                           os.path.join(tmp, f"timing-{name}-{args.timing_steps}"), 0, args.threads)
                             for name, flags in arms(args.mae_weight).items()}  # one at a time
        cpu = {name: r["train_cpu_s"] / r["steps"] for name, r in results["timing"].items()}
        ratios = {name: cpu[name] / cpu["random"] for name in ("attentive", "clip+mae")}
        results["equal_time"] = run_arms({
            f"random, the time of {name}": (arms(args.mae_weight)["random"],
                                            args.steps + round((r - 1) * (args.steps - tune)), tune)
            for name, r in ratios.items()})
        for name, r in ratios.items():
            results["equal_time"][f"random, the time of {name}"]["masked_step_cpu_ratio"] = r
    _write(results, args.json)


def _write(results, path):
    results["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    results["load_avg_end"] = os.getloadavg()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
    print(json.dumps({k: {a: v["mean"] for a, v in results[k].items()} for k in ("equal_steps", "equal_time")},
                     indent=2))


if __name__ == "__main__":
    main()
