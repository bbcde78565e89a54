"""Checkpoint files: written so that a kill leaves a whole one, read so that nothing in them runs.

- `AtomicCheckpointIO` writes a checkpoint to a temporary file in the same folder, fsyncs it and renames
  it over the old one: killed at any moment, the folder holds either the previous checkpoint or the new
  one, never half of one. What it holds: what Lightning keeps (trainable weights, optimizer, LR schedule,
  loop counters, the data loader's position) plus the RNG states and a fingerprint of the run's settings
  (`resume.ResumeCallback` adds them), as tensors and plain data only.
- A checkpoint is checked before anything in it is unpickled (`check_safe_to_load`): a file naming code
  beyond tensors and plain data (or DeepSpeed's own state classes) is refused.
- Under DeepSpeed (`zero*`) the checkpoint is DeepSpeed's folder (each rank writes its optimizer partition;
  frozen weights are left out), written to `last.ckpt.tmp` and then swapped in for `last.ckpt` whole.
- `find_resume_checkpoint` picks the checkpoint a run continues from (`resume=auto|never|<path>`) and
  checks it first: a corrupt or incompatible file stops the run with what is wrong and what to do.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.seed import _collect_rng_states, _set_rng_states
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vlm_finetune.errors import ConfigError
from vlm_finetune.io import save_torch_atomic
from vlm_finetune.settings import RunSettings

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LAST = "last.ckpt"
FORMAT_VERSION = 1
# settings that decide the data order and the meaning of the saved state: resuming under different ones
# cannot continue the same run
FINGERPRINT_KEYS = ("model.name", "seed", "data.source", "data.micro_batch_size", "trainer.accumulate_grad_batches",
                    "lora.r", "lora.alpha", "train.vision", "train.projector", "train.llm", "world_size",
                    "trainer.strategy", "trainer.zero_stage")


# globals beyond torch's weights-only set that DeepSpeed's own checkpoint files name (checked by
# tests/test_resume.py on a real ZeRO checkpoint); nothing else is unpickled
TRUSTED_GLOBALS = frozenset({
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
})


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the message names the file and what to do."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with the save made atomic (temporary file in the same folder, then rename)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        save_torch_atomic(checkpoint, Path(path))


def deepspeed_client_state_file(folder: Path) -> Path | None:
    """The file of a DeepSpeed checkpoint folder that holds Lightning's and our state (rank 0's model states)."""
    files = sorted(Path(folder).glob("*/*model_states.pt"))
    first = [f for f in files if f.name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")]
    return (first or files or [None])[0]


def plain_rng_states(include_cuda: bool) -> dict:
    """The RNG states as tensors and plain data only (numpy's key array as a list), so that a checkpoint
    loads with torch's weights-only unpickler and nothing in it can run code."""
    states = _collect_rng_states(include_cuda=include_cuda)
    name, keys, position, has_gauss, cached = states["numpy"]
    states["numpy"] = (str(name), [int(k) for k in keys], int(position), int(has_gauss), float(cached))
    return states


def restore_rng_states(states: dict) -> None:
    import numpy as np

    states = dict(states)
    name, keys, position, has_gauss, cached = states["numpy"]
    states["numpy"] = (name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached)
    _set_rng_states(states)


def check_safe_to_load(file: Path, fix: str) -> None:
    """Refuse a file whose unpickling would call anything beyond tensors and plain data, before it is
    unpickled: `torch.load(weights_only=False)` on a foreign file runs whatever code it names."""
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(file))
    except Exception as err:  # not a torch file, truncated, ...
        raise CheckpointError(f"checkpoint {file} is corrupt or unreadable ({type(err).__name__}: {err}); {fix}") \
            from None
    unknown = sorted(set(unsafe) - TRUSTED_GLOBALS)
    if unknown:
        raise CheckpointError(f"checkpoint {file} names code that loading it would run ({', '.join(unknown[:4])}); "
                              f"vlm_finetune's checkpoints hold tensors and plain data only, so it was not written by "
                              f"this project's training and is not loaded; {fix}")


def load_checkpoint_file(path: Path) -> dict:
    """Load a checkpoint written by this project (a file, or DeepSpeed's folder) or raise CheckpointError
    saying why it cannot be used."""
    path = Path(path)
    fix = ("delete it to start afresh, point resume= at an older checkpoint, or run with resume=never "
           "in a new folder")
    if path.is_dir():
        state_file = deepspeed_client_state_file(path)
        if state_file is None:
            raise CheckpointError(f"checkpoint folder {path} holds no DeepSpeed model states (*/…model_states.pt); "
                                  f"{fix}")
        for file in sorted(path.rglob("*.pt")):  # DeepSpeed unpickles every one of them on resume
            check_safe_to_load(file, fix)
        try:
            checkpoint = torch.load(state_file, map_location="cpu", weights_only=False)
        except Exception as err:
            raise CheckpointError(f"checkpoint {state_file} is corrupt or unreadable ({type(err).__name__}: {err}); "
                                  f"{fix}") from None
        if not isinstance(checkpoint, dict) or "vlm_finetune" not in checkpoint:
            raise CheckpointError(f"checkpoint {path} was not written by vlm_finetune's training (no run fingerprint); "
                                  f"{fix}")
        return _check_version(checkpoint, path, fix)
    if not path.is_file():
        raise CheckpointError(f"resume: checkpoint {path} does not exist; use resume=auto (continue from "
                              f"<run>/{CHECKPOINT_DIR}/{LAST} when there is one) or resume=never")
    check_safe_to_load(path, fix)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several kinds for truncated or foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(err).__name__}: {err}); {fix}") \
            from None
    if not isinstance(checkpoint, dict) or "vlm_finetune" not in checkpoint or "state_dict" not in checkpoint:
        raise CheckpointError(f"checkpoint {path} was not written by vlm_finetune's training (no run fingerprint); "
                              f"{fix}")
    return _check_version(checkpoint, path, fix)


def _check_version(checkpoint: dict, path: Path, fix: str) -> dict:
    version = checkpoint["vlm_finetune"].get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {version}, this vlm_finetune reads "
                              f"{FORMAT_VERSION}; {fix}")
    return checkpoint


def run_fingerprint(settings: RunSettings, world_size: int) -> dict:
    """The values a resume checkpoint must agree on, under their config keys (FINGERPRINT_KEYS)."""
    strategy = settings.strategy
    values = {
        "model.name": settings.model.name, "seed": settings.seed, "data.source": settings.data.source,
        "data.micro_batch_size": settings.data.micro_batch_size,
        "trainer.accumulate_grad_batches": settings.accumulate_grad_batches,
        "lora.r": settings.lora.r, "lora.alpha": settings.lora.alpha,
        **{f"train.{part}": settings.trainability[part] for part in ("vision", "projector", "llm")},
        "world_size": world_size, "trainer.strategy": strategy.strategy,
        # what the config held: no zero_stage outside DeepSpeed
        "trainer.zero_stage": strategy.zero_stage if strategy.strategy == "deepspeed" else None,
    }
    assert tuple(values) == FINGERPRINT_KEYS  # the two lists are kept together
    return values


def trainable_shapes(module: torch.nn.Module) -> dict[str, list[int]]:
    # ZeRO-3 leaves each rank an empty placeholder; the whole shape is in ds_shape
    return {name: list(getattr(p, "ds_shape", p.shape)) for name, p in module.named_parameters() if p.requires_grad}


def check_compatible(checkpoint: dict, path: Path, fingerprint: dict,
                     shapes: dict[str, list[int]] | None = None) -> None:
    """Raise CheckpointError naming every difference between the checkpoint's run and this one: its settings
    (checked before the model is built) and, given `shapes`, its trainable tensors."""
    saved = checkpoint["vlm_finetune"]
    problems = [f"{k}: checkpoint {saved['fingerprint'].get(k)!r}, now {v!r}"
                for k, v in fingerprint.items() if saved["fingerprint"].get(k) != v]
    if shapes is None:
        if problems:
            _raise_incompatible(path, problems)
        return
    saved_shapes = saved["trainable_shapes"]
    missing = sorted(set(shapes) - set(saved_shapes))
    extra = sorted(set(saved_shapes) - set(shapes))
    if missing:
        problems.append(f"{len(missing)} trainable tensor(s) not in the checkpoint, e.g. {missing[0]}")
    if extra:
        problems.append(f"{len(extra)} tensor(s) in the checkpoint that this model does not train, e.g. {extra[0]}")
    wrong = [n for n in set(shapes) & set(saved_shapes) if list(shapes[n]) != list(saved_shapes[n])]
    if wrong:
        problems.append(f"{len(wrong)} tensor(s) of another shape, e.g. {wrong[0]}: checkpoint "
                        f"{saved_shapes[wrong[0]]}, now {shapes[wrong[0]]}")
    if problems:
        _raise_incompatible(path, problems)


def _raise_incompatible(path: Path, problems: list[str]) -> None:
    raise CheckpointError(f"checkpoint {path} belongs to a different run and cannot be resumed exactly: "
                          + "; ".join(problems) + ". Resume with the same settings, or start a new run folder "
                          "(or resume=never)")


def find_resume_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint to continue from: `auto` -> <run>/checkpoints/last.ckpt if present, `never`/null -> none,
    anything else -> that path (which must exist)."""
    value = "never" if resume in (None, False, "never", "none", "null") else str(resume)
    if value == "never":
        return None
    if value == "auto":
        last = run_dir / CHECKPOINT_DIR / LAST
        if last.exists():
            return last
        # killed between the two renames that swap in a new checkpoint folder: the previous one is whole
        old = last.with_name(LAST + ".old")
        return old if old.is_dir() else None
    return Path(value)
