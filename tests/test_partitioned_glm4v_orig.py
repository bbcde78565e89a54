"""The original GLM-4V-9B built under DeepSpeed's zero.Init (ZeRO-3's partitioned construction): from its config
(its own initialisation of the towers written module by module into whole parameters) and from a released folder
(streamed one tensor at a time, the fused QKV cut per q / k / v, the keys checked strictly) it holds the weights
of an ordinary build, and LoRA added after it is that of an ordinary build. One process (world size 1, gloo)."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import compose_cfg, plain_and_partitioned_builds
from conftest import whole_parameters as _whole
from vlm_finetune.config import model_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.models._partitioned import initialised_whole
from vlm_finetune.models.glm4v_orig import checkpoint
from vlm_finetune.models.glm4v_orig.modeling import Glm4vOrigForCausalLM
from vlm_finetune.models.registry import get_family, parse_trainability
from vlm_finetune.precision import weights_policy
from vlm_finetune.trainability import builds_partitioned

GLM = get_family("glm4v_orig")


def _equal(whole: dict, reference: dict) -> None:
    assert whole.keys() == reference.keys()
    for name, value in whole.items():
        assert torch.equal(value, reference[name].detach()), name


def test_built_from_config_under_zero_init_equals_the_ordinary_build(zero_init, tmp_path):
    config = GLM.build_config(model_settings(compose_cfg(["model=tiny_glm4v"], tmp_path).model))
    torch.manual_seed(3)
    plain = dict(Glm4vOrigForCausalLM(config).named_parameters())
    torch.manual_seed(3)
    with zero_init(), initialised_whole():
        partitioned = Glm4vOrigForCausalLM(config)
    assert all(hasattr(p, "ds_id") for p in partitioned.parameters())
    whole = _whole(partitioned)
    assert float(whole["vision.patch_embedding.proj.weight"].std()) > 0  # the towers' own init reached them
    _equal(whole, plain)


def test_folder_and_lora_under_zero_init_equal_the_ordinary_load(zero_init, tmp_path):
    cfg = compose_cfg(["model=tiny_glm4v"], tmp_path)
    modes, policy = parse_trainability(cfg.train), weights_policy("32-true", "deepspeed")
    assert builds_partitioned(GLM, model_settings(cfg.model), True, modes, policy, False)
    (plain, plan), (partitioned, partitioned_plan) = plain_and_partitioned_builds(zero_init, GLM, cfg)
    assert partitioned_plan == plan
    base = [p for n, p in partitioned.named_parameters() if "lora_" not in n and not p.requires_grad]
    assert base and all(hasattr(p, "ds_id") for p in base)  # the frozen base: partitioned as it was built
    lora = [p for n, p in partitioned.named_parameters() if "lora_" in n]
    assert lora and not any(hasattr(p, "ds_id") for p in lora)  # LoRA: ordinary, the engine partitions it
    _equal(_whole(partitioned), dict(plain.named_parameters()))


def test_the_streamed_load_splits_the_fused_qkv_as_the_released_layout_holds_it(tmp_path):
    """Against the whole-state conversion (`from_released` of every tensor at once): the same module tensors."""
    folder = GLM.checkpoint_folder(model_settings(compose_cfg(["model=tiny_glm4v"], tmp_path).model))
    cfg = checkpoint.read_config(folder)
    reference = checkpoint.from_released(checkpoint.read_state(folder), cfg)
    model = checkpoint.load_folder(folder)
    state = model.state_dict()
    assert reference.keys() == state.keys()
    q = [k for k in reference if k.endswith("self_attn.q_proj.weight")]
    assert q and all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_missing_or_unknown_key_is_named_before_any_tensor_is_read(tmp_path, monkeypatch):
    folder = GLM.checkpoint_folder(model_settings(compose_cfg(["model=tiny_glm4v"], tmp_path).model))
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in folder.iterdir():
        if not path.name.endswith(".safetensors"):
            (broken / path.name).write_bytes(path.read_bytes())
    for path in folder.glob("*.safetensors"):
        state = load_file(str(path))
        state.pop("transformer.encoder.layers.1.self_attention.query_key_value.weight", None)
        if "transformer.encoder.final_layernorm.weight" in state:
            state["transformer.encoder.extra.weight"] = torch.zeros(2)
        save_file(state, str(broken / path.name), metadata={"format": "pt"})
    from vlm_finetune.models._sharded import ShardReader

    read: list[str] = []
    original = ShardReader.get
    monkeypatch.setattr(ShardReader, "get", lambda self, name: read.append(name) or original(self, name))
    with pytest.raises(ConfigError, match=r"1 missing key\(s\): transformer\.encoder\.layers\.1\.self_attention"
                                          r"\.query_key_value\.weight; 1 unexpected key\(s\): transformer\.encoder"
                                          r"\.extra\.weight"):
        checkpoint.load_folder(broken)
    assert read == []
