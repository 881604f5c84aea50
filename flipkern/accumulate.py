"""Gradient accumulation that keeps full-batch negatives (contrastive batches bigger than memory).

Summing per-micro-batch losses shrinks the contrastive batch to one micro-batch:
each sample only meets its own micro-batch's negatives. ``contrastive_backward``
instead computes the loss over the union of all micro-batches (on all ranks),
with the memory of one micro-batch's activations plus every sample's features
(open_clip's ``--accum-freq`` and GradCache do the same):

1. every micro-batch's features, without grad (no activations kept);
2. the loss over all of them and its gradient w.r.t. the features: the chunked
   flipkern losses never hold the [batch, batch] logits;
3. each micro-batch again, with grad, back-propagating its slice of those
   feature gradients.

The second forward must compute the same features as the first: the masks
(ids_keep) are part of each micro-batch and serve both passes, and the RNG is
replayed (whatever the forward draws, e.g. dropout or open_clip's PatchDropout,
is drawn identically). The reference CLIP itself draws nothing.
"""
import contextlib

import torch

FEATURES = ("image_features", "text_features")
SCALARS = ("logit_scale", "logit_bias")


def _rng_state(device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(device, state):
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _no_sync(model, last):
    """DDP syncs gradients once per step: on the last micro-batch's backward only."""
    if last or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def _features_without_grad(model, micro_batches, autocast):
    """Pass 1: the output dict of each micro-batch (no grad) and the RNG state it began with."""
    outs, states = [], []
    with torch.no_grad():
        for images, tokens, ids_keep in micro_batches:
            states.append(_rng_state(images.device))
            with autocast():
                outs.append(model(images, tokens, ids_keep))
    return outs, states


def _loss_and_feature_grads(outs, loss_fn):
    """Pass 2's targets: the loss over all micro-batches' features and its gradient with
    respect to each feature row and to logit_scale / logit_bias (of the last forward)."""
    leaves = {k: torch.cat([o[k] for o in outs]).detach().requires_grad_() for k in FEATURES}
    for k in SCALARS:
        if outs[-1].get(k) is not None:
            leaves[k] = outs[-1][k].detach().requires_grad_()
    loss = loss_fn(leaves)
    grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    return loss.detach(), leaves, dict(zip(leaves, grads))


def contrastive_backward(model, micro_batches, loss_fn, *, autocast=None, scaler=None):
    """Accumulate into the parameters' .grad the gradient of the contrastive loss over all
    ``micro_batches`` together: every sample's negatives are all the samples of all micro-batches on
    all ranks. Memory: one micro-batch's activations plus all the features.

    model: ``model(images, tokens, ids_keep)`` -> the output dict of flipkern.reference.clip.CLIP
        (image_features, text_features, logit_scale[, logit_bias]): the reference CLIP, a module
        calling flipkern.fastpath.clip_forward, or DistributedDataParallel around one (gradients
        then sync once, on the last micro-batch).
    micro_batches: a sequence of (images, tokens, ids_keep) on the model's device, read twice (it
        may make each one on access, so that only one micro-batch's inputs are in memory); ids_keep
        (the FLIP masks, None: unmasked) is drawn once per micro-batch and serves both passes.
    loss_fn: ``loss_fn(out)`` -> 0-d loss of a dict like the model's over the concatenated
        features, e.g. ``lambda out: fk.fastpath.contrastive_loss(clip, out, group=group)``.
    autocast: a factory of the context each forward runs in (e.g. ``lambda: torch.autocast("cuda",
        torch.bfloat16)``); None: none.
    scaler: a torch.amp.GradScaler whose scale the gradients get (fp16), or None.

    Returns (loss, out): the loss (detached) and the dict the loss was computed on (all features,
    detached). One micro-batch needs no second pass and runs forward, loss, backward as usual.
    """
    if not micro_batches:
        raise ValueError("flipkern.contrastive_backward: micro_batches is empty")
    autocast = autocast or contextlib.nullcontext
    scale = scaler.scale if scaler is not None else (lambda t: t)
    if len(micro_batches) == 1:
        with _no_sync(model, True), autocast():
            out = model(*micro_batches[0])
            loss = loss_fn(out)
        scale(loss).backward()
        return loss.detach(), {k: v.detach() if torch.is_tensor(v) else v for k, v in out.items()}
    outs, states = _features_without_grad(model, micro_batches, autocast)
    loss, leaves, grads = _loss_and_feature_grads(outs, loss_fn)
    device = outs[0][FEATURES[0]].device
    rng_after = _rng_state(device)
    start = 0
    for i, (batch, state) in enumerate(zip(micro_batches, states)):
        last = i == len(micro_batches) - 1
        _set_rng_state(device, state)
        with _no_sync(model, last):
            with autocast():
                out = model(*batch)
            rows = slice(start, start + out[FEATURES[0]].shape[0])
            start = rows.stop
            # logit_scale / logit_bias are the same parameters in every micro-batch: their whole
            # gradient goes through the last one (so DDP syncs them with the rest)
            targets = [(out[k], grads[k][rows]) for k in FEATURES]
            targets += [(out[k], grads[k]) for k in SCALARS if last and grads.get(k) is not None]
            tensors, grad_tensors = zip(*[(t, scale(g).to(t.dtype)) for t, g in targets])
            torch.autograd.backward(tensors, grad_tensors)
    _set_rng_state(device, rng_after)
    return loss, {k: v.detach() for k, v in leaves.items()}


__all__ = ["contrastive_backward"]
