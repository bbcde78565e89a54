"""Released checkpoint folders share one weight layout: safetensors shards, `model.safetensors.index.json`
(always written; some original loaders read nothing else) and a config.json in the dtype the weights hold."""
from __future__ import annotations

import json
from pathlib import Path

import torch

INDEX_FILE = "model.safetensors.index.json"


def write_shards(released: dict[str, torch.Tensor], folder: Path, shards: list[list[str]],
                 single_name: str | None = None) -> None:
    """Each list of names in `shards` into `model-0000i-of-0000n.safetensors` (`single_name` when there is one
    shard and the layout names it so), and the index mapping every name to its file."""
    from safetensors.torch import save_file

    weight_map, total = {}, 0
    for i, names in enumerate(shards, 1):
        fname = single_name if single_name and len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: released[k] for k in names}, str(Path(folder) / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in names})
        total += sum(released[k].numel() * released[k].element_size() for k in names)
    (Path(folder) / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                      indent=2))


def written_dtype(released: dict[str, torch.Tensor]) -> torch.dtype | None:
    """The floating dtype most of the weights hold (what config.json's torch_dtype should say)."""
    floats = [t.dtype for t in released.values() if t.is_floating_point()]
    return max(set(floats), key=floats.count) if floats else None


class ShardReader:
    """The tensors of a checkpoint's safetensors files, memory-mapped and read one at a time (`get`), with
    every key name known before any tensor is read (`names`)."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles = [safe_open(str(path), framework="pt", device="cpu") for path in files]
        self._where = {name: handle for handle in self._handles for name in handle.keys()}

    @property
    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)


def stream_into(model: torch.nn.Module, sources: dict[str, list[str]], assemble, reader: ShardReader,
                skip: set[str] = frozenset()) -> None:
    """For each state-dict tensor of `model` (whole, or partitioned by ZeRO-3's zero.Init), read the released
    tensors `sources[name]` names, `assemble(name, tensors)` them into one and copy it in; only that tensor is
    ever whole in memory. `skip`: names that are not read (a tied head). Shapes are checked (ValueError)."""
    from vlm_finetune.models._partitioned import copy_into, logical_shape

    for name, target in model.state_dict(keep_vars=True).items():
        if name in skip or name not in sources:
            continue
        value = assemble(name, [reader.get(s) for s in sources[name]])
        if tuple(value.shape) != logical_shape(target):
            raise ValueError(f"{name} has shape {tuple(value.shape)} in the checkpoint, the model expects "
                             f"{logical_shape(target)}")
        copy_into(target, value.to(target.dtype))
        del value
