"""The MGM family: patch info mining against its equations, the released checkpoint layout, templates,
image preprocessing, frozen towers, MoE LoRA scopes and strategy declarations."""
from __future__ import annotations

import json
import math
import resource
import warnings

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from conftest import FAST, compose_cfg
from vlm_finetune.config import lora_settings, model_settings, read_settings
from vlm_finetune.data.sample import Message, Sample
from vlm_finetune.errors import ConfigError
from vlm_finetune.models.mgm import checkpoint, config_file
from vlm_finetune.models.mgm.modeling import IMAGE_TOKEN_INDEX, MgmForCausalLM
from vlm_finetune.models.mgm.processor import MgmImages
from vlm_finetune.models.mgm.templates import get_template
from vlm_finetune.models.registry import get_family

MGM = get_family("mgm")


def _config(model: str = "tiny_mgm", overrides: list[str] = ()):
    cfg = compose_cfg([f"model={model}", *overrides])
    return cfg, MGM.config_from_options(model_settings(cfg.model))


def _model(model: str = "tiny_mgm", overrides: list[str] = (), seed: int = 0) -> MgmForCausalLM:
    _, config = _config(model, overrides)
    torch.manual_seed(seed)
    built = MgmForCausalLM(config).eval()
    # non-trivial mining projectors (LayerNorm affine included) so the equations are really exercised
    with torch.no_grad():
        for name, p in built.named_parameters():
            if "vlm_uni" in name:
                p.normal_(1.0 if p.ndim == 1 and ".0." in name else 0.0, 0.2)
    return built


def _loop_mining(model: MgmForCausalLM, low: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
    """Patch info mining written out token by token: each CLIP token i,j attends over the s x s block of the
    high-res map below it (rows i*s..i*s+s-1, columns j*s..j*s+s-1)."""
    m = model.model
    n, tokens, c = low.shape
    p = math.isqrt(tokens)
    s = aux.shape[-1] // p
    out = torch.empty_like(low)
    for b in range(n):
        for i in range(p):
            for j in range(p):
                x_l = low[b, i * p + j]
                q = m.vlm_uni_query_projector(x_l)
                block = aux[b, :, i * s:(i + 1) * s, j * s:(j + 1) * s]  # [Ca, s, s]
                cells = block.permute(1, 2, 0).reshape(s * s, -1)  # row-major cells
                k = m.vlm_uni_aux_projector(cells)
                v = m.vlm_uni_val_projector(cells)
                weights = torch.softmax(k @ q / math.sqrt(c), dim=0)
                out[b, i * p + j] = x_l + (weights[:, None] * v).sum(0)
    return out


def _images(model: MgmForCausalLM, n: int = 2, seed: int = 1):
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    clip = cfg.vision_config.image_size
    images = torch.randn(n, cfg.views_per_image, 3, clip, clip, generator=g)
    aux = torch.randn(n, 3, cfg.image_size_aux, cfg.image_size_aux, generator=g)
    return images, aux


def test_patch_info_mining_matches_its_equations():
    model = _model()
    images, aux_images = _images(model)
    with torch.no_grad():
        low = model.model.vision_tower(images.flatten(0, 1))
        aux = model.model.vision_tower_aux(images_aux := aux_images)
        assert aux.shape[1] == sum(model.config.aux["dims"])
        assert aux.shape[-1] == model.config.image_size_aux // 4
        got = model.vision_features(images, images_aux)
        want = _loop_mining(model, low, aux)
    assert got.shape == (2, model.config.image_tokens, model.config.mm_hidden_size)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()
    assert (got - low).abs().max() > 1e-2  # the mined part is not negligible


def test_patch_info_mining_hd_mode_global_first_then_crops():
    model = _model(overrides=["model.image_grid=2", "model.image_global=true", "model.image_size_aux=128"])
    cfg = model.config
    assert cfg.views_per_image == 5 and cfg.image_tokens == 5 * 16
    images, aux_images = _images(model)
    with torch.no_grad():
        got = model.vision_features(images, aux_images)
        aux = model.model.vision_tower_aux(aux_images)  # [n, Ca, 32, 32]
        half = aux.shape[-1] // 2
        crops = [aux[:, :, r * half:(r + 1) * half, c * half:(c + 1) * half] for r in range(2) for c in range(2)]
        small = torch.nn.functional.interpolate(aux, scale_factor=0.5, mode="bilinear", align_corners=False)
        low = [model.model.vision_tower(images[:, v]) for v in range(5)]
        want = torch.cat([_loop_mining(model, low[4], small)] + [_loop_mining(model, low[k], crops[k]) for k in range(4)],
                         dim=1)
    assert got.shape == want.shape == (2, 80, cfg.mm_hidden_size)
    assert torch.allclose(got, want, atol=1e-5, rtol=0), (got - want).abs().max()


@pytest.mark.parametrize("hd", [False, True])
def test_zeroed_mining_gives_the_clip_features(hd):
    overrides = ["model.image_grid=2", "model.image_global=true", "model.image_size_aux=128"] if hd else []
    model = _model(overrides=overrides)
    with torch.no_grad():
        model.model.vlm_uni_val_projector[1].weight.zero_()
        model.model.vlm_uni_val_projector[1].bias.zero_()
        images, aux = _images(model)
        got = model.vision_features(images, aux)
        # CLIP features straight from transformers: hidden_states[-2] without the CLS token
        clip = model.model.vision_tower.vision_tower.vision_model
        ref = [clip(images[:, v], output_hidden_states=True).hidden_states[-2][:, 1:] for v in range(images.shape[1])]
    if hd:  # global view first, then the crops
        ref = [ref[4]] + ref[:4]
    assert torch.allclose(got, torch.cat(ref, dim=1), atol=1e-6)


@pytest.mark.parametrize("name", ["tiny_mgm", "tiny_mgm_moe"])
def test_released_layout_round_trip_is_exact(name, tmp_path):
    model = _model(name, seed=3)
    folder = tmp_path / "MGM-tiny"
    checkpoint.save_folder(model, folder, max_shard_bytes=1_000_000)  # several shards + index, as released
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1
    for key in ("model.mm_projector.0.weight", "model.mm_projector.2.weight", "model.vlm_uni_query_projector.1.weight",
                "model.vlm_uni_aux_projector.0.weight", "model.vlm_uni_val_projector.1.bias",
                "model.vision_tower.vision_tower.vision_model.embeddings.patch_embedding.weight",
                "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
                "model.vision_tower_aux.vision_stem.0.weight", "model.vision_tower_aux.vision_stages.1.downsample.1.weight",
                "model.vision_tower_aux.vision_stages.0.blocks.0.conv_dw.weight",
                "model.vision_tower_aux.vision_stages.0.blocks.0.gamma", "model.embed_tokens.weight"):
        assert key in index, key
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == ("mgm_mixtral" if name.endswith("moe") else "mgm_gemma")
    assert config["mm_hidden_size_aux"] == sum(model.config.aux["dims"])
    assert config["mm_projector_type"] == "mlp2x_gelu" and config["mm_vision_select_layer"] == -2
    if name.endswith("moe"):
        assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in index
        assert "model.layers.0.block_sparse_moe.gate.weight" in index
        assert not any("gate_up_proj" in k for k in index)
    else:
        assert "lm_head.weight" not in index  # Gemma ties the head to the embeddings
    loaded = checkpoint.load_folder(folder).eval()
    ids = torch.randint(0, 300, (2, 40))
    ids[:, 3:3 + model.config.image_tokens] = IMAGE_TOKEN_INDEX
    images, aux = _images(model)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        assert torch.equal(model(ids, mask, images, aux), loaded(ids, mask, images, aux))


def test_missing_or_unexpected_key_is_a_clear_error(tmp_path):
    model = _model(seed=4)
    folder = tmp_path / "broken"
    checkpoint.save_folder(model, folder)
    state = load_file(str(folder / "model.safetensors"))
    del state["model.vlm_uni_val_projector.1.weight"]
    state["model.vision_resampler.weight"] = torch.zeros(2)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ConfigError) as err:
        checkpoint.load_folder(folder)
    text = str(err.value)
    assert "1 missing key(s): model.vlm_uni_val_projector.1.weight" in text
    assert "1 unexpected key(s): model.vision_resampler.weight" in text


def test_a_config_that_is_not_mgm_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ConfigError, match="not an MGM model"):
        config_file.read_config(tmp_path)


def test_mgm_8x7b_on_the_meta_device_counts_47b_without_memory():
    _, config = _config("mgm_8x7b")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.device("meta"):
        model = MgmForCausalLM(config)
    count = sum(p.numel() for p in model.parameters())
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert all(p.is_meta for p in model.parameters())
    assert 46.5e9 < count < 47.5e9, count  # Mixtral-8x7B 46.7 B + CLIP-L 0.30 B + ConvNeXt-L 0.2 B + connectors
    assert grown_mib < 500, grown_mib  # 94 GB in bf16 were never allocated
    assert config.image_tokens == 576 and config.template == "mistral_instruct"
    hd = _config("mgm_8x7b_hd")[1]
    assert hd.image_tokens == 2880 and hd.image_size_aux == 1536


def test_real_size_connector_sizes_match_the_released_models():
    _, config = _config("mgm_2b")
    with torch.device("meta"):
        model = MgmForCausalLM(config)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    mining = sum(n(getattr(model.model, f"vlm_uni_{k}_projector")) for k in ("query", "aux", "val"))
    assert mining == 6_963_456
    assert n(model.model.mm_projector) == 6_295_552  # mlp2x_gelu, 1024 -> 2048 -> 2048
    assert config.mm_hidden_size_aux == 2880


# -- templates and data --------------------------------------------------------------------------
QA = [Message("user", "<image>What color are the shapes?"), Message("assistant", "red")]


@pytest.mark.parametrize("name,expected", [
    ("gemma", "<start_of_turn>user\n<image>\nWhat color are the shapes?<end_of_turn>\n<start_of_turn>model\n"
              "|red<end_of_turn>\n<eos>"),
    ("vicuna_v1", "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                  "detailed, and polite answers to the user's questions. USER: <image>\nWhat color are the shapes? "
                  "ASSISTANT:| red</s>"),
    ("mistral_instruct", "[INST] <image>\nWhat color are the shapes? [/INST]| red </s>"),
    ("chatml_direct", "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat color are "
                      "the shapes?<|im_end|><|im_start|>assistant\n|red<|im_end|>"),
    ("llama_3", "<|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision assistant. You "
                "are able to understand the visual content that the user provides, and assist the user with a variety "
                "of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\nWhat "
                "color are the shapes?<|eot_id|><|start_header_id|>system<|end_header_id|>\n\n|red<|eot_id|>"),
    ("plain", "<image>|red\n"),
])
def test_templates_render_mgm_prompts(name, expected):
    segments = get_template(name).render(QA)
    prompt = "".join(t for t, sup in segments if not sup)
    answer = "".join(t for t, sup in segments if sup)
    assert f"{prompt}|{answer}" == expected
    assert get_template(name).render(QA[:1], for_generation=True) == [s for s in segments if not s[1]]


def test_processor_supervises_only_the_answer_and_expands_images(tmp_path):
    cfg = compose_cfg(["model=tiny_mgm"], tmp_path)
    processor = MGM.load_processor(model_settings(cfg.model), "truncate")
    image = Image.new("RGB", (112, 80), (255, 0, 0))
    enc = processor.encode(Sample(QA, [image]))
    ids, labels = enc.input_ids.tolist(), enc.labels.tolist()
    assert ids[0] == processor.tokenizer.bos_token_id
    assert ids.count(IMAGE_TOKEN_INDEX) == processor.tokens_per_image == 16
    supervised = [i for i, lab in zip(ids, labels) if lab != -100]
    assert processor.tokenizer.decode(supervised) == "red<end_of_turn>\n<eos>"
    assert enc.num_supervised_tokens == len(supervised)
    prompt = processor.encode(Sample(QA, [image]), for_generation=True).input_ids.tolist()
    assert ids[:len(prompt)] == prompt  # the generation prompt is token for token the training prompt
    assert enc.image_inputs["images"].shape == (1, 1, 3, 112, 112)
    assert enc.image_inputs["images_aux"].shape == (1, 3, 64, 64)


def test_images_pad_with_the_mean_colour_and_downsample():
    prep = MgmImages(image_size_aux=64, clip_size=16, image_grid=2, image_global=True)
    wide = Image.new("RGB", (64, 32), (10, 200, 30))
    crops, aux = prep(wide)
    # top and bottom bands are padding in the mean colour: normalised to ~0
    assert aux[:, :10].abs().max() < 0.02 and aux[:, -10:].abs().max() < 0.02
    assert (aux[:, 28:36] - aux[:, 32:33]).abs().max() < 1e-5  # the image itself, one colour
    low = torch.nn.functional.interpolate(aux[None], size=(32, 32), mode="bilinear", align_corners=False)[0]
    assert crops.shape == (5, 3, 16, 16)
    assert torch.equal(crops[1], low[:, :16, 16:])  # row-major: crop 1 is top right
    assert torch.equal(crops[2], low[:, 16:, :16])
    glob = torch.nn.functional.interpolate(low[None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    assert torch.equal(crops[4], glob)


# -- training behaviour ------------------------------------------------------------------------------
def _plan(name: str, overrides: list[str] = ()):
    from vlm_finetune.models.base import parse_trainability
    from vlm_finetune.trainability import apply_trainability, plan_trainability

    cfg = compose_cfg([f"model={name}", *overrides])
    model = MGM.build_model(model_settings(cfg.model))
    plan = plan_trainability(MGM, model, parse_trainability(cfg.train), model_settings(cfg.model), lora_settings(cfg.lora))
    return cfg, apply_trainability(model, plan, lora_settings(cfg.lora)), plan


def test_frozen_towers_stay_in_eval_mode_without_grad():
    from vlm_finetune.module import VLMModule

    cfg, model, plan = _plan("tiny_mgm", ["model.vision_aux.depths=[2,2,2,2]"])
    base = model.get_base_model()
    module = VLMModule(model, MGM, None, plan, lambda groups: torch.optim.AdamW(groups),
                       read_settings(cfg).optimizer, None, read_settings(cfg).loss,
                       read_settings(cfg).eval)
    module.train()
    aux = base.model.vision_tower_aux
    assert not aux.training and not base.model.vision_tower.training
    assert aux.vision_stages[0].blocks[1].drop_path > 0  # drop-path is configured, and off because of eval mode
    assert not any(p.requires_grad for p in aux.parameters())
    mining = dict(base.model.vlm_uni_aux_projector.named_parameters())
    assert mining and all(p.requires_grad for n, p in mining.items() if "modules_to_save" in n)  # PEFT's trained copy
    images, aux_images = _images(base)
    first, second = base.vision_features(images, aux_images), base.vision_features(images, aux_images)
    assert torch.equal(first, second)  # no stochastic depth in a frozen tower
    first.sum().backward()
    grads = [p.grad for n, p in base.model.vlm_uni_query_projector.named_parameters() if "modules_to_save" in n]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("scope,attention,experts", [("attention", True, False), ("experts", False, True),
                                                     ("all", True, True)])
def test_moe_lora_scopes(scope, attention, experts):
    _, model, plan = _plan("tiny_mgm_moe", [f"lora.llm_modules={scope}"])
    names = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert any("self_attn" in n for n in names) == attention
    assert any("experts" in n for n in names) == experts
    assert not any("vision_tower" in n for n in names)


def test_strategies_see_the_moe_block_as_a_leaf_and_the_decoder_layer_as_a_unit():
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralSparseMoeBlock

    assert MixtralSparseMoeBlock in MGM.zero3_leaf_classes
    assert MixtralDecoderLayer in MGM.decoder_layer_classes
    model = MGM.build_model(model_settings(compose_cfg(["model=tiny_mgm_moe"]).model))
    assert any(isinstance(m, MixtralSparseMoeBlock) for m in model.modules())


@pytest.mark.slow  # 2 x 10 s; the quick suite keeps the family contract (pinned losses, adapter reload)
@pytest.mark.parametrize("name", ["tiny_mgm", "tiny_mgm_moe"])
def test_tiny_mgm_trains_and_the_adapter_reloads(name, tmp_path):
    from peft import PeftModel

    from vlm_finetune.train import train

    metrics, objects = train(compose_cfg([f"model={name}", *FAST, "trainer.max_steps=6", "trainer.log_every_n_steps=1"],
                                         tmp_path))
    assert metrics["global_step"] == 6 and math.isfinite(metrics["val_loss"])
    adapter = objects["run_dir"] / "adapter"
    assert (adapter / "adapter_config.json").is_file() and (adapter / "adapter_model.safetensors").is_file()
    cfg = compose_cfg([f"model={name}"], tmp_path)
    reloaded = PeftModel.from_pretrained(MGM.build_model(model_settings(cfg.model)), str(adapter)).eval()
    trained = objects["module"].model.eval()
    batch = next(iter(objects["datamodule"].val_dataloader()))
    keys = ("input_ids", "attention_mask", "images", "images_aux")
    with torch.no_grad():
        a = trained.get_base_model()(**{k: batch[k] for k in keys})
        b = reloaded.get_base_model()(**{k: batch[k] for k in keys})
    assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny_mgm", "tiny_mgm_moe"])
def test_merged_export_is_a_released_layout_mgm_folder(name, tmp_path):
    from vlm_finetune.export import export, load_trained_model
    from vlm_finetune.train import train

    metrics, objects = train(compose_cfg([f"model={name}", *FAST, "trainer.max_steps=3", "eval.generate=false"],
                                         tmp_path / "run"))
    out = export(objects["run_dir"], merge=True, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == ("mgm_mixtral" if name.endswith("moe") else "mgm_gemma")
    assert (out / "tokenizer.json").is_file() and (out / "preprocessor_config.json").is_file()
    merged = checkpoint.load_folder(out).eval()
    with_adapter, _, _ = load_trained_model(objects["run_dir"])
    batch = next(iter(objects["datamodule"].val_dataloader()))
    keys = ("input_ids", "attention_mask", "images", "images_aux")
    with torch.no_grad():
        want = with_adapter.get_base_model()(**{k: batch[k] for k in keys})
        got = merged(**{k: batch[k] for k in keys})
    assert ((got - want).abs().max() / want.abs().max()) < 1e-4
    # LoRA really changed the weights that were merged
    base = MGM.build_model(model_settings(compose_cfg([f"model={name}"]).model)).eval()
    with torch.no_grad():
        assert (base(**{k: batch[k] for k in keys}) - got).abs().max() > 1e-4


def test_trains_on_an_mgm_json_file_with_text_only_and_multi_image_records(tmp_path):
    from vlm_finetune.train import train

    for i, colour in enumerate([(255, 0, 0), (0, 0, 255), (0, 200, 0)]):
        Image.new("RGB", (90 + 10 * i, 60), colour).save(tmp_path / f"img{i}.png")
    records = [
        {"image": "img0.png", "conversations": [{"from": "human", "value": "What color is it?\n<image>"},
                                                {"from": "gpt", "value": "red"}]},
        {"image": ["img1.png", "img2.png"], "conversations": [
            {"from": "human", "value": "<image> and <image>: which colors?"}, {"from": "gpt", "value": "blue and green"},
            {"from": "human", "value": "And the first one?"}, {"from": "gpt", "value": "blue"}]},
        {"conversations": [{"from": "human", "value": "Say yes."}, {"from": "gpt", "value": "yes"}]},
    ] * 4
    (tmp_path / "train.json").write_text(json.dumps(records))
    cfg = compose_cfg(["model=tiny_mgm", "data=conversations", f"data.path={tmp_path / 'train.json'}",
                       "data.micro_batch_size=3", "data.val_fraction=0.25", "trainer.max_steps=3",
                       "trainer.enable_progress_bar=false", "eval.max_new_tokens=3", "scheduler.warmup_steps=1"],
                      tmp_path / "run")
    metrics, objects = train(cfg)
    assert metrics["global_step"] == 3 and math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["train_loss"])
    processor = objects["processor"]
    dm = objects["datamodule"]
    two = next(s for s in list(dm.train_samples) + list(dm.val_samples) if len(s.images) == 2)
    enc = processor.encode(two)
    assert enc.input_ids.tolist().count(IMAGE_TOKEN_INDEX) == 2 * processor.tokens_per_image
    assert enc.image_inputs["images_aux"].shape[0] == 2
    text_only = next(s for s in list(dm.train_samples) + list(dm.val_samples) if not s.images)
    assert processor.encode(text_only).image_inputs == {}


@pytest.mark.parametrize("trainer", ["fsdp", "zero3", "zero3_offload", "zero2", "ddp"])
def test_mgm_strategies_build_for_gpu_profiles(trainer, tmp_path):
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer
    from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer, MixtralSparseMoeBlock

    from vlm_finetune.hardware import resolve
    from vlm_finetune.models.mgm.modeling import ConvNeXtBlock
    from vlm_finetune.strategies import ZeroSizes, build_strategy

    cfg = compose_cfg(["model=mgm_8x7b", f"trainer={trainer}", "hardware=6x4090", "precision=bf16-mixed",
                       "data.micro_batch_size=1"], tmp_path)
    settings = read_settings(cfg)
    strategy = build_strategy(settings.strategy, settings.precision, settings.data.micro_batch_size, MGM,
                              resolve(settings.hardware), ZeroSizes(1000, 1000))
    if trainer == "fsdp":  # FSDP2: fsdp.shard_model makes each of the family's blocks a unit
        assert isinstance(strategy, ModelParallelStrategy)
        wrapped = set(MGM.decoder_layer_classes) | set(MGM.vision_block_classes)
        # the decoder layer is the unit: the MoE block inside it is never split into its own unit
        assert {MixtralDecoderLayer, CLIPEncoderLayer, ConvNeXtBlock} <= wrapped
        assert MixtralSparseMoeBlock not in wrapped
    elif trainer == "ddp":
        assert isinstance(strategy, DDPStrategy)
    else:
        assert isinstance(strategy, DeepSpeedStrategy)
        assert strategy.config["zero_optimization"]["stage"] == int(trainer[4])


# -- memory planner -------------------------------------------------------------------------------
def test_planner_bytes_are_exact_for_tiny_mgm_moe(tmp_path):
    from vlm_finetune.models.base import parse_trainability
    from vlm_finetune.plan import plan_memory
    from vlm_finetune.trainability import apply_trainability, plan_trainability

    plan = plan_memory(["model=tiny_mgm_moe"])
    cfg = compose_cfg(["model=tiny_mgm_moe"], tmp_path)
    model = MGM.build_model(model_settings(cfg.model))
    model = apply_trainability(model, plan_trainability(MGM, model, parse_trainability(cfg.train), model_settings(cfg.model), lora_settings(cfg.lora)),
                               lora_settings(cfg.lora))
    seen, params = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            params += p.numel() * p.element_size()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert plan.total("parameters") == params
    assert plan.total("gradients") == sum(p.numel() * 4 for p in trainable)
    assert plan.total("optimizer") == 2 * plan.total("gradients")
    mining = next(r for r in plan.rows if r.item.startswith("vision-to-LLM modules"))
    # 16 CLIP tokens x 16 aux cells x (3 x 120 + 2 x 64) elements per image, 32 images, float32
    assert mining.bytes == 16 * 16 * (3 * 120 + 2 * 64) * 32 * 4


@pytest.mark.slow
def test_planner_mgm_8x7b_on_six_4090s_gives_a_verdict_and_a_fitting_suggestion(capsys):
    from vlm_finetune import plan as planner
    from vlm_finetune.plan import main
    from vlm_finetune.plan import plan_with_suggestions as plan_memory

    # the float32 base and 32 samples per micro-batch that were the defaults before precision and micro-batch auto
    overrides = ["model=mgm_8x7b", "trainer=zero3", "hardware=6x4090", "precision=32-true", "data.micro_batch_size=32"]
    assert main(overrides) == 0
    out = capsys.readouterr().out
    assert "verdict: DOES NOT FIT" in out and "parameters   llm frozen" in out and "vision-to-LLM modules" in out
    plan = plan_memory(overrides)
    assert 46.5e9 < plan.parameters < 47.6e9 and f"model: {plan.parameters / 1e9:.2f} B parameters" in out
    gathered = next(r for r in plan.rows if r.item.startswith("ZeRO-3 gathered"))
    assert gathered.bytes >= 8 * 3 * 4096 * 14336 * 4  # one whole MoE block (8 experts), float32 here
    assert plan.suggestions
    first = plan.suggestions[0]
    assert first.command in out
    again = planner.plan_memory(first.overrides)
    assert again.fits is True


def test_openclip_convnext_trunk_weights_load_into_the_aux_tower():
    """OpenCLIP's checkpoint names the trunk `visual.trunk.stem.*` / `visual.trunk.stages.*` (timm's ConvNeXt);
    its head and the text tower are ignored. (Checked once against timm 1.0.31's convnext_large itself: same
    196,227,264 parameters, strict load, identical stage features.)"""
    from vlm_finetune.models.mgm.modeling import ConvNeXtAuxTower

    torch.manual_seed(0)
    source = ConvNeXtAuxTower([8, 16, 32, 64], [1, 2, 1, 1]).eval()
    state = {"visual.trunk." + k.replace("vision_stem.", "stem.").replace("vision_stages.", "stages."): v
             for k, v in source.state_dict().items()}
    state.update({"visual.trunk.head.norm.weight": torch.ones(64), "visual.head.mlp.fc1.weight": torch.ones(2, 2),
                  "text.token_embedding.weight": torch.ones(3, 2), "logit_scale": torch.tensor(1.0)})
    assert "visual.trunk.stages.1.blocks.1.mlp.fc2.weight" in state and "visual.trunk.stem.1.bias" in state
    target = ConvNeXtAuxTower([8, 16, 32, 64], [1, 2, 1, 1]).eval()
    checkpoint.load_openclip_convnext(target, state)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))
    del state["visual.trunk.stages.2.blocks.0.gamma"]
    with pytest.raises(ConfigError, match="vision_stages.2.blocks.0.gamma"):
        checkpoint.load_openclip_convnext(ConvNeXtAuxTower([8, 16, 32, 64], [1, 2, 1, 1]), state)


@pytest.mark.parametrize("name,llm_billions,template", [
    ("mgm_2b", 2.506, "gemma"), ("mgm_7b", 6.738, "vicuna_v1"), ("mgm_13b", 13.016, "vicuna_v1"),
    ("mgm_34b", 34.389, "chatml_direct"), ("mgm_8x7b", 46.703, "mistral_instruct")])
def test_real_size_configs_build_their_published_llm_sizes_on_meta(name, llm_billions, template):
    """Each released MGM's LLM at its published size (Gemma-2B, Vicuna-7B/13B, Yi-34B, Mixtral-8x7B), the
    shared towers beside it, its template, and its HD variant with 2880 image tokens."""
    _, config = _config(name)
    with torch.device("meta"):
        model = MgmForCausalLM(config)
    towers = ("vision_tower", "vlm_uni", "mm_projector")
    llm = sum(p.numel() for n, p in model.named_parameters() if not any(t in n for t in towers))
    assert llm / 1e9 == pytest.approx(llm_billions, abs=0.001)
    assert sum(p.numel() for p in model.model.vision_tower.parameters()) == 303_507_456  # CLIP ViT-L/14-336
    assert config.template == template and config.image_tokens == 576
    assert _config(f"{name}_hd")[1].image_tokens == 2880


def test_bf16_mixed_keeps_a_bf16_base_with_float32_trainables(tmp_path):
    from vlm_finetune.train import train

    metrics, objects = train(compose_cfg(["model=tiny_mgm_moe", "precision=bf16-mixed", *FAST, "trainer.max_steps=3",
                                          "eval.generate=false"], tmp_path))
    assert metrics["global_step"] == 3 and math.isfinite(metrics["train_loss"]) and math.isfinite(metrics["val_loss"])
    model = objects["module"].model
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    trained = {p.dtype for p in model.parameters() if p.requires_grad}
    assert frozen == {torch.bfloat16} and trained == {torch.float32}


def test_a_released_style_config_without_our_fields_resolves_the_released_towers():
    """A config.json as MGM's training writes it (no vision_config / vision_aux_config / template): the
    tower paths name CLIP ViT-L/14-336 and OpenCLIP ConvNeXt-L, the template follows the LLM."""
    raw = {
        "architectures": ["MGMGemmaForCausalLM"], "model_type": "mgm_gemma", "vocab_size": 256000,
        "hidden_size": 2048, "intermediate_size": 16384, "num_hidden_layers": 18, "num_attention_heads": 8,
        "num_key_value_heads": 1, "head_dim": 256, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
        "hidden_act": "gelu", "torch_dtype": "bfloat16", "use_cache": True,
        "mm_vision_tower": "model_zoo/OpenAI/clip-vit-large-patch14-336",
        "mm_vision_tower_aux": "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup",
        "mm_hidden_size": 1024, "mm_hidden_size_aux": 2880, "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "image_size_aux": 768,
        "image_grid": 1, "image_global": False, "image_aspect_ratio": "pad", "mm_use_im_start_end": False,
        "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "use_mm_proj": True,
        "optimize_vision_tower": False, "optimize_vision_tower_aux": False, "mm_projector_lr": None,
    }
    cfg = config_file.config_from_dict(raw)
    assert cfg.backbone == "gemma" and cfg.template == "gemma"
    assert cfg.vision_config.hidden_size == 1024 and cfg.vision_config.image_size == 336
    assert cfg.aux["dims"] == [192, 384, 768, 1536] and cfg.image_tokens == 576
    assert cfg.text_config.num_key_value_heads == 1 and cfg.text_config.vocab_size == 256000
    with torch.device("meta"):
        model = MgmForCausalLM(cfg)
    assert 3.0e9 < sum(p.numel() for p in model.parameters()) < 3.05e9
    written = config_file.config_to_dict(cfg)  # exported back: MGM's fields and values kept
    for key in ("model_type", "mm_hidden_size_aux", "image_size_aux", "mm_vision_tower", "mm_vision_tower_aux",
                "tokenizer_model_max_length"):
        assert written[key] == raw[key], key
    bad = dict(raw, mm_hidden_size_aux=1234)
    with pytest.raises(ConfigError, match="mm_hidden_size_aux=1234"):
        config_file.config_from_dict(bad)


def test_generate_greedy_and_sampled():
    """Greedy decoding equals sampling at a temperature that leaves one choice; seeded sampling repeats;
    the prompt comes back first and new ids lie in the vocabulary."""
    model = _model(seed=5)
    images, aux = _images(model, n=2)
    ids = torch.randint(0, 300, (2, 4 + model.config.image_tokens))
    ids[:, 1:1 + model.config.image_tokens] = IMAGE_TOKEN_INDEX
    mask = torch.ones_like(ids)
    with warnings.catch_warnings():  # the KV cache goes by the keyword this transformers takes, without warnings
        warnings.simplefilter("error", FutureWarning)
        greedy = model.generate(ids, mask, images, aux, max_new_tokens=5, eos_token_id=[], pad_token_id=0)
    assert greedy.shape == (2, ids.shape[1] + 5) and torch.equal(greedy[:, :ids.shape[1]], ids)
    cold = model.generate(ids, mask, images, aux, max_new_tokens=5, do_sample=True, temperature=1e-4,
                          eos_token_id=[], pad_token_id=0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cold, greedy)
    draws = [model.generate(ids, mask, images, aux, max_new_tokens=5, do_sample=True, temperature=5.0, eos_token_id=[],
                            pad_token_id=0, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(draws[0], draws[1])
    new = draws[0][:, ids.shape[1]:]
    assert ((new >= 0) & (new < model.config.text_config.vocab_size)).all()
    with pytest.raises(ValueError, match="temperature"):
        model.generate(ids, mask, images, aux, do_sample=True, temperature=0.0)
