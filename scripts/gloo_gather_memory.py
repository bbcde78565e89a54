"""What one gather of a ZeRO-3 module costs in resident memory on CPU ranks (gloo), beyond its output (issue 35).

DeepSpeed ZeRO-3 gathers a module's parameters with `all_gather_into_tensor` (or, with
`stage3_use_all_reduce_for_fetch_params`, with an in-place `all_reduce` of a zeroed full buffer). On two gloo
ranks each collective here fills an output of `--mib` MiB that already exists, so any growth of the rank's
resident peak (VmHWM) is memory the backend allocates for itself: a staging copy that no census of live tensors
sees (it is made inside the backend, outside the dispatcher). NCCL on GPUs gathers straight into the output.

    python scripts/gloo_gather_memory.py [--mib 100]

Prints one JSON line per rank: the peak's growth over the output for each collective, in MiB."""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rank(rank: int, mib: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    numel = mib * 2**20 // 4
    output = torch.zeros(numel)  # touched: resident before any collective
    partition = torch.ones(numel // 2)
    growth = {}
    for name in ("all_reduce", "all_gather_into_tensor", "all_gather"):
        dist.barrier()
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from the resident size
        before = _status("VmHWM")
        if name == "all_reduce":
            dist.all_reduce(output)
        elif name == "all_gather_into_tensor":
            dist.all_gather_into_tensor(output, partition)
        else:
            dist.all_gather(list(output.chunk(2)), partition)
        growth[name] = round((_status("VmHWM") - before) / 2**20, 1)
    print(json.dumps({"rank": rank, "output_mib": mib, "peak_growth_mib": growth}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="the gathered output's size (one module's weights)")
    parser.add_argument("--port", type=int, default=29613)
    args = parser.parse_args()
    import torch.multiprocessing as mp

    mp.spawn(_rank, args=(args.mib, args.port), nprocs=2)


if __name__ == "__main__":
    main()
