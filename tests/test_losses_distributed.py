"""Chunked contrastive losses over 2 and 3 processes (gloo, CPU) against the
single-process reference loss on the concatenated batch.

Each rank holds b samples of a global batch of W*b and calls the loss with the
world group. What DDP does with the results is: average the loss values and average
the gradients of every parameter. For the features (activations of a rank's own
samples) that average is the rank's gradient / W at the rank's rows; for logit_scale
and logit_bias (replicated parameters) the mean over ranks. Both must equal the
gradients of the single-process loss on all W*b samples, in float64 to ~1e-10.
The workers run every usable backend for both losses in one spawn per world size.
"""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import usable_backends

import flipkern as fk
from flipkern import losses
from flipkern.reference import losses as ref

BACKENDS = usable_backends(losses.ALL_BACKENDS)
LOCAL_BATCH, DIM, CHUNK = 5, 6, 2  # chunk 2 of 5 rows: a short last chunk on every rank
LOSSES = ["clip", "siglip"]


def _global_inputs(world):
    g = torch.Generator().manual_seed(1000 + world)
    img = F.normalize(torch.randn(world * LOCAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(world * LOCAL_BATCH, DIM, generator=g, dtype=torch.float64), dim=-1)
    return img, txt, torch.tensor(9.5, dtype=torch.float64), torch.tensor(-3.2, dtype=torch.float64)


def _value_and_grads(fn, img, txt, scale, bias):
    leaves = [t.detach().clone().requires_grad_() for t in (img, txt, scale, bias)]
    out = fn(*leaves)
    out.backward()
    return [out.detach()] + [t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves]


def _loss_fn(name, **kw):
    if name == "clip":
        return lambda i, t, s, b: fk.clip_loss(i, t, s, **kw)
    return lambda i, t, s, b: fk.siglip_loss(i, t, s, b, **kw)


COLLECTIVES = ("all_gather_into_tensor", "reduce_scatter_single", "all_gather", "all_reduce")


def _worker(rank, world, init_file, out_dir, backends):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    originals = {c: getattr(dist, c) for c in COLLECTIVES}

    def counting(calls, name):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return originals[name](*args, **kwargs)
        return wrapper

    try:
        torch.set_num_threads(1)  # W processes share this machine's cores
        img, txt, scale, bias = _global_inputs(world)
        rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
        results = {}
        for backend in backends:
            for name in LOSSES:
                calls = {}  # the collectives one forward + backward runs
                for c in COLLECTIVES:
                    setattr(dist, c, counting(calls, c))
                with fk.use_backend(backend):
                    fn = _loss_fn(name, chunk_size=CHUNK, group=dist.group.WORLD)
                    results[(backend, name)] = _value_and_grads(fn, img[rows], txt[rows], scale, bias)
                for c in COLLECTIVES:
                    setattr(dist, c, originals[c])
                results[(backend, name, "collectives")] = calls
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def distributed_results(request, tmp_path_factory):
    world = request.param
    tmp = tmp_path_factory.mktemp(f"world{world}")
    mp.spawn(_worker, args=(world, str(tmp / "init"), str(tmp), BACKENDS), nprocs=world, join=True)
    return world, [torch.load(tmp / f"rank{r}.pt") for r in range(world)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", LOSSES)
def test_ddp_average_equals_single_process_loss(distributed_results, backend, name):
    world, per_rank = distributed_results
    img, txt, scale, bias = _global_inputs(world)
    ref_fn = ((lambda i, t, s, b: ref.clip_loss(i, t, s)) if name == "clip" else ref.siglip_loss)
    want = _value_and_grads(ref_fn, img, txt, scale, bias)
    ranks = [r[(backend, name)] for r in per_rank]
    got = [
        torch.stack([r[0] for r in ranks]).mean(),          # loss averaged over ranks
        torch.cat([r[1] for r in ranks]) / world,           # DDP: sum over ranks / W
        torch.cat([r[2] for r in ranks]) / world,
        torch.stack([r[3] for r in ranks]).mean(),
        torch.stack([r[4] for r in ranks]).mean(),
    ]
    for n, a, b in zip(("loss", "d_image", "d_text", "d_scale", "d_bias"), got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "reference"])
@pytest.mark.parametrize("name", LOSSES)
def test_one_gather_and_one_reduce_scatter(distributed_results, backend, name):
    # CLIP gathers both towers in one buffer; SigLIP gathers the texts only.
    _, per_rank = distributed_results
    for r in per_rank:
        assert r[(backend, name, "collectives")] == {"all_gather_into_tensor": 1, "reduce_scatter_single": 1}
