"""Shared fixtures: composed real configs, a tiny-model cache per test session, one small shared run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# fast settings for tiny runs in tests (the default run's recipe is longer)
FAST = ["trainer.max_steps=4", "data.num_train=64", "data.num_val=8", "data.micro_batch_size=4",
        "trainer.enable_progress_bar=false", "eval.max_new_tokens=3", "scheduler.warmup_steps=1"]


@pytest.fixture(scope="session", autouse=True)
def _asset_cache(tmp_path_factory):
    """Tiny checkpoints and tokenizers are made once per session in a private folder."""
    cache = tmp_path_factory.mktemp("vlm_cache")
    old = os.environ.get("VLM_FINETUNE_CACHE")
    os.environ["VLM_FINETUNE_CACHE"] = str(cache)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield cache
    if old is None:
        os.environ.pop("VLM_FINETUNE_CACHE", None)
    else:
        os.environ["VLM_FINETUNE_CACHE"] = old


def compose_cfg(overrides: list[str] = (), output_dir: str | Path = "/tmp/vlm_finetune_test"):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=[*overrides, f"output_dir={output_dir}"])


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """One tiny training run (4 steps) shared by the tests that inspect a finished run."""
    from vlm_finetune.train import train

    run_dir = tmp_path_factory.mktemp("shared_run")
    cfg = compose_cfg(FAST + ["trainer.log_every_n_steps=1"], run_dir)
    metrics, objects = train(cfg)
    return cfg, metrics, objects
