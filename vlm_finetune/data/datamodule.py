"""Data module: data sources -> encoded micro-batches, grouped into optimizer-step windows.

The training loader looks ahead over the `accumulate_grad_batches` micro-batches of each optimizer
step and stamps every micro-batch with the step's supervised-token count on this rank
(`num_step_supervised_tokens`). The module then sums those counts over ranks and divides each
micro-batch's loss sum by the global count: the exact per-token mean of the whole step, whatever the
sequence lengths, while backward still runs one micro-batch at a time.
"""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, DistributedSampler, Sampler, SequentialSampler

from vlm_finetune.data.grouping import LengthGroupedSampler, sample_lengths
from vlm_finetune.data.packing import collate_packed, pack_length
from vlm_finetune.data.sample import IGNORE_INDEX, Sample, SampleTooLong
from vlm_finetune.errors import ConfigError, DataError
from vlm_finetune.settings import DataSettings, is_auto

log = logging.getLogger(__name__)


def build_datasets(data: DataSettings, seed: int) -> tuple[Dataset, Dataset, dict]:
    """(train, val, stats) of Samples for `data.source`."""
    source = data.source
    if source == "shapes":
        from vlm_finetune.data.shapes import QUESTION_TYPES, ShapesDataset

        train = ShapesDataset("train", int(data.num_train), image_size=int(data.image_size), seed=seed)
        val = ShapesDataset("val", int(data.num_val), image_size=int(data.image_size), seed=seed)
        return train, val, {"skipped_bad_records": 0, "question_types": list(QUESTION_TYPES)}
    if source == "conversations":
        from vlm_finetune.data.conversations import build_conversation_datasets
        from vlm_finetune.data.sources import build_table_datasets, is_table

        if not data.path:
            raise ConfigError("data=conversations needs data.path=/path/to/train.json (JSON or JSONL, a Parquet file "
                              "or folder, or a datasets.save_to_disk folder)")
        if is_table(data.path) or (data.val_path and is_table(data.val_path)):
            return build_table_datasets(data.path, data.val_path, data.image_root, data.on_bad_record,
                                        float(data.val_fraction), seed)
        return build_conversation_datasets(data.path, data.val_path, data.image_root, data.on_bad_record,
                                           float(data.val_fraction), seed)
    raise ConfigError(f"data.source={source!r} is unknown; use 'shapes' or 'conversations'")


class BadSample:
    """What EncodedDataset gives for a record found bad only now (an image that does not decode, one the
    processor refuses, a conversation that cannot be a prompt) under data.on_bad_record=skip: left out of the
    batch and counted."""


BAD_SAMPLE = BadSample()


class EncodedDataset(Dataset):
    """Encodes Samples with the family processor. Too-long samples come back as None (dropped, counted); a
    record that fails here is named (file and record) and, under data.on_bad_record=skip, left out."""

    def __init__(self, samples: Dataset, processor, max_length: int | None, with_generation_prompt: bool = False,
                 on_bad_record: str = "error"):
        self.samples = samples
        self.processor = processor
        self.max_length = max_length
        self.with_generation_prompt = with_generation_prompt
        self.on_bad_record = on_bad_record

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int | tuple[int, bool]):
        i, repeated = i if isinstance(i, tuple) else (i, False)  # EvalShardSampler flags its repeats
        try:
            return self._encode(i, repeated)
        except (DataError, ValueError, OSError, SyntaxError) as err:  # PIL and processors raise these
            where = f"{getattr(self.samples, 'source', 'data')}: record {self._record_index(i)}"
            if self.on_bad_record == "skip":
                log.warning("skipping %s: %s", where, err)
                return BAD_SAMPLE
            message = str(err) if str(err).startswith(where) else f"{where}: {err}"
            raise DataError(f"{message}. Fix or remove the record, or set data.on_bad_record=skip to skip and count "
                            "bad records") from err

    def _record_index(self, i: int) -> int:
        record_index = getattr(self.samples, "record_index", None)
        if record_index is not None:
            return record_index(i)
        records = getattr(self.samples, "records", None)
        return records[i].index if records is not None else i

    def _encode(self, i: int, repeated: bool):
        sample: Sample = self.samples[i]
        if sample.videos and not getattr(self.processor, "takes_video", False):
            raise DataError(f"{getattr(self.processor, 'model_name', 'this model')} takes no video")
        try:
            encoded = self.processor.encode(sample, self.max_length)
            if not self.with_generation_prompt:
                return encoded
            prompt = self.processor.encode(sample, self.max_length, for_generation=True)
        except SampleTooLong:
            return None
        answer = sample.messages[-1].content
        return encoded, prompt, answer, sample.meta.get("question_type", "all"), repeated


class Collator:
    """Encoded samples -> a batch: padded rows, or (training with `pack_length`) packed rows (data/packing.py)."""

    def __init__(self, processor, evaluation: bool = False, pack_length: int | None = None):
        self.processor = processor
        self.evaluation = evaluation
        self.pack_length = pack_length

    def __call__(self, items: list) -> dict[str, Any]:
        bad = sum(1 for x in items if x is BAD_SAMPLE)
        kept = [x for x in items if x is not None and x is not BAD_SAMPLE]
        dropped = len(items) - len(kept) - bad
        if not kept:
            return {"empty": True, "num_dropped_too_long": dropped, "num_bad_records": bad}
        if not self.evaluation:
            batch = collate_packed(self.processor, kept, self.pack_length) if self.pack_length else \
                self.processor.collate(kept)
            batch["num_truncated"] = sum(e.truncated for e in kept)
        else:
            # a repeated sample (ranks' shares evened out) runs like the others, so that collectives stay in
            # step, but takes no loss (its labels are all ignored) and no metric counts it (`counted`)
            encoded = [replace(x[0], labels=torch.full_like(x[0].labels, IGNORE_INDEX)) if x[4] else x[0]
                       for x in kept]
            batch = self.processor.collate(encoded)
            batch["generation"] = self.processor.collate([x[1] for x in kept], padding_side="left")
            batch["answers"] = [x[2] for x in kept]
            batch["question_types"] = [x[3] for x in kept]
            batch["counted"] = [not x[4] for x in kept]
            batch["num_truncated"] = sum(x[0].truncated for x in kept if not x[4])
        batch["num_dropped_too_long"] = dropped
        batch["num_bad_records"] = bad
        batch["num_supervised_tokens"] = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        return batch


class EvalShardSampler(Sampler[tuple[int, bool]]):
    """This rank's share of an evaluation set: every sample exactly once over all ranks. Ranks get the same
    number of items (collectives in the forward and in generation stay in step), so the last ones repeat
    earlier samples, flagged (index, True): the collator keeps them out of the loss and the metrics.
    (DistributedSampler repeats samples unflagged: the validation loss then depends on the world size.)"""

    def __init__(self, num_samples: int, rank: int, world_size: int):
        self.num_samples, self.rank, self.world_size = int(num_samples), int(rank), int(world_size)

    def __len__(self) -> int:
        return -(-self.num_samples // self.world_size)

    def __iter__(self) -> Iterator[tuple[int, bool]]:
        total = len(self) * self.world_size
        for position in range(self.rank, total, self.world_size):
            yield position % self.num_samples, position >= self.num_samples


class EpochRandomSampler(Sampler[int]):
    """A random order drawn afresh for each epoch from (seed + epoch), like DistributedSampler's, so any
    epoch's order can be rebuilt from its number alone (a resumed run needs no generator state, and
    nothing depends on how far a data loader happened to read ahead). Epoch 0 is torch.randperm under
    `seed`, the order of a RandomSampler seeded with `seed`."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(self.num_samples, generator=generator).tolist()


class ResumableBatchSampler(BatchSampler):
    """A BatchSampler that can leave out the first `skip` batches of its next pass, without loading them."""

    def __init__(self, sampler, batch_size: int, drop_last: bool):
        super().__init__(sampler, batch_size, drop_last)
        self.skip = 0

    def __iter__(self):
        skip, self.skip = self.skip, 0
        for position, batch in enumerate(super().__iter__()):
            if position >= skip:
                yield batch


class StepWindowLoader:
    """Yields micro-batches in windows of `accumulate` and stamps each with its window's token count.

    Windows never straddle epochs: a trailing partial window is dropped, so every optimizer step
    sees exactly `accumulate` micro-batches and the trainer's loss scaling holds.

    Resumable (Lightning saves `state_dict()` in checkpoints and calls `load_state_dict()` on resume):
    the state is the epoch in progress and how many of its micro-batches the trainer has trained on
    (`mark_consumed`, called after each training batch: the fetcher reads ahead, so what was yielded is
    not what was consumed). Each epoch's order depends only on the seed and the epoch number, so a
    resumed loader rebuilds it and starts after the consumed micro-batches, without loading them.
    """

    def __init__(self, loader: DataLoader, accumulate: int):
        self.loader = loader
        self.accumulate = accumulate
        self.epoch = 0  # epochs started
        self.consumed = 0  # micro-batches of the epoch in progress that the trainer has trained on
        self._pending: dict | None = None

    def __len__(self) -> int:
        return (len(self.loader) // self.accumulate) * self.accumulate

    def __iter__(self) -> Iterator[dict]:
        skip = 0
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.epoch, skip = int(state["epoch"]), int(state["consumed"])
            if skip >= len(self):  # saved at the end of an epoch: the next one starts afresh
                self.epoch, skip = self.epoch + 1, 0
        sampler = getattr(self.loader.batch_sampler, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(self.epoch)
        if skip:
            self.loader.batch_sampler.skip = skip
        epoch = self.epoch
        self.epoch += 1
        self.consumed = skip
        window: list[dict] = []
        position = skip
        for batch in self.loader:
            window.append(batch)
            if len(window) == self.accumulate:
                total = sum(b.get("num_supervised_tokens", 0) for b in window)
                for offset, b in enumerate(window):
                    b["num_step_supervised_tokens"] = total
                    b["last_in_step"] = offset == self.accumulate - 1
                    b["data_position"] = (epoch, position)
                    position += 1
                    yield b
                window = []

    def mark_consumed(self, batch: dict) -> None:
        """The trainer has finished this micro-batch."""
        epoch, position = batch["data_position"]
        if epoch == self.epoch - 1:
            self.consumed = position + 1

    def state_dict(self) -> dict:
        return {"epoch": max(self.epoch - 1, 0), "consumed": self.consumed, "micro_batches_per_epoch": len(self)}

    def load_state_dict(self, state: dict) -> None:
        if int(state.get("micro_batches_per_epoch", len(self))) != len(self):
            raise ValueError(f"the checkpoint's data gave {state['micro_batches_per_epoch']} micro-batches per epoch, "
                             f"this run's gives {len(self)}: the data or data.micro_batch_size changed")
        self._pending = dict(state)


class VLMDataModule(L.LightningDataModule):
    def __init__(self, data: DataSettings, processor, micro_batch_size: int, accumulate_grad_batches: int, seed: int,
                 train: Dataset | None = None, val: Dataset | None = None, stats: dict | None = None):
        super().__init__()
        self.data = data
        self.processor = processor
        self.micro_batch_size = int(micro_batch_size)
        self.accumulate = int(accumulate_grad_batches)
        self.seed = seed
        if train is None or val is None:
            train, val, stats = build_datasets(data, seed)
        self.train_samples, self.val_samples = train, val
        self.stats = dict(stats or {})

    def _max_length(self):
        value = self.data.max_length
        return int(value) if value else None

    def _sampler(self, dataset: Dataset, shuffle: bool):
        trainer = self.trainer
        if shuffle and self.data.group_by_length:
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            return LengthGroupedSampler(sample_lengths(self.train_samples), self.micro_batch_size, self.seed,
                                        rank, world)
        if trainer is not None and trainer.world_size > 1:
            return DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                      shuffle=shuffle, seed=self.seed, drop_last=shuffle)
        if shuffle:
            return EpochRandomSampler(len(dataset), self.seed)
        return SequentialSampler(dataset)

    def train_dataloader(self):
        dataset = EncodedDataset(self.train_samples, self.processor, self._max_length(),
                                 on_bad_record=self.data.on_bad_record)
        batches = ResumableBatchSampler(self._sampler(dataset, True), self.micro_batch_size, drop_last=True)
        # the loader's own generator draws its per-epoch worker seed: without it each new epoch's iterator
        # takes a number from torch's global generator and moves the dropout that follows (exact resume)
        loader = DataLoader(dataset, batch_sampler=batches,
                            collate_fn=Collator(self.processor, pack_length=pack_length(self.data)),
                            num_workers=int(self.data.num_workers), persistent_workers=False,
                            generator=torch.Generator().manual_seed(self.seed))
        if len(loader) < self.accumulate:
            raise ConfigError(f"the training set gives {len(loader)} micro-batch(es) per epoch, fewer than "
                              f"trainer.accumulate_grad_batches={self.accumulate}; lower it or data.micro_batch_size")
        return StepWindowLoader(loader, self.accumulate)

    def val_dataloader(self):
        dataset = EncodedDataset(self.val_samples, self.processor, self._max_length(), with_generation_prompt=True,
                                 on_bad_record=self.data.on_bad_record)
        asked = self.data.val_batch_size  # a run resolves auto from its plan; without a run, the micro-batch
        batch_size = self.micro_batch_size if asked is None or is_auto(asked) else int(asked)
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return DataLoader(dataset, batch_size=batch_size, sampler=EvalShardSampler(len(dataset), rank, world),
                          collate_fn=Collator(self.processor, evaluation=True),
                          num_workers=int(self.data.num_workers))
