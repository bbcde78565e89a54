"""Bad inputs found before any weight loads, and writes that fail cleanly (issue 32): corrupt model folders,
full disks, and option values that used to fail only once the model was built."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import FAST, compose_cfg
from vlm_finetune.config import model_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.models._sharded import INDEX_FILE, check_weight_files
from vlm_finetune.models.registry import get_family
from vlm_finetune.train import train


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny GLM-4.1V checkpoint folder (model.safetensors beside config and tokenizer)."""
    cfg = compose_cfg([], tmp_path_factory.mktemp("cfg"))
    spec = model_settings(cfg.model)
    return get_family(spec.family).checkpoint_folder(spec)


def _copy(source, target):
    shutil.copytree(source, target)
    return target


def test_corrupt_model_folders_are_named_before_the_load(tiny_folder, tmp_path):
    good = _copy(tiny_folder, tmp_path / "good")
    assert check_weight_files(good) == [good / "model.safetensors"]

    garbled = _copy(tiny_folder, tmp_path / "garbled")  # a header overwritten (a bad download, a disk error)
    with open(garbled / "model.safetensors", "r+b") as handle:
        handle.seek(8)
        handle.write(b"\x00garbage{")
    with pytest.raises(ConfigError, match=r"garbled/model.safetensors is not a readable safetensors file"):
        check_weight_files(garbled)

    truncated = _copy(tiny_folder, tmp_path / "truncated")  # a copy cut short
    size = (truncated / "model.safetensors").stat().st_size
    with open(truncated / "model.safetensors", "r+b") as handle:
        handle.truncate(size - 1000)
    with pytest.raises(ConfigError, match=rf"truncated/model.safetensors is truncated: {size - 1000:,} bytes, its "
                                          rf"header describes {size:,}"):
        check_weight_files(truncated)

    sharded = _copy(tiny_folder, tmp_path / "sharded")  # an index naming a shard that is not there
    header_len = int.from_bytes((sharded / "model.safetensors").read_bytes()[:8], "little")
    keys = [k for k in json.loads((sharded / "model.safetensors").read_bytes()[8:8 + header_len]) if k != "__metadata__"]
    (sharded / "model.safetensors").rename(sharded / "model-00001-of-00002.safetensors")
    weight_map = {k: "model-00001-of-00002.safetensors" for k in keys}
    weight_map["model.extra.weight"] = "model-00002-of-00002.safetensors"
    (sharded / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    with pytest.raises(ConfigError, match=r"names 1 shard\(s\) that are not in .*: model-00002-of-00002.safetensors"):
        check_weight_files(sharded)

    # the run stops with that message before any weight loads, its folder untouched
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="is truncated"):
        train(compose_cfg(FAST + [f"model.path={truncated}"], run_dir))
    assert not (run_dir / "config.yaml").exists()


# -- full disks -------------------------------------------------------------------------------------------------
@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs: a real full disk (needs root; skipped where mounting is not allowed)."""
    import subprocess

    mount = tmp_path / "small_disk"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.decode().strip()[:100]})")
    yield mount
    subprocess.run(["umount", str(mount)], capture_output=True)


def test_every_writer_on_a_full_disk_names_the_path_and_keeps_the_previous_file(full_disk):
    import torch
    from safetensors.torch import save_file

    from vlm_finetune.errors import WriteFailed
    from vlm_finetune.io import atomic_folder, save_torch_atomic, write_atomic

    big = {"weight": torch.zeros(400_000)}  # 1.6 MB: more than the disk holds
    (full_disk / "metrics.json").write_text("{}")
    save_torch_atomic({"step": 2}, full_disk / "last.ckpt")
    with atomic_folder(full_disk / "adapter") as tmp:
        (tmp / "adapter_config.json").write_text("{}")
    writes = {  # what each library raises on a full disk differs: OSError, torch's RuntimeError, SafetensorError
        "metrics.json": lambda: write_atomic(full_disk / "metrics.json", "x" * 2_000_000),
        "last.ckpt": lambda: save_torch_atomic(big, full_disk / "last.ckpt"),
        "adapter": lambda: _save_folder(atomic_folder, save_file, big, full_disk / "adapter"),
    }
    for name, write in writes.items():
        with pytest.raises(WriteFailed, match=rf"cannot write {full_disk / name}: its disk is full or over quota "
                                              r"\(\d+\.\d MiB free there.*The previous .* is kept whole"):
            write()
    assert (full_disk / "metrics.json").read_text() == "{}"
    assert torch.load(full_disk / "last.ckpt") == {"step": 2}
    assert sorted(p.name for p in (full_disk / "adapter").iterdir()) == ["adapter_config.json"]
    assert sorted(p.name for p in full_disk.iterdir()) == ["adapter", "last.ckpt", "metrics.json"]  # no leftovers


def _save_folder(atomic_folder, save_file, tensors, folder):
    with atomic_folder(folder) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"))


def test_a_full_disk_at_a_checkpoint_stops_the_run_with_the_path_and_keeps_the_last_one(tmp_path, monkeypatch):
    """The run's own checkpoint path, with the OS's error injected at the second save (the real disk is the test
    above's)."""
    import errno

    import torch

    from vlm_finetune.checkpointing import load_checkpoint_file
    from vlm_finetune.errors import WriteFailed

    real_save, saves = torch.save, []

    def save(obj, handle, *args, **kwargs):
        saves.append(obj.get("global_step") if isinstance(obj, dict) else None)
        if len(saves) == 2:
            handle.write(b"\0" * 4096)  # part written, then the disk fills
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, handle, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run_dir = tmp_path / "run"
    with pytest.raises(WriteFailed, match=rf"cannot write {run_dir / 'checkpoints' / 'last.ckpt'}: its disk is full"):
        train(compose_cfg(FAST + ["trainer.max_steps=4", "checkpoint.every_n_steps=2", "eval.generate=false",
                                  "trainer.val_every_n_steps=null"], run_dir))
    assert saves == [2, 4]
    assert load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")["global_step"] == 2
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["last.ckpt"]  # the half-written file is gone


# -- options: checked before any weight loads, the LoRA targets on the model built on the meta device ---------------
BAD_OPTIONS = {
    "lora.dropout=1.5": r"lora.dropout=1.5 must lie in \[0, 1\)",
    "lora.targets.llm='('": r"lora.targets.llm='\(' is not a regular expression \(missing \)",
    "lora.targets.llm=nomatch_xyz": r"lora.targets.llm='nomatch_xyz' matched 0 layer\(s\) LoRA can adapt in the llm; "
                                    r"not matched: (\d+) of the part's \1 modules\. Its linear layers end in: .*q_proj",
    "lora.targets.llm=.*layers": r"matched 0 layer\(s\) LoRA can adapt in the llm and 1 module\(s\) it cannot "
                                 r"\(model.language_model.layers\)",
    "model.attn_implementation=foo": r"model.attn_implementation='foo' is not an attention implementation; use one of "
                                     r"eager, sdpa",
    "model.attn_implementation=flash_attention_2": r"model.attn_implementation=flash_attention_2 needs a CUDA GPU "
                                                   r"and the flash_attn package \((none present|not installed)\); use sdpa",
    "scheduler.warmup_steps=-1": r"scheduler.warmup_steps=-1 must be a whole number >= 0",
    "trainer.val_every_n_steps=0": r"trainer.val_every_n_steps=0 must be null or a whole number >= 1",
    "scheduler.min_lr_ratio=2": r"scheduler.min_lr_ratio=2 must be a number >= 0.0 and <= 1.0",
    "eval.max_new_tokens=0": r"eval.max_new_tokens=0 must be a whole number >= 1",
    "checkpoint.every_n_steps=0": r"checkpoint.every_n_steps=0 must be null or a whole number >= 1",
    "trainer.gradient_clip_val=-1": r"trainer.gradient_clip_val=-1 must be null or a number >= 0.0",
    "data.micro_batch_size=100": r"the training set has 64 sample\(s\): 0 micro-batch\(es\) of data.micro_batch_size=100 "
                                 r"per epoch on each of 1 rank\(s\), fewer than trainer.accumulate_grad_batches=1",
}


def test_bad_option_values_stop_before_any_weight_loads(tmp_path, monkeypatch):
    """Each used to fail only once the model was loaded, as a raw library error, or to be accepted."""
    import vlm_finetune.train as train_module

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the option was refused")

    monkeypatch.setattr(train_module, "build_trainable_model", no_build)  # the real build; the meta one stays
    import importlib.util

    import torch

    flash_here = torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None
    for index, (option, message) in enumerate(BAD_OPTIONS.items()):
        if flash_here and "flash_attention_2" in option:
            continue  # a valid option on this machine
        run_dir = tmp_path / f"run{index}"
        with pytest.raises(ConfigError, match=message):
            train(compose_cfg(FAST + [option], run_dir))
        assert not (run_dir / "config.yaml").exists()
