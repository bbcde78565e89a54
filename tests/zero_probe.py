"""A callback for the ZeRO memory tests (loaded by `python -m vlm_finetune +callbacks.probe._target_=zero_probe.Probe`
with tests/ on PYTHONPATH): after the first optimizer step, each rank writes the bytes it holds for parameters
(ZeRO-3: its partitions, plus whole copies of persistent parameters) and for optimizer state (fp32 master
partition and AdamW's states), read from DeepSpeed's own tensors."""
from __future__ import annotations

import json

import lightning as L
import torch


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bucket_bytes(optimizer) -> int:
    """The reduce buckets DeepSpeed holds now (ZeRO-3: one tensor per dtype, from the start; ZeRO-2: a list, two
    with overlap_comm, made for each backward and released after it)."""
    total = 0
    for bucket in getattr(optimizer, "ipg_buckets", {}).values():
        buffers = bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
        total += sum(_bytes(b) for b in buffers if torch.is_tensor(b))
    return total


class Probe(L.Callback):
    def __init__(self, path: str):
        self.path = path
        self.done = False
        self.buckets = 0

    def on_train_start(self, trainer, pl_module) -> None:
        optimizer = trainer.strategy.model.optimizer
        if hasattr(optimizer, "setup_buckets"):  # ZeRO-1/2 make their buckets when a backward starts
            original = optimizer.setup_buckets

            def setup_buckets():
                original()
                self.buckets = max(self.buckets, _bucket_bytes(optimizer))
            optimizer.setup_buckets = setup_buckets

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done or trainer.global_step < 1:
            return
        self.done = True
        params = 0
        for p in pl_module.parameters():
            if hasattr(p, "ds_tensor"):  # ZeRO-3
                params += _bytes(p.ds_tensor) + (_bytes(p.data) if p.ds_persist else 0)
            else:
                params += _bytes(p.data)
        optimizer = trainer.strategy.model.optimizer
        if hasattr(optimizer, "fp32_partitioned_groups_flat"):  # ZeRO-3
            masters, partitions = optimizer.fp32_partitioned_groups_flat, optimizer.fp16_partitioned_groups_flat
        else:  # ZeRO-1/2
            masters, partitions = optimizer.single_partition_of_fp32_groups, optimizer.bit16_groups_flat
        # a float32 master that is the parameters' own storage (ZeRO-3 under 32-true) is no extra memory
        master_bytes = sum(_bytes(m) for m, w in zip(masters, partitions)
                           if m.untyped_storage().data_ptr() != w.untyped_storage().data_ptr())
        states = sum(_bytes(v) for s in optimizer.optimizer.state.values() for k, v in s.items()
                     if torch.is_tensor(v) and k != "step")
        buckets = max(self.buckets, _bucket_bytes(optimizer))
        record = {"rank": trainer.global_rank, "parameters": params, "master": master_bytes, "states": states,
                  "reduce_buckets": buckets}
        with open(f"{self.path}.{trainer.global_rank}.json", "w") as handle:
            json.dump(record, handle)
