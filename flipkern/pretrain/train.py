"""The pretraining loop: data, model, AdamW + warmup/cosine, mixed precision,
gradient accumulation with full-batch negatives, activation checkpointing, DDP, FLIP
masking, checkpoints, evaluation, summary.

``run(args)`` takes the namespace of ``cli.parse_args`` and returns the summary
dict (or raises DataError / CLIError for unusable input, NonFiniteLoss when the
loss blows up and --skip-nonfinite is off). It reads top to bottom as its steps:
``build`` (everything a run is made of), ``restore`` (a checkpoint, if any),
``train`` (the loop: ``train_step`` per optimizer step, ``evaluate_now`` and
``save_checkpoint`` between steps), then ``summarize``. Which patches a masked
step keeps is its masking mode (masking_modes: random, attentive); what it
optimizes, its objective (objectives: CLIP, + MAE, MAE alone).

Reproducibility: model init is seeded by --seed; the data order and every
sample's kept patches are functions of (seed, step, position in the global
batch) (flipkern.data.loader), independent of the number of processes; a
checkpoint holds everything else (weights, optimizer, scheduler, scaler, RNG,
data position), so a resumed run continues exactly where it stopped.
"""
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
from .. import fastpath
from ..accumulate import contrastive_backward
from ..reference import clip as refclip
from . import checkpoint as ckpt
from . import objectives
from .build import WarmupCosine, build_datasets, model_config, param_groups, resolve_precision, setup_distributed
from .errors import PROG, CLIError, NonFiniteLoss
from .evaluate import evaluate
from .masking_modes import build_masking
from .metrics import MetricsLog, plot_curves
from .progress import Progress, progress_mode

# Defaults of the bare command, tuned so the tiny model reaches >= 70% zero-shot top-1
# on the synthetic held-out split in about 6 minutes on a 2-core CPU (measured: README).
# The last UNMASKED_TUNE_FRACTION of the steps train without masking (FLIP's unmasked
# tuning) unless --unmasked-tune-steps says otherwise: with half of the tiny model's 16
# patches dropped, those steps lift zero-shot top-1 from ~60% to ~80%.
DEFAULTS = dict(steps=1500, batch_size=128, lr=1e-3)
MAX_WARMUP_STEPS = 50  # the default warmup: this many steps, or a tenth of a shorter run
UNMASKED_TUNE_FRACTION = 0.2

__all__ = ["run", "NonFiniteLoss", "format_summary"]


def resolve_defaults(args):
    """Fill the arguments whose defaults depend on others (in place)."""
    for k, v in DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.warmup_steps is None:
        args.warmup_steps = min(MAX_WARMUP_STEPS, max(1, args.steps // 10))
    if args.unmasked_tune_steps is None:
        tune = args.mask_ratio > 0 and args.objective != "mae"  # MAE has nothing to reconstruct unmasked
        args.unmasked_tune_steps = int(args.steps * UNMASKED_TUNE_FRACTION) if tune else 0
    if args.unmasked_tune_steps > args.steps:
        raise CLIError(f"--unmasked-tune-steps {args.unmasked_tune_steps} exceeds --steps {args.steps}")
    objectives.check_args(args)


# ----------------------------------------------------------------------------- build

@dataclasses.dataclass(frozen=True)
class MaskSchedule:
    """Patches each sample keeps at a data (micro-)step: FLIP's random masking keeps
    ``num_keep`` until the unmasked-tuning steps, which keep all (None). The loader's
    collate draws which ones, from (seed, step, position in the global batch)."""
    num_keep: int | None
    accum_steps: int
    unmasked_from: int  # the first optimizer step without masking

    def __call__(self, data_step):
        return None if data_step // self.accum_steps >= self.unmasked_from else self.num_keep


class _ForwardModule(torch.nn.Module):
    """What DDP wraps: the forward of one step (fast path or reference), with the MAE
    decoder when the objective has one (objectives.step_forward)."""

    def __init__(self, model, fast, decoder=None, objective="clip"):
        super().__init__()
        self.model = model
        self.decoder = decoder
        self.fast = fast
        self.objective = objective

    def forward(self, images, tokens, ids_keep):
        return objectives.step_forward(self.model, self.decoder, self.objective, images, tokens, ids_keep,
                                       fast=self.fast)


@dataclasses.dataclass
class Run:
    """Everything ``build`` makes; the steps below read it."""
    args: object
    di: object  # build.DistInfo
    cfg: object  # the model config
    tokenizer: object
    train_ds: object
    val_ds: object
    data_info: dict
    model: torch.nn.Module
    step_module: torch.nn.Module  # model's forward, DDP-wrapped when distributed
    opt: torch.optim.Optimizer
    sched: object
    scaler: torch.amp.GradScaler
    autocast: object  # () -> a context manager
    num_tokens: int
    out_dir: str
    metrics: MetricsLog
    config: dict = None  # config.json's content, also stored in checkpoints
    started: float = 0.0  # time.time() when build began
    decoder: torch.nn.Module = None  # the MAE decoder (objectives), or None
    masking: object = None  # the --masking mode (masking_modes)


@dataclasses.dataclass
class LoopState:
    """What the loop advances; a checkpoint and the summary read it."""
    start_step: int = 0
    step: int = 0
    skipped_nonfinite: int = 0
    bad_samples: int = 0
    train_time: float = 0.0
    train_cpu_time: float = 0.0  # this process's CPU seconds in the steps: work, not the machine's load
    samples_seen: int = 0


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


def _make_output_dir(args, di):
    out_dir = args.output_dir or _default_output_dir(di)
    if di.main:
        try:
            os.makedirs(out_dir, exist_ok=True)
        except OSError as e:
            raise CLIError(f"--output-dir {out_dir}: {e}") from None
    return out_dir


def _build_tokenizer_and_config(args):
    """The tokenizer (its context length from the preset unless --context-length) and
    the model config sized to it."""
    preset = model_config(args)  # validates --model and the overrides before the tokenizer is read
    ctx_len = args.context_length or preset.text.context_length
    try:
        tokenizer = fkdata.build_tokenizer(args.bpe_vocab, ctx_len)
    except (OSError, ValueError) as e:
        raise CLIError(f"--bpe-vocab: {e}") from None
    return tokenizer, model_config(args, tokenizer)


def build(args, di):
    """Tokenizer, model config, datasets, model (seeded), optimizer, schedule, precision,
    DDP wrapper and output directory; in this order (the RNG draws depend on it)."""
    started = time.time()
    if args.batch_size % di.world_size:
        raise CLIError(f"--batch-size {args.batch_size} is not divisible by the number of processes "
                       f"({di.world_size})")
    tokenizer, cfg = _build_tokenizer_and_config(args)
    v = cfg.vision
    train_ds, val_ds, data_info = build_datasets(args, v.image_size)
    torch.manual_seed(args.seed)
    model = refclip.CLIP(cfg).to(di.device)
    objectives.freeze_unused(model, args)
    decoder = objectives.build_decoder(args, cfg)
    decoder = decoder.to(di.device) if decoder is not None else None
    step_module = _ForwardModule(model, args.fast_path, decoder, args.objective)
    groups, _ = param_groups(step_module, args.weight_decay)  # the model's, then the decoder's
    # fused: one kernel per step on CPU and CUDA (on CPU 7x faster than the foreach path)
    opt = torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps, fused=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(args.warmup_steps, args.steps, args.min_lr_ratio))
    autocast = _autocast_factory(di.device, args.precision)
    model.set_grad_checkpointing(args.grad_checkpointing)
    if di.distributed:
        step_module = torch.nn.parallel.DistributedDataParallel(
            step_module, device_ids=[di.device.index] if di.device.type == "cuda" else None,
            find_unused_parameters=decoder is not None)  # unmasked steps leave the decoder unused
    out_dir = _make_output_dir(args, di)
    return Run(args=args, di=di, cfg=cfg, tokenizer=tokenizer, train_ds=train_ds, val_ds=val_ds,
               data_info=data_info, model=model, step_module=step_module, opt=opt, sched=sched,
               scaler=torch.amp.GradScaler(di.device.type, enabled=args.precision == "fp16"),
               autocast=autocast, num_tokens=(v.image_size // v.patch_size) ** 2, out_dir=out_dir,
               metrics=MetricsLog(os.path.join(out_dir, "metrics.jsonl"), enabled=di.main), started=started,
               decoder=decoder, masking=build_masking(args, model, autocast, di))


def contrastive_batch(args):
    """The samples each loss contrasts (all processes): --batch-size x --accum-steps."""
    return args.batch_size * args.accum_steps


def write_config(run):
    """config.json: the arguments, model, data and environment of the run."""
    args, di = run.args, run.di
    _, group_names = param_groups(run.model, args.weight_decay)
    run.config = dict(
        args={k: v for k, v in vars(args).items() if not k.startswith("debug_")},
        model=dataclasses.asdict(run.cfg) if dataclasses.is_dataclass(run.cfg) else str(run.cfg),
        num_params=sum(p.numel() for p in run.model.parameters()),
        tokenizer=dict(name=run.tokenizer.name, vocab_size=run.tokenizer.vocab_size,
                       context_length=run.tokenizer.context_length),
        data=run.data_info, world_size=di.world_size, device=str(di.device), torch=torch.__version__,
        weight_decay_groups={k: len(v) for k, v in group_names.items()},
        num_patches=run.num_tokens,
        num_keep=fkdata.num_keep_for(run.num_tokens, args.mask_ratio) or run.num_tokens,
        contrastive_batch=contrastive_batch(args),
    )
    if di.main:
        with open(os.path.join(run.out_dir, "config.json"), "w") as f:
            json.dump(run.config, f, indent=2, default=str)


# ----------------------------------------------------------------------------- restore

def resume_path(args, out_dir):
    """The checkpoint to resume from (--resume, or the output dir's latest), or None."""
    if args.resume == "latest" or (args.resume is None and args.auto_resume):
        path = ckpt.latest_checkpoint(out_dir)
        if args.resume == "latest" and path is None:
            raise CLIError(f"--resume latest: no checkpoint in {ckpt.checkpoint_dir(out_dir)}")
        return path
    return args.resume


def restore(run):
    """Load the checkpoint to resume from into the run (weights, optimizer, schedule,
    scaler, RNG) and return the loop state it stopped at; a fresh state without one.
    metrics.jsonl keeps only the records of the steps that are not redone."""
    path = resume_path(run.args, run.out_dir)
    if not path:
        if run.di.main and os.path.exists(run.metrics.path):
            os.remove(run.metrics.path)
        return LoopState()
    try:
        state = ckpt.load(path, map_location=run.di.device)
    except RuntimeError as e:
        raise CLIError(str(e)) from None
    _restore_masking_and_decoder(run, state, path)
    run.model.load_state_dict(state["model"])
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    ckpt.set_rng_state(state.get("rng"))
    step = int(state["step"])
    if state.get("data_step") != step * run.args.accum_steps:
        raise CLIError(f"checkpoint {path} was written with a different --accum-steps")
    _print(run.di, f"{PROG}: resumed from {path} at step {step}")
    run.metrics.truncate_after(step)
    return LoopState(start_step=step, step=step, skipped_nonfinite=int(state.get("skipped_nonfinite", 0)))


def _restore_masking_and_decoder(run, state, path):
    """The EMA tower and the MAE decoder of a checkpoint; first, so that a checkpoint of
    another masking mode or objective fails with the arguments to fix, not inside
    the optimizer's state."""
    try:
        if (state.get("mae_decoder") is None) != (run.decoder is None):
            raise ValueError("one has an MAE decoder, the other not")
        if run.decoder is not None:
            run.decoder.load_state_dict(state["mae_decoder"])
        run.masking.load_state_dict(state.get("ema"))
    except (ValueError, RuntimeError) as e:
        raise CLIError(f"checkpoint {path} does not fit this run's --objective/--mae-weight/--masking: {e}") from None


# ----------------------------------------------------------------------------- one step

@dataclasses.dataclass
class StepResult:
    """One optimizer step's numbers (loss: of the whole contrastive batch, mean over processes)."""
    loss: float
    lr: float
    grad_norm: float  # nan when the step was skipped
    logit_scale: torch.Tensor  # not synced to the host until logged
    masked: bool
    nonfinite: bool
    mae_loss: torch.Tensor = None  # the last micro-batch's reconstruction loss, when there is one


def _on_device(batch, device):
    """(images, tokens, ids_keep) of a loader batch on the device (ids_keep None: unmasked)."""
    ids_keep = batch["ids_keep"]
    if ids_keep is not None:
        ids_keep = ids_keep.to(device, non_blocking=True)
    return (batch["images"].to(device, non_blocking=True), batch["tokens"].to(device, non_blocking=True),
            ids_keep)


def _mean_over_processes(loss, di):
    """The loss averaged over the processes, as a Python float (a host sync)."""
    value = loss.detach().float().clone()
    if di.distributed:
        dist.all_reduce(value)
        value /= di.world_size
    return value.item()


def _check_finite(run, loss_value, step):
    """False for a nan/inf loss under --skip-nonfinite; raises NonFiniteLoss without it."""
    if math.isfinite(loss_value):
        return True
    if not run.args.skip_nonfinite:
        raise NonFiniteLoss(
            f"non-finite loss ({loss_value}) at step {step}; stopping (lr {run.sched.get_last_lr()[0]:.3g}, "
            f"precision {run.args.precision}). Lower --lr, use --precision fp32, or pass "
            f"--skip-nonfinite to skip such steps")
    return False


def _apply_gradients(run, finite):
    """Clip and apply the accumulated gradients (or drop them when a loss was not finite);
    advance the schedule. Returns the gradient norm (nan for a skipped step)."""
    args, opt, scaler = run.args, run.opt, run.scaler
    grad_norm = float("nan")
    if finite:
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            run.model.parameters(), args.grad_clip if args.grad_clip > 0 else float("inf")).item()
        scaler.step(opt)
        scaler.update()
    opt.zero_grad(set_to_none=True)
    run.sched.step()
    return grad_norm


def _contrastive_gradients(run, micro_batches, step):
    """The gradients of the contrastive loss over all micro-batches of the step, on all
    processes (flipkern.accumulate: every sample's negatives are the whole contrastive
    batch, --batch-size x --accum-steps); DDP syncs them once. Returns (loss averaged over
    processes, finite, the features' output dict, the last micro-batch's ids_keep)."""
    args, di = run.args, run.di
    accum = len(micro_batches)
    batches = []
    for micro, batch in enumerate(micro_batches):
        images, tokens, ids_keep = _on_device(batch, di.device)
        # the masks are drawn once per micro-batch and serve both passes of the accumulation
        batches.append((images, tokens, run.masking.select(images, ids_keep, step * accum + micro)))

    def loss_fn(out):
        loss = objectives.step_loss(run.model, out, args, di.group)
        if args.debug_nan_step is not None and step == args.debug_nan_step:
            loss = loss + float("nan")  # test hook: the non-finite loss guard
        return loss

    loss, out = contrastive_backward(run.step_module, batches, loss_fn, autocast=run.autocast,
                                     scaler=run.scaler)
    value = _mean_over_processes(loss, di)
    return value, _check_finite(run, value, step), out, batches[-1][2]


def train_step(run, micro_batches, step):
    """One optimizer step on ``micro_batches`` (--accum-steps loader batches): the
    gradients of their contrastive loss, then the optimizer and schedule step."""
    lr = run.sched.get_last_lr()[0]
    loss, finite, out, ids_keep = _contrastive_gradients(run, micro_batches, step)
    grad_norm = _apply_gradients(run, finite)
    if finite:
        run.masking.update(run.model.visual)
    mae_loss = out.get("mae_loss")
    return StepResult(loss=loss, lr=lr, grad_norm=grad_norm, logit_scale=out["logit_scale"].detach(),
                      masked=ids_keep is not None, nonfinite=not finite,
                      mae_loss=None if mae_loss is None else mae_loss.detach())


# ----------------------------------------------------------------------------- evaluate, save

def _print(di, *a, **k):
    if di.main:
        print(*a, **k, flush=True)


def evaluate_now(run, step):
    """Evaluate on the held-out data (rank 0; the others wait) and log it; the result
    dict, or None without held-out data or with --no-eval."""
    res = None
    if run.di.main and run.val_ds is not None and run.args.eval:
        res = evaluate(run.model, run.val_ds, run.tokenizer, run.di.device, batch_size=run.args.eval_batch_size,
                       num_samples=run.args.val_samples, autocast=run.autocast)
        run.metrics.write(dict(type="eval", step=step, **res))
    if run.di.distributed:
        dist.barrier()
    return res


def save_checkpoint(run, state):
    """Write the checkpoint of ``state.step`` (rank 0; the others wait), prune old ones."""
    path = ckpt.checkpoint_path(run.out_dir, state.step)
    if run.di.main:
        ckpt.atomic_save(dict(
            model=run.model.state_dict(), optimizer=run.opt.state_dict(), scheduler=run.sched.state_dict(),
            scaler=run.scaler.state_dict() if run.scaler.is_enabled() else None, step=state.step,
            data_step=state.step * run.args.accum_steps, rng=ckpt.rng_state(),
            skipped_nonfinite=state.skipped_nonfinite, config=run.config,
            mae_decoder=run.decoder.state_dict() if run.decoder is not None else None,
            ema=run.masking.state_dict()), path)
        ckpt.prune(run.out_dir, run.args.keep_checkpoints)
    if run.di.distributed:
        dist.barrier()
    return path


# ----------------------------------------------------------------------------- the loop

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

    def requested(self, di):
        """Whether any process got SIGTERM (all stop at the same step)."""
        flag = torch.tensor([1.0 if self.flag else 0.0], device=di.device)  # nccl reduces device tensors only
        if di.distributed:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() > 0


def make_loader(run, start_step):
    """The training batches from ``start_step`` (a checkpoint's data position) to the end."""
    args, di = run.args, run.di
    schedule = MaskSchedule(fkdata.num_keep_for(run.num_tokens, args.mask_ratio), args.accum_steps,
                            args.steps - args.unmasked_tune_steps)
    return fkdata.make_train_loader(
        run.train_ds, run.tokenizer, global_batch=args.batch_size, num_tokens=run.num_tokens, seed=args.seed,
        world_size=di.world_size, rank=di.rank, start_step=start_step * args.accum_steps,
        end_step=args.steps * args.accum_steps, num_keep_fn=schedule, workers=args.workers,
        pin_memory=di.device.type == "cuda")


def _log_step(run, state, result, dt, progress):
    """metrics.jsonl record and progress line every --log-every steps (and the first
    and last); the bar after every step."""
    args = run.args
    img_per_s = contrastive_batch(args) / dt  # all the samples of the step
    progress.update(state.step, result.loss, result.lr, img_per_s)
    if state.step % args.log_every and state.step not in (args.steps, state.start_step + 1):
        return
    run.metrics.write(dict(type="train", step=state.step, loss=result.loss, lr=result.lr,
                           grad_norm=result.grad_norm, logit_scale=result.logit_scale.float().mean().item(),
                           img_per_s=img_per_s, masked=result.masked, time=time.time() - run.started,
                           **({} if result.mae_loss is None else dict(mae_loss=result.mae_loss.float().item()))))
    eta_s = state.train_time / (state.step - state.start_step) * (args.steps - state.step)
    progress.log(state.step, result.loss, result.lr, img_per_s, eta_s)


def _between_steps(run, state, progress):
    """The checkpoint and evaluation due after ``state.step`` (the last step's come after the loop)."""
    args, step = run.args, state.step
    if step >= args.steps:
        return
    if args.checkpoint_every and step % args.checkpoint_every == 0:
        save_checkpoint(run, state)
    if args.eval_every and step % args.eval_every == 0:
        res = evaluate_now(run, step)
        if run.di.main and res and "zeroshot_top1" in res:
            progress.write(f"step {step}: zero-shot top-1 {100 * res['zeroshot_top1']:.1f}%")


def train(run, state):
    """The optimizer steps from ``state.step`` to --steps. Returns 'done', 'sigterm'
    (stopped early at a step boundary) or 'crashed' (--debug-stop-after)."""
    args, di = run.args, run.di
    it = iter(make_loader(run, state.step))
    _print(di, f"{PROG}: contrastive batch {contrastive_batch(args)} = --batch-size {args.batch_size} x "
               f"--accum-steps {args.accum_steps}, over {di.world_size} process(es); img/s counts all of it")
    progress = Progress(progress_mode(args.progress, di.main, sys.stderr.isatty()), args.steps, state.step)
    run.model.train()
    with _Sigterm() as term, contextlib.closing(progress):
        while state.step < args.steps:
            t0, c0 = time.time(), time.process_time()
            batches = [next(it) for _ in range(args.accum_steps)]
            state.bad_samples += sum(len(b["bad"]) for b in batches)
            result = train_step(run, batches, state.step)
            if result.nonfinite:
                state.skipped_nonfinite += 1
                if di.main:
                    print(f"{PROG}: warning: non-finite loss at step {state.step}; step skipped", file=sys.stderr)
            state.step += 1
            dt = time.time() - t0
            state.train_time += dt
            state.train_cpu_time += time.process_time() - c0
            state.samples_seen += contrastive_batch(args)
            if args.debug_sleep:
                time.sleep(args.debug_sleep)  # test hook: a slow run to send SIGTERM to
            _log_step(run, state, result, dt, progress)
            _between_steps(run, state, progress)
            if args.debug_stop_after is not None and state.step >= args.debug_stop_after:
                return "crashed"  # test hook: no final checkpoint, no summary
            if term.requested(di) and state.step < args.steps:
                return "sigterm"
    return "done"


# ----------------------------------------------------------------------------- summarize

def summarize(run, state, final_eval):
    """summary.json, the curves PNG and the summary line; returns the summary dict."""
    di, out_dir = run.di, run.out_dir
    bad_samples = state.bad_samples
    if di.distributed:
        t = torch.tensor([float(bad_samples)], device=di.device)
        dist.all_reduce(t)
        bad_samples = int(t.item())
    if di.main and run.args.plot:
        try:
            plot_curves(run.metrics.path, os.path.join(out_dir, "curves.png"))
        except Exception as e:  # a plot is not worth failing the run
            print(f"{PROG}: warning: could not draw the curves: {e}", file=sys.stderr)
    skipped_at_index = sum(sum(v.values()) for v in run.data_info.get("skipped_at_index", {}).values())
    summary = dict(
        steps=state.step, trained_steps=state.step - state.start_step, samples=state.samples_seen,
        contrastive_batch=contrastive_batch(run.args), accum_steps=run.args.accum_steps,
        wall_s=time.time() - run.started, train_s=state.train_time, train_cpu_s=state.train_cpu_time,
        img_per_s=state.samples_seen / state.train_time if state.train_time > 0 else 0.0,
        world_size=di.world_size, fast_path=run.args.fast_path, backends=fastpath.backends_used(),
        skipped_samples=bad_samples + skipped_at_index, skipped_nonfinite_steps=state.skipped_nonfinite,
        output_dir=out_dir, eval=final_eval or {}, **run.masking.summary(),
    )
    if di.main:
        with open(os.path.join(out_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
        print(format_summary(summary), flush=True)
    return summary


def format_summary(s):
    ev = s.get("eval") or {}
    parts = [f"steps={s['steps']}", f"contrastive batch={s['contrastive_batch']}", f"time={s['wall_s']:.1f}s",
             f"img/s={s['img_per_s']:.1f}"]
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


# ----------------------------------------------------------------------------- run

def run(args):
    resolve_defaults(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    di = setup_distributed(args.device)
    args.precision = resolve_precision(args.precision, di.device)
    try:
        return _run(args, di)
    finally:
        if di.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _run(args, di):
    run = build(args, di)
    state = restore(run)
    write_config(run)
    outcome = train(run, state)
    if outcome == "crashed":
        return None
    path = save_checkpoint(run, state)
    if outcome == "sigterm":
        _print(di, f"{PROG}: received SIGTERM; saved checkpoint {path} at step {state.step}; exiting")
        return dict(step=state.step, stopped=True, checkpoint=path)
    return summarize(run, state, evaluate_now(run, state.step))
