"""`model.activation_checkpointing` means the same for every family and every strategy: N checkpoints exactly the
first N decoder layers (seen by counting the layers that run again in backward), and the planner predicts N."""
from __future__ import annotations

import pytest
import torch

from conftest import TINY_MODELS, compose_cfg
from vlm_finetune.config import lora_settings, model_settings
from vlm_finetune.data.shapes import ShapesDataset
from vlm_finetune.models.registry import FAMILIES, get_family, parse_trainability
from vlm_finetune.plan import plan_memory
from vlm_finetune.precision import weights_policy
from vlm_finetune.trainability import build_trainable_model, decoder_layers, unwrap

# a tiny model of every registered family (MoE and dense LLMs); each has 2 decoder layers
TINY = {name: compose_cfg([f"model={name}"]).model.family for name in TINY_MODELS}


def test_every_registered_family_has_a_tiny_model_here():
    assert set(TINY.values()) == set(FAMILIES)


def _recomputed_layers(model, family, processor, cfg) -> list[int]:
    """Indices of the decoder layers whose forward runs again during backward (checkpointed layers)."""
    layers = decoder_layers(unwrap(model), family)
    calls = [0] * len(layers)
    # the modules inside each layer: a checkpointed layer's forward (not its call, whose hooks stay outside
    # transformers' checkpoint) runs again in backward, and with it every module inside
    hooks = [child.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(layers) for child in layer.children()]
    sample = ShapesDataset("train", 1, image_size=int(cfg.data.image_size), seed=0)[0]
    batch = processor.collate([processor.encode(sample)])
    model.train()
    hidden = family.hidden_states(unwrap(model), batch)
    forward_calls = list(calls)
    hidden.float().pow(2).mean().backward()
    for hook in hooks:
        hook.remove()
    assert all(n > 0 for n in forward_calls)
    return [i for i, (before, after) in enumerate(zip(forward_calls, calls)) if after > before]


@pytest.mark.parametrize("strategy", ["single"])  # FSDP2 adds no wrapper: tests/test_fsdp.py checkpoints under it
@pytest.mark.parametrize("name", sorted(TINY))
def test_n_checkpoints_exactly_the_first_n_decoder_layers(name, strategy, tmp_path):
    family = get_family(TINY[name])
    for value, expected in [("1", [0]), ("true", [0, 1])] + ([("0", [])] if strategy == "single" else []):
        overrides = [f"model={name}", f"model.activation_checkpointing={value}", f"trainer={strategy}"]
        cfg = compose_cfg(overrides, tmp_path)
        processor = family.load_processor(model_settings(cfg.model), "truncate")
        model, _ = build_trainable_model(family, model_settings(cfg.model), parse_trainability(cfg.train), lora_settings(cfg.lora),
                                         weights_policy("32-true", strategy),
                                         checkpointed_layers=cfg.model.activation_checkpointing,
                                         checkpoint_scope="layer")
        torch.manual_seed(0)
        assert _recomputed_layers(model, family, processor, cfg) == expected, (name, strategy, value)
        planned = plan_memory([f"model={name}", f"model.activation_checkpointing={value}"])
        assert planned.checkpointed_layers == len(expected)


def test_a_number_beyond_the_decoder_layers_is_a_clear_error(tmp_path):
    from vlm_finetune.errors import ConfigError

    family = get_family("mgm")
    cfg = compose_cfg(["model=tiny_mgm_moe", "model.activation_checkpointing=3"], tmp_path)
    with pytest.raises(ConfigError, match="has 2 decoder layers"):
        build_trainable_model(family, model_settings(cfg.model), parse_trainability(cfg.train), lora_settings(cfg.lora), weights_policy("32-true"),
                              checkpointed_layers=cfg.model.activation_checkpointing,
                                         checkpoint_scope="layer")
