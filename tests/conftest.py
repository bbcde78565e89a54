"""Shared fixtures: composed real configs, a tiny-model cache per test session, one small shared run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import vlm_finetune.config  # noqa: F401  (registers the resolvers conf/train.yaml uses)
from vlm_finetune.config import lora_settings, model_settings

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
# the tiny model of each family, found on disk (conf/model/tiny_*.yaml): the family contract runs over them
TINY_MODELS = sorted(p.stem for p in (Path(CONF_DIR) / "model").glob("tiny_*.yaml"))
# fast settings for tiny runs in tests (the default run's recipe is longer)
FAST = ["trainer.max_steps=4", "data.num_train=64", "data.num_val=8", "data.micro_batch_size=4",
        "trainer.enable_progress_bar=false", "eval.max_new_tokens=3", "scheduler.warmup_steps=1"]


@pytest.fixture(scope="session", autouse=True)
def _asset_cache(tmp_path_factory):
    """Tiny checkpoints and tokenizers are made once per session in a private folder."""
    cache = tmp_path_factory.mktemp("vlm_cache")
    old = os.environ.get("VLM_FINETUNE_CACHE")
    os.environ["VLM_FINETUNE_CACHE"] = str(cache)
    # anything JIT-compiled by a run under test goes to a folder of this session (never ~/.cache, where a
    # lock left by a killed compile would stall later runs); test_accumulation checks CPU ZeRO compiles nothing
    os.environ["TORCH_EXTENSIONS_DIR"] = str(tmp_path_factory.mktemp("torch_extensions"))
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield cache
    if old is None:
        os.environ.pop("VLM_FINETUNE_CACHE", None)
    else:
        os.environ["VLM_FINETUNE_CACHE"] = old


ROOT = Path(__file__).resolve().parent.parent


def run_cli(args: list[str], timeout: float, cwd: str | Path = ROOT, env: dict | None = None,
            module: str = "vlm_finetune") -> subprocess.CompletedProcess:
    """`python -m vlm_finetune ARGS` in a process group of its own. On a timeout the whole group is killed
    (a multi-rank run's other ranks too, which would otherwise outlive the test and load the machine), and
    the test fails with what the run printed."""
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        raise AssertionError(f"python -m {module} {' '.join(args)} did not end within {timeout:.0f} s\n"
                             f"stdout: {stdout[-2000:]}\nstderr: {stderr[-3000:]}") from None
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


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


def write_conversation_file(folder: Path, answer_words: list[int], text_only, prompt: str = "Name {i} things.",
                            colour: tuple[int, int] = (30, 20)) -> Path:
    """A train.json of one conversation per entry of `answer_words` (answers of that many words) and a val.json
    of its first two; `text_only(i)` says which have no image, the others get a 56x56 image coloured by `i`."""
    import json

    from PIL import Image

    words = "red green blue yellow circle square triangle diamond one two three four".split()
    records = []
    for i, n_words in enumerate(answer_words):
        answer = " ".join(words[(i + k) % len(words)] for k in range(n_words))
        if text_only(i):
            records.append({"conversations": [{"from": "human", "value": prompt.format(i=i)},
                                              {"from": "gpt", "value": answer}]})
            continue
        Image.new("RGB", (56, 56), (colour[0] * i, 200 - colour[1] * i, 90)).save(folder / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nDescribe picture {i}."}, {"from": "gpt", "value": answer}]})
    (folder / "train.json").write_text(json.dumps(records))
    (folder / "val.json").write_text(json.dumps(records[:2]))
    return folder


@pytest.fixture(scope="module")
def zero_init():
    """A one-rank process group and `deepspeed.zero.Init` for it (ZeRO-3 config, float32)."""
    deepspeed = pytest.importorskip("deepspeed")
    import torch.distributed as dist

    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    started = not dist.is_initialized()
    from vlm_finetune.strategies import _without_shm_comm_op

    with _without_shm_comm_op():  # no JIT-compiled shared-memory op (strategies.py says why)
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    config = {"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1}
    # no `dtype=`: DeepSpeed then takes it from the config (float32 here), as under Lightning
    yield lambda: deepspeed.zero.Init(config_dict_or_path=config)
    # zero.Init swaps torch.nn.functional.linear for its ZeRO-3 version for the rest of the process (DeepSpeed's
    # "mem_efficient_linear"; a training process keeps it): later tests in this process need torch's own
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses as patched

    if hasattr(patched, "linear_bk"):
        torch.nn.functional.linear = patched.linear_bk
    if started:
        dist.destroy_process_group()
    for key, value in saved.items():  # later tests in this process must not look launched by torchrun
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def whole_parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of a (partitioned) model, gathered and copied."""
    import deepspeed

    out = {}
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            out[name] = param.detach().clone()
    return out


def plain_and_partitioned_builds(zero_init, family, cfg, seed: int = 5):
    """The trainable model of `cfg` built ordinarily and inside zero.Init from the same seed, float32 under
    DeepSpeed: ((plain, plan), (partitioned, its plan))."""
    from vlm_finetune.models.registry import parse_trainability
    from vlm_finetune.precision import weights_policy
    from vlm_finetune.trainability import build_trainable_model

    modes, policy = parse_trainability(cfg.train), weights_policy("32-true", "deepspeed")
    torch.manual_seed(seed)
    plain = build_trainable_model(family, model_settings(cfg.model), modes, lora_settings(cfg.lora), policy, checkpointed_layers=False, checkpoint_scope="layer")
    torch.manual_seed(seed)
    with zero_init():
        partitioned = build_trainable_model(family, model_settings(cfg.model), modes, lora_settings(cfg.lora), policy, checkpointed_layers=False, checkpoint_scope="layer")
    return plain, partitioned
