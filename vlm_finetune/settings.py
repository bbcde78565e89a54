"""Typed settings: what the run assembly reads from the composed config once (vlm_finetune.config.read_settings)
and everything below it takes instead of config nodes. Nothing here has a default: every value comes from conf/,
where each default is written once. The checks that need no model are made where the values are read."""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass
from datetime import timedelta
from types import MappingProxyType
from typing import Any, Mapping

from vlm_finetune.errors import ConfigError


def is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.lower() == "auto"


def frozen_mapping(values: Mapping[str, Any] | None) -> Mapping[str, Any]:
    """A read-only view of plain data (nested mappings stay plain dicts: they are read, never written)."""
    return MappingProxyType(dict(values or {}))


def _positive_int(value: Any, option: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{option}={value!r} must be a positive integer {example}")
    return value


@dataclass(frozen=True)
class ModelSettings:
    """The `model=` group. The fields every family reads are typed here; `options` holds the family's own keys
    (`llm`, `vision`, `text`, `template`, ...), plain data the family reads with `option`."""

    family: str
    name: str
    preset: str | None
    path: str | None  # a checkpoint folder; None: the generated tiny one, or random weights from the config
    cache_dir: str
    init_seed: int
    image_size: int
    attn_implementation: str
    liger_kernels: bool
    activation_checkpointing: Any  # false | true | a number of decoder layers | auto (trainability resolves it)
    trust_remote_code: bool
    options: Mapping[str, Any]

    def option(self, key: str) -> Any:
        """A family's own key; a key its model config does not declare is a ConfigError naming it."""
        if key not in self.options:
            raise ConfigError(f"model={self.name} does not declare model.{key}, which model.family={self.family} "
                              f"reads; add it to conf/model/{self.name}.yaml")
        return self.options[key]

    def option_copy(self, key: str) -> dict:
        """A family's own mapping (`llm`, `vision`, `config`, ...) as a deep copy the family may change; null: {}."""
        value = self.option(key)
        return {} if value is None else copy.deepcopy(dict(value))

    @property
    def largest_image_side(self) -> int:
        """The side of the largest image the processor makes: max_image_size where the model has one (GLM-4.1V's
        pixel budget), else image_size."""
        return int(self.options.get("max_image_size") or self.image_size)

    def replace(self, **changes: Any) -> ModelSettings:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """The group as plain data (the tiny checkpoints' fingerprints read keys of it)."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "options"}
        return {**dict(self.options), **fields}


# what lora.llm_modules may name; each family takes those it has (models/lora_targets.py)
LLM_SCOPES = ("qkv", "attention", "mlp", "experts", "all")
EXPERT_FORWARDS = ("per_expert", "peft")


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    dropout: float
    targets: Mapping[str, str | None]  # part name -> a regex over module names; None: the family's default
    llm_modules: str  # attention | mlp | experts | all
    expert_forward: str  # per_expert | peft (models/moe_lora.py)

    def __post_init__(self) -> None:
        _positive_int(self.r, "lora.r", "(the adapter's rank, e.g. 16)")
        if self.llm_modules not in LLM_SCOPES:
            raise ConfigError(f"lora.llm_modules={self.llm_modules!r}: use attention, mlp (dense MLP or MoE experts), "
                              "experts, all, or qkv (GLM-4V-9B)")
        if self.expert_forward not in EXPERT_FORWARDS:
            raise ConfigError(f"lora.expert_forward={self.expert_forward!r} is not one of {'|'.join(EXPERT_FORWARDS)} "
                              "(per_expert: each expert's update applied to its own tokens; peft: PEFT's "
                              "parametrization)")

    def target(self, part: str) -> str | None:
        """A regex the user gave for this part (lora.targets.<part>), else None."""
        custom = self.targets.get(part)
        return str(custom) if custom else None


STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")


@dataclass(frozen=True)
class StrategySettings:
    """The `trainer=` group's strategy: what is sharded, offloaded and how the ranks talk."""

    name: str
    strategy: str  # single | ddp | fsdp | deepspeed
    zero_stage: int  # DeepSpeed's stage; 0 for the other strategies
    offload_optimizer: bool
    offload_parameters: bool
    collective_timeout_s: float
    stop_grace_s: float
    sharding_strategy: str | None  # FSDP's (FULL_SHARD | SHARD_GRAD_OP); None for the others
    deepspeed: Mapping[str, Any]  # DeepSpeed's bucket sizes and stage-3 knobs (strategies.deepspeed_config)
    expert_parallel: int  # ranks that split each MoE layer's experts (1: none)

    def __post_init__(self) -> None:
        _positive_int(self.expert_parallel, "trainer.expert_parallel", "(ranks that share each MoE layer's experts)")
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"trainer.strategy={self.strategy!r} is unknown; use trainer=single|ddp|fsdp|zero2|"
                              "zero2_offload|zero3|zero3_offload")
        seconds = self.collective_timeout_s
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or seconds <= 0:
            raise ConfigError(f"trainer.collective_timeout_s={seconds!r} must be a positive number of seconds")
        grace = self.stop_grace_s
        if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
            raise ConfigError(f"trainer.stop_grace_s={grace!r} must be 0 or a positive number of seconds")

    @property
    def collective_timeout(self) -> timedelta:
        """The process groups' timeout (watchdog.RunWatchdog uses the same)."""
        return timedelta(seconds=float(self.collective_timeout_s))

    def with_deepspeed(self, **changes: Any) -> StrategySettings:
        return dataclasses.replace(self, deepspeed=frozen_mapping({**self.deepspeed, **changes}))

    @property
    def gathers_sequentially(self) -> bool:
        """ZeRO-3's stage3_allgather_sequential as the run applies it (auto is false until a plan resolves it)."""
        value = self.deepspeed.get("stage3_allgather_sequential", False)
        if not isinstance(value, bool) and not is_auto(value):
            raise ConfigError(f"trainer.stage3_allgather_sequential={value!r}: use true, false or auto")
        return value is True

    @property
    def is_zero3(self) -> bool:
        return self.strategy == "deepspeed" and self.zero_stage == 3

    @property
    def resumable(self) -> bool:
        """Runs that write resumable checkpoints (a file; DeepSpeed: its own folder)."""
        return self.strategy in ("single", "ddp", "fsdp", "deepspeed")

    @property
    def replicates_model(self) -> bool:
        """Every device holds the whole model (one process, or DDP)."""
        return self.strategy in ("single", "ddp")

    @property
    def checkpoint_is_folder(self) -> bool:
        """DeepSpeed writes its checkpoint as a folder (one optimizer partition per rank); the others one file."""
        return self.strategy == "deepspeed"


DATA_SOURCES = ("shapes", "conversations")


@dataclass(frozen=True)
class DataSettings:
    """The `data=` group. Keys a source does not have (a generated set has no path) are None."""

    source: str
    micro_batch_size: Any  # a positive integer, or auto (resolved by the run before the data module exists)
    batch_per_device: int | None  # samples per device per optimizer step before accumulation: what auto keeps
    val_batch_size: Any  # a positive integer; None: the micro-batch; auto: the plan's (memory/validation.py)
    max_length: int | None
    truncation: str  # truncate | drop
    on_bad_record: str  # error | skip
    group_by_length: bool
    num_workers: int
    packing: bool
    pack_length: int | None
    global_batch_size: int | None  # samples per optimizer step over all GPUs (`+data.global_batch_size`, for auto)
    # the generated shapes (None for files)
    num_train: int | None
    num_val: int | None
    image_size: int | None
    # conversation files (None for generated data)
    path: str | None
    val_path: str | None
    val_fraction: float | None
    image_root: str | None

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ConfigError(f"data.source={self.source!r} is unknown; use data=shapes or data=conversations")
        if self.truncation not in ("truncate", "drop"):
            raise ConfigError(f"data.truncation={self.truncation!r}: use truncate or drop")
        if self.on_bad_record not in ("error", "skip"):
            raise ConfigError(f"data.on_bad_record={self.on_bad_record!r}: use error or skip")
        mbs = self.micro_batch_size
        if not is_auto(mbs):
            _positive_int(mbs, "data.micro_batch_size", "or auto (GPU)")
        if self.val_batch_size is not None and not is_auto(self.val_batch_size):
            _positive_int(self.val_batch_size, "data.val_batch_size", "or auto (the plan's: within the step's peak)")

    def replace(self, **changes: Any) -> DataSettings:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class CheckpointSettings:
    """Checkpoints for resuming: `checkpoint:` and `resume`."""

    every_n_steps: int | None
    signals: tuple[str, ...]
    requeue: bool
    stop_signals: tuple[str, ...]
    resume: str | None  # auto | never | a checkpoint path


@dataclass(frozen=True)
class HardwareSettings:
    """A `hardware=` profile as declared (hardware.resolve turns it into what this machine has)."""

    name: str
    accelerator: str  # cpu | gpu | auto
    devices: Any  # a number, or auto
    num_nodes: int
    gpu_memory_gib: float
    supports_bf16: bool
    host_memory_gib: float | None  # None: this machine's
    cpu_threads: int | None  # None: torch's default
    interconnect_gbps: float | None  # link bandwidth per GPU each way, Gbit/s; None: unknown


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

    def __post_init__(self) -> None:
        if self.impl not in LOSS_IMPLS:
            raise ConfigError(f"loss.impl={self.impl!r} is unknown; use chunked, plain or liger")
        chunk = self.chunk_size
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"loss.chunk_size={chunk!r} must be a positive number of rows, e.g. 1024")


@dataclass(frozen=True)
class EvalSettings:
    generate: bool
    max_new_tokens: int
    caption_metrics: bool


@dataclass(frozen=True)
class OptimizerSettings:
    name: str
    lr: float
    projector_lr: float | None  # the projector's own rate (None: the base rate)
    momentum: float  # SGD's; 0 for optimizers without it

    def __post_init__(self) -> None:
        if not math.isfinite(self.lr) or self.lr <= 0:
            raise ConfigError(f"optimizer.lr={self.lr!r} must be a positive number, e.g. 2e-4")


@dataclass(frozen=True)
class SpeedSettings:
    checkpoint_scope: str  # layer | mlp
    offload_activations: bool
    compile: bool
    attention_backends: tuple  # SDPA backends, best first; () = PyTorch's choice


@dataclass(frozen=True)
class RunSettings:
    """Every group, read once at the top of a run (or of the planner, export, generate)."""

    seed: int
    precision: str  # never auto: config.read_settings resolves it from the hardware
    auto_choices: tuple[str, ...]  # what the `auto` values resolved while reading chose, and why (printed at start)
    trainability: Mapping[str, str]  # train.vision / projector / llm, as written (models.base.parse_trainability)
    model: ModelSettings
    lora: LoraSettings
    data: DataSettings
    strategy: StrategySettings
    hardware: HardwareSettings
    checkpoint: CheckpointSettings
    loss: LossSettings
    eval: EvalSettings
    optimizer: OptimizerSettings
    speed: SpeedSettings
    max_steps: int
    accumulate_grad_batches: int

    def replace(self, **changes: Any) -> RunSettings:
        return dataclasses.replace(self, **changes)
