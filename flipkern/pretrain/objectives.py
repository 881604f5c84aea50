"""What a training step optimizes: ``--objective clip`` (the contrastive loss, plus
``--mae-weight`` times MAE's reconstruction loss when that is > 0, as FLIP tried) or
``--objective mae`` (MAE pretraining of the vision tower alone: no text forward,
the text tower and logit scale stay frozen).

The MAE decoder (flipkern.reference.mae.MAEDecoder, --mae-decoder-*) reads the
vision tower's kept tokens; steps without masking (FLIP's unmasked tuning)
remove no patch, so they have no reconstruction loss.
"""

from .. import fastpath
from ..reference import mae as ref_mae
from .errors import CLIError


def uses_decoder(args):
    return args.objective == "mae" or args.mae_weight > 0


def check_args(args):
    """The combinations that cannot train (after resolve_defaults)."""
    if uses_decoder(args) and args.mask_ratio <= 0:
        what = "--objective mae" if args.objective == "mae" else f"--mae-weight {args.mae_weight}"
        raise CLIError(f"{what} needs --mask-ratio > 0 (MAE reconstructs the removed patches)")
    if args.objective == "mae" and args.unmasked_tune_steps:
        raise CLIError(f"--objective mae: --unmasked-tune-steps {args.unmasked_tune_steps} would train steps "
                       "with nothing to reconstruct; give 0")
    if uses_decoder(args) and args.accum_steps > 1:
        # the accumulation's first pass keeps only the contrastive features of each
        # micro-batch; a per-micro-batch reconstruction loss would be left out of it
        what = "--objective mae" if args.objective == "mae" else f"--mae-weight {args.mae_weight}"
        raise CLIError(f"{what} does not combine with --accum-steps {args.accum_steps} yet; use --accum-steps 1")
    if args.masking == "attentive" and args.mask_ratio <= 0:
        raise CLIError("--masking attentive needs --mask-ratio > 0")


def build_decoder(args, cfg):
    """The MAE decoder for the vision config of ``cfg``, or None when no loss uses one."""
    if not uses_decoder(args):
        return None
    v = cfg.vision
    try:
        dcfg = ref_mae.MAEDecoderConfig(width=args.mae_decoder_width, depth=args.mae_decoder_depth,
                                        heads=args.mae_decoder_heads)
    except ValueError as e:
        raise CLIError(f"--mae-decoder-*: {e}") from None
    return ref_mae.MAEDecoder(dcfg, v.width, v.grid, v.channels * v.patch_size ** 2)


def freeze_unused(model, args):
    """--objective mae trains the vision tower only: the rest gets no gradient (and so no
    optimizer state, and DDP does not wait for it)."""
    if args.objective == "mae":
        for p in model.parameters():
            p.requires_grad_(False)
        model.visual.requires_grad_(True)


def step_forward(model, decoder, objective, images, tokens, ids_keep, *, fast):
    """The forward of one step: the clip_forward dict, with ``mae_loss`` when a decoder
    is given and patches were removed; for --objective mae only ``mae_loss`` (and the
    frozen logit_scale, which the step logs)."""
    if objective == "mae":
        x = fastpath.vision_tokens(model.visual, images, ids_keep, fast=fast)
        return dict(mae_loss=fastpath.mae_loss(decoder, model.visual, x, images, ids_keep, fast=fast),
                    logit_scale=model.scale_and_bias()[0].detach())
    with_mae = decoder is not None and ids_keep is not None
    out = fastpath.clip_forward(model, images, tokens, ids_keep, fast=fast, image_tokens=with_mae)
    if with_mae:
        out["mae_loss"] = fastpath.mae_loss(decoder, model.visual, out.pop("image_tokens"), images, ids_keep,
                                            fast=fast)
    return out


def step_loss(model, out, args, group):
    """The loss a step minimizes from step_forward's dict."""
    if args.objective == "mae":
        return out["mae_loss"]
    loss = fastpath.contrastive_loss(model, out, fast=args.fast_path, group=group)
    if "mae_loss" in out:
        loss = loss + args.mae_weight * out["mae_loss"].to(loss.dtype)
    return loss


__all__ = ["uses_decoder", "check_args", "build_decoder", "freeze_unused", "step_forward", "step_loss"]
