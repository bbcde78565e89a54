"""`train(cfg) -> (metrics, objects)`: the whole run, testable without Hydra's command line. This is the recipe:
it reads the config, turns it into settings and objects, and nothing but the entry point (and the tests)
imports it."""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf, open_dict

from vlm_finetune.adapters import AdapterSaver
from vlm_finetune.autotune import resolve_before_build, search_micro_batch
from vlm_finetune.callbacks import StepProgressBar
from vlm_finetune.checkpointing import CHECKPOINT_DIR
from vlm_finetune.config import hydra_overrides, read_settings, settings_for
from vlm_finetune.config_checks import check_settings
from vlm_finetune.data.checks import (
    check_generation_takes_the_mix,
    check_image_counts,
    check_micro_batches,
    check_packing_takes_the_videos,
    check_samples_fit,
)
from vlm_finetune.data.datamodule import VLMDataModule, build_datasets
from vlm_finetune.errors import ConfigError
from vlm_finetune.hardware import Hardware, env_global_rank
from vlm_finetune.io import write_atomic
from vlm_finetune.load_turns import loads_in_turns
from vlm_finetune.memory.auto_batch import searched_with_real_steps
from vlm_finetune.memory.count import stored_unit_numels
from vlm_finetune.memory.host import HostMemoryRelease, release_freed, reuse_heap, steady_heap
from vlm_finetune.memory.load_measured import LoadMemory
from vlm_finetune.memory.monitor import MemoryMonitor
from vlm_finetune.memory.oom import handle_oom
from vlm_finetune.memory.planner import check_host_memory
from vlm_finetune.models._sharded import check_model_folder
from vlm_finetune.models.moe_ep import expert_bytes, shard_experts
from vlm_finetune.models.nf4_load import quantised_on_host
from vlm_finetune.models.registry import get_family
from vlm_finetune.module import VLMModule
from vlm_finetune.plots import plot_training_curves
from vlm_finetune.precision import WeightsPolicy, weights_policy
from vlm_finetune.quiet import quiet_run
from vlm_finetune.resume import open_resume_checkpoint, restore_csv_rows, resume_parts
from vlm_finetune.rundir import RunFolderLock, finished_metrics, sweep_checkpoint_leftovers
from vlm_finetune.settings import RunSettings, is_auto
from vlm_finetune.strategies import (
    ZeroSizes,
    build_strategy,
    set_zero3_leaves,
)
from vlm_finetune.trainability import (
    build_trainable_model,
    builds_partitioned,
    compile_regions,
    count_parameters,
    partition_counts,
)
from vlm_finetune.watchdog import RunHung, RunWatchdog, hung_message, is_collective_failure
from vlm_finetune.zero3_nf4 import four_bit_storage, shard_4bit_under_zero3

log = logging.getLogger(__name__)


def _build_trainer(cfg: DictConfig, run_dir: Path, callbacks: list, strategy, hardware: Hardware,
                   policy: WeightsPolicy, plugins: list | None = None) -> L.Trainer:
    t = cfg.trainer
    acc = int(t.accumulate_grad_batches)
    max_steps = int(t.max_steps)
    # the final validation runs inside fit, at the last step, while a sharded engine is still set up
    val_interval = int(t.val_every_n_steps) * acc if t.val_every_n_steps else max_steps * acc
    return L.Trainer(
        accelerator=hardware.accelerator,
        devices=hardware.devices,
        num_nodes=hardware.num_nodes,
        strategy=strategy,
        precision=policy.lightning,
        max_steps=max_steps,
        max_epochs=int(t.max_epochs),
        accumulate_grad_batches=acc,
        gradient_clip_val=t.gradient_clip_val,
        val_check_interval=val_interval,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        limit_val_batches=t.limit_val_batches,
        log_every_n_steps=int(t.log_every_n_steps),
        enable_progress_bar=bool(t.enable_progress_bar),
        enable_checkpointing=False,
        use_distributed_sampler=False,  # the data module shards with its own samplers (step windows)
        default_root_dir=str(run_dir),
        logger=[CSVLogger(str(run_dir), name="csv", version=""),
                TensorBoardLogger(str(run_dir), name="tensorboard", version="")],
        callbacks=callbacks,
        deterministic=bool(t.deterministic),
        plugins=plugins or None,
    )


def _resolve_auto(cfg: DictConfig, settings: RunSettings, family, model, processor, hardware: Hardware
                  ) -> RunSettings:
    """`auto` options become numbers in the settings and in the run's config (so in its config.yaml): before the
    model is built, what the memory plan decides (autotune.resolve_before_build); after it, the micro-batch of
    trainer=single|ddp from real steps."""
    if model is None:
        settings, chosen = resolve_before_build(settings, hardware, hydra_overrides())
        with open_dict(cfg):
            for key, value in chosen.items():
                OmegaConf.update(cfg, key, value)
    elif is_auto(settings.data.micro_batch_size):  # real steps on this GPU; the global batch stays the same
        settings = _set_micro_batch(cfg, settings, *search_micro_batch(settings, family, model, processor, hardware))
    return settings


def _set_micro_batch(cfg: DictConfig, settings: RunSettings, micro: int, accumulate: int) -> RunSettings:
    with open_dict(cfg):
        cfg.data.micro_batch_size = micro
        cfg.trainer.accumulate_grad_batches = accumulate
    return settings.replace(data=settings.data.replace(micro_batch_size=micro), accumulate_grad_batches=accumulate)


def _note_auto_choices(cfg: DictConfig, settings: RunSettings) -> None:
    """What `precision=auto` chose goes into the run's config (so its config.yaml) and onto the start line."""
    with open_dict(cfg):
        cfg.precision.name = settings.precision
    if env_global_rank() == 0:
        for note in settings.auto_choices:
            print(f"vlm_finetune: {note}", flush=True)


def _wants_monitor(cfg: DictConfig, hardware: Hardware, callbacks: list) -> bool:
    setting = cfg.memory.monitor
    wanted = setting is True or (is_auto(setting) and hardware.accelerator == "gpu")
    return wanted and not any(isinstance(c, MemoryMonitor) for c in callbacks)


def _host_release(cfg: DictConfig) -> str:
    """memory.release_host resolved: off | load (after the build and the engine's setup: auto) | step (true: also
    after every optimizer step)."""
    setting = cfg.memory.release_host
    if setting is not True and setting is not False and not is_auto(setting):
        raise ConfigError(f"memory.release_host={setting!r} is not one of auto|true|false")
    if setting is False:
        return "off"
    return "step" if setting is True else "load"


def check_config(cfg: DictConfig) -> tuple[RunSettings, dict, Hardware]:
    """Every check that needs no weights (config_checks.check_settings) on the settings read from the config (values
    checked as they are read, settings.py): the settings, the trainability modes and the resolved hardware."""
    settings = read_settings(cfg)
    return (settings, *check_settings(settings))


def train(cfg: DictConfig, callbacks: list | None = None) -> tuple[dict, dict]:
    """Run one training as configured. Returns (final metrics, objects: module, trainer, datamodule, run_dir).
    The run folder is locked for the run's life (one run per folder); a run that already finished there is
    not run again."""
    started = time.time()
    quiet_run()
    settings, modes, hardware = check_config(cfg)
    _note_auto_choices(cfg, settings)
    release = _host_release(cfg)
    run_dir = Path(cfg.output_dir)
    if cfg.resume == "auto" and (done := finished_metrics(run_dir, int(cfg.trainer.max_steps))) is not None:
        print(f"vlm_finetune: the run in {run_dir} already finished at step {done['global_step']} (metrics.json); "
              "nothing to do. Raise trainer.max_steps to train on, or give a new run its own folder", flush=True)
        return done, {"run_dir": run_dir}
    lock = RunFolderLock(run_dir).acquire() if env_global_rank() == 0 else None
    try:
        if lock is not None:
            sweep_checkpoint_leftovers(run_dir / CHECKPOINT_DIR)  # what a kill during a save left behind
        if release != "off":
            steady_heap()  # before anything loads: freed blocks of 1 MiB or more go back to the system
        return _train(cfg, settings, callbacks, modes, hardware, run_dir, started)
    finally:
        if release != "off":
            reuse_heap()  # the steps of whatever runs next in this process reuse heap blocks
        if lock is not None:
            lock.release()


def _model_builder(settings: RunSettings, release: str, family, modes: dict, policy: WeightsPolicy):
    """`build(device=None, expected_plan=None) -> (model, plan)`: the model with its trainability plan, compiled
    regions and ZeRO-3 leaf modules, as configured; `device="meta"`: the structure only."""
    def build(device: str | None = None, expected_plan=None):
        # FSDP, ZeRO-3: nf4 layers quantised in host memory; each GPU then receives only its shard of the 4-bit bytes
        sharded = settings.strategy.strategy == "fsdp" or settings.strategy.is_zero3
        where = quantised_on_host() if sharded else contextlib.nullcontext()
        with where:
            model, plan = build_trainable_model(family, settings.model, modes, settings.lora, policy,
                                                checkpointed_layers=settings.model.activation_checkpointing,
                                                checkpoint_scope=settings.speed.checkpoint_scope, device=device)
        if expected_plan is not None:  # built inside zero.Init (VLMModule.configure_model) or in FSDP2's turns
            if plan != expected_plan:
                raise RuntimeError(f"the model built at the strategy's set-up has another trainability plan than "
                                   f"its structure: {plan} != {expected_plan}")
            held, whole = partition_counts(model)
            if env_global_rank() == 0 and whole:
                print(f"vlm_finetune: ZeRO-3: built partitioned; this rank holds {held:,} of the base's {whole:,} "
                      "parameters", flush=True)
        if device != "meta":
            if settings.strategy.expert_parallel > 1:  # this rank's experts only, before the engine sees them
                whole = expert_bytes(model)
                layers = shard_experts(model, settings.strategy.expert_parallel, env_global_rank())
                print(f"vlm_finetune: expert parallel: rank {env_global_rank()} holds {expert_bytes(model):,} of "
                      f"the experts' {whole:,} bytes ({layers} MoE layers)", flush=True)
            if settings.speed.compile:
                compile_regions(model, family)
            set_zero3_leaves(model, family, settings.strategy)
            shard_4bit_under_zero3(model, settings.strategy, settings.precision)  # nf4: codes in the engine's dtype
            if release != "off":
                release_freed()  # what building and loading freed
        return model, plan
    return build


def _train(cfg: DictConfig, settings: RunSettings, callbacks: list | None, modes: dict, hardware: Hardware,
           run_dir: Path, started: float) -> tuple[dict, dict]:
    L.seed_everything(settings.seed, workers=True, verbose=False)
    torch.set_num_threads(max(1, int(settings.hardware.cpu_threads or torch.get_num_threads())))
    load_meter = LoadMemory()  # before anything of the model exists: the load's host growth and GPU peak

    family = get_family(settings.model.family)
    # a checkpoint of another run fails here, before any weight loads
    resume_path, resume_checkpoint = open_resume_checkpoint(settings, run_dir, hardware.world_size)
    # a load that cannot fit the host memory stops first, in seconds (the other ranks of a CPU/DDP launch start
    # once rank 0 holds its model, when less memory is free)
    if env_global_rank() == 0:
        check_host_memory(settings, list(hydra_overrides() or []))
    if resume_checkpoint is not None and is_auto(settings.data.micro_batch_size):  # as the run chose at its start
        saved = resume_checkpoint["vlm_finetune"]["fingerprint"]
        settings = _set_micro_batch(cfg, settings, int(saved["data.micro_batch_size"]),
                                    int(saved["trainer.accumulate_grad_batches"]))
        print(f"vlm_finetune: data.micro_batch_size=auto: micro-batch {saved['data.micro_batch_size']} x accumulation "
              f"{saved['trainer.accumulate_grad_batches']}, as the run it resumes chose", flush=True)
    # data next: a bad file fails here, before any weight loads
    data = settings.data
    train_samples, val_samples, data_stats = build_datasets(data, settings.seed)
    processor = family.load_processor(settings.model, truncation=data.truncation)
    for samples in (train_samples, val_samples):  # MGM, GLM-4V-9B: one image per conversation
        check_image_counts(samples, processor, data.on_bad_record)
    check_packing_takes_the_videos(train_samples, data.packing)
    check_samples_fit(train_samples, processor, data.max_length, data.truncation)
    check_micro_batches(len(train_samples), data.micro_batch_size, settings.accumulate_grad_batches,
                        hardware.world_size)
    if settings.model.path:  # a folder's weight files read before the load: headers, sizes, the index's shards
        check_model_folder(family.checkpoint_folder(settings.model))

    policy = weights_policy(settings.precision, settings.strategy.strategy)
    # checkpointing auto -> the fewest layers that fit; the validation batch from the plan
    settings = _resolve_auto(cfg, settings, family, None, processor, hardware)
    data = settings.data
    check_generation_takes_the_mix(val_samples, settings.eval.generate,
                                   int(data.val_batch_size or (1 if is_auto(data.micro_batch_size) else
                                                               data.micro_batch_size)))
    release = _host_release(cfg)
    build = _model_builder(settings, release, family, modes, policy)
    # ZeRO-3: the model is built in VLMModule.configure_model, inside DeepSpeed's partitioned initialisation,
    # so no rank holds it whole; until then its structure on the meta device gives the plan and the counts
    zero3 = settings.strategy.is_zero3
    partitioned = builds_partitioned(family, settings.model, zero3, modes, policy,
                                     searched_with_real_steps(settings, hardware.accelerator))
    if zero3 and not partitioned and env_global_rank() == 0:
        why = (" (model.trust_remote_code=true: the folder's own modelling code)" if settings.model.trust_remote_code
               else "")
        print(f"vlm_finetune: ZeRO-3: {settings.model.name} is built whole on every rank before DeepSpeed partitions "
              f"it{why}; the plan's load rows count that", flush=True)
    # FSDP2 or ZeRO-3 + nf4, several ranks per node: each rank builds, quantises and shards in its turn (the
    # strategy's set-up: FSDP2Strategy, zero3_nf4.PartitionFirst)
    in_turns = family.supports_nf4 and loads_in_turns(  # (a family without nf4 refuses it in its build, here)
        settings.strategy.strategy, settings.strategy.zero_stage, settings.precision, hardware.devices,
        searched_with_real_steps(settings, hardware.accelerator))
    model, plan = build(device="meta") if partitioned or in_turns else build()
    settings = _resolve_auto(cfg, settings, family, model, processor, hardware)  # micro-batch auto -> real steps
    trainable, total = count_parameters(model)

    if env_global_rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        print(f"vlm_finetune: {settings.model.name}: {trainable:,} trainable / {total:,} parameters "
              "(" + ", ".join(f"{p.value}={m.value}" for p, m in modes.items()) + f"); run folder {run_dir}",
              flush=True)

    datamodule = VLMDataModule(settings.data, processor, settings.data.micro_batch_size,
                               settings.accumulate_grad_batches, settings.seed, train=train_samples, val=val_samples,
                               stats=data_stats)
    scheduler = hydra.utils.instantiate(cfg.scheduler.factory) if cfg.scheduler.factory else None
    module = VLMModule(model, family, processor, plan, hydra.utils.instantiate(cfg.optimizer.optimizer),
                       settings.optimizer, scheduler, settings.loss, settings.eval,
                       question_types=list(data_stats.get("question_types", [])),
                       offload_activations=settings.speed.offload_activations,
                       attention_backends=settings.speed.attention_backends,
                       build_model=(lambda: build(expected_plan=plan)[0]) if partitioned else None)

    configured = [hydra.utils.instantiate(c) for c in (cfg.callbacks or {}).values() if c]
    sizes = ZeroSizes.of(model, family)
    if in_turns and settings.strategy.is_zero3:  # ZeRO-3's auto knobs from the 4-bit layers' stored elements, as
        # a model built whole and quantised gives them (the structure on the meta device is not quantised yet)
        sizes = ZeroSizes(sizes.trainable_numel, max(stored_unit_numels(
            model, plan, family, four_bit_storage(settings.precision).itemsize) or [0]))
    strategy = build_strategy(settings.strategy, settings.precision, int(settings.data.micro_batch_size), family,
                              hardware, sizes)
    if in_turns:
        strategy.build_in_turns = lambda: build(expected_plan=plan)[0]
    resumer, ckpt_path, plugins, earlier_rows = resume_parts(settings, run_dir, module, hardware.world_size,
                                                             resume_path, resume_checkpoint)
    # a run stopped by a signal writes no adapter: what it trained so far is in the checkpoint
    saver = AdapterSaver(run_dir / "adapter", plan, processor,
                         interrupted=lambda: resumer is not None and resumer.preempted)
    own = [load_meter, saver] + ([resumer] if resumer is not None else [])
    # a rank stuck in a collective, or a stop signal the main thread cannot take (it is inside C++), ends
    # the run within trainer.collective_timeout_s / trainer.stop_grace_s
    watchdog = RunWatchdog(settings.strategy.collective_timeout.total_seconds(), float(settings.strategy.stop_grace_s),
                           resumer.stop_signals if resumer is not None else ())
    own.append(watchdog)
    if release != "off":
        own.append(HostMemoryRelease(every_step=release == "step"))
    if _wants_monitor(cfg, hardware, list(callbacks or []) + configured):
        own.append(MemoryMonitor(run_dir))  # memory.csv / memory.png per phase; history for OOM snapshots
    if cfg.trainer.enable_progress_bar and not any(isinstance(c, ProgressBar) for c in configured + (callbacks or [])):
        own.append(StepProgressBar())  # optimizer steps out of max_steps, supervised tokens/s, padding fraction
    trainer = _build_trainer(cfg, run_dir, configured + list(callbacks or []) + own, strategy, hardware, policy,
                             plugins)
    if earlier_rows:
        restore_csv_rows(trainer, earlier_rows)
    # a checkpoint file holds tensors and plain data only (weights-only unpickling); DeepSpeed's folder was
    # checked for foreign code before anything in it was unpickled (checkpointing.check_safe_to_load)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None,
                    weights_only=not settings.strategy.checkpoint_is_folder if ckpt_path else None)
    except torch.OutOfMemoryError as err:  # report (phase, sizes, snapshot, planner's advice), no partial files
        raise handle_oom(err, run_dir, trainer, hydra_overrides(), settings_for) from err
    except RuntimeError as err:  # the process group's timeout (or a lost peer) came before the watchdog
        if hardware.world_size < 2 or not is_collective_failure(err):
            raise
        raise RunHung(hung_message(trainer.global_rank, watchdog.where, "saw a collective fail: "
                                   + str(err).strip().splitlines()[0][:200])) from err
    objects = {"module": module, "trainer": trainer, "datamodule": datamodule, "run_dir": run_dir,
               "processor": processor, "plan": plan, "family": family}
    if resumer is not None and resumer.preempted:
        # stopped on the preemption signal: the checkpoint is saved, the job requeued; the rerun finishes
        if trainer.is_global_zero:
            print(f"vlm_finetune: stopped at step {trainer.global_step} for preemption; rerun with the same "
                  f"run folder (or resume=auto) to continue", flush=True)
        stopped = {"preempted": 1, "global_step": int(trainer.global_step)}
        if resumer.stopped_by_signal is not None:
            stopped["stop_signal"] = int(resumer.stopped_by_signal)
        return stopped, objects
    if not saver.saved:  # fit ran no step (max_steps=0): nothing is sharded any more, save as is
        saver.save(trainer, module)
    metrics = {**_final_metrics(trainer, module, datamodule, data_stats, trainable, total, started),
               **load_meter.metrics()}
    if trainer.is_global_zero:
        # JSON has no NaN: a metric that could not be computed is null
        finite = {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in metrics.items()}
        write_atomic(run_dir / "metrics.json", json.dumps(finite, indent=2, sort_keys=True, allow_nan=False) + "\n")
        plot_training_curves(run_dir)
        summary = "  ".join(f"{k}={metrics[k]:.4f}" for k in ("val_accuracy", "val_loss", "train_loss") if k in metrics)
        print(f"\nvlm_finetune: final {summary}  steps={metrics['global_step']}  "
              f"time={metrics['wall_seconds']:.0f}s\nvlm_finetune: run folder {run_dir}", flush=True)
    return metrics, objects


def _final_metrics(trainer: L.Trainer, module: VLMModule, datamodule, data_stats: dict, trainable: int, total: int,
                   started: float) -> dict:
    """Validation metrics of the final step, the last train loss, parameter and data counts; the data counts
    also go to the loggers (and are printed when any is non-zero)."""
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
        # found up front, and found while training (under data.on_bad_record=skip)
        skipped_bad_records=int(data_stats.get("skipped_bad_records", 0)) + int(module.data_counts["num_bad_records"]),
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
    return metrics
