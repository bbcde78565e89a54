"""Host heap release (vlm_finetune.memory.host, memory.release_host): glibc's free pages really go back to the
system, the run's setting resolves per hardware and offload, and the callback trims at optimizer steps only."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from vlm_finetune.memory import host
from vlm_finetune.train import _host_release

glibc = pytest.mark.skipif(host._libc() is None, reason="the C library is not glibc")


def _resident() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


@glibc
def test_release_freed_returns_fragmented_heap_pages():
    # 40,000 blocks of 8 KB (below any mmap threshold) in the heap; every other one freed leaves ~160 MB of free
    # pages between live blocks, which free() alone never returns
    blocks = [torch.ones(2048) for _ in range(40_000)]
    del blocks[::2]
    before = _resident()
    assert host.release_freed() is True
    after = _resident()
    assert before - after > 50 * 2**20, (before, after)  # about 80 MB here (blocks straddle pages)
    assert float(sum(b[0] for b in blocks[:10])) == 10.0  # what is still held is intact


STEADY_PROBE = """
import sys, torch
from pathlib import Path
from vlm_finetune.memory import host
def resident():
    return next(int(l.split()[1]) * 1024 for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS:"))
if sys.argv[1] == "steady":
    assert host.steady_heap()
pins = []
for _ in range(3):  # a large block freed raises glibc's own threshold to its size: the next ones stay in the heap
    before, big = resident(), []
    for _ in range(100):  # 100 blocks of 2 MiB, each followed by a small one that stays (as a run's tensors do)
        big.append(torch.ones(512 * 1024))
        pins.append(torch.ones(256))
    del big
    print((resident() - before) // 2**20)
"""


@pytest.mark.slow  # fresh processes, 12 s
@glibc
def test_steady_heap_maps_large_blocks_and_returns_them():
    """In a fresh process (a heap with free room would serve the blocks from it): with glibc's dynamic threshold,
    2 MiB blocks freed once are then kept in the heap; with the steady threshold each goes back when freed."""
    import subprocess
    import sys

    kept = {mode: [int(x) for x in subprocess.run([sys.executable, "-c", STEADY_PROBE, mode], capture_output=True,
                                                   text=True, check=True).stdout.split()]
            for mode in ("dynamic", "steady")}
    assert max(kept["steady"]) < 20, kept  # MiB still resident after the free
    assert max(kept["dynamic"][1:]) > 150, kept  # the default keeps ~200 MiB that nothing uses


MAPPED_PROBE = """
import ctypes, sys, torch
from vlm_finetune.memory import host
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = host._libc()
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] in ("steady", "reuse"):
    assert host.steady_heap()
if sys.argv[1] == "reuse":  # what a run does once its model is loaded (memory.release_host=auto)
    assert host.reuse_heap()
before = libc.mallinfo2().hblkhd
held = [torch.ones(512 * 1024) for _ in range(20)]  # 20 blocks of 2 MiB, as a step's gradients
print((libc.mallinfo2().hblkhd - before) // 2**20)
"""


@pytest.mark.slow  # fresh processes, 11 s
@glibc
def test_the_steps_get_heap_blocks_again_after_the_load():
    """Under the steady threshold every 2 MiB block is mapped afresh (and zero-filled by the kernel: the cost that
    made CPU steps 40-60% slower); once `reuse_heap` has run they come from the heap, as glibc's own threshold
    gives them after the first free. Measured with glibc's count of mapped bytes (mallinfo2)."""
    import subprocess
    import sys

    mapped = {mode: int(subprocess.run([sys.executable, "-c", MAPPED_PROBE, mode], capture_output=True, text=True,
                                       check=True).stdout)
              for mode in ("steady", "reuse")}
    assert mapped["steady"] >= 40, mapped  # MiB mapped for the 40 MiB held
    assert mapped["reuse"] == 0, mapped


@pytest.mark.parametrize("setting, expected", [("auto", "load"), (True, "step"), (False, "off")])
def test_release_host_setting_resolves(setting, expected):
    cfg = OmegaConf.create({"memory": {"release_host": setting}})
    assert _host_release(cfg) == expected


def test_release_host_refuses_other_values():
    from vlm_finetune.errors import ConfigError

    cfg = OmegaConf.create({"memory": {"release_host": "sometimes"}})
    with pytest.raises(ConfigError, match="memory.release_host='sometimes' is not one of auto"):
        _host_release(cfg)


@pytest.mark.parametrize("every_step, accumulate, calls", [(True, 3, [2, 5]), (True, 1, [0, 1, 2, 3, 4, 5]),
                                                          (False, 1, [])])
def test_callback_trims_after_optimizer_steps_only(monkeypatch, every_step, accumulate, calls):
    seen: list = []
    trims = iter(range(100))
    reused: list[str] = []
    monkeypatch.setattr(host, "release_freed", lambda: seen.append(next(trims)))
    monkeypatch.setattr(host, "reuse_heap", lambda: reused.append("reuse"))
    callback = host.HostMemoryRelease(every_step=every_step)
    trainer = SimpleNamespace(accumulate_grad_batches=accumulate)
    at_batch: list[int] = []
    for batch_idx in range(6):
        before = len(seen)
        callback.on_train_batch_end(trainer, None, None, None, batch_idx)
        if len(seen) > before:
            at_batch.append(batch_idx)
    assert at_batch == calls
    callback.on_fit_start(trainer, None)
    assert len(seen) == len(calls) + 1  # and once when training starts
    # the steps reuse heap blocks unless every step trims (then the 1 MiB threshold stays until the run ends)
    assert reused == ([] if every_step else ["reuse"])
    callback.teardown(trainer, None, "fit")
    assert reused == ["reuse"] * (1 if every_step else 2)


@pytest.mark.parametrize("every_step", [True, False])
def test_a_stage_after_fit_gets_the_steady_heap_again(monkeypatch, every_step):
    """The run's final `trainer.validate` is a stage of its own after fit's teardown (which reuses the heap): with
    `every_step` it maps large blocks again and trims when it ends. Under the 32 MiB threshold the validation of a
    ZeRO-3 MoE kept one freed 16 MiB expert stack per layer in the heap (scripts/load_memory.py with
    lora.llm_modules=all: a rank's growth 0.78x -> 1.0x the model in one run of two)."""
    thresholds: list[int] = []
    trims: list[str] = []
    monkeypatch.setattr(host, "steady_heap", lambda threshold=host.MMAP_THRESHOLD_BYTES: thresholds.append(threshold))
    monkeypatch.setattr(host, "reuse_heap", lambda: thresholds.append(host.REUSE_THRESHOLD_BYTES))
    monkeypatch.setattr(host, "release_freed", lambda: trims.append("trim"))
    callback, trainer = host.HostMemoryRelease(every_step=every_step), SimpleNamespace(accumulate_grad_batches=1)
    callback.teardown(trainer, None, "fit")
    callback.setup(trainer, None, "validate")
    in_validation = thresholds[-1]
    callback.on_validation_end(trainer, None)
    callback.teardown(trainer, None, "validate")
    if every_step:
        assert in_validation == host.MMAP_THRESHOLD_BYTES and trims == ["trim"]
    else:
        assert in_validation == host.REUSE_THRESHOLD_BYTES and trims == []
    assert thresholds[-1] == host.REUSE_THRESHOLD_BYTES  # what follows the run reuses the heap
