"""``flipkern-pretrain`` / ``python -m flipkern.pretrain``: FLIP-style CLIP pretraining.

With no arguments it trains the "tiny" CLIP on the built-in synthetic
shapes dataset (no download) with 50% of the image patches dropped, evaluates
zero-shot accuracy on the held-out split and prints a summary line.
Multi-process: ``torchrun --nproc_per_node N -m flipkern.pretrain ...``
(gloo on CPU, nccl on GPU); ``--batch-size`` is the global batch of a micro-step,
so the same command gives the same training with any number of processes; the
contrastive batch is ``--batch-size x --accum-steps``.
"""
import argparse
import os
import sys

from ..data.datasets import DataError
from .errors import PROG, CLIError, NonFiniteLoss
from .train import run

# The --model-override example of --help (a test parses it): a field of a sub-config.
MODEL_OVERRIDE_EXAMPLE = "vision.width=128"


def _positive_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _nonneg_int(s):
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {s!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _float(lo=None, hi=None, hi_open=False, lo_open=False):
    def parse(s):
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid float value: {s!r}") from None
        if v != v:
            raise argparse.ArgumentTypeError("must not be nan")
        if lo is not None and (v < lo or (lo_open and v == lo)):
            raise argparse.ArgumentTypeError(f"must be {'>' if lo_open else '>='} {lo}, got {s}")
        if hi is not None and (v > hi or (hi_open and v == hi)):
            raise argparse.ArgumentTypeError(f"must be {'<' if hi_open else '<='} {hi}, got {s}")
        return v
    return parse


def _override(s):
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    return k.strip(), v.strip()


def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_data_args(p.add_argument_group("data"))
    _add_model_args(p.add_argument_group("model"))
    _add_training_args(p.add_argument_group("training"))
    _add_masking_args(p.add_argument_group("masking mode and MAE (A-CLIP, MAE)"))
    _add_output_args(p.add_argument_group("output and checkpoints"))
    _add_logging_args(p.add_argument_group("evaluation and logging"))
    # test hooks, not shown in --help
    p.add_argument("--debug-nan-step", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-stop-after", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--debug-sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def _add_data_args(d):
    d.add_argument("--train-data", default=None,
                   help="CSV/TSV file or tar shards (brace patterns, '::'-joined); default: the built-in "
                        "synthetic dataset")
    d.add_argument("--val-data", default=None, help="held-out data for evaluation (same formats)")
    d.add_argument("--dataset-type", choices=["auto", "synthetic", "csv", "webdataset"], default="auto")
    d.add_argument("--csv-img-key", default="filepath")
    d.add_argument("--csv-caption-key", default="title")
    d.add_argument("--csv-separator", default="\t", help="one character; '\\t' or 'tab' for a tab")
    d.add_argument("--train-samples", type=_positive_int, default=200_000,
                   help="synthetic: size of the training split (samples are generated on the fly)")
    d.add_argument("--val-samples", type=_positive_int, default=1000,
                   help="number of held-out samples evaluated (synthetic: size of the held-out split)")
    d.add_argument("--synthetic-colours", default=None,
                   help="comma list of colours for the synthetic dataset (classes = colours x shapes)")
    d.add_argument("--synthetic-shapes", default=None, help="comma list of shapes for the synthetic dataset")
    d.add_argument("--synthetic-position-spread", type=_float(0, 1), default=None,
                   help="synthetic: how far shapes stray from the image centre (0: centred, 1: anywhere they "
                        "fit; default 0.25)")
    d.add_argument("--data-seed", type=int, default=0, help="seed of the synthetic dataset's content")
    d.add_argument("--workers", type=_nonneg_int, default=1, help="DataLoader worker processes per rank")
    d.add_argument("--bpe-vocab", default=None,
                   help="path to a CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz); default: byte tokenizer")
    d.add_argument("--context-length", type=_positive_int, default=None,
                   help="text tokens per caption (default: the model's)")


def _add_model_args(m):
    m.add_argument("--model", default="tiny", help="a preset of flipkern.reference.clip.PRESETS")
    m.add_argument("--image-size", type=_positive_int, default=None, help="override the preset's image size")
    m.add_argument("--patch-size", type=_positive_int, default=None, help="override the preset's patch size")
    m.add_argument("--model-override", type=_override, action="append", default=[], metavar="KEY=VALUE",
                   help="set a field of the model config (flipkern.reference.clip): 'vision.KEY' or 'text.KEY' "
                        "for one tower, a bare KEY for the config or the first tower that has it; e.g. "
                        f"--model-override {MODEL_OVERRIDE_EXAMPLE} (repeatable)")


def _add_training_args(t):
    t.add_argument("--steps", type=_positive_int, default=None, help="optimizer steps")
    t.add_argument("--batch-size", type=_positive_int, default=None,
                   help="global batch of one micro-step (one forward/backward), over all processes; the "
                        "contrastive batch is --batch-size x --accum-steps")
    t.add_argument("--accum-steps", type=_positive_int, default=1,
                   help="micro-steps per optimizer step; the loss contrasts all their samples together "
                        "(full-batch negatives: features first without grad, then each micro-step again "
                        "with grad), so memory is one micro-step's activations plus all features")
    t.add_argument("--grad-checkpointing", action="store_true",
                   help="per-block activation checkpointing in both towers: recompute each block's "
                        "activations in the backward (less memory, about one more forward of time)")
    t.add_argument("--lr", type=_float(0, lo_open=True), default=None, help="peak learning rate")
    t.add_argument("--min-lr-ratio", type=_float(0, 1), default=0.05,
                   help="final lr as a fraction of --lr (cosine end point)")
    t.add_argument("--warmup-steps", type=_nonneg_int, default=None,
                   help="linear lr warmup; default: 50, or a tenth of --steps when that is fewer")
    t.add_argument("--weight-decay", type=_float(0), default=0.1)
    t.add_argument("--beta1", type=_float(0, 1, hi_open=True), default=0.9)
    t.add_argument("--beta2", type=_float(0, 1, hi_open=True), default=0.98)
    t.add_argument("--eps", type=_float(0, lo_open=True), default=1e-6)
    t.add_argument("--grad-clip", type=_float(0), default=1.0, help="max grad norm (0: off)")
    t.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default=None,
                   help="autocast dtype of the forward (weights stay fp32; fp16 adds a GradScaler); default: "
                        "bf16 on a CUDA device, fp32 on CPU")
    t.add_argument("--mask-ratio", type=_float(0, 1, hi_open=True), default=0.5,
                   help="fraction of image patches dropped (FLIP), in [0, 1)")
    t.add_argument("--unmasked-tune-steps", type=_nonneg_int, default=None,
                   help="the last N steps train with no masking (FLIP's unmasked tuning); default: the last "
                        "20%% of --steps when --mask-ratio > 0")
    t.add_argument("--seed", type=int, default=0, help="seeds model init, data order and masks")
    fp = t.add_mutually_exclusive_group()
    fp.add_argument("--fast-path", dest="fast_path", action="store_true", default=True,
                    help="flipkern kernels (default)")
    fp.add_argument("--no-fast-path", dest="fast_path", action="store_false", help="pure-PyTorch reference ops")
    t.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    t.add_argument("--threads", type=_nonneg_int, default=0, help="torch CPU threads per process (0: default)")
    t.add_argument("--skip-nonfinite", action="store_true",
                   help="skip an optimizer step whose loss is nan/inf instead of stopping")


def _add_masking_args(m):
    m.add_argument("--masking", choices=["random", "attentive"], default="random",
                   help="which patches a masked step keeps: FLIP's random ones, or A-CLIP's attentive ones (the "
                        "highest-scored by an EMA copy of the vision tower: each patch's similarity to its pooled "
                        "embedding)")
    m.add_argument("--ema-decay", type=_float(0, 1, hi_open=True), default=0.99,
                   help="attentive: the EMA vision tower's decay per optimizer step")
    m.add_argument("--attentive-random-share", type=_float(0, 1), default=0.0,
                   help="attentive: this share of the kept patches is chosen at random instead")
    m.add_argument("--objective", choices=["clip", "mae"], default="clip",
                   help="clip: the contrastive loss (+ --mae-weight x MAE loss); mae: MAE pretraining of the "
                        "vision tower alone")
    m.add_argument("--mae-weight", type=_float(0), default=0.0,
                   help="weight of MAE's reconstruction loss (normalized pixels of the removed patches) added to "
                        "the contrastive loss (0: off)")
    m.add_argument("--mae-decoder-width", type=_positive_int, default=64, help="MAE decoder width")
    m.add_argument("--mae-decoder-depth", type=_nonneg_int, default=1, help="MAE decoder blocks")
    m.add_argument("--mae-decoder-heads", type=_positive_int, default=4, help="MAE decoder attention heads")


def _add_output_args(c):
    c.add_argument("--output-dir", default=None, help="default: runs/<timestamp>")
    c.add_argument("--checkpoint-every", type=_nonneg_int, default=200,
                   help="steps between checkpoints (0: only at the end)")
    c.add_argument("--keep-checkpoints", type=_nonneg_int, default=2, help="keep the last N (0: all)")
    c.add_argument("--resume", default=None, help="checkpoint to resume from ('latest': the output dir's newest)")
    c.add_argument("--no-auto-resume", dest="auto_resume", action="store_false", default=True,
                   help="do not resume from the output dir's latest checkpoint")


def _add_logging_args(e):
    e.add_argument("--eval-every", type=_nonneg_int, default=0, help="steps between evaluations (0: only at the end)")
    e.add_argument("--eval-batch-size", type=_positive_int, default=250)
    e.add_argument("--no-eval", dest="eval", action="store_false", default=True, help="skip evaluation")
    e.add_argument("--log-every", type=_positive_int, default=10,
                   help="steps between metrics.jsonl records and, when stderr is not a terminal, progress "
                        "lines (step, loss, lr, img/s, ETA)")
    e.add_argument("--no-progress", dest="progress", action="store_false", default=True,
                   help="no progress on stderr: neither the tqdm bar (stderr a terminal) nor the progress lines")
    e.add_argument("--no-plot", dest="plot", action="store_false", default=True)


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.unmasked_tune_steps and args.steps is not None and args.unmasked_tune_steps > args.steps:
        parser.error(f"--unmasked-tune-steps {args.unmasked_tune_steps} exceeds --steps {args.steps}")
    if args.device == "cuda":
        import torch

        from .build import cuda_holds_ranks, local_ranks
        if not torch.cuda.is_available():
            parser.error("--device cuda: no CUDA device is available")
        if not cuda_holds_ranks():
            parser.error(f"--device cuda: {local_ranks()} ranks on this node need a GPU each (NCCL), "
                         f"found {torch.cuda.device_count()}; use --device cpu (gloo)")
    if args.train_data is None and args.dataset_type in ("csv", "webdataset"):
        parser.error(f"--dataset-type {args.dataset_type} needs --train-data")
    if args.train_data is not None and args.dataset_type == "synthetic":
        parser.error("--dataset-type synthetic takes no --train-data")
    if args.resume not in (None, "latest") and not os.path.isfile(args.resume):
        parser.error(f"--resume: no such checkpoint file: {args.resume}")
    if args.resume == "latest" and args.output_dir is None:
        parser.error("--resume latest needs --output-dir")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        run(args)
    except (CLIError, DataError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
