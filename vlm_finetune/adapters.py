"""The adapter folder, written and read in one place: a PEFT adapter (`adapter_config.json`,
`adapter_model.safetensors`, fully trained parts as `modules_to_save`) that `PeftModel.from_pretrained`
loads, plus `non_lora_trainables.safetensors` (the LLaVA/MGM convention) and the processor files."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import lightning as L
import torch
from torch import nn

from vlm_finetune.errors import ConfigError
from vlm_finetune.fsdp import full_trainable_state
from vlm_finetune.io import atomic_folder
from vlm_finetune.running_strategy import full_trainable_parameters, is_fsdp
from vlm_finetune.trainability import TrainablePlan

ADAPTER_CONFIG = "adapter_config.json"
NON_LORA_TRAINABLES = "non_lora_trainables.safetensors"
# prefixes strategies put into parameter names (FSDP units, checkpoint wrappers, torch.compile)
WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def plain_name(name: str) -> str:
    for part in WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def peft_adapter_tensors(state: dict, adapter_name: str = "default") -> dict:
    """PEFT's on-disk layout from trainable parameters with plain names: the adapter name is dropped
    (`q_proj.lora_A.default.weight` -> `q_proj.lora_A.weight`, `merger.modules_to_save.default.x` -> `merger.x`).
    Written here rather than by PeftModel.save_pretrained, whose key discovery walks the module tree and
    misses LoRA layers inside FSDP-wrapped blocks."""
    tensors = {}
    for name, tensor in state.items():
        if "lora_" in name:
            tensors[name.replace(f".{adapter_name}.", ".")] = tensor.contiguous()
        elif f".modules_to_save.{adapter_name}." in name:
            tensors[name.replace(f".modules_to_save.{adapter_name}.", ".")] = tensor.contiguous()
    return tensors


def _write_peft_adapter(model: nn.Module, state: dict, folder: Path, adapter_name: str = "default") -> None:
    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(str(folder))
    save_file(peft_adapter_tensors(state, adapter_name), str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def save_adapter(model: nn.Module, plan: TrainablePlan, processor, folder: Path,
                 whole: dict[str, torch.Tensor] | None = None) -> None:
    """The adapter folder of `model`'s trainable weights (or of `whole`, those weights gathered by name), written
    to a temporary folder and swapped in."""
    from safetensors.torch import save_file

    if whole is None:
        whole = {n: p.detach().to("cpu").clone() for n, p in model.named_parameters() if p.requires_grad}
    with atomic_folder(folder) as tmp:
        # trainable weights by their plain names: strategies wrap modules (checkpointing, compile) and
        # add prefixes that PEFT's export would not recognise
        state = {plain_name(n): t for n, t in whole.items()}
        if plan.uses_lora:
            _write_peft_adapter(model, state, tmp)
        trainables = {}
        for name, tensor in state.items():
            if "lora_" in name:
                continue
            clean = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            trainables[clean] = tensor.contiguous()
        if trainables:
            save_file(trainables, str(tmp / NON_LORA_TRAINABLES))
        processor.save_pretrained(str(tmp))


class AdapterSaver(L.Callback):
    """Writes the adapter folder when training ends, while a sharded engine still holds the weights
    (after `fit` returns, ZeRO-3 and FSDP have been torn down)."""

    def __init__(self, folder: Path, plan: TrainablePlan, processor, interrupted: Callable[[], bool] = lambda: False):
        self.folder, self.plan, self.processor = folder, plan, processor
        self.interrupted = interrupted  # a run stopped early (by a signal) writes no adapter
        self.saved = False

    def on_train_end(self, trainer, pl_module) -> None:
        if not self.interrupted():
            self.save(trainer, pl_module)

    def save(self, trainer, pl_module) -> None:
        if is_fsdp(trainer.strategy):  # the trained weights gathered whole onto rank 0, one at a time
            whole = full_trainable_state(pl_module.model)
            if trainer.is_global_zero:
                save_adapter(pl_module.model, self.plan, self.processor, self.folder, whole)
            self.saved = True
            return
        with full_trainable_parameters(trainer, pl_module):
            if trainer.is_global_zero:
                save_adapter(pl_module.model, self.plan, self.processor, self.folder)
        self.saved = True


def is_adapter_folder(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / ADAPTER_CONFIG).is_file() or (folder / NON_LORA_TRAINABLES).is_file()


def load_adapter(model: nn.Module, folder: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`model` with the adapter folder's trained weights: a PeftModel when it holds a PEFT adapter, else the
    model with the fully trained tensors of `non_lora_trainables.safetensors` loaded into it (every tensor
    must be one of the model's)."""
    folder = Path(folder)
    if (folder / ADAPTER_CONFIG).is_file():
        from peft import PeftModel

        return PeftModel.from_pretrained(model, str(folder))
    if not (folder / NON_LORA_TRAINABLES).is_file():
        raise ConfigError(f"{folder} is not an adapter folder (no {ADAPTER_CONFIG} or {NON_LORA_TRAINABLES}); use "
                          "a run's adapter/ folder or the output of python -m vlm_finetune.export")
    from safetensors.torch import load_file

    trained = load_file(str(folder / NON_LORA_TRAINABLES))
    unknown = sorted(set(trained) - set(dict(model.named_parameters())))
    if unknown:
        raise ConfigError(f"{folder}/{NON_LORA_TRAINABLES} holds {len(unknown)} tensor(s) this model does not "
                          f"have, e.g. {unknown[0]}: was the run made with another model?")
    model.load_state_dict({k: v.to(dtype) for k, v in trained.items()}, strict=False)
    return model
