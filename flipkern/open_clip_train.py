"""open_clip's own training script on flipkern's kernels: a change of command only.

    python -m flipkern.open_clip_train <open_clip_train.main's own arguments>
    flipkern-open-clip-train <the same>             (console script)
    torchrun --nproc_per_node N -m flipkern.open_clip_train <the same>

runs ``open_clip_train.main.main`` itself (data, logging, checkpoints, resume,
evaluation, --accum-freq, --precision, --torchcompile, DDP: all open_clip's
code) with every model it creates passed through ``fk.apply_to_open_clip`` and
its loss through the same patch's loss part. The patch only shadows methods
(no parameter is renamed or added), so the state_dict, and with it every
checkpoint, is the one stock open_clip_train writes and reads: a run started
with one command resumes with the other. What the patch does not cover runs
stock and is reported in the log (rank 0), never an error.
"""
import inspect
import logging
import sys

# open_clip_train.main does ``from open_clip import create_model_and_transforms, create_loss``
# and calls those two names once per model and once for the loss. Wrapping them *in
# open_clip_train.main's namespace* reaches exactly the objects the training loop uses, right
# after open_clip builds them and before DDP / torch.compile wrap them, without copying any of
# main() and without changing open_clip for anyone else in the process.
HOOKS = ("create_model_and_transforms", "create_loss")
TESTED_WITH = "open_clip_torch 3.3.0"


def _train_main_module():
    try:
        import open_clip
        import open_clip_train.main as train_main
    except ImportError as e:
        raise ImportError(f"flipkern.open_clip_train: open_clip_train is not importable ({e}); "
                          "pip install 'open_clip_torch[training]' (open_clip_train and its data "
                          "dependencies)") from None
    moved = [name for name in HOOKS + ("main",) if not callable(getattr(train_main, name, None))]
    try:
        source = inspect.getsource(train_main.main)
    except OSError:  # installed without sources: the names are all that can be checked
        source = None
    if not moved and source is not None:
        moved = [name for name in HOOKS if f"{name}(" not in source]
    if moved:
        raise RuntimeError(
            f"flipkern.open_clip_train: open_clip_train.main of open_clip_torch {open_clip.__version__} "
            f"no longer uses {', '.join(moved)} the way flipkern hooks it (tested with {TESTED_WITH}); "
            "the flipkern command cannot patch this version. Run stock `python -m open_clip_train.main`, "
            "or call flipkern.apply_to_open_clip(model, loss=loss) in your own training code.")
    return train_main


def _is_rank0():
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _describe(report):
    """{part: "flipkern" or why not} -> 'visual: flipkern; text: stock open_clip (why)'."""
    return "; ".join(f"{part}: {'flipkern' if how == 'flipkern' else f'stock open_clip ({how})'}"
                     for part, how in report.items())


def _log(message):
    if _is_rank0():
        logging.info("flipkern: %s", message)


def _patched_model_factory(create_model_and_transforms):
    from .open_clip_patch import apply_to_open_clip

    def create_model_and_transforms_on_flipkern(model_name, *args, **kwargs):
        model, *transforms = create_model_and_transforms(model_name, *args, **kwargs)
        if kwargs.get("jit"):
            _log(f"model {model_name!r}: stock open_clip (a TorchScript model (--torchscript) is not patched)")
        else:
            report = apply_to_open_clip(model)
            covered = sum(how == "flipkern" for how in report.values())
            _log(f"model {model_name!r} ({covered} of {len(report)} towers on flipkern): {_describe(report)}")
        return (model, *transforms)

    return create_model_and_transforms_on_flipkern


def _patched_loss_factory(create_loss):
    from .open_clip_patch import _patch_loss  # the loss part of apply_to_open_clip

    def create_loss_on_flipkern(args):
        loss = create_loss(args)
        how = _patch_loss(loss)
        _log(f"loss {type(loss).__name__} (world size {args.world_size}): {_describe({'loss': how})}")
        return loss

    return create_loss_on_flipkern


def install():
    """Wrap open_clip_train.main's model and loss factories (idempotent); returns the module."""
    train_main = _train_main_module()
    if not getattr(train_main, "_flipkern_installed", False):
        train_main.create_model_and_transforms = _patched_model_factory(train_main.create_model_and_transforms)
        train_main.create_loss = _patched_loss_factory(train_main.create_loss)
        train_main._flipkern_installed = True
    return train_main


def main(argv=None):
    """open_clip_train.main.main(argv) with flipkern's kernels; argv defaults to sys.argv[1:]."""
    # main's return value is dropped, as `python -m open_clip_train.main` drops it (exit status 0)
    install().main(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
