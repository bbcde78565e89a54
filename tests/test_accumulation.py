"""Exact loss normalisation: the same global batch split as (8 x 1), (1 x 8) or (2 x 2 on 2 ranks under DDP,
ZeRO-2 or ZeRO-3) gives the same gradients, the same SGD-trained weights and the same logged per-token loss."""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import compose_cfg, run_cli
from vlm_finetune.config import model_settings
from vlm_finetune.data.conversations import ConversationDataset, load_conversations
from vlm_finetune.data.datamodule import Collator, EncodedDataset
from vlm_finetune.loss import full_logits_cross_entropy_sum
from vlm_finetune.models.registry import get_family
from vlm_finetune.train import train

ROOT = Path(__file__).resolve().parent.parent
WORDS = "red green blue yellow circle square triangle diamond one two three four".split()
# supervised lengths from a couple of tokens to hundreds
ANSWER_WORDS = [1, 300, 3, 40, 2, 120, 10, 220]
COMMON = ["optimizer=sgd", "optimizer.lr=0.5", "scheduler=constant", "trainer.gradient_clip_val=null",
          "eval.generate=false", "trainer.enable_progress_bar=false", "trainer.log_every_n_steps=1",
          "data=conversations", "data.max_length=1024", "trainer.max_steps=3", "lora.dropout=0.0"]


@pytest.fixture(scope="module")
def varied_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("varied")
    records = []
    for i, n_words in enumerate(ANSWER_WORDS):
        Image.new("RGB", (56, 56), (30 * i, 200 - 20 * i, 90)).save(folder / f"{i}.png")
        answer = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(n_words))
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": f"<image>\nDescribe picture {i}."}, {"from": "gpt", "value": answer}]})
    (folder / "train.json").write_text(json.dumps(records))
    (folder / "val.json").write_text(json.dumps(records[:2]))
    return folder


def _overrides(data: Path, micro: int, accumulate: int, grads: Path | None = None) -> list[str]:
    snapshot = [] if grads is None else ["+callbacks.grads._target_=vlm_finetune.callbacks.GradientSnapshot",
                                         f"+callbacks.grads.path={grads}"]
    return COMMON + snapshot + [f"data.path={data / 'train.json'}", f"data.val_path={data / 'val.json'}",
                     f"data.micro_batch_size={micro}", f"trainer.accumulate_grad_batches={accumulate}"]


def _losses(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as handle:
        return [float(r["train_loss"]) for r in csv.DictReader(handle) if r.get("train_loss")]


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    tensors = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    return {k: v for k, v in tensors.items() if "lora_" in k or "modules_to_save" in k}


@pytest.fixture(scope="module")
def runs(varied_data, tmp_path_factory):
    out = {}
    for name, micro, acc, steps in (("init", 8, 1, 0), ("8x1", 8, 1, 3), ("1x8", 1, 8, 3)):
        run_dir = tmp_path_factory.mktemp(name)
        cfg = compose_cfg(_overrides(varied_data, micro, acc, run_dir / "grads.safetensors")
                          + [f"trainer.max_steps={steps}"], run_dir)
        train(cfg)
        out[name] = run_dir
    return out


def _assert_same_gradients(a: dict, b: dict, rtol=1e-5):
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        scale = a[key].abs().max().item()
        assert scale > 0 or "lora_A" in key, key  # lora_A gets no gradient at step 0 (B starts at 0)
        assert (a[key] - b[key]).abs().max().item() <= rtol * max(scale, 1e-12), key


def _assert_same_updates(a: dict, b: dict, init: dict, rtol=1e-5):
    """Trained weights agree to `rtol` of their update, up to float32 resolution of the weights."""
    assert a.keys() == b.keys() == init.keys() and len(a) > 0
    moved = 0
    for key in a:
        delta_a, delta_b = a[key] - init[key], b[key] - init[key]
        scale = delta_a.abs().max().item()
        moved += scale > 0
        resolution = 4 * torch.finfo(torch.float32).eps * a[key].abs().max().item()
        assert (delta_a - delta_b).abs().max().item() <= rtol * scale + resolution, key
    assert moved >= len(a) // 2  # most tensors did change


def test_micro_batch_split_gives_same_gradients(runs):
    _assert_same_gradients(load_file(str(runs["8x1"] / "grads.safetensors")),
                           load_file(str(runs["1x8"] / "grads.safetensors")))


def test_micro_batch_split_gives_same_trained_weights(runs):
    _assert_same_updates(_adapter(runs["8x1"]), _adapter(runs["1x8"]), _adapter(runs["init"]))


def test_logged_loss_is_the_per_token_mean_of_the_step(runs, varied_data, tmp_path):
    # at step 0 the model is the base model (LoRA B = 0): compute the step's loss directly, in one batch
    cfg = compose_cfg(_overrides(varied_data, 8, 1), tmp_path)
    family = get_family("glm4v")
    processor = family.load_processor(model_settings(cfg.model), "truncate")
    records, _ = load_conversations(varied_data / "train.json", None)
    data = EncodedDataset(ConversationDataset(records, "train.json"), processor, 1024)
    batch = Collator(processor)([data[i] for i in range(len(data))])
    model = family.build_model(model_settings(cfg.model))
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        total, count = full_logits_cross_entropy_sum(model(**{k: batch[k] for k in keys}).logits, batch["labels"])
    lengths = [int((batch["labels"][i, 1:] != -100).sum()) for i in range(8)]
    assert min(lengths) <= 4 and max(lengths) >= 250  # the spread this test is about
    expected = float(total) / count
    for name in ("8x1", "1x8"):
        first = _losses(runs[name])[0]
        assert abs(first - expected) <= 1e-5 * expected, (name, first, expected)
    # and a per-micro-batch mean would have given a different number here
    naive = sum(float(full_logits_cross_entropy_sum(model(**{k: batch[k] for k in keys}).logits[i:i + 1],
                                                    batch["labels"][i:i + 1])[0]) / lengths[i] for i in range(8)) / 8
    assert abs(naive - expected) > 1e-2
    torch.testing.assert_close(torch.tensor(_losses(runs["8x1"])), torch.tensor(_losses(runs["1x8"])), rtol=1e-5, atol=1e-6)


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("trainer,extra", [
    ("ddp", []),
    # DeepSpeed ZeRO on two CPU processes (its CPU backend, gloo); it divides by its accumulation steps
    # inside backward, and the module must undo exactly that
    ("zero2", []),
    # every parameter partitioned (none kept whole below the persistence threshold): the output head is
    # gathered for the chunked loss, the embedding and vision tower run on gathered weights
    ("zero3", ["trainer.stage3_param_persistence_threshold=0"]),
    # FSDP2 (fully_shard per decoder layer and vision block): gradients reduce-scattered, gathered whole to compare
    ("fsdp", []),
])
def test_two_ranks_match_single_process(runs, varied_data, tmp_path, trainer, extra):
    """2 ranks x 2 micro-batches x accumulation 2 give the same gradients, trained adapter and logged losses
    as one process with 8 x 1."""
    run_dir = tmp_path / trainer
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    args = _overrides(varied_data, 2, 2, run_dir / "grads.safetensors") + [
        f"trainer={trainer}", "hardware=cpu", "hardware.devices=2", f"hydra.run.dir={run_dir}", *extra]
    result = run_cli(args, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # nothing JIT-compiled: DeepSpeed's CPU backend reduces through gloo, not its shared-memory op
    assert not list(Path(os.environ["TORCH_EXTENSIONS_DIR"]).rglob("*shm_comm*"))
    _assert_same_gradients(load_file(str(run_dir / "grads.safetensors")), load_file(str(runs["8x1"] / "grads.safetensors")))
    _assert_same_updates(_adapter(run_dir), _adapter(runs["8x1"]), _adapter(runs["init"]))
    torch.testing.assert_close(torch.tensor(_losses(run_dir)), torch.tensor(_losses(runs["8x1"])), rtol=1e-5, atol=1e-6)
