"""Checkpoints and exact resume: a run stopped by its preemption signal and resumed ends where an
uninterrupted run ends; a kill while a checkpoint is written leaves the previous one usable; a corrupt
or foreign checkpoint stops the run with a clear error instead of a silent fresh start."""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import FAST, compose_cfg, run_cli
from vlm_finetune.checkpointing import CheckpointError, load_checkpoint_file
from vlm_finetune.io import save_torch_atomic as save_atomic
from vlm_finetune.train import train

ROOT = Path(__file__).resolve().parent.parent
# dropout makes the result depend on the restored RNG; no mid-run validation (a resumed run does not
# repeat the validation of the step it resumed at)
RESUME = FAST + ["trainer.max_steps=20", "trainer.log_every_n_steps=1", "eval.generate=false",
                 "trainer.val_every_n_steps=null", "lora.dropout=0.1", "checkpoint.every_n_steps=5"]


class SignalAt(L.Callback):
    """Sends this process the preemption signal (SIGUSR1) during the given optimizer step, at its
    `micro_batch`-th micro-batch: like SLURM's warning arriving in the middle of a step."""

    def __init__(self, step: int, micro_batch: int = 0):
        self.step, self.micro_batch, self.sent = step, micro_batch, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        position = batch_idx % trainer.accumulate_grad_batches
        if not self.sent and trainer.global_step == self.step - 1 and position == self.micro_batch:
            self.sent = True
            os.kill(os.getpid(), signal.SIGUSR1)


def _logged_losses(run_dir: Path) -> list[tuple[int, float]]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(handle) if r.get("train_loss")]


def _trainable(module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def stopped_and_resumed_equals_whole(overrides: list[str], tmp_path: Path, stop_step: int, steps: int) -> None:
    """The run of `overrides` uninterrupted (in tmp_path/full) and stopped by the preemption signal at `stop_step`
    then resumed in its folder (tmp_path/part): both reach `steps`, with the same trainable weights (1e-6)."""
    full_metrics, full = train(compose_cfg(overrides, tmp_path / "full"))
    stopped, _ = train(compose_cfg(overrides, tmp_path / "part"), callbacks=[SignalAt(stop_step)])
    assert stopped == {"preempted": 1, "global_step": stop_step}
    resumed_metrics, resumed = train(compose_cfg(overrides, tmp_path / "part"))
    assert resumed_metrics["global_step"] == full_metrics["global_step"] == steps
    expected, got = _trainable(full["module"]), _trainable(resumed["module"])
    assert expected.keys() == got.keys() and expected
    assert max(float((expected[k] - got[k]).abs().max()) for k in expected) <= 1e-6


@pytest.mark.parametrize("accumulate, stop_step, micro_batch", [
    (1, 10, 0),   # mid-epoch (16 micro-batches per epoch)
    # at the end of the first epoch, signal on the second micro-batch of the step
    pytest.param(2, 8, 1, marks=pytest.mark.slow),
    # signal on the first micro-batch: the save waits for the end of the step
    pytest.param(2, 5, 0, marks=pytest.mark.slow),
])
def test_stopped_and_resumed_run_equals_uninterrupted_run(tmp_path, accumulate, stop_step, micro_batch):
    overrides = RESUME + [f"trainer.accumulate_grad_batches={accumulate}"]
    full_metrics, full = train(compose_cfg(overrides, tmp_path / "full"))
    assert full_metrics["global_step"] == 20

    part_dir = tmp_path / "part"
    stopped, _ = train(compose_cfg(overrides, part_dir), callbacks=[SignalAt(stop_step, micro_batch)])
    assert stopped == {"preempted": 1, "global_step": stop_step}
    assert not (part_dir / "metrics.json").exists()  # not finished
    assert load_checkpoint_file(part_dir / "checkpoints" / "last.ckpt")["global_step"] == stop_step

    resumed_metrics, resumed = train(compose_cfg(overrides, part_dir))  # resume=auto: same folder
    assert resumed_metrics["global_step"] == 20
    expected, got = _trainable(full["module"]), _trainable(resumed["module"])
    assert expected.keys() == got.keys() and len(expected) > 10
    worst = max(float((expected[k] - got[k]).abs().max()) for k in expected)
    assert worst <= 1e-6, f"weights differ by {worst}"
    full_losses, resumed_losses = _logged_losses(tmp_path / "full"), _logged_losses(part_dir)
    assert [s for s, _ in resumed_losses] == list(range(20))  # every step once, none repeated
    torch.testing.assert_close(torch.tensor([v for _, v in resumed_losses]),
                               torch.tensor([v for _, v in full_losses]), rtol=0, atol=1e-6)
    # the optimizer and LR schedule came back too: the last logged learning rate is the same
    assert resumed["trainer"].lr_scheduler_configs[0].scheduler.last_epoch == 20


@pytest.mark.slow  # a killed process; test_kill_at_any_moment_of_a_save_loop stays quick
def test_kill_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    """A real tiny run, checkpointing every 2 steps, is SIGKILLed half-way through writing its second
    checkpoint. The first checkpoint is still whole, and the run resumes from it to the end."""
    run_dir = tmp_path / "run"
    child = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT / 'tests')!r})
        import torch
        import vlm_finetune.checkpointing as ckpt
        from conftest import FAST, compose_cfg, run_cli
        from vlm_finetune.train import train

        real_save, calls = torch.save, []
        def dying_save(obj, handle, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:  # half a checkpoint on disk, then killed
                handle.write(b"PK\\x03\\x04" + b"\\0" * 50000)
                handle.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, handle, *args, **kwargs)
        ckpt.torch.save = dying_save
        train(compose_cfg(FAST + ["trainer.max_steps=6", "checkpoint.every_n_steps=2", "eval.generate=false"],
                          {str(run_dir)!r}))
    """)
    result = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    folder = run_dir / "checkpoints"
    assert [p.name for p in folder.glob("last.ckpt.*.tmp")]  # the half-written file is beside it
    assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 2
    metrics, _ = train(compose_cfg(FAST + ["trainer.max_steps=6", "checkpoint.every_n_steps=2", "eval.generate=false"],
                                   run_dir))
    assert metrics["global_step"] == 6


@pytest.mark.slow  # whole CLI runs: the quick suite stays within 5 minutes
def test_kill_at_any_moment_of_a_save_loop(tmp_path):
    """A process saving ever larger checkpoints is killed at several arbitrary moments; every time the
    file on disk loads and is self-consistent."""
    path = tmp_path / "last.ckpt"
    child = textwrap.dedent(f"""
        import torch
        from vlm_finetune.io import save_torch_atomic as save_atomic
        i = 0
        while True:
            i += 1
            save_atomic({{"i": i, "w": torch.full((200_000 + i,), float(i))}}, __import__("pathlib").Path({str(path)!r}))
            if i == 1:
                print("saving", flush=True)
    """)
    import time

    seen = []
    for delay in (0.0, 0.013, 0.05, 0.21):
        proc = subprocess.Popen([sys.executable, "-c", child], env=dict(os.environ, PYTHONPATH=str(ROOT)),
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "saving"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        proc.stdout.close()
        state = torch.load(path, weights_only=True)
        assert state["w"].numel() == 200_000 + state["i"] and bool((state["w"] == state["i"]).all())
        seen.append(state["i"])
    assert len(seen) == 4 and seen[-1] > 1  # later kills found later checkpoints


def _checkpointed_run(run_dir: Path) -> None:
    train(compose_cfg(FAST + ["trainer.max_steps=2", "checkpoint.every_n_steps=2", "eval.generate=false"], run_dir))


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    _checkpointed_run(run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated (e.g. a copy cut short)
    cfg = compose_cfg(FAST + ["trainer.max_steps=4", "checkpoint.every_n_steps=2", "eval.generate=false"], run_dir)
    with pytest.raises(CheckpointError, match=r"last\.ckpt is corrupt or unreadable.*resume=never"):
        train(cfg)
    last.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="corrupt or unreadable"):
        train(cfg)
    save_atomic({"state_dict": {}}, last)  # a torch file, but not one of ours
    with pytest.raises(CheckpointError, match="not written by vlm_finetune"):
        train(cfg)


def test_incompatible_checkpoint_names_the_differences(tmp_path):
    run_dir = tmp_path / "run"
    _checkpointed_run(run_dir)
    cfg = compose_cfg(FAST + ["trainer.max_steps=4", "eval.generate=false", "lora.r=8", "data.micro_batch_size=8"],
                      run_dir)
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    message = str(err.value)
    assert "lora.r: checkpoint 16, now 8" in message and "data.micro_batch_size: checkpoint 4, now 8" in message
    assert "new run folder" in message
    # the same settings, but LoRA on fewer modules: found once the model is built, by the tensors it trains
    cfg = compose_cfg(FAST + ["trainer.max_steps=4", "eval.generate=false", "lora.targets.llm=.*q_proj"], run_dir)
    with pytest.raises(CheckpointError, match=r"tensor\(s\) in the checkpoint that this model does not train"):
        train(cfg)


def test_a_checkpoint_of_other_settings_stops_the_run_before_any_weight_loads(tmp_path, monkeypatch):
    from vlm_finetune.models.registry import get_family

    run_dir = tmp_path / "run"
    _checkpointed_run(run_dir)

    def no_weights(*args, **kwargs):
        raise AssertionError("the model was built before the checkpoint was checked")

    monkeypatch.setattr(get_family("glm4v"), "build_model", no_weights)
    cfg = compose_cfg(FAST + ["trainer.max_steps=4", "eval.generate=false", "seed=7"], run_dir)
    with pytest.raises(CheckpointError, match="seed: checkpoint 0, now 7"):
        train(cfg)
    cfg = compose_cfg(FAST + ["trainer.max_steps=4", "eval.generate=false", "trainer=zero2"], run_dir)
    with pytest.raises(CheckpointError, match="is a single-file checkpoint, which trainer=zero2 cannot resume from"):
        train(cfg)


def test_resume_from_a_missing_path_is_an_error(tmp_path):
    cfg = compose_cfg(FAST + [f"resume={tmp_path / 'nope.ckpt'}"], tmp_path / "run")
    with pytest.raises(CheckpointError, match="does not exist"):
        train(cfg)


@pytest.mark.slow  # whole CLI runs: the quick suite stays within 5 minutes
def test_cli_exits_2_on_a_corrupt_checkpoint(tmp_path, _asset_cache):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(b"\0" * 100)
    result = subprocess.run([sys.executable, "-m", "vlm_finetune", *FAST, f"hydra.run.dir={run_dir}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, VLM_FINETUNE_CACHE=str(_asset_cache)))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "last.ckpt is corrupt or unreadable" in result.stderr


@pytest.mark.slow  # 19 s: a whole run in a subprocess
def test_a_warning_that_arrives_while_the_run_starts_is_not_fatal(tmp_path, _asset_cache):
    """SLURM may send USR1 up to a minute early, while Python is still importing and loading: the process
    must survive it, save at its first optimizer step and stop; `resume=auto` then finishes the run."""
    import time

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "vlm_finetune", *RESUME, "trainer.max_steps=4", f"hydra.run.dir={run_dir}"]
    env = dict(os.environ, VLM_FINETUNE_CACHE=str(_asset_cache), PYTHONUNBUFFERED="1")
    env.pop("SLURM_JOB_ID", None)
    process = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # past `install_early`, long before torch, weights and the training loop
    process.send_signal(signal.SIGUSR1)
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    assert "preemption signal: checkpoint saved at step 1" in out
    assert not (run_dir / "metrics.json").exists() and (run_dir / "checkpoints" / "last.ckpt").is_file()
    done = subprocess.run(args + ["resume=auto"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stdout
    import json

    assert json.loads((run_dir / "metrics.json").read_text())["global_step"] == 4


LATE_SIGNAL = textwrap.dedent("""
    import os, subprocess, sys, time
    from vlm_finetune import signals
    signals.install_early()
    if sys.argv[1] == "finished":
        signals.ignore_after_finish()
    class SlowShutdown:  # interpreter shutdown takes a while (thread pools, CUDA, ...)
        def __del__(self):
            time.sleep(1.5)
    keep = SlowShutdown()
    subprocess.Popen(["sh", "-c", f"sleep 0.7; kill -USR1 {os.getpid()}"])  # SLURM's warning, late
""")


def test_a_warning_that_arrives_while_a_finished_run_exits_is_not_fatal(tmp_path):
    """Seen in CI: the restarted job finished all its steps, then SLURM's USR1 arrived while Python was
    shutting down, after it had reset its handlers to the default action; the job ended FAILED. The CLI
    now ignores the signals once the run is done."""
    script = tmp_path / "late.py"
    script.write_text(LATE_SIGNAL)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    killed = subprocess.run([sys.executable, str(script), "running"], env=env, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGUSR1  # what happened before: the handler is gone at shutdown
    done = subprocess.run([sys.executable, str(script), "finished"], env=env, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("trainer", [
    pytest.param(["trainer=zero2"], id="zero2"),
    # every parameter partitioned; MGM is built inside zero.Init (no rank holds it whole) and resumes into its
    # partitions
    pytest.param(["trainer=zero3", "model=tiny_mgm", "trainer.stage3_param_persistence_threshold=0"],
                 id="zero3-partitioned-build"),
    # FSDP2 (fully_shard on CPU ranks): one file, the trained weights and their optimizer state gathered on rank 0
    pytest.param(["trainer=fsdp"], id="fsdp"),
    # DDP, here with expert parallel at the same N (plain DDP's resume is the same path, less the cut): each rank
    # holds 2 of the 4 experts; the LoRA factors are replicated (DDP), so rank 0's checkpoint holds every
    # expert's, and the resumed ranks cut the experts again from the base
    pytest.param(["trainer=ddp", "model=tiny_mgm_moe", "lora.llm_modules=all", "trainer.expert_parallel=2"],
                 id="expert-parallel"),
])
def test_multi_rank_run_stopped_and_resumed_equals_uninterrupted(tmp_path, _asset_cache, trainer):
    """Two CPU ranks (gloo; DeepSpeed's CPU backend for zero*): a run that ends at step 3 and is resumed with
    resume=auto to step 6 logs the same losses and ends with the same adapter as a 6-step run. Under DeepSpeed
    the checkpoint is its folder: optimizer partitions per rank, no frozen weights."""
    from safetensors.torch import load_file

    common = ["trainer.max_steps=6", "data.num_train=96", "data.num_val=8", "data.micro_batch_size=4",
              "trainer.enable_progress_bar=false", "eval.generate=false", "trainer.val_every_n_steps=null",
              "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=3", "hardware=cpu", "hardware.devices=2",
              *trainer]
    env = dict(os.environ, VLM_FINETUNE_CACHE=str(_asset_cache))

    def run(run_dir, *extra):
        result = run_cli([*common, *extra, f"hydra.run.dir={run_dir}"], timeout=600, env=env)
        assert result.returncode == 0, result.stderr[-3000:]
        return result.stdout

    def losses(run_dir):
        with open(run_dir / "csv" / "metrics.csv") as handle:
            return {int(r["step"]): float(r["train_loss"]) for r in csv.DictReader(handle) if r.get("train_loss")}

    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run(whole)
    # the first part stops by max_steps; all 6 steps are in the 50-step warmup, so its shorter schedule
    # gives the same learning rates
    run(parts, "trainer.max_steps=3")
    last = parts / "checkpoints" / "last.ckpt"
    assert last.is_dir() == trainer[0].startswith("trainer=zero")
    if trainer[0] == "trainer=fsdp":  # the trained weights whole, no frozen base
        saved = load_checkpoint_file(last)["state_dict"]
        assert saved and all("lora_" in k or "merger" in k or "modules_to_save" in k for k in saved), list(saved)[:5]
        assert last.stat().st_size < 20e6
    if last.is_dir():  # DeepSpeed's folder, swapped in whole, without the frozen base
        assert not list(parts.glob("checkpoints/*.tmp")) and not list(parts.glob("checkpoints/*.old"))
        assert len(list(last.glob("*/*optim_states.pt"))) == 2  # one optimizer partition per rank
        assert sum(f.stat().st_size for f in last.rglob("*") if f.is_file()) < 20e6
    assert load_checkpoint_file(last)["global_step"] == 3
    assert "resuming from" in run(parts, "resume=auto")
    assert losses(parts) == losses(whole) and sorted(losses(whole)) == list(range(6))
    a = load_file(str(whole / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(parts / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)


def test_auto_resume_takes_the_previous_folder_when_killed_mid_swap(tmp_path):
    """A DeepSpeed checkpoint folder is swapped in by two renames (last.ckpt -> last.ckpt.old, tmp ->
    last.ckpt); killed between them, the run folder holds only last.ckpt.old, which is whole."""
    from vlm_finetune.checkpointing import find_resume_checkpoint

    folder = tmp_path / "checkpoints"
    (folder / "last.ckpt.old" / "checkpoint").mkdir(parents=True)
    assert find_resume_checkpoint("auto", tmp_path) == folder / "last.ckpt.old"
    (folder / "last.ckpt").mkdir()
    assert find_resume_checkpoint("auto", tmp_path) == folder / "last.ckpt"
    assert find_resume_checkpoint("never", tmp_path) is None


def test_deepspeed_folder_without_model_states_is_a_clear_error(tmp_path):
    (tmp_path / "last.ckpt" / "checkpoint").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="holds no DeepSpeed model states"):
        load_checkpoint_file(tmp_path / "last.ckpt")
