"""Data module: data sources -> encoded micro-batches, grouped into optimizer-step windows.

The training loader looks ahead over the `accumulate_grad_batches` micro-batches of each optimizer
step and stamps every micro-batch with the step's supervised-token count on this rank
(`num_step_supervised_tokens`). The module then sums those counts over ranks and divides each
micro-batch's loss sum by the global count: the exact per-token mean of the whole step, whatever the
sequence lengths, while backward still runs one micro-batch at a time.
"""
from __future__ import annotations

import logging
from typing import Any, Iterator

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from vlm_finetune.data.sample import Sample
from vlm_finetune.errors import ConfigError
from vlm_finetune.models.base import SampleTooLong

log = logging.getLogger(__name__)


def build_datasets(data_cfg: Any, seed: int) -> tuple[Dataset, Dataset, dict]:
    """(train, val, stats) of Samples for `data.source`."""
    source = data_cfg.source
    if source == "shapes":
        from vlm_finetune.data.shapes import QUESTION_TYPES, ShapesDataset

        train = ShapesDataset("train", int(data_cfg.num_train), image_size=int(data_cfg.image_size), seed=seed)
        val = ShapesDataset("val", int(data_cfg.num_val), image_size=int(data_cfg.image_size), seed=seed)
        return train, val, {"skipped_bad_records": 0, "question_types": list(QUESTION_TYPES)}
    if source == "conversations":
        from vlm_finetune.data.conversations import build_conversation_datasets

        if not data_cfg.get("path"):
            raise ConfigError("data=conversations needs data.path=/path/to/train.json (JSON or JSONL)")
        return build_conversation_datasets(data_cfg.path, data_cfg.get("val_path"), data_cfg.get("image_root"),
                                           data_cfg.get("on_bad_record", "error"),
                                           float(data_cfg.get("val_fraction", 0.1)), seed)
    raise ConfigError(f"data.source={source!r} is unknown; use 'shapes' or 'conversations'")


class EncodedDataset(Dataset):
    """Encodes Samples with the family processor. Too-long samples come back as None (dropped, counted)."""

    def __init__(self, samples: Dataset, processor, max_length: int | None, with_generation_prompt: bool = False):
        self.samples = samples
        self.processor = processor
        self.max_length = max_length
        self.with_generation_prompt = with_generation_prompt

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        sample: Sample = self.samples[i]
        try:
            encoded = self.processor.encode(sample, self.max_length)
            if not self.with_generation_prompt:
                return encoded
            prompt = self.processor.encode(sample, self.max_length, for_generation=True)
        except SampleTooLong:
            return None
        answer = sample.messages[-1].content
        return encoded, prompt, answer, sample.meta.get("question_type", "all")


class Collator:
    def __init__(self, processor, evaluation: bool = False):
        self.processor = processor
        self.evaluation = evaluation

    def __call__(self, items: list) -> dict[str, Any]:
        kept = [x for x in items if x is not None]
        dropped = len(items) - len(kept)
        if not kept:
            return {"empty": True, "num_dropped_too_long": dropped}
        if not self.evaluation:
            batch = self.processor.collate(kept)
            batch["num_truncated"] = sum(e.truncated for e in kept)
        else:
            batch = self.processor.collate([x[0] for x in kept])
            batch["generation"] = self.processor.collate([x[1] for x in kept], padding_side="left")
            batch["answers"] = [x[2] for x in kept]
            batch["question_types"] = [x[3] for x in kept]
            batch["num_truncated"] = sum(x[0].truncated for x in kept)
        batch["num_dropped_too_long"] = dropped
        batch["num_supervised_tokens"] = int((batch["labels"][:, 1:] != -100).sum())
        return batch


class StepWindowLoader:
    """Yields micro-batches in windows of `accumulate` and stamps each with its window's token count.

    Windows never straddle epochs: a trailing partial window is dropped, so every optimizer step
    sees exactly `accumulate` micro-batches and the trainer's loss scaling holds.
    """

    def __init__(self, loader: DataLoader, accumulate: int):
        self.loader = loader
        self.accumulate = accumulate
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.loader) // self.accumulate) * self.accumulate

    def __iter__(self) -> Iterator[dict]:
        sampler = getattr(self.loader, "sampler", None)
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(self.epoch)
        self.epoch += 1
        window: list[dict] = []
        for batch in self.loader:
            window.append(batch)
            if len(window) == self.accumulate:
                total = sum(b.get("num_supervised_tokens", 0) for b in window)
                for position, b in enumerate(window):
                    b["num_step_supervised_tokens"] = total
                    b["last_in_step"] = position == self.accumulate - 1
                    yield b
                window = []


class VLMDataModule(L.LightningDataModule):
    def __init__(self, data_cfg: Any, processor, micro_batch_size: int, accumulate_grad_batches: int, seed: int,
                 train: Dataset | None = None, val: Dataset | None = None, stats: dict | None = None):
        super().__init__()
        self.data_cfg = data_cfg
        self.processor = processor
        self.micro_batch_size = int(micro_batch_size)
        self.accumulate = int(accumulate_grad_batches)
        self.seed = seed
        if train is None or val is None:
            train, val, stats = build_datasets(data_cfg, seed)
        self.train_samples, self.val_samples = train, val
        self.stats = dict(stats or {})

    def _max_length(self):
        value = self.data_cfg.get("max_length")
        return int(value) if value else None

    def _sampler(self, dataset: Dataset, shuffle: bool):
        trainer = self.trainer
        if trainer is not None and trainer.world_size > 1:
            return DistributedSampler(dataset, num_replicas=trainer.world_size, rank=trainer.global_rank,
                                      shuffle=shuffle, seed=self.seed, drop_last=shuffle)
        if shuffle:
            return RandomSampler(dataset, generator=torch.Generator().manual_seed(self.seed))
        return SequentialSampler(dataset)

    def train_dataloader(self):
        dataset = EncodedDataset(self.train_samples, self.processor, self._max_length())
        loader = DataLoader(dataset, batch_size=self.micro_batch_size, sampler=self._sampler(dataset, True),
                            collate_fn=Collator(self.processor), num_workers=int(self.data_cfg.get("num_workers", 0)),
                            drop_last=True, persistent_workers=False)
        if len(loader) < self.accumulate:
            raise ConfigError(f"the training set gives {len(loader)} micro-batch(es) per epoch, fewer than "
                              f"trainer.accumulate_grad_batches={self.accumulate}; lower it or data.micro_batch_size")
        return StepWindowLoader(loader, self.accumulate)

    def val_dataloader(self):
        dataset = EncodedDataset(self.val_samples, self.processor, self._max_length(), with_generation_prompt=True)
        batch_size = int(self.data_cfg.get("val_batch_size") or self.micro_batch_size)
        return DataLoader(dataset, batch_size=batch_size, sampler=self._sampler(dataset, False),
                          collate_fn=Collator(self.processor, evaluation=True),
                          num_workers=int(self.data_cfg.get("num_workers", 0)))
