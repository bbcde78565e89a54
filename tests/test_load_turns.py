"""nf4 under sharding, several ranks per node: the ranks build in turns and each keeps its shard of its own build,
so the builds are compared (vlm_finetune/load_turns.py). Two gloo processes here: equal builds pass, a build that
differs in one tensor stops both ranks naming that tensor, a build that fails stops both at once; and the turns run
one rank after another."""
from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from vlm_finetune.load_turns import fingerprint, load_in_turns, loads_in_turns


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_the_fingerprint_is_equal_for_equal_builds_and_names_a_changed_tensor():
    a, b = fingerprint(_model(0)), fingerprint(_model(0))
    assert a == b and [name for name, _ in a] == ["0.weight", "0.bias", "1.weight", "1.bias", "2.weight", "2.bias"]
    changed = _model(0)
    with torch.no_grad():
        changed[2].bias[1] += 1e-3
    diff = [name for (name, x), (_, y) in zip(a, fingerprint(changed)) if x != y]
    assert diff == ["2.bias"]


def test_loads_in_turns_for_sharded_nf4_with_several_ranks_per_node_only():
    assert loads_in_turns("fsdp", 0, "nf4", 4) and loads_in_turns("deepspeed", 3, "nf4-fp32", 2)
    assert not loads_in_turns("deepspeed", 2, "nf4", 4)  # ZeRO-2 keeps the whole model on every rank
    assert not loads_in_turns("fsdp", 0, "bf16-mixed", 4)  # partitioned or sharded without quantising whole
    assert not loads_in_turns("deepspeed", 3, "nf4", 1)  # one rank per node: nothing to take turns with
    assert not loads_in_turns("fsdp", 0, "nf4", 4, auto_micro_batch=True)  # real steps on a whole model first


def _rank(rank: int, port: int, seeds: tuple[int | None, int | None], out: dict) -> None:
    """A rank of the load in turns; a seed of None: this rank's build fails."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        spans = {}

        def work():
            start = time.time()
            if seeds[rank] is None:
                raise OSError("no space left on device")
            model = _model(seeds[rank])
            time.sleep(0.2)
            spans["span"] = (start, time.time())
            return fingerprint(model)

        try:
            load_in_turns(rank, 2, work)
            out[rank] = ("ok", spans["span"])
        except (RuntimeError, OSError) as error:
            out[rank] = ("error", str(error))
    finally:
        dist.destroy_process_group()


def _run(seeds: tuple[int, int]) -> dict:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(port, seeds, out), nprocs=2, join=True)
        return dict(out)


@pytest.mark.distributed
def test_two_ranks_take_turns_and_a_build_that_differs_or_fails_stops_both():
    same = _run((0, 0))
    assert [same[r][0] for r in (0, 1)] == ["ok", "ok"]
    assert same[0][1][1] <= same[1][1][0]  # rank 1 built after rank 0 had finished
    different = _run((0, 1))
    for rank in (0, 1):
        kind, message = different[rank]
        assert kind == "error" and "rank 1 built other weights than rank 0 (0.weight differs)" in message
        assert "same seed on every rank" in message
    started = time.time()
    failed = _run((None, 0))  # rank 0's build fails: rank 1 does not wait out the turn's timeout
    assert failed[0] == ("error", "no space left on device")
    assert failed[1][0] == "error" and "rank 0's build failed (OSError: no space left on device)" in failed[1][1]
    assert time.time() - started < 60
