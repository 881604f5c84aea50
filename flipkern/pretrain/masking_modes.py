"""Which patches a training step keeps: ``--masking random`` (FLIP) or ``attentive`` (A-CLIP).

The loader draws FLIP's random ids_keep for every masked step; a masking mode
turns them into the ids the step trains on (``select``), and follows the
optimizer steps (``update``). Random masking keeps the loader's ids.

Attentive masking (A-CLIP, Yang et al. 2023) keeps the patches an EMA copy of
the vision tower finds most relevant. The EMA tower runs unmasked and without
grad (the fast path's encode_image_tokens when --fast-path), and each patch's
score is the cosine similarity of its projected token, proj(ln_post(token)), to
the EMA's pooled image embedding. The pooled token, not the caption's
embedding, because: A-CLIP's own score is the EMA tower's [CLS]-to-patch
attention, which reads no text, and the pooled embedding is what the mean-pooled
FLIP tower has in the [CLS] token's place; it is trained to match the caption's
embedding, so the patches that agree with it are the ones the caption talks
about; and it needs no text forward, so the mask is decided before the step's
forward, which stays as it was. The top K by ``fk.topk_keep_indices`` are kept;
``--attentive-random-share s`` keeps round(s * K) of them at random instead,
from among the patches the attentive part did not take.
"""
import copy
import time

import torch
import torch.nn.functional as F

from .. import fastpath
from .. import masking as fkmasking
from ..data.loader import mix_seed
from ..reference import masking as ref_masking

_SHARE_TAG = 0x52414E44  # "RAND": the random share's noise


class RandomMasking:
    """FLIP: train on the loader's random ids_keep."""

    def select(self, images, ids_keep, data_step):
        return ids_keep

    def update(self, visual):
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state):
        pass

    def summary(self):
        return {}


@torch.no_grad()
def patch_scores(visual, images, *, fast=True):
    """float32 [B, N]: cosine similarity of each patch's projected token to the pooled
    image embedding, from an unmasked forward of ``visual``."""
    x = fastpath.vision_tokens(visual, images, None, fast=fast)
    patches = F.normalize(visual.proj(visual.patch_tokens(x)).float(), dim=-1)
    pooled = F.normalize(visual.pool(x).float(), dim=-1)
    return torch.einsum("bnd,bd->bn", patches, pooled)


def keep_priority(scores, num_keep, random_share, noise):
    """[B, N] priorities whose top ``num_keep`` are the attentive top (num_keep - R) by
    ``scores`` plus R = round(random_share * num_keep) others chosen by ``noise`` (uniform
    in [0, 1)): the attentive ones rank above 1, the rest rank by their noise."""
    num_random = round(random_share * num_keep)
    if num_random == 0:
        return scores
    attentive = fkmasking.topk_keep_indices(scores, num_keep - num_random)
    return noise.scatter(1, attentive, 2.0)


class AttentiveMasking:
    """A-CLIP's attentive token removal over an EMA copy of the vision tower (module docstring)."""

    def __init__(self, visual, *, decay, random_share, seed, fast, autocast, global_batch, rank):
        self.ema = copy.deepcopy(visual).requires_grad_(False).eval()
        self.decay, self.random_share, self.seed, self.fast = decay, random_share, seed, fast
        self.autocast = autocast
        self.global_batch, self.rank = global_batch, rank
        self.seconds, self.calls = 0.0, 0  # the EMA forward's and scoring's cost

    def select(self, images, ids_keep, data_step):
        """The K patches (K = the loader's) with the highest EMA scores; ids_keep None
        (an unmasked step) stays None."""
        if ids_keep is None:
            return None
        t0 = time.perf_counter()
        with self.autocast():
            scores = patch_scores(self.ema, images, fast=self.fast)
        priority = keep_priority(scores, ids_keep.shape[1], self.random_share, self._noise(scores, data_step))
        ids = fkmasking.topk_keep_indices(priority, ids_keep.shape[1])
        if ids.is_cuda:
            torch.cuda.synchronize()  # charge the EMA forward to the EMA, not to the step after it
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return ids

    def _noise(self, scores, data_step):
        """This process's rows of the global batch's uniform noise at ``data_step``: the same
        sample gets the same noise with any number of processes and after a resume."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, _SHARE_TAG, data_step))
        noise = ref_masking.uniform_noise(self.global_batch, scores.shape[1], g)
        B = scores.shape[0]
        return noise[self.rank * B:(self.rank + 1) * B].to(scores.device)

    @torch.no_grad()
    def update(self, visual):
        """ema = decay * ema + (1 - decay) * visual, after each applied optimizer step."""
        ema = list(self.ema.parameters())
        torch._foreach_lerp_(ema, [p.detach() for p in visual.parameters()], 1.0 - self.decay)

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        if state is None:
            raise ValueError("the checkpoint has no EMA vision tower (it was not written by an "
                             "--masking attentive run)")
        self.ema.load_state_dict(state)

    def summary(self):
        return dict(ema_forward_s=self.seconds, ema_forward_ms_per_step=1e3 * self.seconds / max(1, self.calls))


def build_masking(args, model, autocast, di):
    """The masking mode of --masking for ``model`` (a reference CLIP)."""
    if args.masking == "random":
        return RandomMasking()
    return AttentiveMasking(model.visual, decay=args.ema_decay, random_share=args.attentive_random_share,
                            seed=args.seed, fast=args.fast_path, autocast=autocast,
                            global_batch=args.batch_size, rank=di.rank)
