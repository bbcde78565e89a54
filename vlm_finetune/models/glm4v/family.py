"""GLM-4V family adapter: GLM-4.1V (`Glm4vForConditionalGeneration`), GLM-4.5V (`Glm4vMoeForConditionalGeneration`)
and, through `trust_remote_code`, the original GLM-4V-9B checkpoint folder."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlm_finetune.errors import ConfigError
from vlm_finetune.models._partitioned import partitioning_active
from vlm_finetune.models.base import Family, Part
from vlm_finetune.models.glm4v import assets
from vlm_finetune.models.glm4v.partitioned import build_from_config, load_folder_nf4, load_folder_partitioned
from vlm_finetune.models.glm4v.processor import Glm4vProcessor
from vlm_finetune.models.glm4v.video import VideoSettings
from vlm_finetune.models.lora_targets import LoraTargets
from vlm_finetune.models.nf4_load import build_quantised
from vlm_finetune.settings import LoraSettings, ModelSettings

# LLM linear layers of a GLM-4.1V decoder layer (see shared/reference/glm4v.md), per `lora.llm_modules`
ATTENTION = r"self_attn\.(q_proj|k_proj|v_proj|o_proj)"
DENSE_MLP = r"mlp\.(gate_up_proj|down_proj)"
LLM_LORA_PATTERN = r".*language_model\.layers\.\d+\.(" + ATTENTION + "|" + DENSE_MLP + ")"
# GLM-4.5V's MoE blocks: LoRA on the routed experts' fused 3-D tensors (PEFT's target_parameters). Its dense
# first layer and shared expert (gate_proj / up_proj / down_proj linears) take none: PEFT (0.21) reads those
# names in a glm4v_moe model as the pre-v5 expert linears and moves any such target onto the fused experts.
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LLM_SCOPES = ("attention", "mlp", "experts", "all")
VISION_LORA_PATTERN = r".*visual\.blocks\.\d+\.(attn\.(qkv|proj)|mlp\.(gate_proj|up_proj|down_proj))"
# the connector that maps ViT features into the LLM's embedding space
PROJECTOR_MODULES = ("model.visual.downsample", "model.visual.merger")
PRESETS = ("tiny", "tiny_moe", "glm41v_9b", "glm45v")
LORA = LoraTargets("GLM-4V", VISION_LORA_PATTERN, LLM_SCOPES,
                   "use attention, mlp (dense MLP, or GLM-4.5V's experts), experts or all")


def _real_size_config(preset: str, tokenizer, overrides: dict | None):
    from transformers import Glm4vConfig, Glm4vMoeConfig

    config = Glm4vConfig() if preset == "glm41v_9b" else Glm4vMoeConfig()
    # released GLM-4.1V / 4.5V values that the default config lacks; without them the rotary split fails
    config.text_config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5}
    if overrides:
        config.text_config.update(dict(overrides.get("text", {}) or {}))
        config.vision_config.update(dict(overrides.get("vision", {}) or {}))
    # the locally made tokenizer's special ids stand in for the real ones (all below the vocab size)
    for key, value in assets.special_token_ids(tokenizer).items():
        setattr(config, key, value)
    return config


def apply_liger_kernels(model: nn.Module) -> None:
    """Liger's fused RMSNorm and SwiGLU in place (GPU only); the loss stays ours (see loss.impl)."""
    if not torch.cuda.is_available():
        raise ConfigError("model.liger_kernels=true needs a CUDA GPU (Triton kernels); set it to false on the CPU")
    try:
        from liger_kernel.transformers import apply_liger_kernel_to_glm4v, apply_liger_kernel_to_glm4v_moe
    except ImportError as err:
        raise ConfigError("model.liger_kernels=true needs liger-kernel: pip install 'vlm_finetune[gpu]'") from err
    patch = apply_liger_kernel_to_glm4v_moe if "Moe" in type(model).__name__ else apply_liger_kernel_to_glm4v
    patch(rms_norm=True, swiglu=True, fused_linear_cross_entropy=False, model=model)


class Glm4vFamily(Family):
    name = "glm4v"
    input_keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids",
                  "pixel_values_videos", "video_grid_thw")
    builds_partitioned = True

    def can_build_partitioned(self, spec: ModelSettings) -> bool:
        # the original GLM-4V-9B through its own modelling code (trust_remote_code) is loaded whole
        return not spec.trust_remote_code

    def quantises_while_loading(self, spec: ModelSettings) -> bool:
        # from a folder as it is read, from its config as each decoder layer is made; not through remote code
        return not spec.trust_remote_code

    @property
    def decoder_layer_classes(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.glm4v.modeling_glm4v import Glm4vTextDecoderLayer
        from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextDecoderLayer

        return (Glm4vTextDecoderLayer, Glm4vMoeTextDecoderLayer)

    @property
    def vision_block_classes(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.glm4v.modeling_glm4v import Glm4vVisionBlock
        from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeVisionBlock

        return (Glm4vVisionBlock, Glm4vMoeVisionBlock)

    @property
    def zero3_leaf_classes(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeTextMoE

        return (Glm4vMoeTextMoE,)

    # -- folders ----------------------------------------------------------------------------------
    def checkpoint_folder(self, spec: ModelSettings) -> Path | None:
        """The folder the model loads from: `model.path`, or the tiny checkpoint made on first use."""
        folder = self.user_folder(spec, "a checkpoint folder (config.json, *.safetensors, tokenizer and "
                                              "preprocessor files)")
        if folder is not None:
            return folder
        if spec.preset in ("tiny", "tiny_moe"):  # tiny GLM-4.1V, or tiny GLM-4.5V (MoE)
            return assets.ensure_tiny_checkpoint(spec.cache_dir, spec.option("text"), spec.option("vision"),
                                                 spec.image_size, spec.option("max_image_size"),
                                                 spec.option("vocab_size"), spec.init_seed,
                                                 moe=spec.preset == "tiny_moe")
        if spec.preset not in PRESETS:
            raise ConfigError(f"model.preset={spec.preset!r} is unknown for glm4v; use one of {PRESETS}")
        return None  # real size from config, random weights

    def processor_folder(self, spec: ModelSettings) -> Path:
        folder = self.checkpoint_folder(spec)
        if folder is not None:
            return folder
        return assets.ensure_processor_folder(spec.cache_dir, spec.option("vocab_size"), spec.image_size,
                                              spec.option("max_image_size"))

    # -- builders ---------------------------------------------------------------------------------
    def load_processor(self, spec: ModelSettings, truncation: str) -> Glm4vProcessor:
        from transformers import AutoImageProcessor, AutoTokenizer

        folder = self.processor_folder(spec)
        trust = spec.trust_remote_code
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust)
        try:
            image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=trust)
        except (OSError, ValueError) as err:
            raise ConfigError(f"no image processor could be loaded from {folder} ({err}); the folder needs a "
                              "preprocessor_config.json") from err
        merge_size = int(getattr(image_processor, "merge_size", 2))
        return Glm4vProcessor(tokenizer, image_processor, merge_size=merge_size, truncation=truncation,
                              video=VideoSettings.from_folder(folder))

    def build_config(self, spec: ModelSettings):
        """The HF config of the model, without building it (cheap: used by planners and checks)."""
        from transformers import AutoConfig, AutoTokenizer

        folder = self.checkpoint_folder(spec)
        if folder is not None:
            return AutoConfig.from_pretrained(folder, trust_remote_code=spec.trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(self.processor_folder(spec))
        # config_overrides: optional (the real-size configs declare it, `+model.config_overrides` adds it)
        return _real_size_config(spec.preset, tokenizer, spec.options.get("config_overrides"))

    def build_model(self, spec: ModelSettings, dtype: torch.dtype = torch.float32, device: str | None = None,
                    quantization: str | None = None) -> nn.Module:
        """Load `model.path` (or the tiny folder), or build a real-size model from its config with random
        weights; `device` places a from-config build directly there (no CPU copy of 10 B parameters)."""
        from transformers import AutoModelForImageTextToText

        attn = spec.attn_implementation
        folder = self.checkpoint_folder(spec)
        if device == "meta":  # shapes only (planner): the folder's config, no weight file is read
            config = self.build_config(spec)
            config._attn_implementation = attn
            with torch.device("meta"):
                if spec.trust_remote_code:
                    from transformers import AutoModelForCausalLM

                    return AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=True)
                return AutoModelForImageTextToText.from_config(config, dtype=dtype)
        if partitioning_active():  # ZeRO-3's zero.Init (can_build_partitioned): no rank holds the whole model
            config = self.build_config(spec)
            config._attn_implementation = attn
            model = load_folder_partitioned(folder, config, dtype) if folder is not None else \
                build_from_config(config, dtype)
        elif folder is not None:
            trust = spec.trust_remote_code
            if trust:
                if quantization:
                    raise ConfigError(f"precision={quantization} is not wired for a folder loaded with "
                                      "trust_remote_code (its own modelling code); use precision=bf16-mixed")
                from transformers import AutoModelForCausalLM

                # the original GLM-4V-9B ships ChatGLM modelling code in its folder
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, trust_remote_code=True)
            elif quantization == "nf4":  # each decoder layer quantised as it is read (GLM-4.5V's experts per expert)
                config = self.build_config(spec)
                config._attn_implementation = attn
                model = load_folder_nf4(folder, config, dtype)
            else:
                model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, attn_implementation=attn)
        else:
            config = self.build_config(spec)
            config._attn_implementation = attn

            def make() -> nn.Module:
                with torch.device(device or "cpu"):
                    return AutoModelForImageTextToText.from_config(config, dtype=dtype)

            # nf4: the decoder layers made, initialised and quantised one at a time
            model = make() if quantization is None else build_quantised(
                make, self.decoder_layer_classes, "model.language_model.layers", "model.language_model",
                device or "cpu")
        if spec.liger_kernels:
            apply_liger_kernels(model)
        return model

    def memory_dims(self, spec: ModelSettings, image_size: int) -> dict:
        """Architecture sizes the memory planner needs (keys documented in models/base.py), read from the
        HF config without building the model; image geometry for one square image of `image_size` pixels
        as the GLM-4V processor resizes it (sides rounded to multiples of patch x merge)."""
        config = self.build_config(spec)
        if getattr(config, "model_type", "") not in ("glm4v", "glm4v_moe"):
            raise ConfigError(f"the memory planner models GLM-4.1V / GLM-4.5V configs; model_type="
                              f"{getattr(config, 'model_type', '?')!r} (e.g. the ChatGLM-based GLM-4V-9B) "
                              "is not modelled")
        text, vision = config.text_config, config.vision_config
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        patch, merge = int(vision.patch_size), int(vision.spatial_merge_size)
        side = max(patch * merge, round(int(image_size) / (patch * merge)) * patch * merge)
        patches = (side // patch) ** 2
        dims = {
            "hidden": int(text.hidden_size), "layers": int(text.num_hidden_layers),
            "intermediate": int(text.intermediate_size), "heads": heads,
            "kv_heads": int(text.num_key_value_heads), "head_dim": head_dim,
            "q_dim": heads * head_dim, "kv_dim": int(text.num_key_value_heads) * head_dim,
            "vocab": int(text.vocab_size),
            "vision_layers": int(vision.depth), "vision_hidden": int(vision.hidden_size),
            # the ViT MLP is out_hidden_size wide in transformers' Glm4VisionMlp
            "vision_intermediate": int(vision.out_hidden_size), "vision_heads": int(vision.num_heads),
            "vision_patches_per_image": patches, "image_tokens_per_image": patches // (merge * merge),
            "image_side": side,
            "rotary_dim": int(head_dim * float((text.rope_parameters or {}).get("partial_rotary_factor", 1.0))),
        }
        if getattr(text, "n_routed_experts", None):
            dense = int(getattr(text, "first_k_dense_replace", 0))
            dims.update(experts=int(text.n_routed_experts), experts_per_token=int(text.num_experts_per_tok),
                        moe_intermediate=int(text.moe_intermediate_size),
                        shared_experts=int(getattr(text, "n_shared_experts", 0) or 0),
                        moe_layers=dims["layers"] - dense)
        return dims

    # -- structure --------------------------------------------------------------------------------
    def part_module_names(self, model: nn.Module) -> dict[Part, list[str]]:
        names = dict(model.named_modules())
        projector = [n for n in PROJECTOR_MODULES if n in names]
        vision_children = [f"model.visual.{c}" for c, _ in names["model.visual"].named_children()]
        return {
            Part.VISION: [n for n in vision_children if n not in projector],
            Part.PROJECTOR: projector,
            Part.LLM: ["model.language_model", "lm_head"],
        }

    def lora_target_pattern(self, part: Part, spec: ModelSettings, lora: LoraSettings) -> str | None:
        def llm(scope: str) -> str | None:
            moe = self.is_moe(spec)
            if scope == "experts" and not moe:
                raise ConfigError("lora.llm_modules=experts needs an MoE model (glm45v, tiny_glm45v); use mlp")
            if moe:  # attention linears; the experts through lora_target_parameters
                return r".*language_model\.layers\.\d+\." + ATTENTION if scope in ("attention", "all") else None
            return {"attention": r".*language_model\.layers\.\d+\." + ATTENTION,
                    "mlp": r".*language_model\.layers\.\d+\." + DENSE_MLP}.get(scope, LLM_LORA_PATTERN)

        return LORA.pattern(part, lora, llm)

    def lora_target_parameters(self, part: Part, spec: ModelSettings, lora: LoraSettings) -> list[str]:
        """GLM-4.5V's fused expert tensors, when `lora.llm_modules` is mlp, experts or all."""
        return LORA.expert_parameters(part, lora, lambda: self.is_moe(spec), EXPERT_PARAMETERS)

    def is_moe(self, spec: ModelSettings) -> bool:
        """GLM-4.5V (Glm4vMoe), read from the preset or, for a folder, from its config."""
        if not spec.path and spec.preset in PRESETS:
            return spec.preset in ("tiny_moe", "glm45v")
        return getattr(self.build_config(spec), "model_type", "") == "glm4v_moe"

    def hidden_states(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in self.input_keys}
        if "pack_segments" in batch:  # packed rows (data/packing.py): each sample's own M-RoPE positions
            inputs["position_ids"] = packed_positions(model.model, batch)
        if "pixel_values_videos" in inputs:
            inputs = with_visual_embeddings(model.model, inputs)
        return model.model(**inputs, use_cache=False).last_hidden_state

    def output_embedding(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    image_keys = ("pixel_values", "image_grid_thw")
    video_keys = ("pixel_values_videos", "video_grid_thw")
    images_encoded_before_generation = True

    def image_features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"], return_dict=True)
        return torch.cat(out.pooler_output)


def with_visual_embeddings(model: nn.Module, inputs: dict) -> dict:
    """The inputs with the images' and the videos' features placed in the token embeddings by one run of the
    vision tower (`inputs_embeds`), and the M-RoPE positions computed from the ids.

    transformers' GLM-4V forward places image features at every `<|image|>` token and video features at every
    `<|image|>` token too (its video mask is the image mask), so a batch holding both fails; and it runs the
    tower once for images and once for videos, so under ZeRO-3 a rank with both would gather the tower's
    parameters more often than a rank with one (a hang). Here the tower runs once on the images' patches and the
    videos' frames together (each frame a grid of its own, as get_video_features splits them), and the features
    go where mm_token_type_ids says: 1 image, 2 video."""
    inputs = dict(inputs)
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    video_grid = inputs["video_grid_thw"]
    frame_grids = torch.repeat_interleave(video_grid, video_grid[:, 0], dim=0)
    frame_grids[:, 0] = 1
    pixels = [inputs.pop("pixel_values_videos")]
    grids = [frame_grids]
    if "pixel_values" in inputs:
        pixels.insert(0, inputs.pop("pixel_values"))
        grids.insert(0, inputs["image_grid_thw"])
    visual = model.visual
    features = visual(torch.cat(pixels).type(visual.dtype), grid_thw=torch.cat(grids), return_dict=True).pooler_output
    embeds = model.get_input_embeddings()(ids)
    features = features.to(embeds.device, embeds.dtype)
    image_slots = (types == 1).unsqueeze(-1)
    images = int(image_slots.sum())
    embeds = embeds.masked_scatter(image_slots, features[:images])
    embeds = embeds.masked_scatter((types == 2).unsqueeze(-1), features[images:])
    if "position_ids" not in inputs:
        inputs["position_ids"] = model.compute_3d_position_ids(
            input_ids=ids, inputs_embeds=embeds, image_grid_thw=inputs.get("image_grid_thw"),
            video_grid_thw=video_grid, attention_mask=inputs.get("attention_mask"), mm_token_type_ids=types)
    inputs.pop("input_ids")
    inputs["inputs_embeds"] = embeds
    return inputs


def packed_positions(model: nn.Module, batch: dict) -> torch.Tensor:
    """(4, rows, length) positions of packed rows, as transformers' GLM-4V takes them for packing: the 1-D
    positions restarting at each sample (from which the block-diagonal mask is built), then the three M-RoPE
    rows of each sample computed by the model's `get_rope_index` on that sample alone (with its own images)."""
    ids, types, text = batch["input_ids"], batch["mm_token_type_ids"], batch["position_ids"]
    grids = batch.get("image_grid_thw")
    out = torch.empty((4, *ids.shape), dtype=torch.long, device=ids.device)
    out[0] = text
    image = 0
    for r, segments in enumerate(batch["pack_segments"]):
        start = 0
        for length, images in segments:
            span = slice(start, start + length)
            grid = grids[image:image + images] if images else None
            rope, _ = model.get_rope_index(ids[r:r + 1, span], types[r:r + 1, span], grid, None,
                                           attention_mask=torch.ones_like(ids[r:r + 1, span]))
            out[1:, r, span] = rope[:, 0]
            image, start = image + images, start + length
        out[1:, r, start:] = text[r, start:]  # the row's padding
    return out


GLM4V = Glm4vFamily()
