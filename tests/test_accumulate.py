"""flipkern.contrastive_backward (accumulation with full-batch negatives) and per-block
activation checkpointing, in float64 on the micro CLIP of test_fastpath:
- 4 micro-batches of b == one batch of 4b (same samples, same masks): loss and every
  parameter's gradient, CLIP and SigLIP, fast path and reference, 1 process and 2 (gloo, DDP);
- the second pass replays what the forward draws (a forward with dropout);
- checkpointing on and off give identical gradients."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_fastpath import keep, make_batch, make_config, make_model

import flipkern as fk
from flipkern import fastpath
from flipkern.pretrain.train import _ForwardModule

MICRO_BATCH, ACCUM = 3, 4
TOL = dict(rtol=1e-10, atol=1e-12)  # float64 vs float64, summed in another order (docs/DESIGN.md section 4)


def _inputs(cfg, batch, seed=1):
    images, tokens = make_batch(cfg, batch, seed=seed)
    return images, tokens, keep(cfg, batch, 0.5, seed=seed + 1)


def _split(inputs, parts):
    return list(zip(*(t.chunk(parts) for t in inputs)))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _one_batch(model, inputs, fast, group=None):
    """The plain step on the whole contrastive batch: forward, loss, backward."""
    model.zero_grad(set_to_none=True)
    out = fastpath.clip_forward(model, *inputs, fast=fast)
    loss = fastpath.contrastive_loss(model, out, fast=fast, group=group)
    loss.backward()
    return loss.detach(), _grads(model)


def _accumulated(model, forward, micro_batches, fast, group=None):
    model.zero_grad(set_to_none=True)
    loss, out = fk.contrastive_backward(
        forward, micro_batches, lambda o: fastpath.contrastive_loss(model, o, fast=fast, group=group))
    return loss, _grads(model)


def _assert_same(got, want):
    (gl, gg), (wl, wg) = got, want
    torch.testing.assert_close(gl, wl, **TOL)
    assert gg.keys() == wg.keys()
    for n in wg:
        torch.testing.assert_close(gg[n], wg[n], **TOL, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_four_micro_batches_equal_one_batch_of_four_times_the_size(loss, fast):
    cfg = make_config(loss)
    model = make_model(cfg)
    inputs = _inputs(cfg, MICRO_BATCH * ACCUM)
    forward = _ForwardModule(model, fast)
    want = _one_batch(model, inputs, fast)
    _assert_same(_accumulated(model, forward, _split(inputs, ACCUM), fast), want)
    _assert_same(_accumulated(model, forward, _split(inputs, 1), fast), want)  # one micro-batch: one pass


def test_the_second_pass_replays_the_forwards_random_draws():
    """A forward that draws (dropout on the features): the gradients are those of the loss of the
    features the first pass computed, i.e. of one differentiable pass over the same draws."""
    cfg = make_config("clip")
    model = make_model(cfg)

    def forward(images, tokens, ids_keep):
        out = fastpath.clip_forward(model, images, tokens, ids_keep)
        return dict(out, image_features=F.dropout(out["image_features"], 0.5))

    def loss_fn(o):
        return fastpath.contrastive_loss(model, o)

    micro_batches = _split(_inputs(cfg, MICRO_BATCH * ACCUM), ACCUM)
    torch.manual_seed(7)
    outs = [forward(*b) for b in micro_batches]  # every activation kept: the memory-hungry way
    loss = loss_fn(dict(outs[-1], **{k: torch.cat([o[k] for o in outs]) for k in ("image_features",
                                                                                "text_features")}))
    loss.backward()
    want = (loss.detach(), _grads(model))
    rng_after_one_pass = torch.get_rng_state()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)
    got_loss, _ = fk.contrastive_backward(forward, micro_batches, loss_fn)
    _assert_same((got_loss, _grads(model)), want)
    assert torch.equal(torch.get_rng_state(), rng_after_one_pass)  # the RNG advanced as by one pass


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
def test_checkpointing_on_and_off_give_identical_gradients(fast):
    cfg = make_config("siglip")
    model = make_model(cfg)
    inputs = _inputs(cfg, 6)
    off = _one_batch(model, inputs, fast)
    model.set_grad_checkpointing(True)
    assert model.visual.grad_checkpointing and model.text.grad_checkpointing
    on = _one_batch(model, inputs, fast)
    assert torch.equal(on[0], off[0])
    for n in off[1]:
        assert torch.equal(on[1][n], off[1][n]), n
    # and under accumulation (the second pass is where the checkpoints recompute)
    _assert_same(_accumulated(model, _ForwardModule(model, fast), _split(inputs, 2), fast), off)


def test_empty_micro_batches_are_refused():
    with pytest.raises(ValueError, match="micro_batches"):
        fk.contrastive_backward(lambda *a: None, [], lambda o: None)


# ----------------------------------------------------------------------------- 2 processes

WORLD = 2


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        results = {}
        for loss in ("clip", "siglip"):
            cfg = make_config(loss)
            model = make_model(cfg)
            inputs = _inputs(cfg, MICRO_BATCH * ACCUM * WORLD)
            results[loss, "one process"] = _one_batch(model, inputs, fast=True)
            ddp = torch.nn.parallel.DistributedDataParallel(_ForwardModule(model, True))
            # this rank's share of each micro-batch (as the loader deals them out)
            mine = [tuple(t.chunk(WORLD)[rank] for t in b) for b in _split(inputs, ACCUM)]
            results[loss, "accumulated"] = _accumulated(model, ddp, mine, True, group=dist.group.WORLD)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_accumulated_equal_one_process_one_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    per_rank = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    for loss in ("clip", "siglip"):
        want_loss, want_grads = per_rank[0][loss, "one process"]
        # each rank's loss covers its own rows; their mean is the loss of the whole batch
        got_loss = sum(r[loss, "accumulated"][0] for r in per_rank) / WORLD
        for r in per_rank:  # DDP averaged the gradients: every rank holds the same
            _assert_same((got_loss, r[loss, "accumulated"][1]), (want_loss, want_grads))
