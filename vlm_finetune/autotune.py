"""`data.micro_batch_size=auto` (largest micro-batch that fits, found with real steps on the GPU, the global
batch kept by the accumulation) and `model.activation_checkpointing=auto` (as few checkpointed decoder
layers as the memory budget allows, chosen by the planner)."""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from omegaconf import open_dict

from vlm_finetune.errors import ConfigError

log = logging.getLogger(__name__)


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def check_auto_options(cfg: Any, hardware: Any) -> None:
    """Both `auto` options need a GPU; micro-batch auto also needs the global batch it keeps."""
    if is_auto(cfg.data.micro_batch_size):
        if hardware.accelerator != "gpu":
            raise ConfigError("data.micro_batch_size=auto searches with real training steps on the GPU; this run has "
                              f"no GPU (hardware={hardware.name}). Set a number, e.g. data.micro_batch_size=4, or plan "
                              "it with python -m vlm_finetune.plan")
        if cfg.trainer.strategy not in ("single", "ddp"):
            raise ConfigError(f"data.micro_batch_size=auto works with trainer=single|ddp (every GPU holds the model); "
                              f"with trainer={cfg.trainer.name} set a number (python -m vlm_finetune.plan "
                              "data.micro_batch_size=auto ... predicts one)")
        global_batch = cfg.data.get("global_batch_size")
        if not isinstance(global_batch, int) or global_batch < 1:
            raise ConfigError("data.micro_batch_size=auto keeps the global batch the same: set "
                              "+data.global_batch_size=<samples per optimizer step over all GPUs>")
        if global_batch % hardware.world_size:
            raise ConfigError(f"data.global_batch_size={global_batch} is not divisible by the {hardware.world_size} "
                              "GPUs of the hardware profile")
    if is_auto(cfg.model.get("activation_checkpointing")) and hardware.accelerator != "gpu":
        raise ConfigError("model.activation_checkpointing=auto chooses how many decoder layers to checkpoint from the "
                          f"GPU memory budget; this run has no GPU (hardware={hardware.name}). Use true or false "
                          "(or a number of layers) on the CPU")


def resolve_activation_checkpointing(cfg: Any, overrides: list[str] | None = None) -> int | None:
    """Replace `model.activation_checkpointing=auto` by the fewest checkpointed layers whose planned peak
    fits the hardware budget (all when none fits). Returns the number, or None when not auto."""
    if not is_auto(cfg.model.get("activation_checkpointing")):
        return None
    from vlm_finetune.plan import plan_memory

    plan = plan_memory(list(overrides or []), cfg=cfg, suggest=False)
    with open_dict(cfg):
        cfg.model.activation_checkpointing = int(plan.checkpointed_layers)
    print(f"vlm_finetune: activation checkpointing auto: {plan.checkpointed_layers} of {plan.num_layers} decoder "
          f"layers (planned peak {plan.peak_bytes / 2**30:.1f} GiB of {plan.budget_bytes / 2**30:.1f} GiB)", flush=True)
    return int(plan.checkpointed_layers)


def limit_checkpointed_layers(model: torch.nn.Module, layer_classes: tuple[type, ...], count: int) -> int:
    """Keep activation checkpointing on the first `count` decoder layers only (transformers'
    GradientCheckpointingLayer reads its own `gradient_checkpointing` flag). Returns how many are on."""
    layers = [m for m in model.modules() if isinstance(m, tuple(layer_classes))]
    if count < 0 or count > len(layers):
        raise ConfigError(f"model.activation_checkpointing={count}: the model has {len(layers)} decoder layers")
    for index, layer in enumerate(layers):
        layer.gradient_checkpointing = index < count
    return sum(1 for layer in layers if layer.gradient_checkpointing)


def largest_fitting(step: Callable[[int], None], limit: int) -> int:
    """The largest size in 1..limit for which `step(size)` raises no torch.OutOfMemoryError (sizes are
    doubled, then bisected). Raises ConfigError when even 1 does not fit."""
    best, size = 0, 1
    while size <= limit:
        try:
            step(size)
        except torch.OutOfMemoryError:
            break
        best, size = size, size * 2
    if best == 0:
        raise ConfigError("data.micro_batch_size=auto: even a micro-batch of 1 runs out of GPU memory; see python -m "
                          "vlm_finetune.plan for changes that fit (checkpointing, sharding, offload, 4-bit)")
    low, high = best, min(size, limit + 1)
    while high - low > 1:
        mid = (low + high) // 2
        try:
            step(mid)
            low = mid
        except torch.OutOfMemoryError:
            high = mid
    return low


def micro_batch_for_global(found: int, global_batch: int, world_size: int) -> tuple[int, int]:
    """(micro-batch, accumulation): the largest micro-batch <= found that divides the per-GPU share of the
    global batch, and the accumulation that keeps the global batch exactly."""
    per_gpu = global_batch // world_size
    micro = max(d for d in range(1, min(found, per_gpu) + 1) if per_gpu % d == 0)
    return micro, per_gpu // micro


def synthetic_batch(processor: Any, size: int, seq: int, image_px: int, vocab_limit: int) -> dict:
    """`size` samples of exactly `seq` tokens, each one image of `image_px` pixels and a supervised reply
    filling the rest: the worst case the data module can hand a step at data.max_length."""
    from PIL import Image

    from vlm_finetune.data.sample import Message, Sample

    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(image_px, image_px, 3, generator=generator) * 255).to(torch.uint8).numpy()
    sample = Sample([Message("user", "<image>\nDescribe the image."), Message("assistant", "x")],
                    [Image.fromarray(pixels)])
    encoded = processor.encode(sample)
    prompt = int((encoded.labels == -100).sum())
    if seq <= prompt + 1:
        raise ConfigError(f"data.max_length={seq} leaves no room for an answer after the {prompt} prompt and image "
                          "tokens")
    reply = torch.randint(100, vocab_limit, (seq - prompt,), generator=generator)
    encoded.input_ids = torch.cat([encoded.input_ids[:prompt], reply])
    encoded.labels = torch.cat([encoded.labels[:prompt], reply])
    encoded.num_supervised_tokens = int(reply.numel()) - 1
    return processor.collate([encoded] * size)


def search_micro_batch(cfg: Any, family: Any, model: torch.nn.Module, processor: Any, hardware: Any,
                       limit: int | None = None) -> tuple[int, int]:
    """Find the largest micro-batch that fits with real training steps (forward, backward, AdamW step) on
    this GPU, then set data.micro_batch_size and trainer.accumulate_grad_batches in `cfg` so that the
    global batch stays data.global_batch_size. Returns (micro-batch, accumulation)."""
    from vlm_finetune.module import batch_loss_sum
    from vlm_finetune.train import MIXED, PRECISIONS
    from vlm_finetune.trainability import unwrap

    device = torch.device("cuda", torch.cuda.current_device())
    global_batch = int(cfg.data.global_batch_size)
    limit = limit or global_batch // hardware.world_size
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    mixed = cfg.precision.name in MIXED
    dtype = PRECISIONS[cfg.precision.name][1]
    vocab = int(family.output_embedding(unwrap(model)).weight.shape[0])
    image_px = int(cfg.model.get("max_image_size") or cfg.model.get("image_size"))

    def step(size: int) -> None:
        optimizer = torch.optim.AdamW(params, lr=0.0)
        try:
            batch = synthetic_batch(processor, size, int(cfg.data.max_length), image_px, min(vocab, 150000))
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            for _ in range(2):  # the second step holds the optimizer states the first one made
                with torch.autocast("cuda", dtype=dtype, enabled=mixed):
                    loss_sum, count = batch_loss_sum(family, model, batch, cfg.loss.impl, cfg.loss.chunk_size)
                (loss_sum / max(count, 1)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
        finally:
            optimizer.state.clear()
            for p in params:
                p.grad = None
            del optimizer
            torch.cuda.empty_cache()

    found = largest_fitting(step, limit)
    micro, accumulate = micro_batch_for_global(found, global_batch, hardware.world_size)
    with open_dict(cfg):
        cfg.data.micro_batch_size = micro
        cfg.trainer.accumulate_grad_batches = accumulate
    print(f"vlm_finetune: micro-batch auto: {found} fits with real steps; micro-batch {micro} x accumulation "
          f"{accumulate} x {hardware.world_size} GPU(s) = global batch {global_batch}", flush=True)
    return micro, accumulate
