"""Packing: the encoded samples of a micro-batch share rows of exactly `data.pack_length` tokens.

A micro-batch is still `data.micro_batch_size` samples drawn by the sampler (so an optimizer step trains on
the same samples, in the same order, packed or not, and exact resume is unchanged); what changes is their
layout. The samples are placed first-fit, in the sampler's order, into rows of `pack_length` tokens, and
each row is filled up with padding to that length, so every row has one shape whatever was drawn.

Each sample keeps to itself: `position_ids` restart at 0 for every sample (and for the padding at a row's
end), and no `attention_mask` goes to the model, so transformers builds the block-diagonal causal mask from
the restarting positions (`masking_utils.find_packed_sequence_indices`: a boolean mask for SDPA and eager,
cu_seqlens for flash-attention's varlen kernels; never a float mask per head). Families whose positions are
not 1-D build theirs per sample from `pack_segments` (GLM-4.1V/4.5V: M-RoPE positions from each sample's
own image grids). The first token of every sample takes no loss: in a padded batch it is never a target
(targets are labels[1:]), and in a row it would otherwise be predicted from the previous sample. Images are
given in the order of the samples in the rows, so each one meets the vision tower once.
"""
from __future__ import annotations

import torch

from vlm_finetune.data.sample import IGNORE_INDEX, EncodedSample
from vlm_finetune.errors import ConfigError
from vlm_finetune.settings import DataSettings

PADDING_MASK = "padding_mask"  # 1 for a sample's tokens, 0 for padding (for the counts; not a model input)
SEGMENTS = "pack_segments"  # per row: [(sample length, images in it), ...], the row's padding not included


def pack_length(data: DataSettings) -> int | None:
    """The row length when `data.packing` is on (`data.pack_length`, or `data.max_length` when null), else None.
    A sample is at most `data.max_length` long, so every sample fits in a row."""
    if not data.packing:
        return None
    max_length = data.max_length
    length = data.pack_length or max_length
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ConfigError(f"data.pack_length={length!r} must be a positive number of tokens (or null: "
                          "data.max_length), e.g. data.pack_length=4096")
    if not max_length or length < int(max_length):
        raise ConfigError(f"data.pack_length={length} must be at least data.max_length={max_length}, so that every "
                          "sample fits in a row; raise data.pack_length or lower data.max_length")
    return int(length)


def first_fit_rows(lengths: list[int], row_length: int) -> list[list[int]]:
    """Indices of `lengths` placed into rows of at most `row_length`: each, in order, into the first row with
    room for it (a new row when none has)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for index, length in enumerate(lengths):
        if length > row_length:
            raise ValueError(f"a sample of {length} tokens does not fit in a row of {row_length}")
        for row, left in enumerate(room):
            if length <= left:
                rows[row].append(index)
                room[row] -= length
                break
        else:
            rows.append([index])
            room.append(row_length - length)
    return rows


def collate_packed(processor, encoded: list[EncodedSample], row_length: int) -> dict:
    """The packed batch of these samples: `input_ids`, `labels`, `position_ids` and every other per-token
    tensor the processor's collate makes, as (rows, row_length); image tensors in the rows' sample order;
    `padding_mask` and `pack_segments` (see the module's docstring)."""
    rows = first_fit_rows([e.input_ids.numel() for e in encoded], row_length)
    order = [index for row in rows for index in row]
    ordered = [encoded[i] for i in order]
    padded = processor.collate(ordered)  # image tensors in `order`; per-token tensors (n, longest) to repack
    lengths = [e.input_ids.numel() for e in ordered]
    width = padded["input_ids"].shape[1]
    per_token = {k: v for k, v in padded.items()
                 if isinstance(v, torch.Tensor) and v.dim() == 2 and tuple(v.shape) == (len(ordered), width)}
    per_token.pop("attention_mask", None)  # the model gets positions instead (block-diagonal attention)
    fill = {"input_ids": int(processor.pad_token_id), "labels": IGNORE_INDEX}
    batch = {k: v for k, v in padded.items() if k not in per_token and k != "attention_mask"}
    for key, value in per_token.items():
        batch[key] = torch.full((len(rows), row_length), fill.get(key, 0), dtype=value.dtype)
    batch["position_ids"] = torch.zeros((len(rows), row_length), dtype=torch.long)
    batch[PADDING_MASK] = torch.zeros((len(rows), row_length), dtype=torch.long)
    segments: list[list[tuple[int, int]]] = []
    sample = 0
    for r, row in enumerate(rows):
        start, row_segments = 0, []
        for _ in row:
            n = lengths[sample]
            for key, value in per_token.items():
                batch[key][r, start:start + n] = value[sample, :n]
            batch["labels"][r, start] = IGNORE_INDEX  # never a target: it would be predicted from the last sample
            batch["position_ids"][r, start:start + n] = torch.arange(n)
            batch[PADDING_MASK][r, start:start + n] = 1
            images = ordered[sample].image_inputs
            row_segments.append((n, _image_count(images)))
            start += n
            sample += 1
        batch["position_ids"][r, start:] = torch.arange(row_length - start)  # the padding: a block of its own
        segments.append(row_segments)
    batch[SEGMENTS] = segments
    return batch


def _image_count(image_inputs: dict) -> int:
    if not image_inputs:
        return 0
    if "video_grid_thw" in image_inputs:  # train.py refuses this before weights load; a guard for direct callers
        raise ValueError("data.packing=true does not take samples with videos yet; set data.packing=false")
    first = next(iter(image_inputs.values()))
    grid = image_inputs.get("image_grid_thw")
    return int(grid.shape[0]) if grid is not None else int(first.shape[0])
