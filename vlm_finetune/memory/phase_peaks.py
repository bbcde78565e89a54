"""The peak of live tensor bytes per phase of a run, on any device, CPU ranks included (where no allocator keeps a
peak): `+callbacks.phase_peaks._target_=vlm_finetune.memory.phase_peaks.PhasePeaks +callbacks.phase_peaks.path=F`.

Each measured phase starts from a census of every tensor alive in the process (each storage once); a
TorchDispatchMode then follows every storage an operation makes or resizes, and a weak reference on each storage
sees it freed, until the phase ends. (torch's MemTracker does the same with per-module attribution, but its module
hooks refuse frozen parameters and a model called twice per step, as activation checkpointing does.) The
phase's peak is the largest total it saw. Phases: `step` (one training batch: forward, backward and, at the
window's end, the optimizer step; the `step`-th batch of the run), `validation` (a whole validation loop) and
`save` (one checkpoint write). Each rank writes `F.<rank>.json` with
the peaks in bytes and the census at each phase's start. What bypasses the dispatcher (a library's own C++
allocations, the Python heap) is not a tensor and is not counted: this is the quantity the planner predicts
(`torch.cuda.max_memory_allocated` on a GPU), not the resident size."""
from __future__ import annotations

import gc
import json
import os
import warnings
import weakref
from contextlib import contextmanager
from pathlib import Path

import lightning as L
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary


def live_tensors() -> list[torch.Tensor]:
    """Every tensor the garbage collector can see, one per storage (parameters' partitions and optimizer states
    included: DeepSpeed keeps them as plain tensors in its objects)."""
    seen: dict[int, torch.Tensor] = {}
    with warnings.catch_warnings():  # isinstance() on deprecated module-level objects (torch.distributed.reduce_op)
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if torch.is_tensor(obj)]
    for obj in objects:
        try:
            if obj.is_meta:
                continue
            storage = obj.untyped_storage()
        except Exception:  # noqa: BLE001 - wrapper subclasses without a storage, half-built objects
            continue
        if storage.nbytes() > 0:
            seen.setdefault(storage.data_ptr(), obj)
    return list(seen.values())


class LiveBytes(TorchDispatchMode):
    """Bytes of live tensor storage, counted from `tensors` on, and their peak, while the mode is active."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        super().__init__()
        self.sizes = WeakIdKeyDictionary()  # storage -> its bytes as last counted
        self.counted: dict[int, int] = {}  # id(storage) -> bytes, for the finalizer once the storage is gone
        self.made_by: dict[int, str] = {}  # id(storage) -> the operation and shape that made it (diagnosis only)
        self.detail = int(os.environ.get("VLM_FINETUNE_PEAK_DETAIL", "0"))  # a diagnosis: sizes at the peak
        self._func = "census"
        self.current = 0
        for tensor in tensors:
            self._see(tensor)
        self.peak = self.current
        self._resize = None
        self.at_peak: list = []

    def _see(self, tensor: torch.Tensor) -> None:
        try:
            if tensor.is_meta:
                return
            storage = tensor.untyped_storage()
        except Exception:  # noqa: BLE001 - wrapper subclasses (DTensor) are counted through their local tensors
            return
        if self.detail and id(storage) not in self.counted:
            self._func = f"{self._op} {tuple(tensor.shape)}"
        self._count(storage)

    def _count(self, storage) -> None:
        size = storage.nbytes()
        known = self.sizes.get(storage)
        if known is None:
            self.sizes[storage] = size
            self.counted[id(storage)] = size
            if self.detail:
                self.made_by[id(storage)] = self._func
            weakref.finalize(storage, self._freed, id(storage))
            self.current += size
        elif known != size:
            self.sizes[storage] = size
            self.counted[id(storage)] = size
            self.current += size - known

    def _freed(self, key: int) -> None:
        self.current -= self.counted.pop(key, 0)
        self.made_by.pop(key, None)

    def __enter__(self):
        original, mode = torch.UntypedStorage.resize_, self

        def resize_(storage, size):
            result = original(storage, size)
            mode._count(storage)
            mode.peak = max(mode.peak, mode.current)
            return result
        self._resize = original
        torch.UntypedStorage.resize_ = resize_
        return super().__enter__()

    def __exit__(self, *args):
        torch.UntypedStorage.resize_ = self._resize
        return super().__exit__(*args)

    _op = "census"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._op = str(func)
        result = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._see, result)
        tree_map_only(torch.Tensor, self._see, args)  # in-place ops and out= arguments may have grown
        if self.current > self.peak:
            self.peak = self.current
            if self.detail:  # the largest storages alive at the peak and the operation that reached it
                largest = sorted(self.counted.items(), key=lambda kv: -kv[1])[:self.detail]
                self.at_peak = [str(func), [f"{size} {self.made_by.get(key, '?')}" for key, size in largest]]
        return result


class PhasePeaks(L.Callback):
    def __init__(self, path: str, step: int = 2) -> None:
        self.path = str(path)
        self.step = int(step)  # the training batch measured (1-based count of batches this run)
        self.peaks: dict[str, int] = {}
        self.starts: dict[str, int] = {}
        self.shapes: dict[str, list[int]] = {}  # phase -> [samples, tokens] of its largest batch (padded)
        self.details: dict[str, list] = {}  # phase -> the largest storages at its peak (VLM_FINETUNE_PEAK_DETAIL=N)
        self._batches = 0
        self._tracker = None
        self._phase: str | None = None

    # -- a phase ---------------------------------------------------------------------------------------------
    def _begin(self, phase: str) -> None:
        if self._tracker is not None or phase in self.peaks:
            return
        gc.collect()
        tracker = LiveBytes(live_tensors())
        self.starts[phase] = tracker.current
        tracker.__enter__()
        self._tracker, self._phase = tracker, phase

    def _end(self, phase: str, trainer) -> None:
        if self._tracker is None or self._phase != phase:
            return
        tracker, self._tracker, self._phase = self._tracker, None, None
        tracker.__exit__(None, None, None)
        self.peaks[phase] = int(tracker.peak)
        if tracker.at_peak:
            self.details[phase] = tracker.at_peak
        self._write(trainer)

    @contextmanager
    def measuring(self, phase: str, trainer):
        self._begin(phase)
        try:
            yield
        finally:
            self._end(phase, trainer)

    def _write(self, trainer) -> None:
        rank = int(getattr(trainer, "global_rank", 0) or os.environ.get("RANK", 0))
        target = Path(f"{self.path}.{rank}.json")
        partial = target.with_suffix(".json.tmp")
        partial.write_text(json.dumps({"peaks": self.peaks, "starts": self.starts, "shapes": self.shapes,
                                        "details": self.details},
                                       indent=1))
        os.replace(partial, target)

    # -- the hooks -------------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        saving = trainer.save_checkpoint

        def save_checkpoint(*args, **kwargs):
            with self.measuring("save", trainer):
                return saving(*args, **kwargs)
        trainer.save_checkpoint = save_checkpoint

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._batches += 1
        if self._batches == self.step:
            self._shape("step", batch)
            self._begin("step")

    def _shape(self, phase: str, batch) -> None:
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        if torch.is_tensor(ids) and ids.dim() == 2:
            samples, tokens = self.shapes.get(phase, [0, 0])
            self.shapes[phase] = [max(samples, int(ids.shape[0])), max(tokens, int(ids.shape[1]))]

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        if self._phase == "validation":
            self._shape("validation", batch)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._end("step", trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._begin("validation")

    def on_validation_end(self, trainer, pl_module) -> None:
        self._end("validation", trainer)
