"""`trainer=fsdp` is FSDP2 (vlm_finetune/fsdp.py). In this process (a one-rank gloo group): every tiny family is
sharded per decoder layer and vision block with the root as its own unit, and the loss through the root's forward
method, its gradients and the gathered trainable weights equal the unsharded model's; 4-bit codes in uint8 storage
are refused, in bf16 storage they keep their bytes and the 4-bit model's loss and gradients. Two CPU ranks (slow): every family trains the adapter and logs the losses of one process on mixed text-only / image
micro-batches (nf4 on two ranks: tests/test_sharded_nf4.py)."""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from test_mixed_batches import mixed_data  # noqa: F401  (the fixture)

from conftest import TINY_MODELS, compose_cfg, run_cli
from vlm_finetune.config import read_settings
from vlm_finetune.data.sample import Message, Sample
from vlm_finetune.data.shapes import ShapesDataset
from vlm_finetune.fsdp import ROOT_LOSS, fsdp_units, full_tensor, full_trainable_state, root_loss, shard_model
from vlm_finetune.models.registry import get_family, parse_trainability
from vlm_finetune.module import batch_loss_sum
from vlm_finetune.precision import weights_policy
from vlm_finetune.trainability import build_trainable_model, decoder_layers


@pytest.fixture(scope="module")
def one_rank_mesh():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(30500 + os.getpid() % 1000), RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:  # the variables only for the group's start: the runs this module launches must not inherit RANK=0 etc.
        started = not dist.is_initialized()
        if started:
            dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (1,))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    yield mesh
    if started:
        dist.destroy_process_group()


def _mixed_batch(settings, family):
    processor = family.load_processor(settings.model, settings.data.truncation)
    pictured = ShapesDataset("val", 1, image_size=settings.model.image_size, seed=3)[0]
    text_only = Sample([Message("user", "Say two colours."), Message("assistant", "red blue")])
    return processor.collate([processor.encode(text_only), processor.encode(pictured)])


# two families in the quick suite (the dense GLM and the MoE MGM); the others in the slow one
@pytest.mark.parametrize("model", [m if m in ("tiny_glm41v", "tiny_mgm_moe") else pytest.param(m, marks=pytest.mark.slow)
                                   for m in TINY_MODELS])
def test_sharded_loss_gradients_and_gathered_weights_equal_the_plain_model(model, one_rank_mesh, tmp_path):
    settings = read_settings(compose_cfg([f"model={model}", "precision=32-true", "lora.dropout=0.0"], tmp_path))
    family = get_family(settings.model.family)
    torch.manual_seed(0)
    # the first decoder layer checkpointed (recomputed inside its FSDP unit in the backward), as
    # model.activation_checkpointing=1 does
    plain, _ = build_trainable_model(family, settings.model, parse_trainability(compose_cfg([], tmp_path).train),
                                     settings.lora, weights_policy("32-true"), checkpointed_layers=1,
                                     checkpoint_scope="layer")
    with torch.no_grad():  # LoRA B starts at 0: move it so that every LoRA weight gets a gradient
        for name, param in plain.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    sharded = copy.deepcopy(plain)
    batch = _mixed_batch(settings, family)
    loss = settings.loss

    units = fsdp_units(sharded, family)
    layers = decoder_layers(sharded, family)
    blocks = [m for m in sharded.modules() if isinstance(m, tuple(family.vision_block_classes))]
    assert len(units) == len(layers) + len(blocks) and layers
    assert root_loss(sharded) is None
    shard_model(sharded, family, one_rank_mesh, True, False, lambda base, b: batch_loss_sum(family, base, b, loss))
    assert callable(root_loss(sharded)) and hasattr(type(units[0]), "unshard")  # each unit an FSDPModule

    expected, expected_count = batch_loss_sum(family, plain, batch, loss)
    expected.backward()
    got, count = root_loss(sharded)(batch)
    got.backward()
    assert count == expected_count and float(got.detach()) == pytest.approx(float(expected), rel=1e-6)
    want = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    grads = {n: full_tensor(p.grad) for n, p in sharded.named_parameters() if p.requires_grad and p.grad is not None}
    assert grads.keys() == {n for n, g in want.items() if g is not None} and grads
    for name, grad in grads.items():
        scale = float(want[name].abs().max())
        assert float((grad - want[name]).abs().max()) <= 1e-5 * scale + 1e-7, name
    gathered = full_trainable_state(sharded)
    assert gathered.keys() == want.keys()
    for name, param in plain.named_parameters():
        if param.requires_grad:
            assert torch.equal(gathered[name], param.detach()), name
    assert ROOT_LOSS in vars(sharded.get_base_model() if hasattr(sharded, "get_base_model") else sharded)


def test_fsdp_on_cpu_ranks_is_accepted_and_a_bad_sharding_strategy_is_refused(tmp_path):
    from vlm_finetune.errors import ConfigError
    from vlm_finetune.fsdp import reshard_after_forward
    from vlm_finetune.hardware import resolve
    from vlm_finetune.strategies import check_combination

    for trainer in ("fsdp", "fsdp_offload"):
        settings = read_settings(compose_cfg([f"trainer={trainer}", "hardware=cpu", "hardware.devices=2"], tmp_path))
        check_combination(settings.strategy, resolve(settings.hardware), "32-true")
        assert settings.strategy.resumable and settings.strategy.offload_parameters == (trainer == "fsdp_offload")
        assert reshard_after_forward(settings.strategy) is True
    bad = read_settings(compose_cfg(["trainer=fsdp", "trainer.sharding_strategy=HYBRID_SHARD"], tmp_path))
    with pytest.raises(ConfigError, match="SHARD_GRAD_OP"):
        reshard_after_forward(bad.strategy)


# -- slow: two CPU ranks, every family --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("model", TINY_MODELS)
def test_two_rank_fsdp_trains_the_adapter_and_losses_of_one_process(model, mixed_data, tmp_path):  # noqa: F811
    """2 ranks x micro-batch 2 x accumulation 2 under FSDP2 and one process 8 x 1, 4 steps on mixed text-only /
    image micro-batches (rank 0's first text-only): the same logged losses (rtol 1e-5), the same adapter (1e-5 of
    its update), the same final validation loss (generation ran on both ranks, in step); the adapter reloads with PEFT
    and the merged export equals one process's."""
    from test_accumulation import _adapter, _assert_same_updates, _losses
    from test_mixed_batches import _overrides

    from vlm_finetune.train import train

    single = {}
    for name, steps in (("init", 0), ("8x1", 4)):
        single[name] = tmp_path / name
        train(compose_cfg(_overrides(mixed_data, 8, 1, steps, model), single[name]))
    run_dir = tmp_path / "fsdp"
    args = _overrides(mixed_data, 2, 2, 4, model) + ["trainer=fsdp", "hardware=cpu", "hardware.devices=2",
                                                     f"hydra.run.dir={run_dir}"]
    result = run_cli(args, timeout=600, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(_losses(run_dir)) == 4
    torch.testing.assert_close(torch.tensor(_losses(run_dir)), torch.tensor(_losses(single["8x1"])),
                               rtol=1e-5, atol=1e-6)
    _assert_same_updates(_adapter(run_dir), _adapter(single["8x1"]), _adapter(single["init"]))
    ranks, one = (json.loads((d / "metrics.json").read_text()) for d in (run_dir, single["8x1"]))
    assert ranks["val_loss"] == pytest.approx(one["val_loss"], rel=1e-5)
    assert "val_accuracy" in ranks and "val_accuracy" in one
    # the adapter reloads (PEFT, through the export's loader) and the merged export equals one process's
    from safetensors.torch import load_file

    from vlm_finetune.export import export, load_trained_model

    reloaded, _, _ = load_trained_model(run_dir)
    assert any("lora_A" in n for n, _ in reloaded.named_parameters())
    merged = [export(d, merge=True) for d in (run_dir, single["8x1"])]
    tensors = [{k: v for f in sorted(m.glob("*.safetensors")) for k, v in load_file(str(f)).items()} for m in merged]
    assert tensors[0].keys() == tensors[1].keys() and tensors[0]
    for key, value in tensors[1].items():
        tolerance = 1e-5 * float(value.float().abs().max()) + 1e-6
        assert float((tensors[0][key].float() - value.float()).abs().max()) <= tolerance, key


# -- 4-bit weights under FSDP -----------------------------------------------------------------------------------
def _nf4_model(tmp_path):
    settings = read_settings(compose_cfg(["model=tiny_mgm_moe", "precision=nf4", "lora.llm_modules=attention",
                                          "lora.dropout=0.0"], tmp_path))
    family = get_family(settings.model.family)
    torch.manual_seed(0)
    model, _ = build_trainable_model(family, settings.model, parse_trainability(compose_cfg([], tmp_path).train),
                                     settings.lora, weights_policy("nf4"), checkpointed_layers=False,
                                     checkpoint_scope="layer")
    return settings, family, model


def test_uint8_4bit_storage_is_refused_and_bf16_storage_keeps_the_bytes_and_the_loss(one_rank_mesh, tmp_path):
    """FSDP over 4-bit codes in uint8 storage would cast them or fail (accelerate#3983): refused, naming the fix.
    Viewed as bf16 (store_4bit_as) the bytes are unchanged, and the model sharded over one rank gives the loss and
    the LoRA gradients of the unsharded 4-bit model."""
    from vlm_finetune.errors import ConfigError
    from vlm_finetune.fsdp import FOUR_BIT_STORAGE, _four_bit_tensors, check_4bit_storage, store_4bit_as

    settings, family, model = _nf4_model(tmp_path)
    four_bit = _four_bit_tensors(model)
    assert {type(m).__name__ for m, _, _ in four_bit} >= {"Linear4bit"} and any(n.endswith("_nf4") for _, n, _ in four_bit)
    assert all(p.dtype == torch.uint8 for _, _, p in four_bit)
    with pytest.raises(ConfigError, match="quant_storage"):
        check_4bit_storage(model, None)
    with pytest.raises(ConfigError, match="quant_storage"):  # also when FSDP would cast to another dtype
        shard_model(model, family, one_rank_mesh, True, False, lambda base, b: None, param_dtype=torch.float16)
    batch = _mixed_batch(settings, family)
    loss = settings.loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, _ = batch_loss_sum(family, model, batch, loss)
    expected.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "lora_" in n}
    before = [p.detach().clone() for _, _, p in four_bit]

    _, _, sharded = _nf4_model(tmp_path)  # the same seed: the same weights and codes
    assert store_4bit_as(sharded, FOUR_BIT_STORAGE) == len(four_bit)
    for (_, _, p), original in zip(_four_bit_tensors(sharded), before):
        assert p.dtype == FOUR_BIT_STORAGE and torch.equal(p.detach().reshape(-1).view(torch.uint8), original.reshape(-1))
    check_4bit_storage(sharded, None)
    shard_model(sharded, family, one_rank_mesh, True, False, lambda base, b: batch_loss_sum(family, base, b, loss))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = root_loss(sharded)(batch)
    got.backward()
    assert float(got.detach()) == float(expected.detach())
    grads = {n: full_tensor(p.grad) for n, p in sharded.named_parameters() if p.grad is not None and "lora_" in n}
    assert grads.keys() == want.keys() and want
    assert all(torch.equal(grads[n], want[n]) for n in want)
