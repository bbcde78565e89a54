"""Length-grouped micro-batches (`data.group_by_length=true`): samples of similar length share a micro-batch, so
a step spends less of its time and memory on padding. The order is drawn from (seed, epoch) alone, like the
plain random order, so exact resume rebuilds any epoch without state."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from vlm_finetune.data.sample import Video, VideoFile

# an image counts as this many characters in the length proxy (its tokens dwarf a short question)
IMAGE_WEIGHT = 256
# samples are sorted by length within groups of this many micro-batches: long enough to find similar
# lengths, short enough that each group is still a random draw from the whole set
GROUP_MICRO_BATCHES = 64


# a video file counts its frames at GLM's sampling rate (2 per second, at most 300 s: the released processor's)
FILE_FRAMES_PER_SECOND, FILE_MAX_SECONDS = 2, 300


def _frames(video) -> int:
    if isinstance(video, VideoFile):
        return max(1, int(min(video.duration, FILE_MAX_SECONDS) * FILE_FRAMES_PER_SECOND))
    return len(video.frames if isinstance(video, Video) else video)


def visual_items(images: int, videos: list) -> int:
    """Images in the length proxy: each image, and each video's frames two at a time (a temporal patch); a video
    is its list of frames, a Video or a VideoFile."""
    return images + sum(-(-_frames(video) // 2) for video in videos)


def sample_lengths(samples: Dataset) -> np.ndarray:
    """A length proxy per sample (int64), without encoding it: the dataset's own `lengths()` when it has one
    (records read from files), else characters of the messages plus IMAGE_WEIGHT per image."""
    lengths = getattr(samples, "lengths", None)
    if callable(lengths):
        return np.asarray(lengths(), dtype=np.int64)
    out = np.empty(len(samples), dtype=np.int64)
    for index in range(len(samples)):
        sample = samples[index]
        out[index] = (sum(len(m.content) for m in sample.messages)
                      + IMAGE_WEIGHT * visual_items(len(sample.images), sample.videos))
    return out


class LengthGroupedSampler(Sampler[int]):
    """Each epoch: a random permutation (seed + epoch) cut into groups of GROUP_MICRO_BATCHES micro-batches,
    each group sorted by length (longest first, ties in permutation order) and cut into micro-batches, the
    micro-batches then shuffled; with several ranks, rank r takes micro-batches r, r + W, ... (each rank's
    micro-batches stay length-homogeneous). The indices come out micro-batch after micro-batch, for a
    BatchSampler of the same size. Held as numpy arrays: a million samples are not a million Python ints."""

    def __init__(self, lengths, micro_batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.micro_batch_size = int(micro_batch_size)
        self.seed, self.rank, self.world_size = int(seed), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches_per_rank(self) -> int:
        return len(self.lengths) // self.micro_batch_size // self.world_size

    def __len__(self) -> int:
        return self._batches_per_rank() * self.micro_batch_size

    def _batches(self) -> np.ndarray:
        """This rank's micro-batches of the epoch, (count, micro_batch_size)."""
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.lengths), generator=generator).numpy()
        group = self.micro_batch_size * GROUP_MICRO_BATCHES
        for start in range(0, len(order), group):
            members = order[start:start + group]
            order[start:start + group] = members[np.argsort(-self.lengths[members], kind="stable")]
        # a group holds whole micro-batches, so the one incomplete micro-batch (if any) is the last group's tail
        full = len(order) // self.micro_batch_size
        batches = order[:full * self.micro_batch_size].reshape(full, self.micro_batch_size)
        shuffled = batches[torch.randperm(full, generator=generator).numpy()]
        kept = shuffled[:self._batches_per_rank() * self.world_size]
        return kept[self.rank::self.world_size]

    def micro_batches(self) -> list[list[int]]:
        return self._batches().tolist()

    def __iter__(self) -> Iterator[int]:
        for index in self._batches().reshape(-1):
            yield int(index)
