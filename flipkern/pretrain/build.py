"""What a pretraining run is made of, built from the parsed arguments: the
process group and device, the model config (preset + overrides), the datasets,
AdamW's parameter groups and the warmup/cosine schedule."""
import ast
import dataclasses
import math
import os

import torch
import torch.distributed as dist

from .. import data as fkdata
from .errors import CLIError


def resolve_precision(precision, device):
    """--precision as given, else bf16 autocast on a CUDA device (tensor-core matmuls, no
    loss scaling, fp32 master weights) and fp32 on CPU (the README's measured CPU runs)."""
    if precision is not None:
        return precision
    return "bf16" if device.type == "cuda" else "fp32"


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

    def load(path):  # --val-data is read as the same type as --train-data
        if kind == "csv":
            return fkdata.CsvDataset(path, image_size, img_key=args.csv_img_key,
                                     caption_key=args.csv_caption_key, sep=args.csv_separator)
        return fkdata.TarShardDataset(path, image_size)

    train = load(args.train_data)
    val = load(args.val_data) if args.val_data else None
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
