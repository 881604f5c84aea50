"""The token-dropping ops together in a small model, eager and under
torch.compile(fullgraph=True), on every backend usable here."""
import pytest
import torch
import torch.nn.functional as F
from conftest import usable_backends

import flipkern as fk

BACKENDS = usable_backends(fk.masking.ALL_BACKENDS)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    # Each test compiles the same code objects again (other backend, other shapes):
    # start from an empty cache so the recompile limit measures one test only.
    torch._dynamo.reset()


class TinyMaskedEncoder(torch.nn.Module):
    """Patch-embed only the kept patches (A-CLIP style: keep the highest scores),
    add their position embedding, and restore a full grid with a mask token."""

    def __init__(self, C=2, p=2, D=6, N=12):
        super().__init__()
        self.p, self.N = p, N
        self.embed = torch.nn.Conv2d(C, D, p, stride=p)
        self.pos = torch.nn.Parameter(torch.randn(N, D))
        self.mask_token = torch.nn.Parameter(torch.randn(D))

    def forward(self, images, scores, keep):
        ids = fk.topk_keep_indices(scores, keep)
        tok = F.linear(fk.gather_patches(images, ids, self.p), self.embed.weight.flatten(1), self.embed.bias)
        tok = tok + fk.drop_tokens(self.pos.expand(images.shape[0], -1, -1), ids)
        full = fk.restore_tokens(torch.tanh(tok), ids, self.N, self.mask_token)
        # drop_tokens with the position add in the kernel, on the restored grid
        return fk.drop_tokens(full, ids, self.pos).square().mean() + full.mean()


@pytest.mark.parametrize("backend", BACKENDS)
def test_model_compiles_fullgraph_and_matches_eager(backend):
    torch.manual_seed(0)
    model = TinyMaskedEncoder()
    images, scores = torch.randn(3, 2, 6, 8), torch.randn(3, 12)
    with fk.use_backend(backend):
        eager = model(images, scores, 5)
        eager_grads = torch.autograd.grad(eager, list(model.parameters()))
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        out = compiled(images, scores, 5)
        grads = torch.autograd.grad(out, list(model.parameters()))
    torch.testing.assert_close(out, eager)
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dynamic", [False, True])
def test_random_keep_indices_compiles_fullgraph(backend, dynamic):
    def f(x):  # with dynamic=True the batch size reaches the ops as a SymInt
        ids = fk.random_keep_indices(x.shape[0], x.shape[1], keep_ratio=0.5)
        return fk.drop_tokens(x, ids), ids

    compiled = torch.compile(f, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for B in (4, 3):
        x = torch.randn(B, 10, 3)
        with fk.use_backend(backend):
            out, ids = compiled(x)
        assert ids.shape == (B, 5) and bool((ids[:, 1:] > ids[:, :-1]).all())
        torch.testing.assert_close(out, x[torch.arange(B)[:, None], ids], rtol=0, atol=0)
