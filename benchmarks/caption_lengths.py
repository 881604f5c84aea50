"""Caption lengths for the benchmarks: a stated model of web image-text captions.

Lengths count every token of a caption from its start-of-text to its end-of-text
token inclusive (what a causal text tower must run), capped at the 77-token context.

The "realistic" model is ASSUMED, not fitted to a dataset in this repository:
lognormal with a median of 14 tokens and sigma 0.9, truncated at 77. That is
alt-text-like data (LAION / CC-style captions are mostly one short phrase or
sentence, with a long tail of paragraph-length ones); with sigma 0.9 about 3% of
captions reach the 77-token cap, so a batch of 32 holds a 77-token caption more
often than not (1 - 0.97**32 ~ 0.6) and trimming a padded batch to its longest
caption saves little. Other kinds, for sweeps and for the cases where packing
cannot win:

  realistic   the model above (mean ~19 tokens)
  short       uniform in 12..20 tokens (the benchmarks' earlier fixed short captions)
  full        every caption 77 tokens (equal lengths: nothing to pack away)
  mean<M>     the lognormal model with its median scaled so the mean is ~M tokens
"""
import math

import torch

MEDIAN, SIGMA, CONTEXT = 14.0, 0.9, 77
MIN_LENGTH = 2  # start-of-text + end-of-text


def lognormal_lengths(batch, median=MEDIAN, sigma=SIGMA, context=CONTEXT, generator=None):
    """int64 [batch]: round(median * exp(sigma * z)), z ~ N(0, 1), clamped to [2, context]."""
    z = torch.randn(batch, generator=generator, dtype=torch.float64)
    return (median * torch.exp(sigma * z)).round().clamp(MIN_LENGTH, context).long()


def median_for_mean(mean, sigma=SIGMA, context=CONTEXT):
    """The lognormal median whose truncated lengths have this mean (bisection on a fixed sample)."""
    z = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    lo, hi = 0.5, float(context)
    for _ in range(50):
        mid = math.sqrt(lo * hi)
        m = float((mid * torch.exp(sigma * z)).round().clamp(MIN_LENGTH, context).mean())
        lo, hi = (mid, hi) if m < mean else (lo, mid)
    return math.sqrt(lo * hi)


def caption_lengths(kind, batch, context=CONTEXT, generator=None):
    """int64 [batch] caption lengths of one of the kinds in the module docstring."""
    if kind == "realistic":
        return lognormal_lengths(batch, context=context, generator=generator)
    if kind == "short":
        return torch.randint(12, 21, (batch,), generator=generator).clamp(MIN_LENGTH, context)
    if kind == "full":
        return torch.full((batch,), context, dtype=torch.int64)
    if kind.startswith("mean") and kind[4:].isdigit():
        mean = int(kind[4:])
        if mean >= context:
            return torch.full((batch,), context, dtype=torch.int64)
        return lognormal_lengths(batch, median_for_mean(mean, context=context), context=context, generator=generator)
    raise ValueError(f"caption kind must be realistic, short, full or mean<M>, got {kind!r}")


def tokens_from_lengths(lengths, context, eot_id, generator=None):
    """int64 [B, context] captions [sot, random words..., eot, 0 ...] of the given lengths.

    sot = eot_id - 1 and words < sot, as in CLIP's BPE vocabulary, so the eot token is
    also each row's largest id (open_clip's argmax pooling picks it)."""
    B = lengths.shape[0]
    tokens = torch.randint(1, eot_id - 1, (B, context), generator=generator)
    pos = torch.arange(context)[None, :]
    tokens[:, 0] = eot_id - 1
    tokens[pos == (lengths[:, None] - 1)] = eot_id
    tokens[pos >= lengths[:, None]] = 0
    return tokens
