"""Hydra at the edges: the config folder, composition for the entry points that are not Hydra apps, the
running app's overrides, and the small typed settings that inner code takes instead of config nodes (their
defaults live in conf/, once)."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

from hydra.experimental.callback import Callback

from vlm_finetune.errors import ConfigError
from vlm_finetune.hardware import env_global_rank, resolve
from vlm_finetune.rundir import note_folder
from vlm_finetune.settings import (
    CheckpointSettings,
    DataSettings,
    EvalSettings,
    HardwareSettings,
    LoraSettings,
    LossSettings,
    ModelSettings,
    OptimizerSettings,
    RunSettings,
    SpeedSettings,
    StrategySettings,
    attention_backends,
    frozen_mapping,
)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


class RunDirSnapshot(Callback):
    """A Hydra callback (conf/train.yaml: hydra.callbacks) that notes, before Hydra creates the run folder,
    whether it exists and what is in it (rundir.remove_created takes back only what this start made)."""

    def on_run_start(self, config: Any, **kwargs: Any) -> None:
        note_folder(Path(str(config.hydra.run.dir)))


def register_resolvers() -> None:
    """`${vlm_rank_zero:x}`: x on the process of global rank 0 (launcher's RANK / SLURM_PROCID), else null;
    `${vlm_rank_zero_file:path}`: path on rank 0, else os.devnull. conf/train.yaml uses them so that only
    rank 0 of a multi-process job writes Hydra's config copy and log file. Done on import: whatever composes
    conf/ (the entry points, `compose` below, the tests) imports this module first."""
    import os

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("vlm_rank_zero"):
        OmegaConf.register_new_resolver("vlm_rank_zero", lambda value: value if env_global_rank() == 0 else None)
    if not OmegaConf.has_resolver("vlm_rank_zero_file"):
        OmegaConf.register_new_resolver("vlm_rank_zero_file",
                                        lambda path: path if env_global_rank() == 0 else os.devnull)


register_resolvers()


def group_options(group: str) -> list[str]:
    """The option names of a config group (`conf/<group>/*.yaml`)."""
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def compose(overrides: list[str], output_dir: str = "/tmp/vlm_finetune_plan"):
    """The training config for these overrides (the same composition `python -m vlm_finetune` uses). Works
    inside a running Hydra app too (the out-of-memory report plans from within training)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from hydra.initialize import get_gh_backup, restore_gh_from_backup
    from omegaconf.errors import OmegaConfBaseException

    backup = get_gh_backup()
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return hydra_compose(config_name="train", overrides=[*overrides, f"output_dir={output_dir}"])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"the overrides {overrides} do not compose: {err}") from err
    finally:
        restore_gh_from_backup(backup)


def settings_for(overrides: list[str]) -> RunSettings:
    """The settings of the training config these overrides compose (what the planner's suggestions and the
    out-of-memory report plan from)."""
    return read_settings(compose(list(overrides)))


def hydra_overrides() -> list[str] | None:
    """The command-line overrides of the running Hydra app, or None outside one."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return [o for o in HydraConfig.get().overrides.task if not o.startswith("hydra.")]
    except Exception:
        return None


def parse_overrides(argv: list[str], allowed: dict[str, object]) -> dict:
    """`key=value` arguments (the Hydra override look) into a dict; unknown keys are an error. The command
    line of the entry points that are not Hydra apps (export, generate)."""
    values = dict(allowed)
    for arg in argv:
        if "=" not in arg:
            raise ConfigError(f"argument {arg!r}: write key=value, with key one of {sorted(allowed)}")
        key, value = arg.split("=", 1)
        if key not in allowed:
            raise ConfigError(f"unknown option {key!r}; options: {sorted(allowed)}")
        default = allowed[key]
        if isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ConfigError(f"{key}={value!r}: use true or false")
            values[key] = value.lower() in ("true", "1", "yes")
        elif isinstance(default, int) and not isinstance(default, bool):
            try:
                values[key] = int(value)
            except ValueError:
                raise ConfigError(f"{key}={value!r}: must be an integer") from None
        else:
            values[key] = value
    return values


def remote_code_as_asked(model_cfg: Any, asked: bool, source: str) -> Any:
    """A model config read from a file (a run folder's config.yaml) with `trust_remote_code` as this command
    line asks, never as the file says: a folder's Python code runs only when asked for, every time."""
    from omegaconf import open_dict

    if model_cfg.get("trust_remote_code") and not asked:
        raise ConfigError(f"{source} loads its model with trust_remote_code (Python files from "
                          f"{model_cfg.get('path')} would run); add trust_remote_code=true to this command if you "
                          "trust that folder's code")
    with open_dict(model_cfg):
        model_cfg.trust_remote_code = bool(asked)
    return model_cfg




# -- the composed config, read once into settings ------------------------------------------------------------
MODEL_FIELDS = ("family", "name", "preset", "path", "cache_dir", "init_seed", "image_size", "attn_implementation",
                "liger_kernels", "activation_checkpointing", "trust_remote_code")


def plain(node: Any) -> Any:
    """A config node as plain resolved Python data (mappings and lists); anything else as it is."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _required(node: Any, key: str, group: str) -> Any:
    if key not in node:
        raise ConfigError(f"the {group} config does not declare {group}.{key}; every {group} option must "
                          f"(see conf/{group}/)")
    return plain(node[key])


def model_settings(node: Any) -> ModelSettings:
    values = plain(node)
    common = {key: _required(values, key, "model") for key in MODEL_FIELDS}
    options = {k: v for k, v in values.items() if k not in MODEL_FIELDS}
    path = common["path"]
    return ModelSettings(**{**common, "path": str(path) if path else None, "cache_dir": str(common["cache_dir"]),
                            "init_seed": int(common["init_seed"]), "image_size": int(common["image_size"]),
                            "liger_kernels": bool(common["liger_kernels"]),
                            "trust_remote_code": bool(common["trust_remote_code"])},
                         options=frozen_mapping(options))


def lora_settings(node: Any) -> LoraSettings:
    values = plain(node)
    try:
        alpha, dropout = float(values["alpha"]), float(values["dropout"])
    except (TypeError, ValueError):
        raise ConfigError(f"lora.alpha={values['alpha']!r} and lora.dropout={values['dropout']!r} must be "
                          "numbers") from None
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"lora.dropout={dropout} must lie in [0, 1): the probability of zeroing a LoRA input "
                          "(e.g. 0.05; 0 for none)")
    if alpha <= 0:
        raise ConfigError(f"lora.alpha={alpha} must be positive (the update is scaled by alpha / r; e.g. 2 * r)")
    return LoraSettings(r=values["r"], alpha=alpha, dropout=dropout, targets=frozen_mapping(values["targets"]),
                        llm_modules=str(values["llm_modules"]), expert_forward=str(values["expert_forward"]))


DEEPSPEED_KEYS = ("reduce_bucket_size", "allgather_bucket_size", "stage3_prefetch_bucket_size",
                  "stage3_param_persistence_threshold", "stage3_max_live_parameters", "stage3_max_reuse_distance",
                  "stage3_use_all_reduce_for_fetch_params", "stage3_allgather_sequential")


def strategy_settings(node: Any) -> StrategySettings:
    values = plain(node)
    strategy = str(values["strategy"])
    deepspeed = strategy == "deepspeed"
    return StrategySettings(
        name=str(values["name"]), strategy=strategy, zero_stage=int(values["zero_stage"]) if deepspeed else 0,
        offload_optimizer=bool(values.get("offload_optimizer")),  # DeepSpeed's profiles declare the two
        offload_parameters=bool(values.get("offload_parameters")),
        collective_timeout_s=values["collective_timeout_s"], stop_grace_s=values["stop_grace_s"],
        sharding_strategy=str(values["sharding_strategy"]) if strategy == "fsdp" else None,
        deepspeed=frozen_mapping({k: values[k] for k in DEEPSPEED_KEYS} if deepspeed else {}),
        expert_parallel=values["expert_parallel"])


def data_settings(node: Any, accelerator: str = "cpu") -> DataSettings:
    """The data group. `micro_batch_size` left to the hardware profile (`${hardware.micro_batch_size}`: auto on GPU
    profiles) is data.batch_per_device where the profile resolves to the CPU (hardware=auto on a machine without
    GPUs): there is no GPU memory to fit."""
    from omegaconf import OmegaConf

    values = plain(node)
    names = {f.name for f in dataclasses.fields(DataSettings)}
    if (accelerator != "gpu" and str(values.get("micro_batch_size")).lower() == "auto"
            and OmegaConf.is_config(node) and OmegaConf.is_interpolation(node, "micro_batch_size")):
        values["micro_batch_size"] = values.get("batch_per_device")
    return DataSettings(**{name: values.get(name) for name in names})


def hardware_settings(node: Any) -> HardwareSettings:
    values = plain(node)
    return HardwareSettings(**{f.name: values[f.name] for f in dataclasses.fields(HardwareSettings)})


def checkpoint_settings(cfg: Any) -> CheckpointSettings:
    values = plain(cfg.checkpoint)
    return CheckpointSettings(every_n_steps=values["every_n_steps"], signals=tuple(values["signals"] or ()),
                              requeue=bool(values["requeue"]), stop_signals=tuple(values["stop_signals"] or ()),
                              resume=None if cfg.resume is None else str(cfg.resume))


def optimizer_settings(node: Any) -> OptimizerSettings:
    try:
        lr = float(node.lr)
    except (TypeError, ValueError):
        raise ConfigError(f"optimizer.lr={node.lr!r} must be a positive number, e.g. 2e-4") from None
    projector = node.projector_lr
    return OptimizerSettings(name=str(node.name), lr=lr, projector_lr=float(projector) if projector else None,
                             momentum=float(node.get("momentum") or 0.0))


# attention implementations transformers knows (and that every family here passes on to it)
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


def _whole(low: int, none_ok: bool = False, meaning: str = "") -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None and none_ok:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            return f"must be {'null or ' if none_ok else ''}a whole number >= {low}{meaning}"
        return None
    return check


def _number(low: float, high: float | None = None, none_ok: bool = False, open_high: bool = False
            ) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value is None and none_ok:
            return None
        top = "" if high is None else f" and {'<' if open_high else '<='} {high}"
        bad = (isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < low
               or (high is not None and (value >= high if open_high else value > high)))
        return f"must be {'null or ' if none_ok else ''}a number >= {low}{top}" if bad else None
    return check


# option ranges that no later code checks (a value outside would be accepted and mean nothing, or fail late)
RANGES: dict[str, Callable[[Any], str | None]] = {
    "scheduler.warmup_steps": _whole(0, meaning=" (optimizer steps of linear warm-up)"),
    "scheduler.min_lr_ratio": _number(0.0, 1.0),
    "trainer.val_every_n_steps": _whole(1, none_ok=True, meaning=" (null: validate once, after training)"),
    "trainer.log_every_n_steps": _whole(1),
    "trainer.gradient_clip_val": _number(0.0, none_ok=True),
    "trainer.limit_val_batches": _number(0.0, none_ok=True),
    "eval.max_new_tokens": _whole(1, meaning=" (tokens generated per validation answer)"),
    "checkpoint.every_n_steps": _whole(1, none_ok=True, meaning=" (null: only on a signal)"),
    "data.max_length": _whole(1, none_ok=True, meaning=" (tokens per sample; null: no limit)"),
    "data.num_workers": _whole(0),
    "optimizer.projector_lr": _number(0.0, none_ok=True),
}


def check_ranges(cfg: Any) -> None:
    """Every numeric option in its range, and the attention implementation one transformers knows: a ConfigError
    naming the option, the value and what it may be, before anything loads."""
    from omegaconf import OmegaConf

    for key, check in RANGES.items():
        value = OmegaConf.select(cfg, key, default="<absent>")
        if value == "<absent>":
            continue  # the chosen option of the group does not have it (scheduler=constant)
        problem = check(value)
        if problem is not None:
            raise ConfigError(f"{key}={value!r} {problem}")
    attn = OmegaConf.select(cfg, "model.attn_implementation")
    if attn not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"model.attn_implementation={attn!r} is not an attention implementation; use one of "
                          f"{', '.join(ATTN_IMPLEMENTATIONS)} (sdpa: PyTorch's fused kernels, the default)")


def read_settings(cfg: Any) -> RunSettings:
    """The composed config as typed settings: what everything below the run assembly takes. `precision=auto` is
    resolved here from the hardware profile (what it chose and why is in `auto_choices`)."""
    check_ranges(cfg)
    from vlm_finetune.precision import resolve_precision  # torch: not imported with the entry point's resolvers

    hardware = hardware_settings(cfg.hardware)
    machine = resolve(hardware)
    precision, why = resolve_precision(str(cfg.precision.name), machine.accelerator, machine.supports_bf16,
                                       machine.name)
    return RunSettings(
        seed=int(cfg.seed), precision=precision, auto_choices=tuple(note for note in (why,) if note),
        trainability=frozen_mapping({k: str(v) for k, v in plain(cfg.train).items()}),
        model=model_settings(cfg.model), lora=lora_settings(cfg.lora),
        data=data_settings(cfg.data, machine.accelerator),
        strategy=strategy_settings(cfg.trainer), hardware=hardware,
        checkpoint=checkpoint_settings(cfg),
        loss=LossSettings(str(cfg.loss.impl), cfg.loss.chunk_size),
        eval=EvalSettings(bool(cfg.eval.generate), int(cfg.eval.max_new_tokens), bool(cfg.eval.caption_metrics)),
        optimizer=optimizer_settings(cfg.optimizer),
        speed=SpeedSettings(str(cfg.speed.checkpoint_scope), bool(cfg.speed.offload_activations),
                            bool(cfg.speed.compile), attention_backends(plain(cfg.speed.attention_backends))),
        max_steps=cfg.trainer.max_steps, accumulate_grad_batches=cfg.trainer.accumulate_grad_batches)
