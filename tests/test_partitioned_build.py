"""Building under DeepSpeed's zero.Init (ZeRO-3's partitioned construction) gives the weights of an ordinary build:
from its config (every initialisation written into whole parameters, the same random numbers in the same order)
and from a released folder (streamed one tensor at a time, the keys checked strictly), and LoRA added after it
is the LoRA of an ordinary build. One process (world size 1, gloo): the code paths, not the memory; the memory
is measured on two ranks by scripts/load_memory.py and the split by tests/test_zero_cpu.py."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import compose_cfg, plain_and_partitioned_builds
from conftest import whole_parameters as _whole
from vlm_finetune.config import lora_settings, model_settings, strategy_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.models._sharded import ShardReader
from vlm_finetune.models.mgm import checkpoint
from vlm_finetune.models.mgm.modeling import MgmForCausalLM
from vlm_finetune.models.registry import get_family, parse_trainability
from vlm_finetune.precision import weights_policy
from vlm_finetune.trainability import build_trainable_model

MGM = get_family("mgm")


def test_built_from_config_under_zero_init_equals_the_ordinary_build(zero_init):
    config = MGM.config_from_options(model_settings(compose_cfg(["model=tiny_mgm_moe"]).model))
    torch.manual_seed(3)
    plain = dict(MgmForCausalLM(config).named_parameters())
    from vlm_finetune.models._partitioned import initialised_whole

    torch.manual_seed(3)
    with zero_init(), initialised_whole():
        partitioned = MgmForCausalLM(config)
    assert all(hasattr(p, "ds_id") for p in partitioned.parameters())
    whole = _whole(partitioned)
    assert whole.keys() == plain.keys()
    for name, value in whole.items():
        assert torch.equal(value, plain[name].detach()), name


def test_folder_and_lora_under_zero_init_equal_the_ordinary_load(zero_init, tmp_path):
    cfg = compose_cfg(["model=tiny_mgm_moe", "lora.llm_modules=attention"], tmp_path)
    (plain, plan), (partitioned, partitioned_plan) = plain_and_partitioned_builds(zero_init, MGM, cfg)
    assert partitioned_plan == plan
    base = [p for n, p in partitioned.named_parameters() if "lora_" not in n and not p.requires_grad]
    assert base and all(hasattr(p, "ds_id") for p in base)  # the frozen base: partitioned as it was built
    lora = [p for n, p in partitioned.named_parameters() if "lora_" in n]
    assert lora and not any(hasattr(p, "ds_id") for p in lora)  # LoRA: ordinary, the engine partitions it
    whole, reference = _whole(partitioned), dict(plain.named_parameters())
    assert whole.keys() == reference.keys()
    for name, value in whole.items():
        assert torch.equal(value, reference[name].detach()), name


def test_shard_reader_reads_each_tensor_as_saved(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5), "c": torch.randn(2, 2).bfloat16(),
               "d": torch.tensor([True, False]), "e": torch.zeros(0, 3)}
    save_file(tensors, str(tmp_path / "x.safetensors"))
    reader = ShardReader([tmp_path / "x.safetensors"])
    assert sorted(reader.names) == sorted(tensors)
    for name, value in tensors.items():
        got = reader.get(name)
        assert got.dtype == value.dtype and torch.equal(got, value), name


def test_a_missing_expert_is_named_before_any_tensor_is_read(tmp_path):
    config = MGM.config_from_options(model_settings(compose_cfg(["model=tiny_mgm_moe"]).model))
    folder = tmp_path / "moe"
    checkpoint.save_folder(MgmForCausalLM(config), folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError, match=r"1 missing key\(s\): model\.layers\.1\.block_sparse_moe\.experts\.2\.w3"):
        checkpoint.load_folder(folder)


def test_a_tiny_folder_first_made_inside_zero_init_holds_whole_weights(zero_init, tmp_path):
    """A run whose tiny folder is not cached yet may first ask for it while the model is built under zero.Init:
    the folder is still written from an ordinary model, never from empty partition placeholders."""
    cfg = compose_cfg(["model=tiny_mgm", f"model.cache_dir={tmp_path}"], tmp_path)
    with zero_init():
        folder = MGM.checkpoint_folder(model_settings(cfg.model))
    state = load_file(str(folder / "model.safetensors"))
    assert tuple(state["model.embed_tokens.weight"].shape) == (cfg.model.vocab_size, cfg.model.llm.hidden_size)
    assert all(t.numel() > 0 for t in state.values())


def test_under_bf16_the_parameters_made_outside_zero_init_compute_in_bf16(zero_init, tmp_path):
    """DeepSpeed's engine casts no parameter of a model built inside zero.Init: LoRA and the trainable copy of the
    fully trained projector are made bf16 at the build (as the engine makes a whole-built model's), else the
    projector's float32 weights would meet bf16 activations."""
    cfg = compose_cfg(["model=tiny_mgm", "precision=bf16-mixed"], tmp_path)
    modes, policy = parse_trainability(cfg.train), weights_policy("bf16-mixed", "deepspeed")
    with zero_init():
        model, plan = build_trainable_model(MGM, model_settings(cfg.model), modes, lora_settings(cfg.lora), policy, checkpointed_layers=False, checkpoint_scope="layer")
    made_outside = {n: p for n, p in model.named_parameters() if not hasattr(p, "ds_id")}
    assert any("lora_" in n for n in made_outside) and any("modules_to_save" in n for n in made_outside)
    assert {p.dtype for p in made_outside.values()} == {torch.bfloat16}
    assert all(p.requires_grad for p in made_outside.values())
    lora_layers = [m for m in model.modules() if hasattr(m, "_cast_input_dtype")]
    assert lora_layers and not any(m.cast_input_dtype_enabled for m in lora_layers)


def test_marking_the_moe_leaves_under_zero_init_gathers_no_parameter(zero_init, monkeypatch):
    """The ZeRO-3 leaf flags are set while the model is still inside zero.Init (VLMModule.configure_model), where
    `Module.apply` gathers each module's parameters whole before it runs: marking the MoE blocks must not gather
    the experts (MGM-8x7B: 2.6 GiB a layer on every rank, measured 1.5 GiB of extra host peak at world size 1)."""
    from deepspeed.runtime.zero.partition_parameters import Init
    from deepspeed.utils import z3_leaf_module

    from vlm_finetune.strategies import set_zero3_leaves

    config = MGM.config_from_options(model_settings(compose_cfg(["model=tiny_mgm_moe"]).model))
    gathered = []
    original = Init._all_gather

    def counted(self, param_list, *args, **kwargs):
        gathered.extend(param_list)
        return original(self, param_list, *args, **kwargs)

    with zero_init():
        model = MgmForCausalLM(config)
        monkeypatch.setattr(Init, "_all_gather", counted)
        with torch.no_grad():  # the instrument itself: a gather inside zero.Init is counted
            model.apply(lambda module: None)
        assert gathered, "the count sees no gather: it would prove nothing"
        gathered.clear()
        leaves = set_zero3_leaves(model, MGM, strategy_settings(compose_cfg(["trainer=zero3"]).trainer))
    assert leaves and gathered == []
    moe = [m for m in model.modules() if isinstance(m, tuple(leaves))]
    assert moe and all(z3_leaf_module(m) for m in moe)
