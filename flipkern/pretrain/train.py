"""The pretraining loop: data, model, AdamW + warmup/cosine, mixed precision,
gradient accumulation, DDP, FLIP masking, checkpoints, evaluation, summary.

``run(args)`` takes the namespace of ``cli.parse_args`` and returns the summary
dict (or raises DataError / CLIError for unusable input, NonFiniteLoss when the
loss blows up and --skip-nonfinite is off).

Reproducibility: model init is seeded by --seed; the data order and every
sample's kept patches are functions of (seed, step, position in the global
batch) (flipkern.data.loader), independent of the number of processes; a
checkpoint holds everything else (weights, optimizer, scheduler, scaler, RNG,
data position), so a resumed run continues exactly where it stopped.
"""
import ast
import contextlib
import dataclasses
import datetime
import json
import math
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from .. import data as fkdata
from ..data.datasets import DataError
from . import checkpoint as ckpt
from .cli import PROG, CLIError
from .evaluate import evaluate
from .metrics import MetricsLog, plot_curves

# Defaults of the bare command, tuned so the tiny model reaches >= 70% zero-shot top-1
# on the synthetic held-out split in about 6 minutes on a 2-core CPU (measured: README).
# The last UNMASKED_TUNE_FRACTION of the steps train without masking (FLIP's unmasked
# tuning) unless --unmasked-tune-steps says otherwise: with half of the tiny model's 16
# patches dropped, those steps lift zero-shot top-1 from ~60% to ~80%.
DEFAULTS = dict(steps=1500, batch_size=128, lr=1e-3)
MAX_WARMUP_STEPS = 50  # the default warmup: this many steps, or a tenth of a shorter run
UNMASKED_TUNE_FRACTION = 0.2


class NonFiniteLoss(RuntimeError):
    pass


# ----------------------------------------------------------------------------- setup

@dataclasses.dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object = None
    owns_group: bool = False

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def main(self):
        return self.rank == 0


def local_ranks():
    """Processes of this job on this node (torchrun sets LOCAL_WORLD_SIZE; 1 when run alone)."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))


def cuda_holds_ranks():
    """NCCL needs a GPU of its own for every rank of a node (two ranks on one GPU fail)."""
    return torch.cuda.is_available() and torch.cuda.device_count() >= local_ranks()


def setup_distributed(device_arg):
    # auto: CUDA when every local rank gets its own GPU, else CPU with gloo
    want_cuda = device_arg == "cuda" or (device_arg == "auto" and cuda_holds_ranks())
    if dist.is_available() and dist.is_initialized():  # e.g. spawned by a test harness
        world, rank = dist.get_world_size(), dist.get_rank()
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        owns = False
    elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
        world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dist.init_process_group("nccl" if want_cuda else "gloo")
        owns = True
    else:
        return DistInfo(device=torch.device("cuda" if want_cuda else "cpu"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    group = dist.group.WORLD if world > 1 else None
    return DistInfo(world, rank, local_rank, device, group, owns)


def _parse_value(v):
    try:
        return ast.literal_eval(v)
    except (ValueError, SyntaxError):
        return v


def _apply_overrides(cfg, overrides):
    """Set fields of a (nested) dataclass config: 'key' looks in the config and its
    sub-configs (the first that has it); 'vision.key' addresses one sub-config."""
    for key, value in overrides.items():
        if "." in key:
            head, rest = key.split(".", 1)
            if not hasattr(cfg, head):
                raise CLIError(f"--model-override {key}: the model config has no {head!r}")
            setattr(cfg, head, _apply_overrides(getattr(cfg, head), {rest: value}))
            continue
        if hasattr(cfg, key) and not dataclasses.is_dataclass(getattr(cfg, key)):
            cfg = dataclasses.replace(cfg, **{key: value})
            continue
        done = False
        for f in dataclasses.fields(cfg):
            sub = getattr(cfg, f.name)
            if dataclasses.is_dataclass(sub) and hasattr(sub, key):
                cfg = dataclasses.replace(cfg, **{f.name: dataclasses.replace(sub, **{key: value})})
                done = True
                if key not in ("image_size",):  # image_size may live in several; set them all
                    break
        if not done:
            raise CLIError(f"--model-override {key}: no such field in the model config")
    return cfg


def model_config(args, tokenizer=None):
    from flipkern.reference import clip as refclip
    if args.model not in refclip.PRESETS:
        raise CLIError(f"--model {args.model!r}: unknown preset; choose from {sorted(refclip.PRESETS)}")
    cfg = dataclasses.replace(refclip.PRESETS[args.model]) if dataclasses.is_dataclass(
        refclip.PRESETS[args.model]) else refclip.PRESETS[args.model]
    over = {}
    if args.image_size:
        over["image_size"] = args.image_size
    if args.patch_size:
        over["patch_size"] = args.patch_size
    if tokenizer is not None:
        over.update(vocab_size=tokenizer.vocab_size, pad_id=tokenizer.pad_id, eot_id=tokenizer.eot_id,
                    context_length=tokenizer.context_length)
    over.update({k: _parse_value(v) for k, v in args.model_override})
    try:
        cfg = _apply_overrides(cfg, over)
        cfg = dataclasses.replace(cfg)  # re-run validation (__post_init__) if any
    except (TypeError, ValueError) as e:
        raise CLIError(f"bad model configuration: {e}") from None
    return cfg


def _image_cfg(cfg):
    v = cfg.vision
    return v.image_size, v.patch_size, (v.image_size // v.patch_size) ** 2


def build_datasets(args, image_size):
    """(train, val, info). Synthetic by default; CSV/TSV or tar shards with --train-data."""
    kind = args.dataset_type
    if kind == "auto":
        kind = "synthetic" if args.train_data is None else fkdata.detect_type(args.train_data)
    if kind == "synthetic":
        sc = {}
        if args.synthetic_colours:
            sc["colours"] = tuple(c.strip() for c in args.synthetic_colours.split(",") if c.strip())
        if args.synthetic_shapes:
            sc["shapes"] = tuple(c.strip() for c in args.synthetic_shapes.split(",") if c.strip())
        if args.synthetic_position_spread is not None:
            sc["position_spread"] = args.synthetic_position_spread
        try:
            scfg = fkdata.SyntheticConfig(image_size=image_size, **sc)
        except ValueError as e:
            raise CLIError(str(e)) from None
        train = fkdata.SyntheticShapes("train", args.train_samples, seed=args.data_seed, config=scfg)
        val = fkdata.SyntheticShapes("val", args.val_samples, seed=args.data_seed, config=scfg)
        info = dict(type="synthetic", train_samples=len(train), val_samples=len(val),
                    num_classes=train.num_classes, colours=list(scfg.colours), shapes=list(scfg.shapes))
        return train, val, info

    def load(path, what):
        t = kind if kind != "auto" else fkdata.detect_type(path)
        if t == "csv":
            return fkdata.CsvDataset(path, image_size, img_key=args.csv_img_key,
                                     caption_key=args.csv_caption_key, sep=args.csv_separator)
        return fkdata.TarShardDataset(path, image_size)

    train = load(args.train_data, "train")
    val = load(args.val_data, "val") if args.val_data else None
    info = dict(type=kind, train_samples=len(train), val_samples=len(val) if val else 0,
                skipped_at_index={"train": dict(train.skipped), "val": dict(val.skipped) if val else {}})
    return train, val, info


def param_groups(model, weight_decay):
    """AdamW groups: no weight decay on gains, biases, embeddings, logit scale/bias, 1-D params."""
    decay, no_decay = [], []
    names = {"decay": [], "no_decay": []}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        low = n.lower()
        nd = (p.ndim < 2 or "bias" in low or "norm" in low or "logit_" in low
              or any(k in low for k in ("token_embedding", "pos_embed", "positional_embedding", "cls_token",
                                         "class_embedding", "mask_token", "embedding.weight")))
        (no_decay if nd else decay).append(p)
        names["no_decay" if nd else "decay"].append(n)
    return [dict(params=decay, weight_decay=weight_decay), dict(params=no_decay, weight_decay=0.0)], names


class WarmupCosine:
    """lr multiplier: linear warmup to 1 over ``warmup`` steps, then cosine to ``min_ratio``."""

    def __init__(self, warmup, total, min_ratio):
        self.warmup, self.total, self.min_ratio = warmup, total, min_ratio

    def __call__(self, step):
        if step < self.warmup:
            return (step + 1) / self.warmup
        span = max(1, self.total - self.warmup)
        t = min(1.0, (step - self.warmup) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class _ForwardModule(torch.nn.Module):
    """What DDP wraps: the forward of one step (fast path or reference)."""

    def __init__(self, model, forward_fn):
        super().__init__()
        self.model = model
        self._forward_fn = forward_fn

    def forward(self, images, tokens, ids_keep):
        return self._forward_fn(self.model, images, tokens, ids_keep)


def _fastpath():
    try:
        from flipkern import fastpath
        return fastpath
    except ImportError:
        return None


def _autocast_factory(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def _default_output_dir(di):
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    if di.distributed:
        obj = [stamp]
        dist.broadcast_object_list(obj, src=0)
        stamp = obj[0]
    return os.path.join("runs", stamp)


def _print(di, *a, **k):
    if di.main:
        print(*a, **k, flush=True)


class _Sigterm:
    """SIGTERM sets a flag; the loop checkpoints and exits 0 at the next step boundary."""

    def __init__(self):
        self.flag = False
        self.previous = None

    def __enter__(self):
        try:
            self.previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler
            self.previous = None
        return self

    def _handle(self, signum, frame):
        self.flag = True

    def __exit__(self, *exc):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


# ----------------------------------------------------------------------------- run

def run(args):
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup_steps is None:
        args.warmup_steps = min(MAX_WARMUP_STEPS, max(1, args.steps // 10))
    if args.unmasked_tune_steps is None:
        args.unmasked_tune_steps = int(args.steps * UNMASKED_TUNE_FRACTION) if args.mask_ratio > 0 else 0
    if args.unmasked_tune_steps > args.steps:
        raise CLIError(f"--unmasked-tune-steps {args.unmasked_tune_steps} exceeds --steps {args.steps}")
    if args.threads:
        torch.set_num_threads(args.threads)

    di = setup_distributed(args.device)
    try:
        return _run(args, di)
    finally:
        if di.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, di):
    t_start = time.time()
    if args.batch_size % di.world_size:
        raise CLIError(f"--batch-size {args.batch_size} is not divisible by the number of processes "
                       f"({di.world_size})")
    fastpath = _fastpath()

    # --- tokenizer, model config, data
    try:
        from flipkern.reference import clip as refclip
    except ImportError as e:
        raise CLIError(f"cannot import the model code (flipkern.reference.clip): {e}") from None
    base_cfg = model_config(args)
    ctx_len = args.context_length
    if ctx_len is None:
        ctx_len = base_cfg.text.context_length
    try:
        tokenizer = fkdata.build_tokenizer(args.bpe_vocab, ctx_len)
    except (OSError, ValueError) as e:
        raise CLIError(f"--bpe-vocab: {e}") from None
    cfg = model_config(args, tokenizer)
    image_size, patch_size, num_tokens = _image_cfg(cfg)
    train_ds, val_ds, data_info = build_datasets(args, image_size)

    # --- model, optimizer, schedule, precision
    torch.manual_seed(args.seed)
    model = refclip.CLIP(cfg).to(di.device)
    groups, group_names = param_groups(model, args.weight_decay)
    # fused: one kernel per step on CPU and CUDA (on CPU 7x faster than the foreach path)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(args.warmup_steps, args.steps, args.min_lr_ratio))
    scaler = torch.amp.GradScaler(di.device.type, enabled=args.precision == "fp16")
    autocast = _autocast_factory(di.device, args.precision)

    if fastpath is not None:
        def forward_fn(m, images, tokens, ids_keep):
            return fastpath.clip_forward(m, images, tokens, ids_keep, fast=args.fast_path)

        def loss_fn(m, out):
            return fastpath.contrastive_loss(m, out, fast=args.fast_path, group=di.group)
    else:
        def forward_fn(m, images, tokens, ids_keep):
            return m(images, tokens, ids_keep=ids_keep)

        def loss_fn(m, out):
            return m.loss(out, group=di.group)

    step_module = _ForwardModule(model, forward_fn)
    if di.distributed:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[di.device.index] if di.device.type == "cuda" else None)

    # --- output dir, resume
    out_dir = args.output_dir or _default_output_dir(di)
    if di.main:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise CLIError(f"--output-dir {out_dir}: {e}") from None
    resume_path = None
    if args.resume == "latest" or (args.resume is None and args.auto_resume):
        resume_path = ckpt.latest_checkpoint(out_dir)
        if args.resume == "latest" and resume_path is None:
            raise CLIError(f"--resume latest: no checkpoint in {ckpt.checkpoint_dir(out_dir)}")
    elif args.resume:
        resume_path = args.resume
    start_step = 0
    skipped_nonfinite = 0
    if resume_path:
        try:
            state = ckpt.load(resume_path, map_location=di.device)
        except RuntimeError as e:
            raise CLIError(str(e)) from None
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ckpt.set_rng_state(state.get("rng"))
        start_step = int(state["step"])
        skipped_nonfinite = int(state.get("skipped_nonfinite", 0))
        if state.get("data_step") != start_step * args.accum_steps:
            raise CLIError(f"checkpoint {resume_path} was written with a different --accum-steps")
        _print(di, f"{PROG}: resumed from {resume_path} at step {start_step}")

    metrics = MetricsLog(os.path.join(out_dir, "metrics.jsonl"), enabled=di.main)
    if resume_path:
        metrics.truncate_after(start_step)  # drop records of steps this run redoes
    elif di.main and os.path.exists(metrics.path):
        os.remove(metrics.path)
    config = dict(
        args={k: v for k, v in vars(args).items() if not k.startswith("debug_")},
        model=dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else str(cfg),
        num_params=sum(p.numel() for p in model.parameters()),
        tokenizer=dict(name=tokenizer.name, vocab_size=tokenizer.vocab_size, context_length=tokenizer.context_length),
        data=data_info, world_size=di.world_size, device=str(di.device), torch=torch.__version__,
        fastpath_module=fastpath is not None, weight_decay_groups={k: len(v) for k, v in group_names.items()},
        num_patches=num_tokens,
        num_keep=fkdata.num_keep_for(num_tokens, args.mask_ratio) or num_tokens,
    )
    if di.main:
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2, default=str)

    # --- data loader (starts at the checkpoint's data position)
    accum = args.accum_steps
    num_keep = fkdata.num_keep_for(num_tokens, args.mask_ratio)
    unmasked_from = args.steps - args.unmasked_tune_steps

    def num_keep_fn(data_step):
        return None if data_step // accum >= unmasked_from else num_keep

    loader = fkdata.make_train_loader(
        train_ds, tokenizer, global_batch=args.batch_size, num_tokens=num_tokens, seed=args.seed,
        world_size=di.world_size, rank=di.rank, start_step=start_step * accum, end_step=args.steps * accum,
        num_keep_fn=num_keep_fn, workers=args.workers, pin_memory=di.device.type == "cuda")

    eval_autocast = autocast

    def run_eval(step):
        res = None
        if di.main and val_ds is not None and args.eval:
            res = evaluate(model, val_ds, tokenizer, di.device, batch_size=args.eval_batch_size,
                           num_samples=args.val_samples, autocast=eval_autocast)
            metrics.write(dict(type="eval", step=step, **res))
        if di.distributed:
            dist.barrier()
        return res

    def save(step, data_step):
        if di.main:
            state = dict(model=model.state_dict(), optimizer=opt.state_dict(), scheduler=sched.state_dict(),
                         scaler=scaler.state_dict() if scaler.is_enabled() else None, step=step, data_step=data_step,
                         rng=ckpt.rng_state(), skipped_nonfinite=skipped_nonfinite, config=config)
            path = ckpt.checkpoint_path(out_dir, step)
            ckpt.atomic_save(state, path)
            ckpt.prune(out_dir, args.keep_checkpoints)
        if di.distributed:
            dist.barrier()
        return ckpt.checkpoint_path(out_dir, step)

    progress = args.progress and di.main and sys.stderr.isatty()
    from tqdm import tqdm
    bar = tqdm(total=args.steps, initial=start_step, disable=not progress, dynamic_ncols=True, desc=PROG)

    bad_samples = 0
    last_eval = None
    train_time = 0.0
    samples_seen = 0
    step = start_step
    stopped_by_signal = False
    it = iter(loader)
    model.train()
    with _Sigterm() as term:
        while step < args.steps:
            t0 = time.time()
            loss_sum = 0.0
            nonfinite = False
            for micro in range(accum):
                batch = next(it)
                bad_samples += len(batch["bad"])
                images = batch["images"].to(di.device, non_blocking=True)
                tokens = batch["tokens"].to(di.device, non_blocking=True)
                ids_keep = batch["ids_keep"]
                if ids_keep is not None:
                    ids_keep = ids_keep.to(di.device, non_blocking=True)
                sync = step_module.no_sync() if (di.distributed and micro < accum - 1) else contextlib.nullcontext()
                with sync:
                    with autocast():
                        out = step_module(images, tokens, ids_keep)
                        loss = loss_fn(model, out)
                    if args.debug_nan_step is not None and step == args.debug_nan_step:
                        loss = loss + float("nan")
                    lval = loss.detach().float().clone()
                    if di.distributed:
                        dist.all_reduce(lval)
                        lval /= di.world_size
                    lval = lval.item()
                    if not math.isfinite(lval):
                        if not args.skip_nonfinite:
                            bar.close()
                            raise NonFiniteLoss(
                                f"non-finite loss ({lval}) at step {step}; stopping (lr {sched.get_last_lr()[0]:.3g}, "
                                f"precision {args.precision}). Lower --lr, use --precision fp32, or pass "
                                f"--skip-nonfinite to skip such steps")
                        nonfinite = True
                    scaler.scale(loss / accum).backward()
                loss_sum += lval / accum
            lr = sched.get_last_lr()[0]
            if nonfinite:
                opt.zero_grad(set_to_none=True)
                skipped_nonfinite += 1
                gnorm = float("nan")
                if di.main:
                    print(f"{PROG}: warning: non-finite loss at step {step}; step skipped", file=sys.stderr)
            else:
                scaler.unscale_(opt)
                gnorm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf")).item()
                scaler.step(opt)
                scaler.update()
                opt.zero_grad(set_to_none=True)
            sched.step()
            step += 1
            dt = time.time() - t0
            train_time += dt
            samples_seen += args.batch_size * accum
            ips = args.batch_size * accum / dt
            if args.debug_sleep:
                time.sleep(args.debug_sleep)
            bar.update(1)
            if progress:
                bar.set_postfix(loss=f"{loss_sum:.3f}", lr=f"{lr:.2e}", ips=f"{ips:.0f}", refresh=False)
            if step % args.log_every == 0 or step == args.steps or step == start_step + 1:
                with torch.no_grad():
                    scale = out["logit_scale"].detach().float().mean().item()
                metrics.write(dict(type="train", step=step, loss=loss_sum, lr=lr, grad_norm=gnorm,
                                   logit_scale=scale, img_per_s=ips, masked=ids_keep is not None,
                                   time=time.time() - t_start))
            if args.checkpoint_every and step % args.checkpoint_every == 0 and step < args.steps:
                save(step, step * accum)
            if args.eval_every and step % args.eval_every == 0 and step < args.steps:
                last_eval = run_eval(step)
                if di.main and last_eval and "zeroshot_top1" in last_eval:
                    bar.write(f"step {step}: zero-shot top-1 {100 * last_eval['zeroshot_top1']:.1f}%")
            if args.debug_stop_after is not None and step >= args.debug_stop_after:
                bar.close()
                return None  # a simulated crash: no final checkpoint, no summary
            flag = torch.tensor([1.0 if term.flag else 0.0])
            if di.distributed:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() > 0 and step < args.steps:
                stopped_by_signal = True
                break
    bar.close()
    del it

    final_path = save(step, step * accum)
    if stopped_by_signal:
        _print(di, f"{PROG}: received SIGTERM; saved checkpoint {final_path} at step {step}; exiting")
        return dict(step=step, stopped=True, checkpoint=final_path)

    final_eval = run_eval(step)
    if di.distributed:
        t = torch.tensor([float(bad_samples)])
        dist.all_reduce(t)
        bad_samples = int(t.item())
    if di.main and args.plot:
        try:
            plot_curves(metrics.path, os.path.join(out_dir, "curves.png"))
        except Exception as e:  # a plot is not worth failing the run
            print(f"{PROG}: warning: could not draw the curves: {e}", file=sys.stderr)

    used = fastpath.backends_used() if fastpath is not None and hasattr(fastpath, "backends_used") else {}
    if not used:
        from flipkern.backends import backends_used
        used = backends_used()
    trained = step - start_step
    summary = dict(
        steps=step, trained_steps=trained, samples=samples_seen, wall_s=time.time() - t_start,
        train_s=train_time, img_per_s=samples_seen / train_time if train_time > 0 else 0.0,
        world_size=di.world_size, fast_path=args.fast_path, backends=used,
        skipped_samples=bad_samples + sum(sum(v.values()) for v in data_info.get("skipped_at_index", {}).values()),
        skipped_nonfinite_steps=skipped_nonfinite, output_dir=out_dir, eval=final_eval or {},
    )
    if di.main:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        print(format_summary(summary), flush=True)
    return summary


def format_summary(s):
    ev = s.get("eval") or {}
    parts = [f"steps={s['steps']}", f"time={s['wall_s']:.1f}s", f"img/s={s['img_per_s']:.1f}"]
    if "zeroshot_top1" in ev:
        parts.append(f"zero-shot top-1={100 * ev['zeroshot_top1']:.1f}% top-5={100 * ev['zeroshot_top5']:.1f}% "
                     f"({ev['num_classes']} classes)")
    if "i2t_r@1" in ev:
        parts.append(f"i2t R@1={100 * ev['i2t_r@1']:.1f}% t2i R@1={100 * ev['t2i_r@1']:.1f}%")
    parts.append(f"skipped samples={s['skipped_samples']}")
    if s.get("skipped_nonfinite_steps"):
        parts.append(f"skipped non-finite steps={s['skipped_nonfinite_steps']}")
    backends = ", ".join(f"{k}={v}" for k, v in sorted(s["backends"].items())) or "none recorded"
    parts.append(f"fast path={'on' if s['fast_path'] else 'off'} backends: {backends}")
    parts.append(f"output={s['output_dir']}")
    return f"{PROG}: done: " + " | ".join(parts)
