"""flipkern.blocks: the one block forward, through each family's adapter, against the
block module's own forward (float64, so any difference beyond rounding is a bug).

The oracle of the packed forward is the block's own forward on each sequence alone.
"""
import pytest
import torch

import flipkern
from flipkern.blocks import block_parts, dense_block_forward, packed_block_forward
from flipkern.reference.vit import Block

D, HEADS = 32, 4
LENGTHS = torch.tensor([7, 1, 5, 3])


def tight(got, want):
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def reference_block():
    return Block(D, HEADS).double()


def open_clip_block(ls_init_value):
    transformer = pytest.importorskip("open_clip.transformer")
    block = transformer.ResidualAttentionBlock(D, HEADS, ls_init_value=ls_init_value).double()
    with torch.no_grad():  # in_proj_bias and out_proj.bias start at zero; make them count
        block.attn.in_proj_bias.normal_()
        block.attn.out_proj.bias.normal_()
    return block


def causal_mask(n):
    return torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)


def own_forward(block, x, causal):
    """The block module's own forward on [B, N, D]."""
    if isinstance(block, Block):
        return block(x, causal=causal)
    return block(x, attn_mask=causal_mask(x.shape[1]) if causal else None)


BLOCKS = {"reference": reference_block,
          "open_clip": lambda: open_clip_block(None),
          "open_clip+layer_scale": lambda: open_clip_block(0.5)}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", BLOCKS)
def test_dense_block_forward_equals_the_blocks_own(family, causal):
    block = BLOCKS[family]()
    x = torch.randn(3, 9, D, dtype=torch.float64)
    want = own_forward(block, x, causal)
    got = dense_block_forward(block, x, causal=causal)
    tight(got, want)
    g = torch.randn_like(got)
    params = list(block.parameters())
    for a, b in zip(torch.autograd.grad(got, params, g), torch.autograd.grad(want, params, g)):
        tight(a, b)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("family", BLOCKS)
def test_packed_block_forward_equals_the_blocks_own_per_sequence(family, causal):
    block = BLOCKS[family]()
    x = torch.randn(LENGTHS.shape[0], int(LENGTHS.max()), D, dtype=torch.float64)
    packed, cu = flipkern.pack(x, LENGTHS)
    got = packed_block_forward(block, packed, cu, int(LENGTHS.max()), causal=causal)
    want = torch.cat([own_forward(block, x[b:b + 1, :n], causal)[0] for b, n in enumerate(LENGTHS.tolist())])
    tight(got, want)


def test_open_clip_adapter_reads_the_modules_parameters():
    block = open_clip_block(0.5)
    parts = block_parts(block)
    assert parts.ln_1 is block.ln_1 and parts.ln_2 is block.ln_2 and parts.mlp is block.mlp
    assert parts.out_proj is block.attn.out_proj and parts.ls_1 is block.ls_1 and parts.ls_2 is block.ls_2
    assert parts.num_heads == HEADS


def test_a_block_no_adapter_serves_is_named():
    class MyBlock(Block):  # a subclass may change the forward: not served by Block's adapter
        pass

    with pytest.raises(TypeError, match="MyBlock"):
        dense_block_forward(MyBlock(D, HEADS), torch.randn(1, 2, D))


def test_open_clip_attention_dropout_is_refused():
    block = open_clip_block(None)
    block.attn.dropout = 0.1
    with pytest.raises(ValueError, match="dropout"):
        dense_block_forward(block, torch.randn(1, 2, D, dtype=torch.float64))


@pytest.mark.parametrize("fn, x, arg", [
    (lambda b, x: dense_block_forward(b, x), torch.randn(4, D), "x"),
    (lambda b, x: packed_block_forward(b, x, torch.tensor([0, 4], dtype=torch.int32), 4), torch.randn(1, 4, D),
     "x_packed"),
])
def test_bad_rank_names_the_argument(fn, x, arg):
    with pytest.raises(ValueError, match=f"{arg} must be"):
        fn(reference_block().float(), x)
