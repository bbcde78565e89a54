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
