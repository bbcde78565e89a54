"""A finished tiny run: its folder, pinned first losses, frozen weights, LoRA init, adapter round trip."""
from __future__ import annotations

import csv
import json

import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from conftest import FAST, compose_cfg
from vlm_finetune.config import lora_settings, model_settings
from vlm_finetune.data.datamodule import Collator, EncodedDataset
from vlm_finetune.data.shapes import ShapesDataset
from vlm_finetune.models.registry import get_family
from vlm_finetune.trainability import apply_trainability, plan_trainability, unwrap

# First train_loss values of the seeded run in conftest.shared_run (torch 2.13 CPU, fp32). A change in
# data, encoding, init, loss or optimisation moves them.
PINNED_FIRST_LOSSES = [6.111869812011719, 5.618814945220947, 5.116453647613525, 4.769550800323486]


def _logged_losses(run_dir):
    with open(run_dir / "csv" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    return [float(r["train_loss"]) for r in rows if r.get("train_loss")]


def _batch(processor, n=4):
    data = EncodedDataset(ShapesDataset("val", n, seed=5), processor, None)
    return Collator(processor)([data[i] for i in range(n)])


def _logits(model, batch):
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    with torch.no_grad():
        return model(**{k: batch[k] for k in keys}).logits


def test_run_folder_contents(shared_run):
    cfg, metrics, objects = shared_run
    run_dir = objects["run_dir"]
    assert (run_dir / "config.yaml").is_file() and "tiny_glm41v" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "csv" / "metrics.csv").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((run_dir / "metrics.json").read_text())
    assert saved["global_step"] == 4
    assert 0.0 <= saved["val_accuracy"] <= 1.0 and saved["train_loss"] > 0
    assert all(isinstance(v, (int, float)) for v in saved.values())  # flat
    png = run_dir / "training_curves.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    projector = load_file(str(adapter / "non_lora_trainables.safetensors"))
    assert any(k.startswith("model.visual.merger.") for k in projector)
    assert any(k.startswith("model.visual.downsample.") for k in projector)


def test_first_losses_are_pinned(shared_run):
    losses = _logged_losses(shared_run[2]["run_dir"])
    assert len(losses) == 4
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(PINNED_FIRST_LOSSES), rtol=1e-4, atol=1e-4)


def test_frozen_weights_bit_identical_after_steps(shared_run):
    cfg, _, objects = shared_run
    folder = get_family("glm4v").checkpoint_folder(model_settings(cfg.model))
    original = AutoModelForImageTextToText.from_pretrained(folder).state_dict()
    trained = unwrap(objects["module"].model)
    changed_trainable = 0
    for name, param in trained.named_parameters():
        clean = name.replace(".base_layer", "").replace(".original_module", "")
        if "lora_" in name or ".modules_to_save." in name:
            continue
        assert not param.requires_grad, name
        assert torch.equal(param.detach(), original[clean]), f"frozen {name} changed"
    for name, param in trained.named_parameters():
        if ".modules_to_save." in name:
            clean = name.replace(".modules_to_save.default", "")
            changed_trainable += int(not torch.equal(param.detach(), original[clean]))
    assert changed_trainable > 0  # the projector did train
    # frozen vision parts stayed in eval mode through training
    assert not unwrap(objects["module"].model).model.visual.blocks.training


def test_lora_at_init_gives_the_base_output(tmp_path):
    cfg = compose_cfg([], tmp_path)
    family = get_family("glm4v")
    processor = family.load_processor(model_settings(cfg.model), "truncate")
    base = family.build_model(model_settings(cfg.model))
    batch = _batch(processor)
    expected = _logits(base, batch)
    from vlm_finetune.models.base import parse_trainability

    plan = plan_trainability(family, base, parse_trainability(cfg.train), model_settings(cfg.model), lora_settings(cfg.lora))
    wrapped = apply_trainability(base, plan, lora_settings(cfg.lora))
    n_lora = sum(1 for n, _ in wrapped.named_parameters() if "lora_B" in n)
    assert n_lora == 2 * 6  # 2 layers x (q, k, v, o, gate_up, down)
    torch.testing.assert_close(_logits(wrapped, batch), expected, rtol=0, atol=0)


def test_adapter_file_has_peft_layout(shared_run):
    """The adapter we write has exactly the keys PEFT itself would write for the same model."""
    from peft import get_peft_model_state_dict

    module = shared_run[2]["module"]
    ours = load_file(str(shared_run[2]["run_dir"] / "adapter" / "adapter_model.safetensors"))
    theirs = get_peft_model_state_dict(module.model)
    assert set(ours) == set(theirs) and len(ours) == 12 * 2 + 8
    for key in ours:
        assert torch.equal(ours[key], theirs[key].cpu()), key


def test_adapter_round_trip_reproduces_outputs(shared_run):
    cfg, _, objects = shared_run
    module = objects["module"]
    family = get_family("glm4v")
    batch = _batch(objects["processor"])
    module.model.eval()
    trained = _logits(module.model, batch)
    base = AutoModelForImageTextToText.from_pretrained(family.checkpoint_folder(model_settings(cfg.model)))
    base_logits = _logits(base, batch)
    reloaded = PeftModel.from_pretrained(base, objects["run_dir"] / "adapter")
    reloaded.eval()
    torch.testing.assert_close(_logits(reloaded, batch), trained, rtol=1e-5, atol=1e-5)
    assert (trained - base_logits).abs().max() > 1e-3  # the adapter changes the model


def test_bf16_mixed_keeps_a_bf16_base_and_float32_adapters(tmp_path):
    from vlm_finetune.train import train

    cfg = compose_cfg(FAST + ["precision=bf16-mixed", "eval.generate=false", "trainer.max_steps=2"], tmp_path)
    metrics, objects = train(cfg)
    model = unwrap(objects["module"].model)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and metrics["train_loss"] > 0
    # adapters compute in bf16 under autocast instead of casting every input up to float32
    lora_layers = [m for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")]
    assert lora_layers and not any(m.cast_input_dtype_enabled for m in lora_layers)


def test_logging_interval_does_not_change_logged_losses(shared_run, tmp_path):
    """Logged train_loss at a step is that step's per-token mean, whatever log_every_n_steps is."""
    from vlm_finetune.train import train

    cfg = compose_cfg(FAST + ["trainer.log_every_n_steps=3"], tmp_path)
    train(cfg)
    every_step = _logged_losses(shared_run[2]["run_dir"])
    with open(tmp_path / "csv" / "metrics.csv") as handle:
        rows = [(int(r["step"]), float(r["train_loss"])) for r in csv.DictReader(handle) if r.get("train_loss")]
    assert [step for step, _ in rows] == [2]
    assert abs(rows[0][1] - every_step[2]) < 1e-6
