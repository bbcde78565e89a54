"""The MGM (Mini-Gemini) architecture, written from the facts in shared/reference/mgm.md.

Module names follow the released checkpoints, so a state dict maps one to one (see checkpoint.py):

    model.vision_tower.vision_tower.vision_model.*      CLIP ViT (low resolution), frozen
    model.vision_tower_aux.vision_stem / vision_stages  ConvNeXt trunk (high resolution), frozen
    model.vlm_uni_{query,aux,val}_projector.{0,1}       patch info mining (LayerNorm, Linear)
    model.mm_projector.{0,2}                            mlp2x_gelu projector
    model.embed_tokens / layers / norm, lm_head         the LLM (Gemma, Llama, Mistral or Mixtral)

Image tokens are expanded at tokenisation time: every image position holds `IMAGE_TOKEN_INDEX` (-200,
MGM's constant), and the forward pass writes the image features over those positions. The sequence
the LLM sees is the one MGM builds by splicing, but its length is known before the forward pass
(exact token budgets, truncation that never cuts an image).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_finetune.models._decode import cache_argument, cached_step, decode, stop_ids
from vlm_finetune.models._partitioned import whole_for_init

IMAGE_TOKEN_INDEX = -200

# LLM backbones by MGM model_type (mgm/model/language_model/*.py)
BACKBONES = {"mgm": "llama", "mgm_gemma": "gemma", "mgm_mistral": "mistral", "mgm_mixtral": "mixtral"}
MODEL_TYPES = {v: k for k, v in BACKBONES.items()}
ARCHITECTURES = {"llama": "MGMLlamaForCausalLM", "gemma": "MGMGemmaForCausalLM", "mistral": "MGMMistralForCausalLM",
                 "mixtral": "MGMMixtralForCausalLM"}

# OpenAI CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336): the low-res tower of every released MGM
CLIP_L_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                  image_size=336, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=768)
# ConvNeXt trunks of the OpenCLIP models MGM uses as the aux tower (timm convnext_large / base / xxlarge)
CONVNEXT = {
    "convnext_large_d_320": dict(dims=[192, 384, 768, 1536], depths=[3, 3, 27, 3]),
    "convnext_base_w_320": dict(dims=[128, 256, 512, 1024], depths=[3, 3, 27, 3]),
    "convnext_xxlarge": dict(dims=[384, 768, 1536, 3072], depths=[3, 4, 30, 3]),
}
# OpenAI CLIP normalisation, used by both towers
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class MgmConfig:
    """Everything that defines an MGM model: the LLM's HF config plus MGM's multimodal fields."""

    text_config: Any  # transformers config of the backbone (GemmaConfig, LlamaConfig, MixtralConfig, ...)
    vision_config: Any  # transformers CLIPVisionConfig
    aux: dict = field(default_factory=lambda: dict(CONVNEXT["convnext_large_d_320"]))
    mm_hidden_size: int = 1024
    mm_projector_type: str = "mlp2x_gelu"
    mm_vision_select_layer: int = -2
    mm_vision_select_feature: str = "patch"
    image_size_aux: int = 768
    image_grid: int = 1
    image_global: bool = False
    template: str = "vicuna_v1"
    # where MGM's own loader finds the towers: local folders (relative to its working directory, as in the
    # released configs) whose names it checks ("openai" for CLIP; "openclip", "convnext", "large", "d-320")
    mm_vision_tower: str = "model_zoo/OpenAI/clip-vit-large-patch14-336"
    mm_vision_tower_aux: str = "model_zoo/OpenAI/openclip-convnext-large-d-320-laion2B-s29B-b131K-ft-soup"
    image_aspect_ratio: str = "pad"
    extra: dict = field(default_factory=dict)  # other MGM fields of a released config.json, kept for export
    source: dict = field(default_factory=dict)  # the loaded config.json as read: every field kept on export

    @property
    def backbone(self) -> str:
        return self.text_config.model_type

    @property
    def mm_hidden_size_aux(self) -> int:
        return int(sum(self.aux["dims"]))

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def patches_per_side(self) -> int:
        return self.vision_config.image_size // self.vision_config.patch_size

    @property
    def views_per_image(self) -> int:
        """CLIP inputs per image: 1, or image_grid^2 crops (+1 global view in HD mode)."""
        if self.image_grid == 1:
            return 1
        return self.image_grid**2 + int(self.image_global)

    @property
    def image_tokens(self) -> int:
        """LLM positions one image takes: 576 normal, 2880 in HD mode, at real size."""
        return self.patches_per_side**2 * self.views_per_image

    def get(self, key: str, default=None):  # PEFT reads a model's config like a dict
        return getattr(self.text_config, key, default)

    def to_dict(self) -> dict:
        return self.text_config.to_dict()

    def check(self) -> None:
        """Shapes that must divide, with the option to change."""
        from vlm_finetune.errors import ConfigError

        vc = self.vision_config
        if vc.image_size % vc.patch_size:
            raise ConfigError(f"MGM: vision image_size {vc.image_size} is not a multiple of patch_size {vc.patch_size}")
        if self.image_size_aux % 4:
            raise ConfigError(f"MGM: image_size_aux={self.image_size_aux} must be a multiple of 4 (ConvNeXt stem)")
        grid = self.image_size_aux // 4 // self.image_grid
        if (self.image_size_aux // 4) % self.image_grid or grid % self.patches_per_side:
            raise ConfigError(
                f"MGM: the aux feature map ({self.image_size_aux // 4} px per side, "
                f"{self.image_grid} crop(s) per side) "
                f"must split into {self.patches_per_side} x {self.patches_per_side} sub-grids, one per CLIP patch: "
                f"choose image_size_aux as a multiple of {4 * self.image_grid * self.patches_per_side}")
        if self.mm_projector_type not in ("mlp2x_gelu", "linear"):
            raise ConfigError(f"MGM: mm_projector_type={self.mm_projector_type!r} is not supported; "
                              "use mlp2x_gelu (every released model) or linear")
        if self.mm_vision_select_feature not in ("patch", "cls_patch"):
            raise ConfigError(f"MGM: mm_vision_select_feature={self.mm_vision_select_feature!r}: "
                              "use patch or cls_patch")


# -- high-resolution tower: ConvNeXt with timm's parameter names --------------------------------
class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an NCHW tensor (timm's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class ConvMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """Depthwise 7x7 conv, LayerNorm, MLP (x4), layer scale `gamma`, residual; drop-path in training."""

    def __init__(self, dim: int, drop_path: float = 0.0, ls_init: float = 1e-6, eps: float = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp = ConvMlp(dim, 4 * dim)
        self.gamma = nn.Parameter(ls_init * torch.ones(dim))
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.mlp(self.norm(x)) * self.gamma
        x = x.permute(0, 3, 1, 2)
        if self.training and self.drop_path > 0:
            keep = 1.0 - self.drop_path
            mask = x.new_empty((x.shape[0], 1, 1, 1)).bernoulli_(keep) / keep
            x = x * mask
        return shortcut + x


class ConvNeXtStage(nn.Module):
    def __init__(self, in_dim: int, dim: int, depth: int, drop_paths: list[float], eps: float = 1e-6):
        super().__init__()
        if in_dim != dim:
            self.downsample = nn.Sequential(LayerNorm2d(in_dim, eps=eps),
                                            nn.Conv2d(in_dim, dim, kernel_size=2, stride=2))
        else:
            self.downsample = nn.Identity()
        self.blocks = nn.Sequential(*[ConvNeXtBlock(dim, drop_paths[i], eps=eps) for i in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class ConvNeXtAuxTower(nn.Module):
    """The OpenCLIP ConvNeXt trunk, stem and stages only: every stage output is resized (bilinear) to the
    stage-0 grid and concatenated on channels -> [N, sum(dims), S/4, S/4]."""

    def __init__(self, dims: list[int], depths: list[int], drop_path_rate: float = 0.1, eps: float = 1e-6):
        super().__init__()
        self.dims, self.depths = list(dims), list(depths)
        self.vision_stem = nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), LayerNorm2d(dims[0], eps=eps))
        total = sum(depths)
        rates = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, start, in_dim = [], 0, dims[0]
        for dim, depth in zip(dims, depths):
            stages.append(ConvNeXtStage(in_dim, dim, depth, rates[start:start + depth], eps=eps))
            start, in_dim = start + depth, dim
        self.vision_stages = nn.Sequential(*stages)

    @property
    def hidden_size(self) -> int:
        return sum(self.dims)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.vision_stem(images.to(self.vision_stem[0].weight.dtype))
        outputs = []
        for stage in self.vision_stages:
            x = stage(x)
            outputs.append(x)
        size = outputs[0].shape[-2:]
        resized = [outputs[0]] + [F.interpolate(o.float(), size=size, mode="bilinear", align_corners=False).to(o.dtype)
                                  for o in outputs[1:]]
        return torch.cat(resized, dim=1)


# -- low-resolution tower: HF CLIP -----------------------------------------------------------------
class ClipTower(nn.Module):
    """CLIP vision model; features of layer `select_layer` (second to last), CLS dropped ('patch').
    Only the layers up to the selected one run (the rest would be computed and thrown away)."""

    def __init__(self, vision_config, select_layer: int = -2, select_feature: str = "patch"):
        super().__init__()
        from transformers import CLIPVisionModel

        # transformers 5's CLIPVisionModel holds the transformer directly; MGM's keys (transformers 4) have
        # `vision_tower.vision_model.*`, so the model sits under a `vision_model` attribute here
        self.vision_tower = nn.Module()
        self.vision_tower.vision_model = CLIPVisionModel(vision_config)
        self.select_layer, self.select_feature = select_layer, select_feature

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        vm = self.vision_tower.vision_model
        hidden = vm.pre_layrnorm(vm.embeddings(images.to(vm.embeddings.patch_embedding.weight.dtype)))
        # hidden_states[k] is the output of k layers (hidden_states[0] = embeddings)
        n_layers = len(vm.encoder.layers)
        keep = self.select_layer % (n_layers + 1)
        for layer in vm.encoder.layers[:keep]:
            hidden = layer(hidden, attention_mask=None)
        return hidden[:, 1:] if self.select_feature == "patch" else hidden


def build_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


def patch_info_mining(low: torch.Tensor, aux: torch.Tensor, query: nn.Module, key: nn.Module, value: nn.Module
                      ) -> torch.Tensor:
    """Each low-res token attends over its s x s sub-grid of the high-res map; returns low + mined features.

    low: [N, p*p, C] CLIP tokens, row-major; aux: [N, Ca, p*s, p*s]."""
    n, tokens, _ = low.shape
    p = math.isqrt(tokens)
    s = aux.shape[-1] // p
    ca = aux.shape[1]
    # [N, Ca, p*s, p*s] -> [N, p, s, p, s, Ca] -> [N, p, p, s, s, Ca] -> [N, p*p, s*s, Ca]
    grid = aux.permute(0, 2, 3, 1).reshape(n, p, s, p, s, ca).permute(0, 1, 3, 2, 4, 5).reshape(n, p * p, s * s, ca)
    q = query(low)  # [N, T, C]
    k = key(grid)  # [N, T, s*s, C]
    v = value(grid)
    scores = (q.unsqueeze(2) @ (k.transpose(-1, -2) / math.sqrt(k.shape[-1]))).nan_to_num()  # [N, T, 1, s*s]
    mined = (scores.softmax(-1) @ v).mean(2)  # [N, T, C]
    return low + mined


# -- the whole model --------------------------------------------------------------------------------
class MgmForCausalLM(nn.Module):
    """An MGM model with any of the supported LLM backbones; `model` is the backbone's base model with
    the vision modules attached to it (as in MGM's MGMMetaModel), `lm_head` the output projection."""

    def __init__(self, config: MgmConfig):
        super().__init__()
        from transformers import AutoModel

        config.check()
        self.config = config
        text = config.text_config
        self.model = AutoModel.from_config(text)
        vision = ClipTower(config.vision_config, config.mm_vision_select_layer, config.mm_vision_select_feature)
        self.model.vision_tower = vision
        self.model.vision_tower_aux = ConvNeXtAuxTower(config.aux["dims"], config.aux["depths"],
                                                       drop_path_rate=float(config.aux.get("drop_path_rate", 0.1)))
        c, ca = config.mm_hidden_size, config.mm_hidden_size_aux
        self.model.vlm_uni_query_projector = nn.Sequential(nn.LayerNorm(c), nn.Linear(c, c))
        self.model.vlm_uni_aux_projector = nn.Sequential(nn.LayerNorm(ca), nn.Linear(ca, c))
        self.model.vlm_uni_val_projector = nn.Sequential(nn.LayerNorm(ca), nn.Linear(ca, c))
        self.model.mm_projector = build_projector(config.mm_projector_type, c, text.hidden_size)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        # as transformers initialises a causal LM's head (PyTorch's default would be ~half as wide)
        with whole_for_init([self.lm_head.weight]):  # under ZeRO-3's zero.Init the Linear is already partitioned
            nn.init.normal_(self.lm_head.weight, std=float(getattr(text, "initializer_range", 0.02)))
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # -- vision ---------------------------------------------------------------------------------
    @staticmethod
    def _maybe_no_grad(module: nn.Module):
        frozen = not any(p.requires_grad for p in module.parameters())
        return torch.no_grad() if frozen else torch.enable_grad()

    def mine(self, low: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        m = self.model
        return patch_info_mining(low, aux.to(low.dtype), m.vlm_uni_query_projector, m.vlm_uni_aux_projector,
                                 m.vlm_uni_val_projector)

    def vision_features(self, images: torch.Tensor, images_aux: torch.Tensor) -> torch.Tensor:
        """Mined image tokens before the projector: [n_images, image_tokens, mm_hidden_size].

        images: [n, views, 3, h, w] (views: 1, or grid^2 crops then the global view); images_aux: [n, 3, S, S]."""
        cfg, n = self.config, images.shape[0]
        with self._maybe_no_grad(self.model.vision_tower):
            low = self.model.vision_tower(images.flatten(0, 1))
        low = low.reshape(n, images.shape[1], *low.shape[1:])  # [n, views, T, C]
        with self._maybe_no_grad(self.model.vision_tower_aux):
            aux = self.model.vision_tower_aux(images_aux)  # [n, Ca, S/4, S/4]
        g = cfg.image_grid
        if g == 1:
            return self.mine(low[:, 0], aux)
        # local branch: the aux map split into g x g crops (row-major), each mined with its crop's tokens
        side = aux.shape[-1] // g
        crops = aux.reshape(n, aux.shape[1], g, side, g, side).permute(0, 2, 4, 1, 3, 5).flatten(0, 2)
        local = self.mine(low[:, : g * g].flatten(0, 1), crops).reshape(n, g * g * low.shape[2], -1)
        if not cfg.image_global:
            return local
        # global branch: the whole aux map downscaled to one crop's size, mined with the global view
        small = F.interpolate(aux.float(), scale_factor=1 / g, mode="bilinear", align_corners=False).to(aux.dtype)
        glob = self.mine(low[:, g * g], small)
        return torch.cat([glob, local], dim=1)

    def encode_images(self, images: torch.Tensor, images_aux: torch.Tensor) -> torch.Tensor:
        return self.model.mm_projector(self.vision_features(images, images_aux))

    # -- text + images ---------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
              images_aux: torch.Tensor | None = None) -> torch.Tensor:
        is_image = input_ids == IMAGE_TOKEN_INDEX
        embeds = self.model.embed_tokens(input_ids.masked_fill(is_image, 0))
        n_positions = int(is_image.sum())
        if images is None or images.shape[0] == 0:
            if n_positions:
                raise ValueError(f"{n_positions} image positions in input_ids but no images were given")
            return embeds
        features = self.encode_images(images, images_aux)
        # transformers' Gemma scales embeddings inside embed_tokens; MGM (transformers 4.38) scaled every input
        # embedding, image features included, by sqrt(hidden_size): apply the same factor to the image rows
        scale = getattr(self.model.embed_tokens, "embed_scale", None)
        if scale is not None:
            features = features * scale.to(features.dtype)
        if features.shape[0] * features.shape[1] != n_positions:
            raise ValueError(f"{n_positions} image positions in input_ids but {features.shape[0]} image(s) x "
                             f"{features.shape[1]} tokens of features")
        return embeds.masked_scatter(is_image.unsqueeze(-1), features.to(embeds.dtype))

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       images: torch.Tensor | None = None, images_aux: torch.Tensor | None = None,
                       position_ids: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.embed(input_ids, images, images_aux)
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False).last_hidden_state

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                images: torch.Tensor | None = None, images_aux: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Logits [batch, seq, vocab] (tests and export checks; training never builds full logits)."""
        return self.lm_head(self.forward_hidden(input_ids, attention_mask, images, images_aux, position_ids))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, images: torch.Tensor | None = None,
                 images_aux: torch.Tensor | None = None, max_new_tokens: int = 16, do_sample: bool = False,
                 temperature: float = 1.0, eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
                 generator: torch.Generator | None = None, synced_gpus: bool = False, **_: Any) -> torch.Tensor:
        """Decoding with the backbone's KV cache for a left-padded batch: greedy, or with `do_sample` drawn from
        softmax(logits / temperature) (`generator` makes it reproducible). Returns prompt + new ids.
        `synced_gpus`: every rank keeps decoding (padding its finished rows) until all ranks are done, as
        DeepSpeed ZeRO-3 needs: each forward gathers parameters collectively."""
        embeds = self.embed(input_ids, images, images_aux)
        mask = attention_mask.clone()
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=True)
        arg = cache_argument(self.model)
        step = cached_step(self.model, getattr(out, arg), mask, positions[:, -1:], arg)
        new = decode(out.last_hidden_state[:, -1], self.lm_head, step, max_new_tokens,
                     stop_ids(eos_token_id, input_ids.device), pad_token_id, do_sample, temperature, generator,
                     synced_gpus)
        return torch.cat([input_ids, new], dim=1)

    # -- conveniences the framework uses --------------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=activation_checkpointing_kwargs)

