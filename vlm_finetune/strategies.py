"""`trainer=` names -> Lightning strategy objects, built from the config and what the model family declares
(its decoder-layer and vision-block classes for wrapping and checkpointing, its ZeRO-3 leaf modules)."""
from __future__ import annotations

from typing import Any

from vlm_finetune.errors import ConfigError
from vlm_finetune.hardware import Hardware

STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")
SHARDED = ("fsdp", "deepspeed")


def check_combination(trainer_cfg: Any, hardware: Hardware, precision: str) -> None:
    """Reject combinations that cannot work, naming the option and the fix."""
    strategy = str(trainer_cfg.strategy)
    if strategy not in STRATEGIES:
        raise ConfigError(f"trainer.strategy={strategy!r} is unknown; use trainer=single|ddp|fsdp|zero2|zero2_offload|"
                          "zero3|zero3_offload")
    if strategy == "single" and hardware.world_size > 1:
        raise ConfigError(f"trainer=single runs one process, but hardware={hardware.name} has {hardware.world_size} "
                          "devices; use trainer=ddp (model fits on one GPU) or trainer=zero3 / trainer=fsdp (it does not)")
    if strategy == "fsdp" and hardware.accelerator != "gpu":
        raise ConfigError(f"trainer=fsdp needs GPUs: PyTorch's FSDP does not run on CPU processes "
                          f"(hardware={hardware.name} has no GPU). On the CPU use trainer=single or trainer=ddp, or "
                          "trainer=zero2 / trainer=zero3 to rehearse a sharded run with DeepSpeed's CPU backend")
    if precision == "nf4":
        if strategy == "fsdp" or (strategy == "deepspeed" and int(trainer_cfg.zero_stage) == 3):
            raise ConfigError(f"precision=nf4 cannot be combined with trainer={trainer_cfg.get('name', strategy)}: "
                              "4-bit base weights cannot be sharded by FSDP or ZeRO-3. Use trainer=ddp or "
                              "trainer=zero2 with precision=nf4 (each GPU holds the 4-bit base), or keep ZeRO-3 with "
                              "precision=bf16-mixed")
    if precision == "fp16-mixed" and hardware.accelerator != "gpu":
        raise ConfigError("precision=fp16-mixed needs a GPU (loss scaling is CUDA-only); on the CPU use 32-true or bf16-mixed")
    offload = bool(trainer_cfg.get("offload_optimizer")) or bool(trainer_cfg.get("offload_parameters"))
    if offload and strategy != "deepspeed":
        raise ConfigError("optimizer/parameter offload is a DeepSpeed feature; use trainer=zero2_offload or "
                          "trainer=zero3_offload")
    if bool(trainer_cfg.get("offload_parameters")) and int(trainer_cfg.get("zero_stage", 0)) != 3:
        raise ConfigError("trainer.offload_parameters=true needs ZeRO stage 3 (trainer=zero3_offload)")


def deepspeed_config(trainer_cfg: Any, precision: str, accumulate: int, micro_batch_size: int,
                     on_gpu: bool = True) -> dict:
    """The ZeRO config generated from the trainer profile."""
    stage = int(trainer_cfg.zero_stage)
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": True,
        "contiguous_gradients": True,
        "reduce_bucket_size": int(float(trainer_cfg.reduce_bucket_size)),
        "allgather_bucket_size": int(float(trainer_cfg.allgather_bucket_size)),
    }
    if trainer_cfg.offload_optimizer:
        # pinned host buffers speed up GPU<->CPU copies; CPU processes have none
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if stage == 3:
        zero.update({
            "stage3_prefetch_bucket_size": int(float(trainer_cfg.stage3_prefetch_bucket_size)),
            "stage3_param_persistence_threshold": int(float(trainer_cfg.stage3_param_persistence_threshold)),
            "stage3_max_live_parameters": int(float(trainer_cfg.stage3_max_live_parameters)),
            # the adapter is gathered by us on save; never write a 16-bit copy of the whole model
            "stage3_gather_16bit_weights_on_model_save": False,
        })
        if trainer_cfg.offload_parameters:
            zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    # gradient_accumulation_steps and gradient_clipping are filled in by Lightning from the Trainer
    config = {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": int(micro_batch_size),
        "zero_allow_untested_optimizer": True,
    }
    if trainer_cfg.offload_optimizer:
        # the optimizer is built by the module (torch AdamW, param groups); DeepSpeedCPUAdam would be
        # faster on offloaded states but needs its C++ op compiled on the machine
        config["zero_force_ds_cpu_optimizer"] = False
    if precision in ("bf16-mixed", "bf16-true", "nf4"):  # nf4 computes in bf16
        config["bf16"] = {"enabled": True}
    elif precision == "fp16-mixed":
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    return config


def build_strategy(cfg: Any, family: Any, hardware: Hardware):
    """The Lightning strategy for `cfg.trainer`, or "auto" for one process."""
    t = cfg.trainer
    precision = str(cfg.precision.name)
    check_combination(t, hardware, precision)
    if t.strategy == "single":
        return "auto"
    if t.strategy == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        backend = "nccl" if hardware.accelerator == "gpu" else "gloo"
        # LoRA leaves most parameters frozen: no unused-parameter search, gradients as bucket views
        return DDPStrategy(process_group_backend=backend, find_unused_parameters=False, gradient_as_bucket_view=True)
    if t.strategy == "fsdp":
        from lightning.pytorch.strategies import FSDPStrategy

        blocks = set(family.decoder_layer_classes) | set(family.vision_block_classes)
        checkpointed = set(family.decoder_layer_classes) if cfg.model.get("activation_checkpointing") else None
        return FSDPStrategy(
            auto_wrap_policy=blocks,
            activation_checkpointing_policy=checkpointed,
            sharding_strategy=str(t.sharding_strategy),
            cpu_offload=False,
            # frozen base and trainable LoRA weights share FSDP units: keep original parameters
            use_orig_params=True,
            limit_all_gathers=True,
            state_dict_type="full",
        )
    on_gpu = hardware.accelerator == "gpu"
    config = deepspeed_config(t, precision, int(t.accumulate_grad_batches), int(cfg.data.micro_batch_size), on_gpu)
    if on_gpu:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        # checkpoints hold the trained weights and their optimizer partitions; the frozen base comes from the model
        return DeepSpeedStrategy(config=config, exclude_frozen_parameters=True)
    return cpu_deepspeed_strategy(config)


def cpu_deepspeed_strategy(config: dict):
    """DeepSpeed ZeRO on CPU processes (DeepSpeed's CPU accelerator, gloo): the same partitioning, gathers,
    leaf modules and adapter consolidation as on GPUs, so a sharded configuration can be rehearsed with a
    tiny model on a laptop or in CI. Lightning allows DeepSpeed on CUDA only; this subclass lifts that check."""
    import torch
    from lightning.fabric.utilities.seed import reset_seed
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy

    class CPUDeepSpeedStrategy(DeepSpeedStrategy):
        def setup_environment(self) -> None:
            from deepspeed.accelerator import get_accelerator

            found = get_accelerator().device_name()
            if found != "cpu":  # DeepSpeed picks its accelerator once per process, from what it detects
                raise ConfigError(f"hardware=cpu asks for CPU processes, but DeepSpeed chose its {found!r} "
                                  "accelerator on this machine; use a GPU hardware profile (hardware=auto), or "
                                  "set DS_ACCELERATOR=cpu to rehearse the run on CPU processes")
            DDPStrategy.setup_environment(self)  # skips DeepSpeedStrategy's CUDA-only check

        def setup_distributed(self) -> None:  # without the check that devices are GPU indices
            reset_seed()
            self.set_world_ranks()
            self._init_deepspeed_distributed()

        @property
        def root_device(self):
            # Lightning hands DeepSpeed the device index as its device rank; give CPU devices the local rank
            return torch.device("cpu", self.local_rank)

    return CPUDeepSpeedStrategy(config=config, process_group_backend="gloo", exclude_frozen_parameters=True)


def zero3_leaf_classes(family: Any) -> tuple[type, ...]:
    """Modules DeepSpeed ZeRO-3 must gather whole (MoE blocks: their experts fire data-dependently)."""
    return tuple(getattr(family, "zero3_leaf_classes", ()) or ())
