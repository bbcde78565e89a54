"""Nothing lost, nothing run that the user did not ask for: foreign checkpoints, remote code, file modes,
folders that hold someone's files, one run per folder, finished runs, signals, images, and values that would
only fail late (issue 18)."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import FAST, compose_cfg
from vlm_finetune.checkpointing import CheckpointError, load_checkpoint_file
from vlm_finetune.config import model_settings
from vlm_finetune.errors import ConfigError, DataError
from vlm_finetune.train import train

ROOT = Path(__file__).resolve().parent.parent


class Touch:
    """Unpickling this calls Path.touch(marker): a harmless stand-in for code hidden in a checkpoint."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (self.marker,)


def test_a_checkpoint_that_would_run_code_is_refused_before_anything_in_it_runs(tmp_path):
    run_dir, marker = tmp_path / "run", tmp_path / "code_ran"
    (run_dir / "checkpoints").mkdir(parents=True)
    payload = {"state_dict": {}, "vlm_finetune": {"format_version": 1}, "x": Touch(marker)}
    torch.save(payload, run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match="names code that loading it would run"):
        load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(CheckpointError, match="names code"):  # resume=auto in that folder
        train(compose_cfg(FAST, run_dir))
    assert not marker.exists()


def _finished_run_folder(tmp_path: Path, trust_remote_code: bool) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    cfg = compose_cfg([f"model.trust_remote_code={str(trust_remote_code).lower()}"], run_dir)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    (run_dir / "metrics.json").write_text("{}")
    return run_dir


def test_remote_code_runs_only_when_the_command_line_asks(tmp_path, monkeypatch):
    from vlm_finetune import export as export_module
    from vlm_finetune.generate import answer
    from vlm_finetune.models.registry import get_family

    run_dir = _finished_run_folder(tmp_path, trust_remote_code=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    with pytest.raises(ConfigError, match="add trust_remote_code=true"):
        export_module.export(run_dir, merge=True)
    with pytest.raises(ConfigError, match="add trust_remote_code=true"):
        answer(tmp_path / "a.png", "what?", run_dir=run_dir)
    seen = []

    def build_model(model_cfg, **kwargs):
        seen.append(bool(model_cfg.trust_remote_code))
        raise RuntimeError("stop here")

    monkeypatch.setattr(get_family("glm4v"), "build_model", build_model)
    with pytest.raises(RuntimeError, match="stop here"):
        export_module.export(run_dir, merge=True, trust_remote_code=True)
    assert seen == [True]


def test_files_and_folders_follow_the_umask(tmp_path):
    from safetensors.torch import save_file

    from vlm_finetune.io import atomic_folder, save_torch_atomic, write_atomic

    old = os.umask(0o022)
    try:
        write_atomic(tmp_path / "a.txt", "x")
        save_torch_atomic({"w": torch.zeros(2)}, tmp_path / "b.pt")
        with atomic_folder(tmp_path / "folder") as tmp:
            (tmp / "c.txt").write_text("y")
            save_file({"w": torch.zeros(2)}, str(tmp / "w.safetensors"))  # safetensors makes it 0600
        modes = [(tmp_path / n).stat().st_mode & 0o777 for n in ("a.txt", "b.pt", "folder", "folder/w.safetensors")]
        assert modes == [0o644, 0o644, 0o755, 0o644]
        os.umask(0o077)
        write_atomic(tmp_path / "d.txt", "x")
        assert (tmp_path / "d.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_export_never_deletes_what_it_did_not_write(shared_run, tmp_path):
    from vlm_finetune.export import export

    run_dir = shared_run[2]["run_dir"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="did not export there"):
        export(run_dir, out=mine)
    assert (mine / "notes.txt").read_text() == "keep me"
    for out in (run_dir, run_dir.parent):
        with pytest.raises(ConfigError, match="is the run folder or holds it"):
            export(run_dir, out=out)
    assert (run_dir / "metrics.json").is_file()
    first = export(run_dir, out=tmp_path / "fresh")
    assert export(run_dir, out=first) == first  # an earlier export is replaced
    assert (first / "adapter_config.json").is_file()


@pytest.mark.slow  # three command-line starts: 12 s
def test_a_refused_start_removes_only_what_it_created(tmp_path):
    folder = tmp_path / "existing"
    (folder / ".hydra").mkdir(parents=True)
    (folder / "old.log").write_text("an earlier run's log")
    # the earlier run's record of its command, which Hydra rewrites at every start (issue 32)
    record = {"config.yaml": "model:\n  name: earlier\n", "overrides.yaml": "- trainer.max_steps=7\n"}
    for name, text in record.items():
        (folder / ".hydra" / name).write_text(text)
    (folder / "__main__.log").write_text("the earlier run's own log\n")
    result = subprocess.run([sys.executable, "-m", "vlm_finetune", f"hydra.run.dir={folder}",
                             "data.micro_batch_size=0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert (folder / "old.log").read_text() == "an earlier run's log" and (folder / ".hydra").is_dir()
    assert sorted(p.name for p in folder.iterdir()) == [".hydra", "__main__.log", "old.log"]
    assert {p.name: p.read_text() for p in (folder / ".hydra").iterdir()} == record  # no hydra.yaml added either
    assert (folder / "__main__.log").read_text() == "the earlier run's own log\n"
    fresh = tmp_path / "fresh"
    result = subprocess.run([sys.executable, "-m", "vlm_finetune", f"hydra.run.dir={fresh}",
                             "data.micro_batch_size=0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and not fresh.exists()


def test_two_runs_cannot_share_a_folder(tmp_path):
    from vlm_finetune.rundir import RunFolderLock

    lock = RunFolderLock(tmp_path / "run").acquire()
    try:
        with pytest.raises(ConfigError, match="in use by another run"):
            train(compose_cfg(FAST, tmp_path / "run"))
    finally:
        lock.release()


def test_rerunning_a_finished_run_changes_nothing(shared_run):
    cfg, metrics, objects = shared_run
    path = objects["run_dir"] / "metrics.json"
    before = path.read_bytes(), path.stat().st_mtime_ns
    again, _ = train(cfg)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before
    assert again["global_step"] == metrics["global_step"] and again["train_loss"] == pytest.approx(metrics["train_loss"])


def test_a_killed_save_leaves_nothing_for_the_next_start(tmp_path):
    run_dir = tmp_path / "run"
    leftovers = [run_dir / "checkpoints" / "last.ckpt.x1y2.tmp", run_dir / "checkpoints" / "last.ckpt.tmp" / "a"]
    for path in leftovers:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * 1000)
    with pytest.raises(DataError):  # a refused start still clears them (it held the folder's lock)
        train(compose_cfg(["data=conversations", f"data.path={tmp_path / 'missing.json'}"], run_dir))
    assert not any(p.exists() for p in leftovers) and not (run_dir / "checkpoints" / "last.ckpt.tmp").exists()


class TermAt(L.Callback):
    """Sends this process a stop signal (SIGTERM: scancel, docker stop; SIGINT: Ctrl-C) during the given
    optimizer step."""

    def __init__(self, step: int, signum: int = signal.SIGTERM):
        self.step, self.signum, self.sent = step, signum, False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if not self.sent and trainer.global_step == self.step - 1:
            self.sent = True
            os.kill(os.getpid(), self.signum)


TERM_RUN = FAST + ["trainer.max_steps=8", "eval.generate=false", "trainer.val_every_n_steps=null",
                   "trainer.log_every_n_steps=1", "checkpoint.every_n_steps=10"]


@pytest.mark.slow  # whole CLI runs: the quick suite stays within 5 minutes
def test_sigterm_and_ctrl_c_save_write_no_adapter_and_the_rerun_resumes_exactly(tmp_path, capsys):
    full_metrics, full = train(compose_cfg(TERM_RUN, tmp_path / "full"))
    expected = {n: p for n, p in full["module"].named_parameters() if p.requires_grad}
    handler_before = signal.getsignal(signal.SIGINT)
    for signum in (signal.SIGTERM, signal.SIGINT):
        part = tmp_path / f"part_{signum}"
        stopped, _ = train(compose_cfg(TERM_RUN, part), callbacks=[TermAt(3, signum)])
        assert stopped == {"preempted": 1, "global_step": 3, "stop_signal": int(signum)}
        assert load_checkpoint_file(part / "checkpoints" / "last.ckpt")["global_step"] == 3  # not a periodic one
        assert not (part / "adapter").exists() and not (part / "metrics.json").exists()  # nothing passes as final
        said = capsys.readouterr().out
        assert f"{signal.Signals(signum).name}: checkpoint saved at step 3" in said
        assert "To resume from step 3, rerun the same command" in said
        assert signal.getsignal(signal.SIGINT) is handler_before  # Ctrl-C is the caller's again
        resumed_metrics, resumed = train(compose_cfg(TERM_RUN, part))
        assert resumed_metrics["global_step"] == 8
        assert resumed_metrics["train_loss"] == pytest.approx(full_metrics["train_loss"], abs=1e-6)
        got = {n: p for n, p in resumed["module"].named_parameters() if p.requires_grad}
        assert max(float((expected[n] - got[n]).abs().max()) for n in expected) <= 1e-6


def test_ctrl_c_outside_the_steps_is_a_stop_request_not_a_keyboard_interrupt():
    """Before training (data, weights) Ctrl-C used to end in a traceback, or inside fit in Lightning's silent exit 1;
    the entry point now reports StopRequested (exit 130, what was kept, how to continue)."""
    from vlm_finetune.signals import StopRequested, stop_on_interrupt

    previous = signal.getsignal(signal.SIGINT)
    try:
        stop_on_interrupt()
        with pytest.raises(StopRequested, match="SIGINT arrived outside a training step") as caught:
            signal.raise_signal(signal.SIGINT)
        assert caught.value.signum == signal.SIGINT and not isinstance(caught.value, KeyboardInterrupt)
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.slow  # the command line; the in-process saves stay quick
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_command_line_exits_non_zero_on_sigterm_and_ctrl_c(tmp_path, signum):
    run_dir = tmp_path / "run"
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "term_probe.py").write_text(
        "import os, signal\nimport lightning as L\n\n\nclass TermAt(L.Callback):\n"
        "    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):\n"
        f"        if trainer.global_step == 1:\n            os.kill(os.getpid(), {int(signum)})\n")
    args = [sys.executable, "-m", "vlm_finetune", *TERM_RUN, f"hydra.run.dir={run_dir}",
            "+callbacks.term._target_=term_probe.TermAt"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(probe), str(ROOT)]))
    result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 128 + signum, result.stderr[-2000:]
    assert f"{signal.Signals(signum).name}: checkpoint saved at step 2" in result.stdout
    assert "To resume from step 2, rerun the same command" in result.stdout


def test_a_max_length_that_drops_every_sample_stops_before_training(tmp_path):
    with pytest.raises(DataError, match="drops all 64 training samples"):
        train(compose_cfg(FAST + ["data.max_length=8", "data.truncation=drop"], tmp_path / "run"))


def test_images_reach_the_model_as_their_pixels_intend(tmp_path):
    from vlm_finetune.data.images import load_rgb

    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "deep.png")  # a 16-bit grey PNG
    deep = np.asarray(load_rgb(tmp_path / "deep.png"), dtype=np.float64)
    assert deep.shape == (32, 32, 3) and abs(deep.mean() - 127.5) < 1.0  # not clipped to white
    assert abs(float(deep[0, 0, 0])) < 1 and float(deep[-1, -1, 0]) > 254

    # a phone photo stored sideways: 20 wide x 10 high, with EXIF orientation 6 (rotate 90 degrees to view)
    stored = Image.new("RGB", (20, 10), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 10, 10))  # red left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = load_rgb(tmp_path / "phone.jpg")
    assert upright.size == (10, 20)  # portrait as the phone showed it
    top, bottom = np.asarray(upright)[2, 5], np.asarray(upright)[17, 5]
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200  # the red half is on top once rotated

    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 0, 255), (0, 0, 4, 8))  # opaque black left half
    rgba.save(tmp_path / "alpha.png")
    flat = np.asarray(load_rgb(tmp_path / "alpha.png"))
    assert (flat[:, :4] == 0).all() and (flat[:, 4:] == 255).all()  # transparency shows the white background


@pytest.mark.slow
@pytest.mark.distributed
def test_the_validation_loss_does_not_depend_on_the_number_of_ranks(tmp_path):
    """5 validation samples on 1, 2 and 3 CPU ranks, the same weights (no training step): the same loss."""
    losses = []
    for devices in (1, 2, 3):
        run_dir = tmp_path / f"ranks{devices}"
        args = [sys.executable, "-m", "vlm_finetune", "trainer.max_steps=0", "data.num_val=5", "data.num_train=16",
                "data.micro_batch_size=2", "data.val_batch_size=2", "eval.generate=false",
                "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}", "hardware=cpu",
                f"hardware.devices={devices}", f"trainer={'single' if devices == 1 else 'ddp'}"]
        result = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert result.returncode == 0, result.stderr[-3000:]
        losses.append(json.loads((run_dir / "metrics.json").read_text())["val_loss"])
    assert losses[1] == pytest.approx(losses[0], rel=1e-6) and losses[2] == pytest.approx(losses[0], rel=1e-6)


def test_the_eval_sampler_gives_every_sample_once_over_the_ranks():
    from vlm_finetune.data.datamodule import EvalShardSampler

    for world in (1, 2, 3, 4):
        shares = [list(EvalShardSampler(5, rank, world)) for rank in range(world)]
        assert len({len(s) for s in shares}) == 1  # the same number of items on every rank
        counted = sorted(i for share in shares for i, repeated in share if not repeated)
        assert counted == [0, 1, 2, 3, 4]


def test_data_files_bom_non_utf8_folders_and_bad_jsonl_lines(tmp_path):
    from vlm_finetune.data.conversations import load_conversations

    Image.new("RGB", (16, 16)).save(tmp_path / "a.png")
    good = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>q"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps([good]).encode())
    assert len(load_conversations(tmp_path / "bom.json", tmp_path)[0]) == 1
    (tmp_path / "latin1.json").write_bytes(json.dumps([good]).encode()[:-2] + b"\xe9]")
    with pytest.raises(DataError, match="line 1 is not UTF-8"):
        load_conversations(tmp_path / "latin1.json", tmp_path)
    with pytest.raises(DataError, match="is a folder"):
        load_conversations(tmp_path, tmp_path)
    (tmp_path / "lines.jsonl").write_text(json.dumps(good) + "\n{not json\n" + json.dumps(good) + "\n")
    records, skipped = load_conversations(tmp_path / "lines.jsonl", tmp_path, on_bad_record="skip")
    assert (len(records), skipped) == (2, 1)
    with pytest.raises(DataError, match=r"record 1 \(line 2\) is not valid JSON"):
        load_conversations(tmp_path / "lines.jsonl", tmp_path)


def test_metrics_json_is_strict_json_and_the_learning_rate_is_logged(shared_run):
    run_dir = shared_run[2]["run_dir"]
    json.loads((run_dir / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    header = (run_dir / "csv" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "lr" in header


def test_a_record_found_bad_only_while_training_is_named_and_skippable(tmp_path):
    from vlm_finetune.data.conversations import ConversationDataset, load_conversations
    from vlm_finetune.data.datamodule import BAD_SAMPLE, Collator, EncodedDataset
    from vlm_finetune.models.registry import get_family

    Image.new("RGB", (64, 64), (200, 30, 30)).save(tmp_path / "good.png")
    Image.new("RGB", (2000, 4), (200, 30, 30)).save(tmp_path / "strip.png")  # decodes; the processor refuses it
    record = {"conversations": [{"from": "human", "value": "<image>colour?"}, {"from": "gpt", "value": "red"}]}
    (tmp_path / "train.json").write_text(json.dumps([dict(record, image="good.png"), dict(record, image="later.png")]))
    shutil.copy(tmp_path / "strip.png", tmp_path / "later.png")
    # issue 32: the up-front check applies the processors' own limits (it used to let this image through)
    with pytest.raises(DataError, match=r"train.json: record 1 image .*later.png is 2000x4 pixels, an aspect ratio "
                                        r"of 500:1 over the limit of 200:1"):
        load_conversations(tmp_path / "train.json", tmp_path)
    assert len(load_conversations(tmp_path / "train.json", tmp_path, on_bad_record="skip")[0]) == 1
    # an image changed on disk after the check is still named, and skippable, while training
    shutil.copy(tmp_path / "good.png", tmp_path / "later.png")
    records, skipped = load_conversations(tmp_path / "train.json", tmp_path)
    assert (len(records), skipped) == (2, 0)
    shutil.copy(tmp_path / "strip.png", tmp_path / "later.png")
    processor = get_family("glm4v").load_processor(model_settings(compose_cfg([], tmp_path).model), "truncate")
    dataset = ConversationDataset(records, str(tmp_path / "train.json"))
    with pytest.raises(DataError, match=r"train.json: record 1: image .*later.png cannot be read .*aspect ratio of "
                                        r"500:1.*on_bad_record=skip"):
        EncodedDataset(dataset, processor, 256)[1]
    lenient = EncodedDataset(dataset, processor, 256, on_bad_record="skip")
    assert lenient[1] is BAD_SAMPLE
    batch = Collator(processor)([lenient[0], lenient[1]])
    assert batch["num_bad_records"] == 1 and batch["input_ids"].shape[0] == 1
