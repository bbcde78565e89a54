"""Hardware profiles: what a profile promises, what this machine has, and a preflight that compares them
before any weight loads."""
from __future__ import annotations

import os
from dataclasses import dataclass

from vlm_finetune.errors import ConfigError
from vlm_finetune.settings import HardwareSettings


def env_global_rank() -> int:
    """This process's rank as the launcher states it (torchrun: RANK, srun: SLURM_PROCID), before Lightning
    starts (and before torch is imported: the package's config resolvers read it)."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if os.environ.get(key) not in (None, ""):
            return int(os.environ[key])
    return 0


@dataclass(frozen=True)
class Hardware:
    name: str
    accelerator: str  # "gpu" | "cpu"
    devices: int  # per node
    num_nodes: int
    gpu_memory_gib: float  # per device; 0 on the CPU
    supports_bf16: bool
    host_memory_gib: float = 0.0  # per node; 0: unknown
    interconnect_gbps: float = 0.0  # link bandwidth per GPU each way, Gbit/s; 0: unknown

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


@dataclass(frozen=True)
class Found:
    gpus: int
    gpu_names: tuple[str, ...]
    min_gpu_memory_gib: float
    bf16: bool


def detect() -> Found:
    import torch

    if not torch.cuda.is_available():
        return Found(0, (), 0.0, False)
    count = torch.cuda.device_count()
    names = tuple(torch.cuda.get_device_name(i) for i in range(count))
    memory = min(torch.cuda.get_device_properties(i).total_memory for i in range(count)) / 2**30
    return Found(count, names, round(memory, 1), bool(torch.cuda.is_bf16_supported()))


def this_host_memory_gib() -> float:
    """Physical memory of this machine, GiB."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return 0.0


def available_host_memory_gib() -> float:
    """Memory this machine can give a new process now (/proc/meminfo's MemAvailable: free plus reclaimable
    cache), GiB; 0 where it cannot be read."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return round(int(line.split()[1]) / 2**20, 2)
    except (OSError, ValueError, IndexError):
        pass
    return 0.0


def resolve(profile: HardwareSettings, found: Found | None = None) -> Hardware:
    """The profile with `auto` fields (and a null host memory: this machine's) filled in from this machine."""
    host = float(profile.host_memory_gib) if profile.host_memory_gib else this_host_memory_gib()
    if profile.accelerator != "auto":
        return Hardware(str(profile.name), str(profile.accelerator), int(profile.devices), int(profile.num_nodes),
                        float(profile.gpu_memory_gib), bool(profile.supports_bf16), host,
                        float(profile.interconnect_gbps or 0.0))
    found = found or detect()
    if found.gpus == 0:
        return Hardware("auto(cpu)", "cpu", 1, 1, 0.0, True, host)
    devices = found.gpus if str(profile.devices) == "auto" else int(profile.devices)
    return Hardware(f"auto({devices}x {found.gpu_names[0]})", "gpu", devices, int(profile.num_nodes),
                    found.min_gpu_memory_gib, found.bf16, host, float(profile.interconnect_gbps or 0.0))


def preflight(hardware: Hardware, precision: str, found: Found | None = None) -> None:
    """Stop in seconds when the profile asks for what is not here: names what the profile expects, what was
    found, and what to do instead."""
    if hardware.accelerator != "gpu":
        return
    found = found or detect()
    expected = (f"hardware={hardware.name} expects {hardware.devices} GPU(s) per node x {hardware.num_nodes} node(s), "
                f"{hardware.gpu_memory_gib:g} GiB each")
    seen = (f"found {found.gpus} GPU(s)" + (f" ({', '.join(sorted(set(found.gpu_names)))}, "
                                            f"{found.min_gpu_memory_gib:g} GiB)" if found.gpus else ""))
    advice = ("Run it on that hardware, or choose the profile of this "
              "machine: hardware=auto detects it, hardware=cpu runs on the CPU (tiny models only).")
    if found.gpus < hardware.devices:
        raise ConfigError(f"{expected}, but this machine {seen}. {advice}")
    if found.min_gpu_memory_gib + 0.5 < hardware.gpu_memory_gib:
        raise ConfigError(f"{expected}, but this machine {seen}: less memory per GPU than the profile plans for. "
                          f"{advice}")
    if precision in ("bf16-mixed", "bf16-true") and not found.bf16:
        raise ConfigError(f"precision={precision} needs bf16, which the GPUs here ({', '.join(found.gpu_names)}) lack; "
                          "use precision=fp16-mixed (loss scaling) or 32-true")
