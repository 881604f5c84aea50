"""Rank-independent data order and masks, and the DataLoader around them.

The global batch at data step ``s`` is a fixed slice of a permutation of the
dataset: epoch ``e = s // steps_per_epoch``, permutation seeded by
``(seed, e)``, slice ``[(s % steps_per_epoch) * G, ... + G)``. Rank ``r`` of
``W`` takes the contiguous part ``[r * G/W, (r + 1) * G/W)`` of that slice. The
kept patch indices of the sample at global position ``j`` of step ``s`` come
from a generator seeded by ``(seed, s, j)``. So one process with global batch G
and W processes with G/W each see exactly the same samples and masks, and a run
resumed at step s continues with exactly the batches it would have seen.

A data step is one micro-batch; with gradient accumulation an optimizer step
consumes ``accum`` data steps.
"""
import numpy as np
import torch

from .datasets import CorruptSample, DataError

_MASK_TAG = 0x4D41534B  # "MASK"
_PERM_TAG = 0x5045524D  # "PERM"


def mix_seed(*ints):
    """A 63-bit seed from a tuple of ints (SeedSequence hashing, platform-independent)."""
    state = np.random.SeedSequence([int(i) & 0xFFFFFFFFFFFFFFFF for i in ints]).generate_state(2, np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) & ((1 << 63) - 1)


def epoch_permutation(num_samples, seed, epoch):
    g = torch.Generator().manual_seed(mix_seed(seed, _PERM_TAG, epoch))
    return torch.randperm(num_samples, generator=g)


def sample_keep_indices(seed, step, global_pos, num_tokens, num_keep):
    """int64 [K] kept patch positions of one sample: depends on (seed, step, global_pos) only."""
    from flipkern.reference.masking import random_keep_indices
    g = torch.Generator().manual_seed(mix_seed(seed, _MASK_TAG, step, global_pos))
    return random_keep_indices(1, num_tokens, num_keep=num_keep, generator=g)[0]


def num_keep_for(num_tokens, mask_ratio):
    """FLIP/MAE: keep int(N * (1 - ratio)) tokens (at least 1); None when nothing is masked."""
    if mask_ratio <= 0:
        return None
    return max(1, int(num_tokens * (1.0 - mask_ratio)))


class GlobalBatchSampler:
    """Yields, for each data step in [start_step, end_step), this rank's items
    ``(step, global_pos, dataset_index, num_keep)``.

    ``num_keep_fn(step) -> int | None``: how many patches to keep at that step
    (None: no masking).
    """

    def __init__(self, num_samples, global_batch, *, world_size=1, rank=0, seed=0,
                 start_step=0, end_step=None, num_keep_fn=None):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
        if num_samples < global_batch:
            raise DataError(f"dataset has {num_samples} samples, fewer than one global batch ({global_batch})")
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.world_size, self.rank = world_size, rank
        self.local_batch = global_batch // world_size
        self.seed = seed
        self.start_step = start_step
        self.end_step = end_step
        self.num_keep_fn = num_keep_fn or (lambda step: None)
        self.steps_per_epoch = num_samples // global_batch
        self._perm_epoch, self._perm = None, None

    def __len__(self):
        return max(0, self.end_step - self.start_step)

    def global_indices(self, step):
        """Dataset indices of the whole global batch of data step ``step``."""
        epoch, pos = divmod(step, self.steps_per_epoch)
        if self._perm_epoch != epoch:
            self._perm_epoch, self._perm = epoch, epoch_permutation(self.num_samples, self.seed, epoch)
        return self._perm[pos * self.global_batch:(pos + 1) * self.global_batch]

    def items(self, step):
        idx = self.global_indices(step)
        lo = self.rank * self.local_batch
        nk = self.num_keep_fn(step)
        return [(step, lo + i, int(idx[lo + i]), nk) for i in range(self.local_batch)]

    def __iter__(self):
        for step in range(self.start_step, self.end_step):
            yield self.items(step)


class SkipBad(torch.utils.data.Dataset):
    """Wraps a map-style dataset of (image, caption). A sample that fails to
    decode is replaced by the next index (deterministically, so ranks and
    resumed runs agree) and reported in the batch's ``bad`` list."""

    max_tries = 64

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        step, gpos, idx, nk = item
        bad = []
        n = len(self.dataset)
        for attempt in range(self.max_tries):
            j = (idx + attempt) % n
            try:
                image, caption = self.dataset[j]
            except CorruptSample as e:
                bad.append((j, str(e)))
                continue
            if not caption or not caption.strip():
                bad.append((j, "empty caption"))
                continue
            return dict(image=image, caption=caption, step=step, gpos=gpos, index=j, num_keep=nk, bad=bad)
        raise DataError(f"{self.max_tries} consecutive samples from index {idx} could not be read; "
                        f"last error: {bad[-1][1]}")


class Collate:
    """Stacks images, tokenizes captions, draws each sample's kept patch indices."""

    def __init__(self, tokenizer, num_tokens, seed):
        self.tokenizer = tokenizer
        self.num_tokens = num_tokens
        self.seed = seed

    def __call__(self, samples):
        images = torch.stack([s["image"] for s in samples])
        tokens = self.tokenizer([s["caption"] for s in samples])
        nk = samples[0]["num_keep"]
        ids_keep = None
        if nk is not None and nk < self.num_tokens:
            ids_keep = torch.stack([sample_keep_indices(self.seed, s["step"], s["gpos"], self.num_tokens, nk)
                                    for s in samples])
        return dict(images=images, tokens=tokens, ids_keep=ids_keep,
                    step=samples[0]["step"], index=torch.tensor([s["index"] for s in samples]),
                    bad=[b for s in samples for b in s["bad"]])


def _worker_init(worker_id):
    # SIGTERM is for the main process (it checkpoints and exits); workers follow it out.
    import signal
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_train_loader(dataset, tokenizer, *, global_batch, num_tokens, seed, world_size=1, rank=0,
                      start_step=0, end_step, num_keep_fn=None, workers=0, pin_memory=False):
    sampler = GlobalBatchSampler(len(dataset), global_batch, world_size=world_size, rank=rank, seed=seed,
                                 start_step=start_step, end_step=end_step, num_keep_fn=num_keep_fn)
    kw = {}
    if workers > 0:
        kw = dict(prefetch_factor=4, persistent_workers=False, worker_init_fn=_worker_init)
    return torch.utils.data.DataLoader(SkipBad(dataset), batch_sampler=sampler, num_workers=workers,
                                       collate_fn=Collate(tokenizer, num_tokens, seed),
                                       pin_memory=pin_memory, **kw)


def make_eval_loader(dataset, tokenizer, *, batch_size, num_samples=None, workers=0):
    """Sequential batches over the first ``num_samples`` samples (no masking)."""
    n = len(dataset) if num_samples is None else min(num_samples, len(dataset))
    batches = [[(0, i, i, None) for i in range(s, min(s + batch_size, n))] for s in range(0, n, batch_size)]
    return torch.utils.data.DataLoader(SkipBad(dataset), batch_sampler=batches, num_workers=workers,
                                       collate_fn=Collate(tokenizer, 1, 0))
