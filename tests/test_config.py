"""Every config group option composes and resolves; bad options fail before any weight loads."""
from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import CONF_DIR, compose_cfg
from vlm_finetune.errors import ConfigError
from vlm_finetune.models.base import Mode, Part, parse_trainability
from vlm_finetune.train import check_config

GROUPS = sorted(p.name for p in Path(CONF_DIR).iterdir() if p.is_dir())


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONF_DIR) / group).glob("*.yaml"))


def test_every_group_has_options():
    expected = {"data", "experiment", "hardware", "lora", "model", "optimizer", "precision", "scheduler", "trainer"}
    assert expected <= set(GROUPS)
    assert {"tiny_glm41v", "glm41v_9b", "glm45v"} <= set(_options("model"))
    assert {"32-true", "bf16-mixed", "bf16-true", "fp16-mixed"} <= set(_options("precision"))
    assert {"single", "ddp"} <= set(_options("trainer"))
    assert {"adamw", "sgd"} <= set(_options("optimizer"))


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_option_composes_and_resolves(group, option, tmp_path):
    cfg = compose_cfg([f"{group}={option}"], tmp_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    assert resolved["output_dir"] == str(tmp_path)
    # the plain-named knobs exist whatever is chosen
    for key in ("trainer.max_steps", "data.micro_batch_size", "trainer.accumulate_grad_batches", "seed"):
        assert OmegaConf.select(cfg, key) is not None, key
    if group == "experiment":
        assert cfg.model.name in _options("model")
    else:
        # the chosen option is really what landed in the config
        name_key = {"model": "model.name", "precision": "precision.name", "optimizer": "optimizer.name",
                    "hardware": "hardware.name", "scheduler": "scheduler.name", "data": "data.source",
                    "trainer": "trainer.name"}.get(group)
        if name_key:
            assert OmegaConf.select(cfg, name_key) == option


def test_default_trainability_and_override(tmp_path):
    cfg = compose_cfg([], tmp_path)
    modes = parse_trainability(cfg.train)
    assert modes == {Part.VISION: Mode.FROZEN, Part.PROJECTOR: Mode.FULL, Part.LLM: Mode.LORA}
    cfg = compose_cfg(["train.vision=full", "train.llm=full"], tmp_path)
    assert parse_trainability(cfg.train)[Part.VISION] is Mode.FULL


@pytest.mark.parametrize("override,needle", [
    ("train.projector=lora", "train.projector=lora is not supported"),
    ("train.llm=qlora", "train.llm='qlora' is not a trainability mode"),
    ("precision=fp16-mixed", "fp16-mixed needs a GPU"),
    ("data.micro_batch_size=0", "data.micro_batch_size=0 must be a positive integer"),
    # values that would otherwise fail only once the model is built (or never)
    ("lora.r=0", "lora.r=0 must be a positive integer"),
    ("optimizer.lr=-1e-4", "optimizer.lr=-0.0001 must be a positive number"),
    ("trainer.max_steps=-1", "trainer.max_steps=-1 must be 0 or a positive"),
    ("data.truncation=trunc", "data.truncation='trunc': use truncate or drop"),
])
def test_bad_options_raise_config_error(override, needle, tmp_path):
    cfg = compose_cfg([override], tmp_path)
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
        check_config(cfg)


def test_all_frozen_is_rejected(tmp_path):
    cfg = compose_cfg(["train.vision=frozen", "train.projector=frozen", "train.llm=frozen"], tmp_path)
    with pytest.raises(ConfigError, match="nothing would train"):
        check_config(cfg)
