"""The original GLM-4V-9B family adapter: GLM-4 decoder (transformers' `GlmModel`), EVA2-CLIP tower, GLU adapter;
released folders (`model.path`) load without running their Python files and merged exports write them back."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from vlm_finetune.errors import ConfigError
from vlm_finetune.models.base import Family, Part
from vlm_finetune.models.glm4v_orig import assets, checkpoint
from vlm_finetune.models.glm4v_orig.modeling import EvaTransformerLayer, Glm4vOrigConfig, Glm4vOrigForCausalLM
from vlm_finetune.models.glm4v_orig.processor import Glm4vOrigProcessor
from vlm_finetune.models.glm4v_orig.tokenizer import load_tokenizer
from vlm_finetune.models.lora_targets import LoraTargets
from vlm_finetune.settings import LoraSettings, ModelSettings

# LLM linear layers per `lora.llm_modules`: the released recipe's `query_key_value` is q/k/v here
LLM_LORA = {"qkv": r"self_attn\.(q_proj|k_proj|v_proj)", "attention": r"self_attn\.(q_proj|k_proj|v_proj|o_proj)",
            "mlp": r"mlp\.(gate_up_proj|down_proj)",
            "all": r"self_attn\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_up_proj|down_proj)"}
VISION_LORA_PATTERN = r".*vision\.transformer\.layers\.\d+\.(attention\.(query_key_value|dense)|mlp\.(fc1|fc2))"
LORA = LoraTargets("GLM-4V-9B", VISION_LORA_PATTERN, tuple(LLM_LORA),
                   f"use one of {sorted(LLM_LORA)} for GLM-4V-9B (qkv is the released recipe's query_key_value)")


class Glm4vOrigFamily(Family):
    name = "glm4v_orig"
    supports_nf4 = False  # 4-bit loading is not wired for the released GLM-4V-9B layout yet
    input_keys = ("input_ids", "attention_mask", "pixel_values")
    builds_partitioned = True  # its folders stream into each rank's partition (checkpoint.load_folder)

    @property
    def decoder_layer_classes(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.glm.modeling_glm import GlmDecoderLayer

        return (GlmDecoderLayer,)

    @property
    def vision_block_classes(self) -> tuple[type[nn.Module], ...]:
        return (EvaTransformerLayer,)

    # -- folders and configs --------------------------------------------------------------------------
    def checkpoint_folder(self, spec: ModelSettings) -> Path | None:
        """`model.path`, the tiny folder made on first use, or None (real size from the config)."""
        folder = self.user_folder(spec, "a GLM-4V-9B folder (config.json, *.safetensors + index, "
                                              "tokenizer.model, tokenizer_config.json)")
        if folder is not None:
            return folder
        if str(spec.preset or "").startswith("tiny"):
            return assets.ensure_tiny_checkpoint(spec.cache_dir, spec.as_dict())
        return None

    def tokenizer_folder(self, spec: ModelSettings) -> Path:
        folder = self.checkpoint_folder(spec)
        if folder is not None:
            return folder
        raw = assets.released_config(spec.option_copy("config"))
        return assets.ensure_tokenizer_folder(spec.cache_dir, int(spec.option("vocab_size")),
                                              int(raw["vision_config"]["image_size"]))

    def build_config(self, spec: ModelSettings) -> Glm4vOrigConfig:
        folder = self.checkpoint_folder(spec)
        if folder is not None:
            return checkpoint.read_config(folder)
        # real size, random weights: the locally made tokenizer's special ids stand in for the released ones
        tokenizer = load_tokenizer(self.tokenizer_folder(spec))
        raw = assets.released_config(spec.option_copy("config"), assets.tokenizer_ids(tokenizer))
        return checkpoint.config_from_dict(raw, spec.option("initializer_range"))

    # -- builders -------------------------------------------------------------------------------------
    def load_processor(self, spec: ModelSettings, truncation: str) -> Glm4vOrigProcessor:
        folder = self.tokenizer_folder(spec)
        config = self.build_config(spec)
        return Glm4vOrigProcessor(load_tokenizer(folder), config.vision.image_size, config.vision.patch_tokens,
                                  stop_token=str(spec.option("stop_token")), truncation=truncation,
                                  tokenizer_folder=folder)

    def build_model(self, spec: ModelSettings, dtype: torch.dtype = torch.float32, device: str | None = None,
                    quantization: str | None = None) -> nn.Module:
        if quantization:
            raise ConfigError(f"precision={quantization}: 4-bit loading is not wired for model.family=glm4v_orig "
                              "yet; use bf16-mixed")
        if spec.liger_kernels:
            raise ConfigError("model.liger_kernels=true is not wired for GLM-4V-9B; set it to false")
        folder = self.checkpoint_folder(spec)
        if device is not None and str(device) == "meta":  # the planner: structure only, no weights read
            with torch.device("meta"):
                model = Glm4vOrigForCausalLM(self.build_config(spec)).to(dtype)
        elif folder is not None:
            model = checkpoint.load_folder(folder, dtype=dtype, device=device or "cpu")
        else:
            previous = torch.get_default_dtype()
            torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
            try:
                config = self.build_config(spec)
                with torch.random.fork_rng(devices=[]), torch.device(device or "cpu"):
                    torch.manual_seed(spec.init_seed)  # the caller's random state untouched
                    model = Glm4vOrigForCausalLM(config)
            finally:
                torch.set_default_dtype(previous)
        model.set_attn_implementation(spec.attn_implementation)
        return model

    # -- structure ------------------------------------------------------------------------------------
    def part_module_names(self, model: nn.Module) -> dict[Part, list[str]]:
        return {Part.VISION: ["vision"], Part.PROJECTOR: ["projector"], Part.LLM: ["model", "lm_head"]}

    def lora_target_pattern(self, part: Part, spec: ModelSettings, lora: LoraSettings) -> str | None:
        return LORA.pattern(part, lora, lambda scope: r".*model\.layers\.\d+\.(" + LLM_LORA[scope] + ")")

    def hidden_states(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.forward_hidden(batch["input_ids"], batch.get("attention_mask"), batch.get("pixel_values"),
                                    batch.get("pack_segments"))

    def output_embedding(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    # a text-only micro-batch runs the vision path on a blank image under multi-rank sharding (module.VisionInEveryStep)
    image_keys = ("pixel_values",)

    def image_features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.image_features(batch["pixel_values"])

    def input_embedding(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens

    # -- planner and export ---------------------------------------------------------------------------
    def memory_dims(self, spec: ModelSettings, image_size: int) -> dict:
        """Sizes for the memory planner (keys in models/base.py). The geometry is fixed by the config (every
        image is squashed to vision_config.image_size): 6401 ViT tokens (80 x 80 patches + cls) and 1602 LLM
        rows at 1120 px, whatever `image_size`. A trainable adapter saves, per image, the conv input (the
        ViT's patch tokens) and the GLU's inputs: four of width hidden and four of the ffn width per row."""
        cfg = self.build_config(spec)
        text, vision = cfg.text_config, cfg.vision
        heads, kv_heads, head_dim = int(text.num_attention_heads), int(text.num_key_value_heads), int(text.head_dim)
        rows, glu_width = vision.patch_tokens, int(text.hidden_size) + int(text.intermediate_size)
        return {
            "hidden": int(text.hidden_size), "layers": int(text.num_hidden_layers),
            "intermediate": int(text.intermediate_size), "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "q_dim": heads * head_dim, "kv_dim": kv_heads * head_dim, "vocab": int(text.vocab_size),
            "rotary_dim": head_dim // 2,
            "vision_layers": vision.num_hidden_layers, "vision_hidden": vision.hidden_size,
            "vision_intermediate": vision.intermediate_size, "vision_heads": vision.num_heads,
            "vision_patches_per_image": vision.num_positions, "image_tokens_per_image": cfg.image_tokens,
            "image_side": vision.image_size,
            "vision_extra_saved_elements_per_image": vision.grid**2 * vision.hidden_size + rows * 4 * glu_width,
            "vision_post_norm": 1,  # EVA2-CLIP blocks (memory.activations.eva_block_bytes_per_patch)
            "vision_eager_attention": int(spec.attn_implementation == "eager"),
        }

    def save_merged(self, model: nn.Module, folder: Path, processor: Glm4vOrigProcessor) -> None:
        """The released layout: config.json (chatglm, the source's `auto_map` kept), sharded safetensors + index,
        tokenizer.model and tokenizer_config.json, and the source folder's own remote code (`*.py`) and
        generation / special-token files byte for byte: the folder `AutoModel.from_pretrained(folder,
        trust_remote_code=True)` loads, as GLM-4V-9B users load it. The Python files are copied, never imported."""
        checkpoint.write_weights(model, Path(folder))
        processor.save_pretrained(str(folder))
        if processor.tokenizer_folder is not None:
            checkpoint.copy_released_files(processor.tokenizer_folder, Path(folder))


GLM4V_ORIG = Glm4vOrigFamily()
