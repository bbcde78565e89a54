"""MGM (Mini-Gemini) family adapter: Gemma, Llama (Vicuna, LLaMA-3, Yi), Mistral and Mixtral backbones with
CLIP + ConvNeXt towers and patch info mining."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from vlm_finetune.errors import ConfigError
from vlm_finetune.models.base import Family, Part
from vlm_finetune.models.lora_targets import LoraTargets
from vlm_finetune.models.mgm import assets, checkpoint, config_file
from vlm_finetune.models.mgm.modeling import CLIP_L_336, CONVNEXT, ConvNeXtBlock, MgmConfig, MgmForCausalLM
from vlm_finetune.models.mgm.processor import MgmImages, MgmProcessor
from vlm_finetune.models.nf4_load import build_quantised
from vlm_finetune.settings import LoraSettings, ModelSettings

PROJECTOR_MODULES = ("model.mm_projector", "model.vlm_uni_query_projector", "model.vlm_uni_aux_projector",
                     "model.vlm_uni_val_projector")
VISION_MODULES = ("model.vision_tower", "model.vision_tower_aux")
LLM_MODULES = ("model.embed_tokens", "model.layers", "model.norm", "lm_head")

ATTENTION = r"self_attn\.(q_proj|k_proj|v_proj|o_proj)"
DENSE_MLP = r"mlp\.(gate_proj|up_proj|down_proj)"
# the fused expert tensors of transformers' Mixtral (LoRA on parameters: PEFT's target_parameters)
EXPERT_PARAMETERS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")
LLM_SCOPES = ("attention", "mlp", "experts", "all")
# mm_vision_tower_aux written for each ConvNeXt: the local folder names MGM's loader accepts (see MgmConfig)
AUX_TOWER_PATHS = {
    "convnext_large_d_320": MgmConfig.mm_vision_tower_aux,
    "convnext_base_w_320": "model_zoo/OpenAI/openclip-convnext-base-w-320-laion_aesthetic-s13B-b82K",
    "convnext_xxlarge": "model_zoo/OpenAI/openclip-convnext-xxlarge-laion2B-s34B-b82K-augreg-soup",
}
VISION_LORA_PATTERN = (r".*vision_tower\.vision_tower\.vision_model\.encoder\.layers\.\d+\."
                       r"(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))")
LORA = LoraTargets("MGM", VISION_LORA_PATTERN, LLM_SCOPES,
                   "use attention, mlp (dense MLP or MoE experts), experts or all")


class MgmFamily(Family):
    name = "mgm"
    builds_partitioned = True
    input_keys = ("input_ids", "attention_mask", "images", "images_aux")

    @property
    def decoder_layer_classes(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer
        from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
        from transformers.models.mixtral.modeling_mixtral import MixtralDecoderLayer

        return (GemmaDecoderLayer, LlamaDecoderLayer, MistralDecoderLayer, MixtralDecoderLayer)

    @property
    def vision_block_classes(self) -> tuple[type[nn.Module], ...]:
        from transformers.models.clip.modeling_clip import CLIPEncoderLayer

        return (CLIPEncoderLayer, ConvNeXtBlock)

    @property
    def zero3_leaf_classes(self) -> tuple[type[nn.Module], ...]:
        # experts fire data-dependently: ZeRO-3 must gather the MoE block whole, not expert by expert
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        return (MixtralSparseMoeBlock,)

    # -- configs and folders ------------------------------------------------------------------------
    def config_from_options(self, spec: ModelSettings, tokenizer=None) -> MgmConfig:
        """MgmConfig from the `model=` YAML (`llm`, `vision`, `vision_aux`, image and template options)."""
        from transformers import CLIPVisionConfig

        llm = spec.option_copy("llm")
        if "model_type" not in llm:
            raise ConfigError(f"model.llm must name the backbone: model.llm.model_type=gemma|llama|mistral|mixtral "
                              f"(model={spec.name})")
        model_type = llm.pop("model_type")
        if tokenizer is not None and str(spec.preset or "").startswith("tiny"):
            llm.setdefault("vocab_size", len(tokenizer))
            llm.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
        text = config_file.text_config_for(model_type, llm)
        vision = spec.option_copy("vision") or dict(CLIP_L_336)
        aux = spec.option("vision_aux")
        aux_path = MgmConfig.mm_vision_tower_aux
        if isinstance(aux, str):
            if aux not in CONVNEXT:
                raise ConfigError(f"model.vision_aux={aux!r} is unknown; use one of {sorted(CONVNEXT)} or "
                                  "{dims: [...], depths: [...]}")
            aux_path = AUX_TOWER_PATHS[aux]
            aux = dict(CONVNEXT[aux])
        else:
            aux = spec.option_copy("vision_aux")
        vision_config = CLIPVisionConfig(**vision)
        cfg = MgmConfig(
            text_config=text, vision_config=vision_config, aux=aux, mm_hidden_size=vision_config.hidden_size,
            mm_projector_type=str(spec.option("projector_type")),
            image_size_aux=int(spec.option("image_size_aux")), image_grid=int(spec.option("image_grid")),
            image_global=bool(spec.option("image_global")),
            template=str(spec.option("template") or config_file.default_template(model_type, int(text.vocab_size))),
            mm_vision_tower_aux=aux_path,
        )
        cfg.check()
        return cfg

    def checkpoint_folder(self, spec: ModelSettings) -> Path | None:
        folder = self.user_folder(spec, "an MGM checkpoint folder (config.json, *.safetensors[.index.json], "
                                              "tokenizer files)")
        if folder is not None:
            return folder
        if str(spec.preset or "").startswith("tiny"):
            return assets.ensure_tiny_checkpoint(spec.cache_dir, spec, self.config_from_options)
        return None

    def quantises_while_loading(self, spec: ModelSettings) -> bool:
        return True  # from a folder as it is read, from its config as each decoder layer is made

    def build_config(self, spec: ModelSettings) -> MgmConfig:
        folder = self.checkpoint_folder(spec)
        if folder is not None:
            return config_file.read_config(folder)
        return self.config_from_options(spec)

    def load_processor(self, spec: ModelSettings, truncation: str) -> MgmProcessor:
        from transformers import AutoTokenizer

        folder = self.checkpoint_folder(spec)
        config = config_file.read_config(folder) if folder is not None else self.config_from_options(spec)
        template = str(spec.option("template") or config.template)
        tokenizer_folder = folder if folder is not None else assets.ensure_tokenizer_folder(
            spec.cache_dir, int(spec.option("vocab_size")), template, **assets.tokenizer_options(spec.as_dict()))
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # AutoTokenizer reads config.json and warns that `mgm_*` is not its type
        try:
            # it also builds a config from MGM's released `"rope_scaling": null` (transformers 4's field), which
            # transformers 5 flags as deprecated: the folder is in the released format on purpose
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*rope_scaling.*deprecated", category=FutureWarning)
                tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
        except (OSError, ValueError) as err:
            raise ConfigError(f"no tokenizer could be loaded from {tokenizer_folder} ({err})") from err
        finally:
            hf_logging.set_verbosity(level)
        images = MgmImages(config.image_size_aux, config.vision_config.image_size, config.image_grid,
                           config.image_global, aspect_ratio=config.image_aspect_ratio)
        return MgmProcessor(tokenizer, images, config.image_tokens, template, truncation=truncation,
                            tokenizer_folder=tokenizer_folder)

    def build_model(self, spec: ModelSettings, dtype: torch.dtype = torch.float32, device: str | None = None,
                    quantization: str | None = None) -> nn.Module:
        if quantization not in (None, "nf4"):
            raise ConfigError(f"precision={quantization}: MGM loads 4-bit weights as nf4 only; use precision=nf4")
        attn = spec.attn_implementation
        folder = self.checkpoint_folder(spec)
        on_meta = device is not None and str(device) == "meta"
        if on_meta:  # the planner: structure only, no weights read
            with torch.device("meta"):
                model = MgmForCausalLM(self.build_config(spec)).to(dtype)
        elif folder is not None:  # nf4: each decoder layer quantised as it is read
            model = checkpoint.load_folder(folder, dtype=dtype, device=device or "cpu", quantization=quantization)
        else:
            config = self.config_from_options(spec)

            def make() -> MgmForCausalLM:
                previous = torch.get_default_dtype()
                torch.set_default_dtype(dtype if dtype.is_floating_point else torch.float32)
                try:
                    with torch.device(device or "cpu"):
                        return MgmForCausalLM(config)
                finally:
                    torch.set_default_dtype(previous)

            # nf4: the decoder layers made, initialised and quantised one at a time
            model = make() if quantization is None else build_quantised(
                make, self.decoder_layer_classes, "model.layers", "model", device or "cpu")
        model.config.text_config._attn_implementation = attn
        model.config.vision_config._attn_implementation = attn
        if spec.liger_kernels:
            raise ConfigError("model.liger_kernels=true is not wired for MGM yet; set it to false")
        return model

    # -- structure ----------------------------------------------------------------------------------
    def part_module_names(self, model: nn.Module) -> dict[Part, list[str]]:
        names = dict(model.named_modules())
        return {
            Part.VISION: [n for n in VISION_MODULES if n in names],
            Part.PROJECTOR: [n for n in PROJECTOR_MODULES if n in names],
            Part.LLM: [n for n in LLM_MODULES if n in names],
        }

    def lora_target_pattern(self, part: Part, spec: ModelSettings, lora: LoraSettings) -> str | None:
        def llm(scope: str) -> str | None:
            moe = self._is_moe(spec)
            pieces = []
            if scope in ("attention", "all"):
                pieces.append(ATTENTION)
            if scope in ("mlp", "all") and not moe:
                pieces.append(DENSE_MLP)
            if scope == "experts" and not moe:
                raise ConfigError("lora.llm_modules=experts needs an MoE backbone (mgm_8x7b, tiny_mgm_moe); use mlp")
            if not pieces:
                return None  # experts only: LoRA on parameters, no module targets
            return r".*model\.layers\.\d+\.(" + "|".join(pieces) + ")"

        return LORA.pattern(part, lora, llm)

    def lora_target_parameters(self, part: Part, spec: ModelSettings, lora: LoraSettings) -> list[str]:
        """Parameters that take LoRA directly (the fused MoE expert tensors)."""
        return LORA.expert_parameters(part, lora, lambda: self._is_moe(spec), EXPERT_PARAMETERS)

    def _is_moe(self, spec: ModelSettings) -> bool:
        llm = spec.option("llm") or {}
        if llm.get("model_type"):
            return llm.get("model_type") == "mixtral"
        return self.build_config(spec).backbone == "mixtral"

    def memory_dims(self, spec: ModelSettings, image_size: int) -> dict:
        """Sizes for the memory planner (keys in models/base.py). The "vision tower" is CLIP (the layers up to the
        selected one run); MGM's image geometry is fixed by its config, whatever `image_size` is. Patch info
        mining with trainable projectors saves, per CLIP view, the shared LayerNorm input, both LayerNorm outputs
        (2880 wide at real size) and the keys and values of its s x s sub-grids:
        `vision_extra_saved_elements_per_image`."""
        cfg = self.build_config(spec)
        text, vision = cfg.text_config, cfg.vision_config
        heads = int(text.num_attention_heads)
        head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // heads)
        kv_heads = int(getattr(text, "num_key_value_heads", None) or heads)
        n_layers = int(vision.num_hidden_layers)
        clip_layers = cfg.mm_vision_select_layer % (n_layers + 1)
        p = cfg.patches_per_side
        sub = (cfg.image_size_aux // 4 // cfg.image_grid // p) ** 2  # aux cells per CLIP token
        per_view = p * p * sub * (3 * cfg.mm_hidden_size_aux + 2 * cfg.mm_hidden_size)
        dims = {
            "hidden": int(text.hidden_size), "layers": int(text.num_hidden_layers),
            "intermediate": int(text.intermediate_size), "heads": heads, "kv_heads": kv_heads, "head_dim": head_dim,
            "q_dim": heads * head_dim, "kv_dim": kv_heads * head_dim, "vocab": int(text.vocab_size),
            "vision_layers": clip_layers, "vision_hidden": int(vision.hidden_size),
            "vision_intermediate": int(vision.intermediate_size), "vision_heads": int(vision.num_attention_heads),
            "vision_patches_per_image": (p * p + 1) * cfg.views_per_image,
            "image_tokens_per_image": cfg.image_tokens, "image_side": cfg.image_size_aux,
            "vision_extra_saved_elements_per_image": per_view * cfg.views_per_image,
        }
        if cfg.backbone == "mixtral":
            dims.update(experts=int(text.num_local_experts), experts_per_token=int(text.num_experts_per_tok),
                        moe_intermediate=int(text.intermediate_size), shared_experts=0, moe_layers=dims["layers"])
        return dims

    def save_merged(self, model: nn.Module, folder: Path, processor: MgmProcessor) -> None:
        """A merged model (LoRA folded in) written in MGM's released layout: a drop-in MGM checkpoint folder."""
        checkpoint.write_weights(model, Path(folder))
        processor.save_pretrained(str(folder))

    def hidden_states(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        # packed rows (data/packing.py) come without attention_mask: positions restarting per sample give the
        # backbone its block-diagonal mask
        return model.forward_hidden(batch["input_ids"], batch.get("attention_mask"), batch.get("images"),
                                    batch.get("images_aux"), batch.get("position_ids"))

    def output_embedding(self, model: nn.Module) -> nn.Module:
        return model.lm_head

    image_keys = ("images", "images_aux")

    def image_features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model.encode_images(batch["images"], batch["images_aux"])

    def input_embedding(self, model: nn.Module) -> nn.Module:
        return model.model.embed_tokens


MGM = MgmFamily()
