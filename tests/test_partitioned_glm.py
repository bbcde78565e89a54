"""GLM-4.1V and GLM-4.5V under DeepSpeed's zero.Init (ZeRO-3's partitioned construction): built from a config or
streamed from a released folder (per-expert tensors fused as transformers fuses them, GLM-4.5V's ignored keys
left out), the weights and the LoRA added after them equal an ordinary transformers build or
`from_pretrained`; a folder that does not match its config is refused with the key lists, before any tensor is
read. One process (world size 1, gloo): the code paths; two ranks train in tests/test_zero_cpu.py."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import compose_cfg, plain_and_partitioned_builds, whole_parameters
from vlm_finetune.config import model_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.models.glm4v import partitioned
from vlm_finetune.models.registry import get_family, parse_trainability
from vlm_finetune.precision import weights_policy
from vlm_finetune.trainability import builds_partitioned

GLM = get_family("glm4v")


def _equal(partitioned_model, reference) -> None:
    got, expected = whole_parameters(partitioned_model), dict(reference.named_parameters())
    assert got.keys() == expected.keys()
    for name, value in got.items():
        assert torch.equal(value, expected[name].detach()), name


@pytest.mark.parametrize("model", ["tiny_glm41v", "tiny_glm45v"])
def test_folder_and_lora_under_zero_init_equal_the_ordinary_load(zero_init, tmp_path, model):
    cfg = compose_cfg([f"model={model}"], tmp_path)
    modes, policy = parse_trainability(cfg.train), weights_policy("32-true", "deepspeed")
    assert builds_partitioned(GLM, model_settings(cfg.model), True, modes, policy, False)
    (plain, plan), (built, built_plan) = plain_and_partitioned_builds(zero_init, GLM, cfg)
    assert built_plan == plan
    base = [p for n, p in built.named_parameters() if "lora_" not in n and not p.requires_grad]
    assert base and all(hasattr(p, "ds_id") for p in base)  # the frozen base: partitioned as it was built
    _equal(built, plain)


def test_glm45v_built_from_config_under_zero_init_equals_the_ordinary_build(zero_init):
    from transformers import AutoModelForImageTextToText

    config = GLM.build_config(model_settings(compose_cfg(["model=tiny_glm45v"]).model))
    torch.manual_seed(3)
    plain = AutoModelForImageTextToText.from_config(config, dtype=torch.float32)
    torch.manual_seed(3)
    with zero_init():
        built = partitioned.build_from_config(config, torch.float32)
    assert all(hasattr(p, "ds_id") for p in built.parameters())
    _equal(built, plain)


def test_fused_experts_are_joined_as_transformers_joins_them(tmp_path):
    """Expert e's gate and up rows concatenated, experts stacked: what from_pretrained holds."""
    from transformers import AutoModelForImageTextToText

    folder = GLM.checkpoint_folder(model_settings(compose_cfg(["model=tiny_glm45v"]).model))
    reference = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    names = load_file(str(folder / "model.safetensors"))
    sources, lacking, unexpected = partitioned.released_sources(reference, list(names))
    assert lacking == [] and unexpected == []
    fused = [n for n in sources if n.endswith("experts.gate_up_proj")]
    assert fused and len(sources[fused[0]]) == 2 * reference.config.text_config.n_routed_experts
    state = reference.state_dict()
    for name in fused + [n.replace("gate_up_proj", "down_proj") for n in fused]:
        joined = partitioned.assemble(name, [names[s] for s in sources[name]])
        assert torch.equal(joined, state[name]), name


def _copy_folder(tmp_path, model: str):
    source = GLM.checkpoint_folder(model_settings(compose_cfg([f"model={model}"]).model))
    folder = tmp_path / model
    shutil.copytree(source, folder)
    return folder


def test_a_missing_expert_and_an_extra_key_are_named(zero_init, tmp_path):
    folder = _copy_folder(tmp_path, "tiny_glm45v")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.language_model.layers.1.mlp.experts.2.up_proj.weight"]
    state["model.language_model.layers.1.mlp.surprise.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)  # the index would name the removed key
    config = GLM.build_config(model_settings(compose_cfg([f"model.path={folder}", "model=tiny_glm45v"]).model))
    with zero_init(), pytest.raises(ConfigError) as err:
        partitioned.load_folder_partitioned(folder, config, torch.float32)
    message = str(err.value)
    assert "1 unexpected key(s): model.language_model.layers.1.mlp.surprise.weight" in message
    assert "1 missing key(s): model.language_model.layers.1.mlp.experts.2.up_proj.weight" in message


def test_the_original_glm4v_9b_code_path_is_built_whole():
    cfg = compose_cfg(["model=tiny_glm41v", "model.trust_remote_code=true"])
    modes, policy = parse_trainability(cfg.train), weights_policy("32-true", "deepspeed")
    assert not builds_partitioned(GLM, model_settings(cfg.model), True, modes, policy, False)
