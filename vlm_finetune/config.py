"""Hydra at the edges: the config folder, composition for the entry points that are not Hydra apps, the
running app's overrides, and the small typed settings that inner code takes instead of config nodes (their
defaults live in conf/, once)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vlm_finetune.errors import ConfigError
from vlm_finetune.hardware import env_global_rank

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


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


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


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


ATTENTION_BACKENDS = ("cudnn", "flash", "efficient", "math")


def attention_backends(names: Any) -> tuple:
    """speed.attention_backends ([cudnn, flash, ...], best first; null = PyTorch's own choice) as SDPA backends."""
    from torch.nn.attention import SDPBackend

    members = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    unknown = [n for n in (names or []) if str(n) not in members]
    if unknown:
        raise ConfigError(f"speed.attention_backends: {unknown[0]!r} is not an SDPA backend; use some of "
                          f"{list(ATTENTION_BACKENDS)}, best first (Hopper: [cudnn, flash, efficient])")
    return tuple(members[str(n)] for n in (names or []))


LOSS_IMPLS = ("chunked", "plain", "liger")


@dataclass(frozen=True)
class LossSettings:
    impl: str  # chunked | plain | liger
    chunk_size: int  # supervised rows projected at a time (chunked)

    @classmethod
    def from_config(cls, loss_cfg: Any) -> LossSettings:
        if loss_cfg.impl not in LOSS_IMPLS:
            raise ConfigError(f"loss.impl={loss_cfg.impl!r} is unknown; use chunked, plain or liger")
        chunk = loss_cfg.chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"loss.chunk_size={chunk!r} must be a positive number of rows, e.g. 1024")
        return cls(str(loss_cfg.impl), chunk)


@dataclass(frozen=True)
class EvalSettings:
    generate: bool
    max_new_tokens: int
    caption_metrics: bool

    @classmethod
    def from_config(cls, eval_cfg: Any) -> EvalSettings:
        return cls(bool(eval_cfg.generate), int(eval_cfg.max_new_tokens), bool(eval_cfg.caption_metrics))


@dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    projector_lr: float | None  # the projector's own rate (None: the base rate)

    @classmethod
    def from_config(cls, optim_cfg: Any) -> OptimizerSettings:
        projector = optim_cfg.get("projector_lr")
        return cls(float(optim_cfg.lr), float(projector) if projector else None)
