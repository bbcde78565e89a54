"""A callback for the communication tests (loaded by `python -m vlm_finetune +callbacks.comm._target_=comm_probe.Count
+callbacks.comm.path=...` with tests/ on PYTHONPATH): while training batches run, every collective a rank calls is
counted at its ring cost per rank (memory/comm.py's convention: all-reduce 2 (N-1)/N S, all-gather (N-1)/N of the
result, reduce-scatter (N-1)/N of the input, all_to_all the bytes sent to other ranks), DDP's bucketed all-reduce
through its default communication hook registered from Python, torch.distributed's functions by wrapping them before any strategy captures them
(DeepSpeed's backend keeps references). At the end each rank writes its bytes per kind and the tokens its MoE
layers saw per training forward."""
from __future__ import annotations

import functools
import json
import time
from collections import defaultdict

import lightning as L
import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d


def _nbytes(t) -> int:
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return t.numel() * t.element_size() if torch.is_tensor(t) else 0


def _world(kwargs) -> int:
    return dist.get_world_size(kwargs.get("group"))


def _cost(name: str, args, kwargs) -> float:
    names = {"all_reduce": ("tensor",), "all_gather_into_tensor": ("output_tensor", "input_tensor"),
             "_all_gather_base": ("output_tensor", "input_tensor"), "all_gather": ("tensor_list", "tensor"),
             "all_gather_single": ("output_tensor", "input_tensor"), "reduce_scatter_single": ("output", "input"),
             "reduce_scatter_tensor": ("output", "input"), "_reduce_scatter_base": ("output", "input"),
             "reduce_scatter": ("output", "input_list"), "all_to_all_single": ("output", "input"),
             "broadcast": ("tensor",), "reduce": ("tensor",)}[name]
    values = dict(zip(names, args))
    values.update({k: v for k, v in kwargs.items() if k in names or k in ("output_tensor", "input_tensor")})
    n = _world(kwargs)
    share = (n - 1) / n
    if name == "all_reduce":
        return 2 * share * _nbytes(values["tensor"])
    if name in ("all_gather_into_tensor", "_all_gather_base", "all_gather_single"):
        return share * _nbytes(values.get("output_tensor", next(iter(values.values()))))
    if name == "all_gather":
        return share * _nbytes(values["tensor_list"])
    if name in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single"):
        return share * _nbytes(values.get("input", values.get("input_tensor")))
    if name == "reduce_scatter":
        return share * _nbytes(values["input_list"])
    if name == "all_to_all_single":
        inp = values["input"]
        splits = kwargs.get("input_split_sizes") or [inp.shape[0] // n] * n
        rank = dist.get_rank(kwargs.get("group")) if kwargs.get("group") is not None else dist.get_rank()
        row = _nbytes(inp) // max(inp.shape[0], 1)
        return row * (sum(splits) - splits[rank])
    return share * _nbytes(values["tensor"])  # broadcast, reduce


class Count(L.Callback):
    # FSDP2 (torch 2.13) calls all_gather_single / reduce_scatter_single, which the older names now call in turn:
    # a collective called from inside a counted one is not counted again
    WRAPPED = ("all_reduce", "all_gather_into_tensor", "_all_gather_base", "all_gather", "all_gather_single",
               "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter", "reduce_scatter_single",
               "all_to_all_single", "broadcast", "reduce")

    def __init__(self, path: str):
        self.path = path
        self.on = False
        self.depth = 0  # counted collectives in progress (one may call another)
        self.bytes: dict[str, float] = defaultdict(float)
        self.moe_tokens: list[int] = []
        self.seconds: list[float] = []  # each training batch's wall time (forward, backward, step)
        self.calls: list[tuple[str, int]] = []  # each counted call and its bytes, in order
        for name in self.WRAPPED:  # now, before any strategy (DeepSpeed's backend) keeps a reference
            for module in (dist, c10d):
                original = getattr(module, name, None)
                if original is not None and not getattr(original, "_counted", False):
                    setattr(module, name, self._wrap(name, original))

    def _wrap(self, name, original):
        @functools.wraps(original)
        def counted(*args, **kwargs):
            if self.on and not self.depth:
                self.bytes[name] += _cost(name, args, kwargs)
                self.calls.append((name, round(_cost(name, args, kwargs))))
            self.depth += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.depth -= 1
        counted._counted = True
        return counted

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        model = trainer.strategy.model
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            # DDP's own hook, registered from Python: its bucket all-reduces go through the wrapped dist.all_reduce
            model.register_comm_hook(None, default_hooks.allreduce_hook)
        # the first MoE block (router + experts): the tokens of each training forward through it
        first = next((m for m in pl_module.modules() if hasattr(m, "gate") and hasattr(m, "experts")), None)
        if first is not None:
            def tokens(module, args):
                if self.on:
                    self.moe_tokens.append(int(args[0].numel() // args[0].shape[-1]))
            first.register_forward_pre_hook(tokens)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.on = True
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.on = False
        self.seconds.append(time.perf_counter() - self.started)

    def on_train_end(self, trainer, pl_module):
        with open(f"{self.path}.rank{trainer.global_rank}.json", "w") as handle:
            json.dump({"bytes": dict(self.bytes), "moe_tokens": self.moe_tokens, "calls": self.calls, "seconds": self.seconds,
                       "steps": int(trainer.global_step)}, handle)
