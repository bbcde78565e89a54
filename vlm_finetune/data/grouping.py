"""Length-grouped micro-batches (`data.group_by_length=true`): samples of similar length share a micro-batch, so
a step spends less of its time and memory on padding. The order is drawn from (seed, epoch) alone, like the
plain random order, so exact resume rebuilds any epoch without state."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Dataset, Sampler

# an image counts as this many characters in the length proxy (its tokens dwarf a short question)
IMAGE_WEIGHT = 256
# samples are sorted by length within groups of this many micro-batches: long enough to find similar
# lengths, short enough that each group is still a random draw from the whole set
GROUP_MICRO_BATCHES = 64


def visual_items(images: int, videos: list) -> int:
    """Images in the length proxy: each image, and each video's frames two at a time (a temporal patch)."""
    return images + sum(-(-len(video) // 2) for video in videos)


def sample_lengths(samples: Dataset) -> list[int]:
    """A length proxy per sample, without encoding it: the dataset's own `lengths()` when it has one (records
    read from files), else characters of the messages plus IMAGE_WEIGHT per image."""
    lengths = getattr(samples, "lengths", None)
    if callable(lengths):
        return [int(n) for n in lengths()]
    out = []
    for index in range(len(samples)):
        sample = samples[index]
        out.append(sum(len(m.content) for m in sample.messages)
                   + IMAGE_WEIGHT * visual_items(len(sample.images), [v.frames for v in sample.videos]))
    return out


class LengthGroupedSampler(Sampler[int]):
    """Each epoch: a random permutation (seed + epoch) cut into groups of GROUP_MICRO_BATCHES micro-batches,
    each group sorted by length and cut into micro-batches, the micro-batches then shuffled; with several
    ranks, rank r takes micro-batches r, r + W, ... (each rank's micro-batches stay length-homogeneous). The
    indices come out micro-batch after micro-batch, for a BatchSampler of the same size."""

    def __init__(self, lengths: list[int], micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.lengths = list(lengths)
        self.micro_batch_size = int(micro_batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches_per_rank(self) -> int:
        return len(self.lengths) // self.micro_batch_size // self.world_size

    def __len__(self) -> int:
        return self._batches_per_rank() * self.micro_batch_size

    def micro_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        group = self.micro_batch_size * GROUP_MICRO_BATCHES
        batches = []
        for start in range(0, len(order), group):
            members = sorted(order[start:start + group], key=lambda i: -self.lengths[i])
            batches += [members[k:k + self.micro_batch_size] for k in range(0, len(members), self.micro_batch_size)]
        batches = [b for b in batches if len(b) == self.micro_batch_size]
        shuffled = [batches[k] for k in torch.randperm(len(batches), generator=generator).tolist()]
        kept = shuffled[:self._batches_per_rank() * self.world_size]
        return kept[self.rank::self.world_size]

    def __iter__(self) -> Iterator[int]:
        for batch in self.micro_batches():
            yield from batch
