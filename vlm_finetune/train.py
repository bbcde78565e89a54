"""`train(cfg) -> (metrics, objects)`: the whole run, testable without Hydra's command line."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from vlm_finetune.errors import ConfigError

if TYPE_CHECKING:
    from vlm_finetune.hardware import Hardware

log = logging.getLogger(__name__)

PRECISIONS = {
    # name -> (Lightning precision, dtype the weights are loaded in). In the mixed profiles the frozen
    # base is loaded in half precision and trainable parameters are kept in float32 (master weights);
    # compute runs under autocast.
    "32-true": ("32-true", torch.float32),
    "bf16-mixed": ("bf16-mixed", torch.bfloat16),
    "bf16-true": ("bf16-true", torch.bfloat16),
    "fp16-mixed": ("16-mixed", torch.float16),
    "nf4": ("bf16-mixed", torch.bfloat16),  # 4-bit frozen base (bitsandbytes), bf16 compute
}
MIXED = ("bf16-mixed", "fp16-mixed", "nf4")


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a crash leaves either the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def replace_folder(tmp: Path, folder: Path) -> None:
    """Move a finished temporary folder to `folder` (same file system); an existing one is swapped out,
    then removed, so that `folder` is always either the old complete folder or the new one."""
    import shutil

    if folder.exists():
        old = folder.with_name(folder.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(folder, old)
        os.replace(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def _quiet_known_noise() -> None:
    """Silence warnings that are expected here, so that what is printed is worth reading."""
    import warnings

    # frozen parts are in eval mode on purpose
    warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
    # validation metrics are torchmetrics objects, already reduced across ranks
    warnings.filterwarnings("ignore", message=r".*when logging on epoch level in distributed setting.*")
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    warnings.filterwarnings("ignore", message=r".*smaller than the logging interval.*")
    # Lightning sees SLURM's tools installed; runs outside a job are not meant for SLURM
    warnings.filterwarnings("ignore", message=r".*The `srun` command is available on your system.*")
    # a resumed run puts the earlier rows back into metrics.csv (checkpointing.restore_csv_rows)
    warnings.filterwarnings("ignore", message=r".*Previous log files in this directory will be deleted.*")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric.utilities.rank_zero").setLevel(logging.WARNING)


def check_config(cfg: DictConfig) -> tuple[dict, Hardware]:
    """Every check that needs no weights: fails in seconds with the option and the fix.
    Returns the trainability modes and the resolved hardware profile."""
    from vlm_finetune.hardware import preflight, resolve
    from vlm_finetune.models.base import parse_trainability
    from vlm_finetune.strategies import check_combination

    modes = parse_trainability(cfg.train)
    if cfg.precision.name not in PRECISIONS:
        raise ConfigError(f"precision={cfg.precision.name!r} is unknown; use one of {sorted(PRECISIONS)}")
    hardware = resolve(cfg.hardware)
    check_combination(cfg.trainer, hardware, cfg.precision.name)
    preflight(hardware, cfg.precision.name)
    if cfg.precision.name == "nf4":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError("precision=nf4 (QLoRA) loads the base in 4-bit with bitsandbytes, which is not installed: "
                              "pip install 'vlm_finetune[qlora]' (CUDA GPUs, and CPUs for rehearsal with tiny models)")
    mbs = cfg.data.micro_batch_size
    from vlm_finetune.autotune import check_auto_options, is_auto

    if not is_auto(mbs) and (not isinstance(mbs, int) or mbs < 1):
        raise ConfigError(f"data.micro_batch_size={mbs!r} must be a positive integer or auto (GPU)")
    check_auto_options(cfg, hardware)
    acc = cfg.trainer.accumulate_grad_batches
    if not isinstance(acc, int) or acc < 1:
        raise ConfigError(f"trainer.accumulate_grad_batches={acc!r} must be a positive integer")
    impl = cfg.loss.get("impl", "chunked")
    if impl not in ("chunked", "plain", "liger"):
        raise ConfigError(f"loss.impl={impl!r} is unknown; use chunked, plain or liger")
    if impl == "liger":
        if hardware.accelerator != "gpu":
            raise ConfigError("loss.impl=liger needs a CUDA GPU (Triton kernels); use loss.impl=chunked")
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            raise ConfigError("loss.impl=liger needs liger-kernel: pip install 'vlm_finetune[gpu]'") from None
    return modes, hardware


def _build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, strategy, hardware, plugins: list | None = None):
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    t = cfg.trainer
    steps_per_val = t.get("val_every_n_steps")
    acc = int(t.accumulate_grad_batches)
    max_steps = int(t.max_steps)
    # the final validation runs inside fit, at the last step, while a sharded engine is still set up
    val_interval = int(steps_per_val) * acc if steps_per_val else max_steps * acc
    return L.Trainer(
        accelerator=hardware.accelerator,
        devices=hardware.devices,
        num_nodes=hardware.num_nodes,
        strategy=strategy,
        precision=PRECISIONS[cfg.precision.name][0],
        max_steps=max_steps,
        max_epochs=int(t.get("max_epochs", -1)),
        accumulate_grad_batches=acc,
        gradient_clip_val=t.get("gradient_clip_val"),
        val_check_interval=val_interval,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        limit_val_batches=t.get("limit_val_batches", 1.0),
        log_every_n_steps=int(t.get("log_every_n_steps", 10)),
        enable_progress_bar=bool(t.get("enable_progress_bar", True)),
        enable_checkpointing=False,
        use_distributed_sampler=False,  # the data module shards with its own samplers (step windows)
        default_root_dir=str(run_dir),
        logger=[CSVLogger(str(run_dir), name="csv", version=""),
                TensorBoardLogger(str(run_dir), name="tensorboard", version="")],
        callbacks=callbacks,
        deterministic=bool(t.get("deterministic", False)),
        plugins=plugins or None,
    )


@contextlib.contextmanager
def full_trainable_parameters(trainer, module):
    """Inside this context the trainable weights are whole on every rank, whatever the sharding:
    ZeRO-3 gathers them, FSDP summons full parameters; other strategies hold them whole already.
    Every rank must enter it (the gathers are collective)."""
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DeepSpeedStrategy) and strategy.zero_stage_3:
        import deepspeed

        params = [p for p in module.parameters() if p.requires_grad]
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    elif isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import FullyShardedDataParallel

        # gathered copies go to CPU memory when sharded (FSDP refuses that for NO_SHARD, i.e. one device)
        offload = trainer.world_size > 1
        with FullyShardedDataParallel.summon_full_params(strategy.model, writeback=False, offload_to_cpu=offload):
            yield
    else:
        yield


class AdapterSaver(L.Callback):
    """Writes the adapter folder when training ends, while a sharded engine still holds the weights
    (after `fit` returns, ZeRO-3 and FSDP have been torn down)."""

    def __init__(self, folder: Path, plan, processor):
        self.folder, self.plan, self.processor = folder, plan, processor
        self.saved = False

    def on_train_end(self, trainer, pl_module) -> None:
        self.save(trainer, pl_module)

    def save(self, trainer, pl_module) -> None:
        with full_trainable_parameters(trainer, pl_module):
            if trainer.is_global_zero:
                save_adapter(pl_module.model, self.plan, self.processor, self.folder)
        self.saved = True


WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def _plain_name(name: str) -> str:
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


def _write_peft_adapter(model, state: dict, folder: Path, adapter_name: str = "default") -> None:
    import copy

    from safetensors.torch import save_file

    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(str(folder))
    save_file(peft_adapter_tensors(state, adapter_name), str(folder / "adapter_model.safetensors"),
              metadata={"format": "pt"})


def save_adapter(model, plan, processor, folder: Path) -> None:
    """PEFT adapter folder (with fully trained parts as modules_to_save) + `non_lora_trainables.safetensors`
    (the LLaVA/MGM convention) + the processor, written to a temporary folder and then renamed."""
    from safetensors.torch import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        # trainable weights by their plain names: strategies wrap modules (FSDP, checkpointing) and
        # add prefixes that PEFT's export would not recognise
        state = {_plain_name(n): p.detach().to("cpu").clone() for n, p in model.named_parameters() if p.requires_grad}
        if plan.uses_lora:
            _write_peft_adapter(model, state, tmp)
        trainables = {}
        for name, tensor in state.items():
            if "lora_" in name:
                continue
            clean = name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
            trainables[clean] = tensor.contiguous()
        if trainables:
            save_file(trainables, str(tmp / "non_lora_trainables.safetensors"))
        processor.save_pretrained(str(tmp))
        replace_folder(tmp, folder)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise


def env_global_rank() -> int:
    """This process's rank as the launcher states it (torchrun: RANK, srun: SLURM_PROCID), before Lightning starts."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key) not in (None, ""):
            return int(os.environ[key])
    return 0


RESUMABLE_STRATEGIES = ("single", "ddp", "deepspeed")


def _check_resume_early(cfg: DictConfig, run_dir: Path, hardware) -> tuple[Path | None, dict | None]:
    """The checkpoint a run would continue from, opened and checked before any weight loads: it exists, it
    is readable, it is of the strategy's kind and its settings are this run's. Returns (path, checkpoint),
    or (None, None) when the run starts afresh. (Its tensor shapes are checked once the model is built.)"""
    from vlm_finetune.checkpointing import (CheckpointError, check_compatible, find_resume_checkpoint,
                                            load_checkpoint_file, run_fingerprint)

    if cfg.trainer.strategy not in RESUMABLE_STRATEGIES:
        return None, None
    path = find_resume_checkpoint(cfg.get("resume", "auto"), run_dir)
    if path is None:
        return None, None
    if path.exists() and path.is_dir() != (cfg.trainer.strategy == "deepspeed"):
        kind = "DeepSpeed's checkpoint folder" if path.is_dir() else "a single-file checkpoint"
        raise CheckpointError(f"checkpoint {path} is {kind}, which trainer={cfg.trainer.name} cannot resume from; "
                              "resume with the trainer that wrote it, or start a new run folder (resume=never)")
    checkpoint = load_checkpoint_file(path)
    check_compatible(checkpoint, path, run_fingerprint(cfg, hardware.world_size))
    return path, checkpoint


def _resume_setup(cfg: DictConfig, run_dir: Path, module, hardware, path: Path | None,
                  checkpoint: dict | None) -> tuple[Any, Path | None, list, list]:
    """(checkpoint callback or None, checkpoint to resume from or None, trainer plugins, CSV rows to keep).
    `path` and `checkpoint` come from _check_resume_early."""
    import signal

    from lightning.pytorch.plugins.environments import SLURMEnvironment

    from vlm_finetune.checkpointing import (CHECKPOINT_DIR, AtomicCheckpointIO, CheckpointError, ResumeCallback,
                                            check_compatible, run_fingerprint, trainable_shapes)

    plugins: list = []
    if SLURMEnvironment.detect():
        # the preemption signal is handled by ResumeCallback (atomic save at a step boundary, then requeue),
        # not by Lightning's handler, which saves from inside the signal handler in the middle of a step
        plugins.append(SLURMEnvironment(auto_requeue=False))
    ckpt_cfg = cfg.get("checkpoint") or {}
    resume = cfg.get("resume", "auto")
    if cfg.trainer.strategy not in RESUMABLE_STRATEGIES:
        if resume not in (None, "never", "auto"):
            raise ConfigError(f"resume={resume} works with trainer=single|ddp|zero*; trainer={cfg.trainer.name} "
                              "writes no resumable checkpoints yet (use resume=never)")
        return None, None, plugins, []
    deepspeed = cfg.trainer.strategy == "deepspeed"
    if not deepspeed:  # DeepSpeed writes its own checkpoint folder (made atomic by ResumeCallback)
        plugins.append(AtomicCheckpointIO())
    fingerprint = run_fingerprint(cfg, hardware.world_size)
    signals = tuple(getattr(signal, "SIG" + str(name).upper().removeprefix("SIG"))
                    for name in (ckpt_cfg.get("signals") or []))
    callback = ResumeCallback(run_dir / CHECKPOINT_DIR, ckpt_cfg.get("every_n_steps"), fingerprint, signals,
                              requeue=bool(ckpt_cfg.get("requeue", True)))
    rows: list = []
    if path is not None:
        check_compatible(checkpoint, path, fingerprint, trainable_shapes(module))
        step = int(checkpoint.get("global_step", 0))
        if step > int(cfg.trainer.max_steps):
            raise CheckpointError(f"checkpoint {path} is at step {step}, past trainer.max_steps={cfg.trainer.max_steps}; "
                                  "raise trainer.max_steps or start a new run folder")
        if env_global_rank() == 0:
            from vlm_finetune.checkpointing import logged_rows_before

            rows = logged_rows_before(run_dir / "csv" / "metrics.csv", step)
            print(f"vlm_finetune: resuming from {path} at step {step}", flush=True)
    return callback, path, plugins, rows


def train(cfg: DictConfig, callbacks: list | None = None) -> tuple[dict, dict]:
    """Run one training as configured. Returns (final metrics, objects: module, trainer, datamodule, run_dir)."""
    import hydra
    import lightning as L

    from vlm_finetune.data.datamodule import VLMDataModule, build_datasets
    from vlm_finetune.models import get_family
    from vlm_finetune.module import VLMModule
    from vlm_finetune.trainability import apply_trainability, count_parameters, keep_trainables_fp32, plan_trainability

    started = time.time()
    _quiet_known_noise()
    modes, hardware = check_config(cfg)
    run_dir = Path(cfg.output_dir)
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    torch.set_num_threads(max(1, int(cfg.hardware.get("cpu_threads") or torch.get_num_threads())))

    family = get_family(cfg.model.family)
    # a checkpoint of another run fails here, before any weight loads
    resume_path, resume_checkpoint = _check_resume_early(cfg, run_dir, hardware)
    # data first: a bad file fails here, before any weight loads
    train_samples, val_samples, data_stats = build_datasets(cfg.data, int(cfg.seed))
    processor = family.load_processor(cfg.model, truncation=cfg.data.get("truncation", "truncate"))

    dtype = PRECISIONS[cfg.precision.name][1]
    fsdp_mixed = cfg.trainer.strategy == "fsdp" and cfg.precision.name in MIXED
    if fsdp_mixed:
        # FSDP flattens each unit into one tensor of one dtype: keep every weight float32 and let
        # FSDP's mixed precision compute in bf16/fp16 (the sharding pays for the wider base)
        dtype = torch.float32
    from vlm_finetune.autotune import is_auto, resolve_activation_checkpointing, search_micro_batch
    from vlm_finetune.memory import hydra_overrides

    resolve_activation_checkpointing(cfg, hydra_overrides())  # auto -> the fewest layers the budget allows
    model = family.build_model(cfg.model, dtype=dtype, quantization="nf4" if cfg.precision.name == "nf4" else None)
    plan = plan_trainability(family, model, modes, cfg.model, cfg.lora)
    model = apply_trainability(model, plan, cfg.lora)
    if cfg.precision.name in MIXED and not fsdp_mixed:
        keep_trainables_fp32(model)
    if is_auto(cfg.data.micro_batch_size):  # real steps on this GPU; the global batch stays the same
        search_micro_batch(cfg, family, model, processor, hardware)
    trainable, total = count_parameters(model)

    is_rank_zero = env_global_rank() == 0
    if is_rank_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        print(f"vlm_finetune: {cfg.model.name}: {trainable:,} trainable / {total:,} parameters "
              "(" + ", ".join(f"{p.value}={m.value}" for p, m in modes.items()) + f"); run folder {run_dir}", flush=True)

    datamodule = VLMDataModule(cfg.data, processor, cfg.data.micro_batch_size, cfg.trainer.accumulate_grad_batches,
                               int(cfg.seed), train=train_samples, val=val_samples, stats=data_stats)
    optimizer_factory = hydra.utils.instantiate(cfg.optimizer.optimizer)
    question_types = list(data_stats.get("question_types", []))
    module = VLMModule(model, family, processor, plan, optimizer_factory, cfg.optimizer, cfg.scheduler, cfg.loss,
                       cfg.eval, question_types=question_types)

    configured = [hydra.utils.instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    from vlm_finetune.strategies import build_strategy, zero3_leaf_classes

    strategy = build_strategy(cfg, family, hardware)
    if cfg.trainer.strategy == "deepspeed" and int(cfg.trainer.zero_stage) == 3:
        leaves = [c for c in zero3_leaf_classes(family) if any(isinstance(m, c) for m in model.modules())]
        if leaves:  # MoE blocks are gathered whole: their experts fire data-dependently
            from deepspeed.utils import set_z3_leaf_modules

            set_z3_leaf_modules(model, leaves)
    saver = AdapterSaver(run_dir / "adapter", plan, processor)
    resumer, ckpt_path, plugins, earlier_rows = _resume_setup(cfg, run_dir, module, hardware, resume_path,
                                                              resume_checkpoint)
    own = [saver] + ([resumer] if resumer is not None else [])
    from vlm_finetune.memory import MemoryMonitor, handle_oom

    monitor_cfg = (cfg.get("memory") or {}).get("monitor", "auto")
    if (monitor_cfg is True or (monitor_cfg == "auto" and hardware.accelerator == "gpu")) and \
            not any(isinstance(c, MemoryMonitor) for c in list(callbacks or []) + configured):
        own.append(MemoryMonitor(run_dir))  # memory.csv / memory.png per phase; history for OOM snapshots
    trainer = _build_trainer(cfg, run_dir, configured + list(callbacks or []) + own, strategy, hardware, plugins)
    if earlier_rows:
        from vlm_finetune.checkpointing import restore_csv_rows

        restore_csv_rows(trainer, earlier_rows)
    # the run's own checkpoint (already opened and checked by _resume_setup) holds numpy's RNG state,
    # which torch's weights-only unpickler refuses
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                    weights_only=False if ckpt_path else None)
    except torch.OutOfMemoryError as err:  # report (phase, sizes, snapshot, planner's advice), no partial files
        raise handle_oom(err, run_dir, trainer, hydra_overrides()) from err
    objects = {"module": module, "trainer": trainer, "datamodule": datamodule, "run_dir": run_dir,
               "processor": processor, "plan": plan, "family": family}
    if resumer is not None and resumer.preempted:
        # stopped on the preemption signal: the checkpoint is saved, the job requeued; the rerun finishes
        if trainer.is_global_zero:
            print(f"vlm_finetune: stopped at step {trainer.global_step} for preemption; rerun with the same "
                  f"run folder (or resume=auto) to continue", flush=True)
        return {"preempted": 1, "global_step": int(trainer.global_step)}, objects
    if not saver.saved:  # fit ran no step (max_steps=0): nothing is sharded any more, save as is
        saver.save(trainer, module)
    train_loss = trainer.callback_metrics.get("train_loss")
    if module.last_validation_step == trainer.global_step:
        # the last validation ran inside fit, at the final step (the engine is still whole there)
        results = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("val_")}
    else:
        results = trainer.validate(module, datamodule=datamodule, verbose=False)[0]
    metrics = {k: float(v) for k, v in results.items()}
    metrics.update(
        train_loss=float(train_loss) if train_loss is not None else float("nan"),
        global_step=int(trainer.global_step),
        trainable_parameters=trainable,
        total_parameters=total,
        skipped_bad_records=int(data_stats.get("skipped_bad_records", 0)),
        truncated_samples=int(module.data_counts["num_truncated"]),
        dropped_too_long=int(module.data_counts["num_dropped_too_long"]),
        wall_seconds=round(time.time() - started, 1),
    )
    data_counts = {k: metrics[k] for k in ("skipped_bad_records", "truncated_samples", "dropped_too_long")}
    for logger in trainer.loggers:
        logger.log_metrics({f"data/{k}": v for k, v in data_counts.items()}, step=trainer.global_step)
        logger.save()
    if trainer.is_global_zero and any(data_counts.values()):
        print("vlm_finetune: data: " + ", ".join(f"{k}={v}" for k, v in data_counts.items()), flush=True)
    if trainer.is_global_zero:
        write_atomic(run_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        from vlm_finetune.plots import plot_training_curves

        plot_training_curves(run_dir)
        summary = "  ".join(f"{k}={metrics[k]:.4f}" for k in ("val_accuracy", "val_loss", "train_loss") if k in metrics)
        print(f"\nvlm_finetune: final {summary}  steps={metrics['global_step']}  "
              f"time={metrics['wall_seconds']:.0f}s\nvlm_finetune: run folder {run_dir}", flush=True)
    return metrics, objects
