"""The batch plan: which samples go into which micro-batch, on which rank, at which step. Pure index
arithmetic (no videos, no model), so it can be read and tested on its own.

    layout = StepLayout(batch_size=4, accumulation=2, world=8, rank=0)   # 64 samples an optimizer step
    train_batches(counts, weights, layout, epoch, seed)   # this rank's micro-batches for one epoch
    eval_batches(counts, batch_size, world, rank)         # every sample once across ranks
    eval_plan(counts, batch_size, world, rank, views, pad)  # ... for every view; FSDP2: padded to equal counts

Keys are (sample index, epoch, train, view), what data.VideoDataset takes. Any batch_size x
accumulation x world with the same product trains on the same samples at every step: that is what
makes gradient accumulation, and changing the GPU count on resume, exact.
"""

import math
from dataclasses import dataclass

import numpy as np

from video import SINGLE_VIEW, DataError


def group_by_length(order, lengths, per_step, chunk_steps=50):
    """Reorders `order` so each run of per_step samples has similar lengths: chunks of chunk_steps
    optimizer steps (in the random order) are sorted by length, longest first. The randomness that
    is left: which samples share a chunk, and the order of the steps (shuffled afterwards)."""
    chunk = per_step * chunk_steps
    return np.concatenate([part[np.argsort(-lengths[part], kind="stable")]
                           for part in np.split(order, range(chunk, len(order), chunk))])


@dataclass(frozen=True)
class StepLayout:
    """How one optimizer step's samples are split: `accumulation` micro-batches of `batch_size` on
    each of `world` ranks; this process is `rank`."""
    batch_size: int
    accumulation: int
    world: int
    rank: int

    @property
    def per_step(self):
        return self.batch_size * self.accumulation * self.world


def steps_per_epoch(dataset_sizes, weights, per_step):
    """Optimizer steps in one epoch: each dataset gives round(weight * size) samples, cut into whole
    steps (the remainder is dropped; see train_batches)."""
    return sum(round(w * size) // per_step for size, w in zip(dataset_sizes, weights))


def train_batches(dataset_sizes, weights, layout, epoch, seed, lengths=None):
    """This rank's micro-batches for one epoch, in order, as lists of (global_index, epoch, True) keys.

    The datasets are concatenated; each contributes round(weight * size) samples per epoch (drawn
    without replacement while it can, then again), shuffled with (seed, epoch). They are cut into
    optimizer-step groups of layout.per_step samples from one dataset (so one label space), and the
    groups are shuffled. Micro-batch m of rank r is the group's slice (m * world + r). So any
    batch_size x accumulation x world with the same product trains on exactly the same samples at
    every step: that is what makes gradient accumulation (and changing the GPU count) exact.
    Incomplete groups are dropped, so ranks step in lockstep.
    `lengths` (per global index, e.g. sample_lengths): group similar lengths into the same optimizer
    step, and so into the same micro-batches, to cut padding (group_by_length); the samples and the
    dropped remainder are the same as without it.
    """
    rng = np.random.default_rng([seed, epoch])
    offsets = np.cumsum([0] + list(dataset_sizes))
    per_step = layout.per_step
    groups = []
    for d, (size, weight) in enumerate(zip(dataset_sizes, weights)):
        count = round(weight * size)
        order = np.concatenate([rng.permutation(size) for _ in range(math.ceil(count / size))])[:count]
        order = order + offsets[d]
        if lengths is not None:  # drop the same remainder as without grouping, then sort within chunks
            order = group_by_length(order[:count - count % per_step], np.asarray(lengths), per_step)
        groups += [order[i:i + per_step] for i in range(0, count - per_step + 1, per_step)]
    batches = []
    for g in rng.permutation(len(groups)):
        for micro in range(layout.accumulation):
            start = (micro * layout.world + layout.rank) * layout.batch_size
            batches.append([(int(j), epoch, True) for j in groups[g][start:start + layout.batch_size]])
    return batches


def eval_batches(counts, batch_size, world_size, rank, view=SINGLE_VIEW):
    """Each sample of the concatenated datasets (sizes `counts`) exactly once across ranks (no
    padding duplicates, unlike DistributedSampler); a batch never spans two datasets, so it holds
    one label space."""
    batches, offset = [], 0
    for count in counts:
        mine = list(range(offset + rank, offset + count, world_size))
        batches += [[(j, 0, False, view) for j in mine[i:i + batch_size]] for i in range(0, len(mine), batch_size)]
        offset += count
    return batches


def resumed_position(position, saved, layout):
    """A checkpoint's data position (this rank's micro-batches into the epoch, counted in the
    checkpoint's layout `saved`: {"per_step", "accumulation"}) in `layout`'s micro-batches. The same
    samples a step: the same step of the epoch, exactly, however they are split over ranks and
    micro-batches. Other step sizes cut the epoch into other steps: the first step that starts after
    the samples already consumed (the run is then no longer the checkpoint's run)."""
    steps = position // saved["accumulation"]
    if saved["per_step"] != layout.per_step:
        steps = math.ceil(steps * saved["per_step"] / layout.per_step)
    return steps * layout.accumulation


PADDING = -1  # the sample index of a padding key: its batch runs through the model and counts nowhere


def eval_plan(counts, batch_size, world_size, rank, views, pad=False):
    """This rank's evaluation batches: eval_batches for each view in turn. `pad` (FSDP2, where every
    forward is a collective): then padding batches of one PADDING key until this rank has as many
    batches as the rank with the most, so all ranks run the same number of forwards."""
    def plan(r):
        return [b for view in views for b in eval_batches(counts, batch_size, world_size, r, view)]
    mine = plan(rank)
    if pad:
        most = max(len(plan(r)) for r in range(world_size))
        mine += [[(PADDING, 0, False, SINGLE_VIEW)] for _ in range(most - len(mine))]
    return mine


class EpochBatches:
    """This rank's micro-batches, epoch after epoch without end, from (epoch, position) on. One
    DataLoader iterates it for the whole run."""

    def __init__(self, mix, layout, seed, start, lengths=None):
        self.mix, self.layout, self.seed, self.start, self.lengths = mix, layout, seed, start, lengths
        self.per_epoch = steps_per_epoch(mix.counts, mix.weights, layout.per_step) * layout.accumulation
        if self.per_epoch == 0:
            raise DataError("the training set is smaller than one optimizer step (per_device_train_batch_size x "
                            "gradient_accumulation_steps x world size): lower the batch size")

    def batches(self, epoch):
        return train_batches(self.mix.counts, self.mix.weights, self.layout, epoch, self.seed, self.lengths)

    def __iter__(self):
        epoch, position = self.start
        while True:
            yield from self.batches(epoch)[position:]
            epoch, position = epoch + 1, 0
