"""Model configs: real sizes build on the meta device with the published parameter counts; model.path loads a folder."""
from __future__ import annotations

import pytest
import torch

from conftest import compose_cfg
from vlm_finetune.config import model_settings
from vlm_finetune.errors import ConfigError
from vlm_finetune.models.registry import get_family


# GLM-4.5V is published as 106 B; the transformers model built from its config has 104.4 B
@pytest.mark.parametrize("name,billions,low,high", [("glm41v_9b", 10.34, 10.2, 10.5), ("glm45v", 104.4, 100, 110)])
def test_real_size_builds_on_meta_with_expected_size(name, billions, low, high, tmp_path):
    cfg = compose_cfg([f"model={name}", "model.activation_checkpointing=false"], tmp_path)
    model = get_family("glm4v").build_model(model_settings(cfg.model), dtype=torch.bfloat16, device="meta")
    total = sum(p.numel() for p in model.parameters())
    assert low * 1e9 < total < high * 1e9, total / 1e9
    assert all(p.device.type == "meta" for p in model.parameters())  # nothing allocated
    if name == "glm41v_9b":
        # released GLM-4.1V rotary settings are in place (without them the rotary split fails)
        assert model.config.text_config.rope_parameters["mrope_section"] == [8, 12, 12]
        names = {n for n, _ in model.named_modules()}
        assert "model.visual.merger" in names and "model.language_model.layers.39.mlp.gate_up_proj" in names


def test_model_path_loads_a_checkpoint_folder(tmp_path):
    family = get_family("glm4v")
    tiny = compose_cfg([], tmp_path)
    folder = family.checkpoint_folder(model_settings(tiny.model))  # the generated tiny checkpoint is a normal HF folder
    cfg = compose_cfg([f"model.path={folder}"], tmp_path)
    assert family.checkpoint_folder(model_settings(cfg.model)) == folder
    processor = family.load_processor(model_settings(cfg.model), "truncate")
    model = family.build_model(model_settings(cfg.model))
    assert model.config.image_token_id == processor.image_token_id
    reference = family.build_model(model_settings(tiny.model))
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), reference.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


def test_model_path_without_config_is_a_clear_error(tmp_path):
    cfg = compose_cfg([f"model.path={tmp_path}"], tmp_path)
    with pytest.raises(ConfigError, match="has no config.json"):
        get_family("glm4v").build_model(model_settings(cfg.model))
