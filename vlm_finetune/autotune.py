"""`data.micro_batch_size=auto` (largest micro-batch that fits, found with real steps on the GPU under
trainer=single|ddp or chosen by the memory plan under sharding, the global batch kept by the accumulation) and
`model.activation_checkpointing=auto` (as few checkpointed decoder layers as the memory budget allows, chosen by
the planner)."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable

import torch
from PIL import Image

from vlm_finetune.data.sample import IGNORE_INDEX, Message, Sample
from vlm_finetune.errors import ConfigError
from vlm_finetune.memory.auto_batch import kept_global_batch, micro_batch_for_global, searched_with_real_steps
from vlm_finetune.memory.planner import plan_run
from vlm_finetune.memory.search import largest_size
from vlm_finetune.module import batch_loss_sum
from vlm_finetune.precision import weights_policy
from vlm_finetune.settings import RunSettings, is_auto
from vlm_finetune.trainability import unwrap

log = logging.getLogger(__name__)


def check_auto_options(settings: RunSettings, hardware: Any) -> None:
    """Both `auto` options need a GPU; micro-batch auto also needs the global batch it keeps."""
    if is_auto(settings.data.micro_batch_size):
        if hardware.accelerator != "gpu":
            raise ConfigError("data.micro_batch_size=auto searches with real training steps on the GPU; this run has "
                              f"no GPU (hardware={hardware.name}). Set a number, e.g. data.micro_batch_size=4, or plan "
                              "it with python -m vlm_finetune.plan")
        kept_global_batch(settings, hardware.world_size)  # a ConfigError naming what is missing
    if is_auto(settings.model.activation_checkpointing) and hardware.accelerator != "gpu":
        raise ConfigError("model.activation_checkpointing=auto chooses how many decoder layers to checkpoint from the "
                          f"GPU memory budget; this run has no GPU (hardware={hardware.name}). Use true or false "
                          "(or a number of layers) on the CPU")


def resolve_planned_micro_batch(settings: RunSettings, hardware: Any, overrides: list[str] | None = None
                                ) -> tuple[int, int] | None:
    """For `data.micro_batch_size=auto` under sharding (ZeRO, FSDP: no device holds the whole model to step
    with), (micro-batch, accumulation) of the memory plan: the largest micro-batch it fits, the global batch
    kept. None when the micro-batch is a number or real steps on the GPU search it (trainer=single|ddp)."""
    if not is_auto(settings.data.micro_batch_size) or searched_with_real_steps(settings, hardware.accelerator):
        return None
    plan = plan_run(settings, list(overrides or []))
    note = next(n for n in plan.notes if n.startswith("data.micro_batch_size=auto"))
    print(f"vlm_finetune: {note} (planned peak {plan.peak_bytes / 2**30:.1f} GiB of "
          f"{plan.budget_bytes / 2**30:.1f} GiB)", flush=True)
    return int(plan.micro_batch_size), int(plan.accumulate_grad_batches)


def resolve_activation_checkpointing(settings: RunSettings, overrides: list[str] | None = None
                                     ) -> tuple[int, str] | None:
    """For `model.activation_checkpointing=auto`, (layers, scope) of the plan with the least recompute whose
    planned peak fits the hardware budget: whole layers or only their MLPs (selective), unless the command
    line fixes `speed.checkpoint_scope`; every whole layer when nothing fits. None when it is not auto."""
    if not is_auto(settings.model.activation_checkpointing):
        return None
    plan = plan_run(settings, list(overrides or []))
    what = "decoder layers" if plan.checkpoint_scope == "layer" else "decoder layers' MLPs (selective)"
    print(f"vlm_finetune: activation checkpointing auto: {plan.checkpointed_layers} of {plan.num_layers} {what} "
          f"(planned peak {plan.peak_bytes / 2**30:.1f} GiB of {plan.budget_bytes / 2**30:.1f} GiB)", flush=True)
    return int(plan.checkpointed_layers), plan.checkpoint_scope


def resolve_val_batch(settings: RunSettings, plan: Any) -> int | None:
    """For `data.val_batch_size=auto`, the validation batch of `plan` (these settings' plan): the largest (up to 8
    training micro-batches and the rank's share of the validation set) whose peak stays within the training
    step's (memory/validation.py). None when it is not auto."""
    if not is_auto(settings.data.val_batch_size):
        return None
    chosen = plan.validation
    print(f"vlm_finetune: data.val_batch_size auto: {chosen.batch_size} (validation's planned peak "
          f"{chosen.allocated_bytes / 2**30:.2f} GiB within the step's {plan.allocated_bytes / 2**30:.2f} GiB)",
          flush=True)
    return int(chosen.batch_size)


def gathers_auto(settings: RunSettings) -> bool:
    return settings.strategy.is_zero3 and is_auto(settings.strategy.deepspeed.get("stage3_allgather_sequential"))


def resolve_gather_in_place(settings: RunSettings, plan: Any) -> bool | None:
    """For ZeRO-3's `trainer.stage3_allgather_sequential=auto`: what `plan` (these settings' plan) chose, true only
    where the plan fits with it and not without (memory.planner). None when it is not auto or not ZeRO-3."""
    if not gathers_auto(settings):
        return None
    chosen = bool(plan.choices.get("trainer.stage3_allgather_sequential", False))
    if chosen:
        print("vlm_finetune: trainer.stage3_allgather_sequential auto: true (each parameter gathered into its own "
              "buffer, a parameter prefetched per module fetch: the plan fits only so, "
              f"{plan.peak_bytes / 2**30:.1f} GiB)",
              flush=True)
    return chosen


def largest_fitting(step: Callable[[int], None], limit: int) -> int:
    """The largest size in 1..limit for which `step(size)` raises no torch.OutOfMemoryError (the planner's
    search: sizes doubled, then bisected). Raises ConfigError when even 1 does not fit."""
    def fits(size: int) -> bool:
        try:
            step(size)
        except torch.OutOfMemoryError:
            return False
        return True

    found = largest_size(fits, limit)
    if found == 0:
        raise ConfigError("data.micro_batch_size=auto: even a micro-batch of 1 runs out of GPU memory; see python -m "
                          "vlm_finetune.plan for changes that fit (checkpointing, sharding, offload, 4-bit)")
    return found


def synthetic_batch(processor: Any, size: int, seq: int, image_px: int, vocab_limit: int) -> dict:
    """`size` samples of exactly `seq` tokens, each one image of `image_px` pixels and a supervised reply
    filling the rest: the worst case the data module can hand a step at data.max_length."""
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(image_px, image_px, 3, generator=generator) * 255).to(torch.uint8).numpy()
    sample = Sample([Message("user", "<image>\nDescribe the image."), Message("assistant", "x")],
                    [Image.fromarray(pixels)])
    encoded = processor.encode(sample)
    prompt = int((encoded.labels == IGNORE_INDEX).sum())
    if seq <= prompt + 1:
        raise ConfigError(f"data.max_length={seq} leaves no room for an answer after the {prompt} prompt and image "
                          "tokens")
    reply = torch.randint(100, vocab_limit, (seq - prompt,), generator=generator)
    encoded.input_ids = torch.cat([encoded.input_ids[:prompt], reply])
    encoded.labels = torch.cat([encoded.labels[:prompt], reply])
    encoded.num_supervised_tokens = int(reply.numel()) - 1
    return processor.collate([encoded] * size)


def search_micro_batch(settings: RunSettings, family: Any, model: torch.nn.Module, processor: Any, hardware: Any,
                       limit: int | None = None) -> tuple[int, int]:
    """The largest micro-batch that fits with real training steps (forward, backward, AdamW step) on this
    GPU, and the accumulation that keeps the global batch data.global_batch_size: (micro-batch, accumulation)."""
    device = torch.device("cuda", torch.cuda.current_device())
    global_batch, _ = kept_global_batch(settings, hardware.world_size)
    limit = limit or global_batch // hardware.world_size
    model.to(device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    policy = weights_policy(settings.precision)  # autocast and image dtype (single / ddp only)
    mixed, dtype = policy.mixed, policy.load_dtype
    loss = settings.loss
    vocab = int(family.output_embedding(unwrap(model)).weight.shape[0])
    image_px = settings.model.largest_image_side

    def step(size: int) -> None:
        optimizer = torch.optim.AdamW(params, lr=0.0)
        try:
            batch = synthetic_batch(processor, size, int(settings.data.max_length), image_px, min(vocab, 150000))
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            if "pixel_values" in batch:
                batch["pixel_values"] = batch["pixel_values"].to(dtype)
            for _ in range(2):  # the second step holds the optimizer states the first one made
                with torch.autocast("cuda", dtype=dtype, enabled=mixed):
                    loss_sum, count = batch_loss_sum(family, model, batch, loss)
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
    print(f"vlm_finetune: micro-batch auto: {found} fits with real steps; micro-batch {micro} x accumulation "
          f"{accumulate} x {hardware.world_size} GPU(s) = global batch {global_batch}", flush=True)
    return micro, accumulate


def resolve_before_build(settings: RunSettings, hardware: Any, overrides: list[str] | None
                         ) -> tuple[RunSettings, dict[str, Any]]:
    """What the memory plan decides before the model is built, for every option left at `auto`: the micro-batch
    under sharding, the checkpointed layers, ZeRO-3's gather and the validation batch. Returns the settings with
    them and the config keys to write (so the run's config.yaml holds the numbers)."""
    chosen: dict[str, Any] = {}
    overrides = list(overrides or [])  # none outside Hydra's command line (tests, train(cfg))
    planned = resolve_planned_micro_batch(settings, hardware, overrides)  # sharded: the plan's
    if planned is not None:
        chosen["data.micro_batch_size"], chosen["trainer.accumulate_grad_batches"] = planned
        settings = settings.replace(data=settings.data.replace(micro_batch_size=planned[0]),
                                    accumulate_grad_batches=planned[1])
    layers = resolve_activation_checkpointing(settings, overrides)
    if layers is not None:
        chosen["model.activation_checkpointing"], chosen["speed.checkpoint_scope"] = layers
        settings = settings.replace(model=settings.model.replace(activation_checkpointing=layers[0]),
                                    speed=dataclasses.replace(settings.speed, checkpoint_scope=layers[1]))
    # one plan for both: under gather auto it is already the plan of the gather it chose
    plan = plan_run(settings, overrides) if gathers_auto(settings) or is_auto(settings.data.val_batch_size) else None
    in_place = resolve_gather_in_place(settings, plan)
    if in_place is not None:
        chosen["trainer.stage3_allgather_sequential"] = in_place
        settings = settings.replace(strategy=settings.strategy.with_deepspeed(stage3_allgather_sequential=in_place))
    val_batch = resolve_val_batch(settings, plan)
    if val_batch is not None:
        chosen["data.val_batch_size"] = val_batch
        settings = settings.replace(data=settings.data.replace(val_batch_size=val_batch))
    return settings, chosen
