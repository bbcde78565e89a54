"""A callback for the FSDP and ZeRO-3 memory tests (loaded by `python -m vlm_finetune +callbacks.probe._target_=fsdp_probe.Probe`
with tests/ on PYTHONPATH): after the first optimizer step, each rank writes the bytes it holds of the packed 4-bit
codes (its local shards), of the 4-bit statistics (absmax, code books: buffers and quant states, whole), of every
parameter shard, and of the optimizer states, read from FSDP's DTensors (DeepSpeed ZeRO-3: each parameter's
partition, `ds_tensor`) and the optimizer."""
from __future__ import annotations

import json

import lightning as L
import torch


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _local(p: torch.Tensor) -> torch.Tensor:
    if hasattr(p, "ds_tensor"):  # ZeRO-3: the rank's partition, and the whole of a parameter it keeps gathered
        return torch.cat([p.ds_tensor.reshape(-1), p.data.reshape(-1)]) if p.data.numel() else p.ds_tensor
    return p.to_local() if hasattr(p, "to_local") else p


def _whole_bytes(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel())) * p.element_size()


class Probe(L.Callback):
    def __init__(self, path: str):
        self.path = path
        self.done = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.done or trainer.global_step < 1:
            return
        self.done = True
        codes = whole_codes = stats = params = 0
        for module in pl_module.modules():
            for name, p in module.named_parameters(recurse=False):
                local = _bytes(_local(p if hasattr(p, "ds_tensor") else p.data))  # (ds_tensor is no .data)
                params += local
                four_bit = name.endswith("_nf4") or (name == "weight" and hasattr(module, "quant_state")
                                                     and type(module).__name__ == "Linear4bit")
                if four_bit:
                    codes += local
                    whole_codes += _whole_bytes(p)
            if type(module).__name__ == "Linear4bit" and module.quant_state is not None:
                state = module.quant_state
                stats += _bytes(state.absmax) + _bytes(state.code)
                if state.nested:
                    stats += _bytes(state.state2.absmax) + _bytes(state.state2.code) + _bytes(state.offset)
            for name, buffer in module.named_buffers(recurse=False):
                if name.endswith(("_absmax", "_code")):
                    stats += _bytes(buffer)
        optimizer = trainer.optimizers[0]
        states = sum(_bytes(_local(v)) for s in getattr(optimizer, "state", {}).values() for k, v in s.items()
                     if torch.is_tensor(v) and k != "step")
        record = {"rank": trainer.global_rank, "codes": codes, "whole_codes": whole_codes, "statistics": stats,
                  "parameters": params, "optimizer": states}
        with open(f"{self.path}.{trainer.global_rank}.json", "w") as handle:
            json.dump(record, handle)
