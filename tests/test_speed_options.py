"""Step options that trade memory for time compute the same step: selective checkpointing (only the MLP of the
chosen decoder layers recomputed) and activation offloading give the loss and gradients of the run without
them (fp32, 1e-6), and selective checkpointing recomputes the MLP and nothing else."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from vlm_finetune.config import lora_settings, model_settings, read_settings
from vlm_finetune.data.shapes import ShapesDataset
from vlm_finetune.models.registry import get_family, parse_trainability
from vlm_finetune.module import batch_loss_sum
from vlm_finetune.precision import weights_policy
from vlm_finetune.trainability import build_trainable_model, decoder_layers, unwrap


def _step(name: str, tmp_path, layers, scope: str = "layer", offload: bool = False, hooks=None, on_forward=None):
    cfg = compose_cfg([f"model={name}"], tmp_path)
    family = get_family(cfg.model.family)
    processor = family.load_processor(model_settings(cfg.model), "truncate")
    torch.manual_seed(0)
    model, _ = build_trainable_model(family, model_settings(cfg.model), parse_trainability(cfg.train), lora_settings(cfg.lora),
                                     weights_policy("32-true"), checkpointed_layers=layers, checkpoint_scope=scope)
    if hooks is not None:
        hooks(model, family)
    samples = [ShapesDataset("train", 2, image_size=int(cfg.data.image_size), seed=3)[i] for i in range(2)]
    batch = processor.collate([processor.encode(s) for s in samples])
    model.train()
    saving = torch.autograd.graph.save_on_cpu(pin_memory=False) if offload else torch.enable_grad()
    with saving:
        loss_sum, count = batch_loss_sum(family, model, batch, read_settings(cfg).loss)
    if on_forward is not None:
        on_forward()
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return float(loss_sum), grads


def _assert_same(reference, other):
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert loss_b == pytest.approx(loss_a, abs=1e-6)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 4
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["tiny_glm41v", "tiny_mgm_moe"])
def test_selective_checkpointing_gives_the_same_loss_and_gradients_and_recomputes_only_the_mlp(name, tmp_path):
    calls = {"mlp": 0, "attention": 0}

    def count(model, family):
        # the modules inside the first layer's MLP and attention (a recompute calls the MLP's forward, whose
        # own hooks stay outside the checkpoint, and with it every module inside)
        layer = decoder_layers(unwrap(model), family)[0]
        for part, module in (("mlp", layer.mlp), ("attention", layer.self_attn)):
            for child in module.children():
                child.register_forward_pre_hook(lambda *_, part=part: calls.__setitem__(part, calls[part] + 1))

    reference = _step(name, tmp_path, 0)
    forward_only = {}
    selective = _step(name, tmp_path, True, scope="mlp", hooks=count, on_forward=lambda: forward_only.update(calls))
    _assert_same(reference, selective)
    # in backward the first layer's MLP ran again, its attention did not: attention outputs were kept
    assert forward_only["mlp"] > 0 and calls["mlp"] == 2 * forward_only["mlp"]
    assert calls["attention"] == forward_only["attention"] > 0


def test_activation_offloading_gives_the_same_loss_and_gradients(tmp_path):
    _assert_same(_step("tiny_glm41v", tmp_path, 0), _step("tiny_glm41v", tmp_path, 0, offload=True))


@pytest.mark.slow
def test_regional_compile_gives_the_same_loss_and_gradients(tmp_path):
    from torch._dynamo.utils import counters

    from vlm_finetune.trainability import compile_regions

    counters.clear()
    compiled = []
    reference = _step("tiny_glm41v", tmp_path, 0)
    other = _step("tiny_glm41v", tmp_path, 0, hooks=lambda model, family: compiled.append(compile_regions(model, family)))
    assert compiled == [4]  # 2 decoder layers + 2 vision blocks
    assert counters["frames"]["ok"] > 0  # dynamo really compiled frames (no silent eager fallback)
    (loss_a, grads_a), (loss_b, grads_b) = reference, other
    assert loss_b == pytest.approx(loss_a, abs=1e-4)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-4)


def test_attention_backends_are_checked_and_the_math_kernel_gives_the_same_step(tmp_path):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vlm_finetune.errors import ConfigError
    from vlm_finetune.settings import attention_backends
    from vlm_finetune.train import check_config

    assert attention_backends(["cudnn", "flash"]) == (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION)
    with pytest.raises(ConfigError, match="'flash2' is not an SDPA backend"):
        check_config(compose_cfg(["speed.attention_backends=[flash2]"], tmp_path))
    (loss_a, grads_a) = _step("tiny_glm41v", tmp_path, 0)
    with sdpa_kernel([SDPBackend.MATH]):  # another kernel: the same step up to float32 rounding
        (loss_b, grads_b) = _step("tiny_glm41v", tmp_path, 0)
    assert loss_b == pytest.approx(loss_a, rel=1e-6)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-6)


def test_a_run_with_offloading_and_chosen_kernels_logs_the_losses_of_a_run_without(shared_run, tmp_path):
    import csv

    from conftest import FAST
    from vlm_finetune.train import train

    def losses(run_dir):
        with open(run_dir / "csv" / "metrics.csv") as handle:
            return [float(r["train_loss"]) for r in csv.DictReader(handle) if r.get("train_loss")]

    overrides = FAST + ["trainer.log_every_n_steps=1", "speed.offload_activations=true",
                        "speed.attention_backends=[math]", "model.activation_checkpointing=true",
                        "speed.checkpoint_scope=mlp"]
    train(compose_cfg(overrides, tmp_path / "run"))
    reference = losses(shared_run[2]["run_dir"])
    assert len(reference) == 4
    torch.testing.assert_close(torch.tensor(losses(tmp_path / "run")), torch.tensor(reference), rtol=1e-5, atol=1e-5)
