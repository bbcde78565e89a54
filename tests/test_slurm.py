"""On a real single-node SLURM (tests/slurm_local.py): the array script runs one sweep line per task,
the submitit launcher runs one job per combination, and a job warned before its time limit saves,
requeues itself, resumes and finishes. Skipped with the reason where SLURM cannot be started (not root,
packages not installable)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

from slurm_local import LocalSlurm, why_unavailable

ROOT = Path(__file__).resolve().parent.parent
TINY = ["trainer.max_steps=4", "data.num_train=64", "data.num_val=8", "data.micro_batch_size=4",
        "trainer.enable_progress_bar=false", "eval.max_new_tokens=3", "scheduler.warmup_steps=1",
        "hardware.cpu_threads=1"]
# one CPU and 3 GB per task: two tiny runs at a time on two cores
CPU_TASK = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=3G"]

pytestmark = pytest.mark.slurm


@pytest.fixture(scope="module")
def cluster():
    reason = why_unavailable()
    if reason:
        pytest.skip(reason)
    slurm = LocalSlurm().start()
    yield slurm
    slurm.stop()


def _job_env(cache) -> dict:
    return {"PYTHON": sys.executable, "VLM_FINETUNE_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}


def _read_metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


@pytest.mark.slow  # 33 s with the cluster's start: the quick suite stays under 10 minutes
def test_array_job_runs_one_sweep_line_per_task(cluster, tmp_path, _asset_cache):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("# tiny sweep\nlora.r=2\nlora.r=4\n\nlora.r=8 optimizer.lr=5e-4\nlora.r=16\n")
    job = cluster.sbatch("--array=0-3", *CPU_TASK, f"--output={tmp_path}/slurm-%A_%a.out",
                         str(ROOT / "slurm" / "sweep.sbatch"), str(sweep), *TINY, cwd=ROOT,
                         env={**_job_env(_asset_cache), "RUN_ROOT": str(tmp_path / "runs")})
    states = cluster.wait(job, timeout=400)
    assert sorted(states) == [f"{job}_{i}" for i in range(4)] and set(states.values()) == {"COMPLETED"}, states
    from omegaconf import OmegaConf

    expected = [(2, 2e-3), (4, 2e-3), (8, 5e-4), (16, 2e-3)]
    for task, (rank, lr) in enumerate(expected):
        folder = tmp_path / "runs" / job / str(task)
        metrics = _read_metrics(folder)
        assert metrics["global_step"] == 4 and metrics["train_loss"] > 0 and 0 <= metrics["val_accuracy"] <= 1
        config = OmegaConf.load(folder / "config.yaml")
        assert (config.lora.r, config.optimizer.lr) == (rank, lr), task
        # LoRA rank r gives 2 x 6 adapted layers x r x (in + out) parameters: the sizes differ per line
        adapter_cfg = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        assert adapter_cfg["r"] == rank


def test_array_task_beyond_the_sweep_file_fails_clearly(cluster, tmp_path, _asset_cache):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("lora.r=2\n")
    job = cluster.sbatch("--array=1", *CPU_TASK, f"--output={tmp_path}/slurm-%A_%a.out",
                         str(ROOT / "slurm" / "sweep.sbatch"), str(sweep), cwd=ROOT, env=_job_env(_asset_cache))
    states = cluster.wait(job, timeout=120, poll=1)
    assert set(states.values()) == {"FAILED"}
    log = (tmp_path / f"slurm-{job}_1.out").read_text()
    assert f"sweep file {sweep} has no line 1" in log and "--array=0-<lines - 1>" in log


@pytest.mark.slow  # two jobs through a real SLURM and a Hydra sweep: 14 s
def test_submitit_multirun_submits_one_job_per_combination(cluster, tmp_path, _asset_cache):
    import subprocess

    from omegaconf import OmegaConf

    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install -e '.[slurm]'")
    sweep_dir = tmp_path / "multirun"
    result = subprocess.run(
        [sys.executable, "-m", "vlm_finetune", "-m", "hydra/launcher=slurm", "lora.r=4,8", *TINY,
         f"hydra.sweep.dir={sweep_dir}", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=3",
         "hydra.launcher.timeout_min=10"],
        cwd=ROOT, env={**cluster.env, **_job_env(_asset_cache)}, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    jobs = sorted(p.name for p in (sweep_dir / ".submitit").iterdir() if p.is_dir() and "_" in p.name)
    assert len(jobs) == 2  # one SLURM (array) task per combination
    for num, rank in enumerate((4, 8)):
        folder = sweep_dir / str(num)
        assert _read_metrics(folder)["global_step"] == 4
        assert OmegaConf.load(folder / "config.yaml").lora.r == rank
        assert (folder / ".hydra" / "overrides.yaml").is_file()
    assert (sweep_dir / "multirun.yaml").is_file()


def _release_requeued(cluster: LocalSlurm, job: str, seen: dict) -> None:
    """A requeued job waits about 2 minutes (BeginTime) before SLURM starts it again; start it now."""
    out = cluster.run("scontrol", "-o", "show", "job", job, check=False).stdout
    fields = dict(f.split("=", 1) for f in out.split() if "=" in f)
    seen["restarts"] = max(seen.get("restarts", 0), int(fields.get("Restarts", 0)))
    if fields.get("JobState") == "PENDING" and fields.get("Reason") == "BeginTime":
        cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now", check=False)


@pytest.mark.slow
def test_time_limit_warning_saves_requeues_and_resumes(cluster, tmp_path, _asset_cache):
    """A 2-minute job asks for USR1 90 s before its limit (slurm/train.sbatch's --signal, shortened);
    training takes longer than that, so it is warned mid-run, checkpoints, requeues, resumes from the
    checkpoint (maybe more than once) and completes all its steps."""
    run_dir = tmp_path / "run"
    steps = 1000
    overrides = [o for o in TINY if not o.startswith("trainer.max_steps")] + [
        f"trainer.max_steps={steps}", "trainer.val_every_n_steps=null", "trainer.log_every_n_steps=50",
        "checkpoint.every_n_steps=500", "eval.generate=false"]
    job = cluster.sbatch(*CPU_TASK, "--time=2", "--signal=USR1@90", f"--output={tmp_path}/slurm-%j.out",
                         str(ROOT / "slurm" / "train.sbatch"), *overrides, cwd=ROOT,
                         env={**_job_env(_asset_cache), "RUN_DIR": str(run_dir)})
    seen: dict = {}
    states = cluster.wait(job, timeout=900, poll=2, on_poll=lambda _: _release_requeued(cluster, job, seen))
    log = (tmp_path / f"slurm-{job}.out").read_text()
    assert states == {job: "COMPLETED"}, log[-3000:]
    assert seen["restarts"] >= 1
    saved = [int(line.rsplit("at step ", 1)[1].split()[0]) for line in log.splitlines()
             if "preemption signal: checkpoint saved at step" in line]
    resumed = [int(line.rsplit("at step ", 1)[1]) for line in log.splitlines() if "vlm_finetune: resuming from" in line]
    assert saved and resumed[: len(saved)] == saved  # each rerun continued from the step its warning saved
    assert 0 < saved[0] < steps
    assert _read_metrics(run_dir)["global_step"] == steps
    with open(run_dir / "csv" / "metrics.csv") as handle:
        logged = [int(r["step"]) for r in csv.DictReader(handle) if r.get("train_loss")]
    assert len(logged) == len(set(logged)) and logged == sorted(logged) and logged[-1] == steps - 1
