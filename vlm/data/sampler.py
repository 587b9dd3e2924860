"""Samplers that group samples of similar length, and never mix image and text-only samples in a batch.

Follows LLaVA-1.5's `group_by_modality_length` (`--group_by_modality_length`), with one change:
LLaVA puts the leftover image and text samples together in one mixed final batch; here each
modality's leftover stays its own (smaller) global batch, so no global batch ever mixes modalities.

Per epoch, for each modality: shuffle the indices (seeded by `seed` and the epoch), cut them into
megabatches of `megabatch_mult` global batches, sort each megabatch by length (longest first) and cut
it into global batches of `world_size * batch_size`, each dealt into `world_size` per-device batches
with balanced total length (LLaVA's `split_to_even_chunks`). The full global batches of both
modalities are shuffled together; the two partial ones (at most one per modality) come last.

Iterating yields the indices global batch by global batch, each one rank 0's batch then rank 1's...,
which is the order in which Hugging Face / accelerate deal consecutive batches to ranks. `batches(rank)` gives one rank's batches directly (for `DataLoader(batch_sampler=)`);
use it when the data size is not a multiple of `world_size * batch_size`, where a loader that cuts the
flat order into fixed-size batches would join the two leftovers.
"""

from __future__ import annotations

import random
from typing import Iterator

from torch.utils.data import Sampler


class ModalityLengthGroupedSampler(Sampler[int]):
    """Length-grouped, modality-pure order of `range(len(lengths))`; call `set_epoch` every epoch.

    Args:
        lengths: token length of each sample (image tokens included, or an estimate).
        has_image: whether each sample has at least one image.
        batch_size: per-device batch size.
        world_size: number of data-parallel processes.
        seed: base seed; the order depends only on (seed, epoch).
        megabatch_mult: global batches per megabatch, the pool sorted by length before cutting batches
            (HF's `group_by_length` uses 50; LLaVA's modality sampler is 1, which groups nothing).
    """

    def __init__(
        self,
        lengths: list[int],
        has_image: list[bool],
        batch_size: int,
        world_size: int = 1,
        seed: int = 0,
        megabatch_mult: int = 50,
    ):
        if len(lengths) != len(has_image):
            raise ValueError(f"{len(lengths)} lengths but {len(has_image)} has_image flags; give one of each per sample")
        if min(batch_size, world_size, megabatch_mult) < 1:
            raise ValueError(f"batch_size ({batch_size}), world_size ({world_size}) and megabatch_mult ({megabatch_mult}) must be >= 1")
        self.lengths = [int(n) for n in lengths]
        self.has_image = [bool(h) for h in has_image]
        self.batch_size = batch_size
        self.world_size = world_size
        self.seed = seed
        self.megabatch_mult = megabatch_mult
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self) -> Iterator[int]:
        for global_batch in self.global_batches():
            for device_batch in global_batch:
                yield from device_batch

    def batches(self, rank: int = 0) -> list[list[int]]:
        """The per-device batches of `rank` for this epoch (same count on every rank; one may be empty when a
        leftover global batch has fewer samples than `world_size`)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside [0, {self.world_size})")
        return [global_batch[rank] for global_batch in self.global_batches()]

    def global_batches(self) -> list[list[list[int]]]:
        """This epoch's global batches, each a list of `world_size` per-device batches of indices."""
        rng = random.Random(f"{self.seed}:{self.epoch}")
        step = self.world_size * self.batch_size
        megabatch = step * self.megabatch_mult
        full: list[list[int]] = []
        leftovers: list[list[int]] = []
        for modality in (True, False):
            indices = [i for i, h in enumerate(self.has_image) if h == modality]
            rng.shuffle(indices)
            for start in range(0, len(indices), megabatch):
                group = sorted(indices[start: start + megabatch], key=lambda i: (-self.lengths[i], i))
                full += [group[k: k + step] for k in range(0, len(group), step)]
            if full and len(full[-1]) < step:
                leftovers.append(full.pop())
        rng.shuffle(full)
        return [self._deal(chunk) for chunk in full + leftovers]

    def _deal(self, chunk: list[int]) -> list[list[int]]:
        """Split a megabatch into `world_size` device batches of similar lengths and balanced totals."""
        ordered = sorted(chunk, key=lambda i: (-self.lengths[i], i))
        capacity = -(-len(chunk) // self.world_size)
        devices: list[list[int]] = [[] for _ in range(self.world_size)]
        totals = [0] * self.world_size
        for i in ordered:
            open_devices = [d for d in range(self.world_size) if len(devices[d]) < capacity]
            d = min(open_devices, key=lambda d: (totals[d], d))
            devices[d].append(i)
            totals[d] += self.lengths[i]
        return devices


class LengthGroupedSampler(ModalityLengthGroupedSampler):
    """Length grouping without modality separation (HF's `group_by_length`)."""

    def __init__(self, lengths: list[int], batch_size: int, world_size: int = 1, seed: int = 0, megabatch_mult: int = 50):
        super().__init__(lengths, [True] * len(lengths), batch_size, world_size, seed, megabatch_mult)
