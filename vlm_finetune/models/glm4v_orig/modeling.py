"""The original GLM-4V-9B (THUDM, June 2024), written from the facts in shared/reference/glm4v_9b_original.md.

    model.*      the GLM-4 decoder: transformers' text `GlmModel` (q/k/v split from the released fused QKV and
                 the fused gate-first SwiGLU kept as `gate_up_proj`; checkpoint.py maps the names)
    vision.*     the EVA2-CLIP tower: patch embedding (conv, cls, learned positions), transformer layers whose
                 LayerNorms sit inside the residual after each sublayer, no final norm
    projector.*  the 2x2 stride-2 conv, the GLU adapter, the learned boi / eoi vectors (all / scaling_factor)
    lm_head      the untied output layer

The image is spliced as the released model does it: the processor writes boi, `image_tokens` placeholder
rows and eoi into the ids (the released tokenizer writes one placeholder, the released model expands it to
the same sequence), the forward pass writes [boi, patches, eoi] / scaling_factor over that span, and every
patch row shares one position id (boi p, patches p + 1, eoi p + 2, the text after it p + 3, ...).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vlm_finetune.models._decode import cached_step, decode, stop_ids
from vlm_finetune.models._partitioned import whole_for_init

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# special tokens of the released tokenizer, in id order after the BPE ranks (151329 ... 151342)
SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>")


@dataclass
class VisionSettings:
    """`vision_config` of the released config.json."""

    hidden_size: int = 1792
    num_hidden_layers: int = 63
    num_heads: int = 16
    intermediate_size: int = 15360
    patch_size: int = 14
    image_size: int = 1120
    in_channels: int = 3
    layer_norm_eps: float = 1e-6
    scaling_factor: float = 8.0

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        return self.grid**2 + 1

    @property
    def patch_tokens(self) -> int:
        """LLM rows of one image's patches after the 2x2 stride-2 conv (1600 at 1120 px)."""
        return (self.grid // 2) ** 2


@dataclass
class Glm4vOrigConfig:
    text_config: Any  # transformers GlmConfig
    vision: VisionSettings = field(default_factory=VisionSettings)
    boi_token_id: int = 151339
    eoi_token_id: int = 151340
    initializer_range: float = 0.02
    source: dict = field(default_factory=dict)  # the config.json it was read from (every field kept on export)

    @property
    def image_tokens(self) -> int:
        """LLM positions one image takes: boi + patches + eoi (1602 at 1120 px)."""
        return self.vision.patch_tokens + 2

    @property
    def tie_word_embeddings(self) -> bool:
        return bool(getattr(self.text_config, "tie_word_embeddings", False))

    def get(self, key: str, default=None):  # PEFT reads a model's config like a dict
        return getattr(self.text_config, key, default)

    def to_dict(self) -> dict:
        return self.text_config.to_dict()


# -- EVA2-CLIP ---------------------------------------------------------------------------------------
class PatchEmbedding(nn.Module):
    def __init__(self, arch: VisionSettings):
        super().__init__()
        self.proj = nn.Conv2d(arch.in_channels, arch.hidden_size, kernel_size=arch.patch_size, stride=arch.patch_size)
        self.cls_embedding = nn.Parameter(torch.zeros(1, arch.hidden_size))
        self.position_embedding = nn.Embedding(arch.num_positions, arch.hidden_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.proj(images.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)  # row-major grid
        x = torch.cat([self.cls_embedding.expand(x.shape[0], -1, -1), x], dim=1)
        # the whole table, no interpolation; called as a module so that ZeRO-3 gathers its weight
        return x + self.position_embedding(torch.arange(x.shape[1], device=x.device)).unsqueeze(0)


class VisionAttention(nn.Module):
    def __init__(self, arch: VisionSettings):
        super().__init__()
        self.num_heads = arch.num_heads
        self.query_key_value = nn.Linear(arch.hidden_size, 3 * arch.hidden_size)
        self.dense = nn.Linear(arch.hidden_size, arch.hidden_size)
        self.attn_implementation = "sdpa"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        # [q all heads | k all heads | v all heads]
        q, k, v = self.query_key_value(x).view(b, length, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if self.attn_implementation == "eager":  # the (heads x L x L) matrix, as the released eager path
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            out = scores.softmax(-1, dtype=torch.float32).to(v.dtype) @ v
        else:  # flash / memory-efficient kernels where the device has them
            out = F.scaled_dot_product_attention(q, k, v)
        return self.dense(out.transpose(1, 2).reshape(b, length, -1))


class VisionMLP(nn.Module):
    def __init__(self, arch: VisionSettings):
        super().__init__()
        self.fc1 = nn.Linear(arch.hidden_size, arch.intermediate_size)
        self.fc2 = nn.Linear(arch.intermediate_size, arch.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU


def _checkpointing_layer_base() -> type[nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return GradientCheckpointingLayer


class EvaTransformerLayer(_checkpointing_layer_base()):
    """x + LN(Attn(x)), then + LN(MLP(x)): the norms inside the residual, after the sublayer (the released
    names: `input_layernorm` normalises the attention output, `post_attention_layernorm` the MLP output)."""

    def __init__(self, arch: VisionSettings):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)
        self.attention = VisionAttention(arch)
        self.mlp = VisionMLP(arch)
        self.post_attention_layernorm = nn.LayerNorm(arch.hidden_size, eps=arch.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.input_layernorm(self.attention(x))
        return x + self.post_attention_layernorm(self.mlp(x))


class EvaTransformer(nn.Module):
    def __init__(self, arch: VisionSettings):
        super().__init__()
        self.layers = nn.ModuleList(EvaTransformerLayer(arch) for _ in range(arch.num_hidden_layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class EvaVisionTower(nn.Module):
    """Patches + cls through the transformer; returns the patch tokens (cls dropped), no final norm."""

    def __init__(self, arch: VisionSettings):
        super().__init__()
        self.patch_embedding = PatchEmbedding(arch)
        self.transformer = EvaTransformer(arch)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.transformer(self.patch_embedding(images))[:, 1:]


# -- adapter -----------------------------------------------------------------------------------------
class GLU(nn.Module):
    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.linear_proj = nn.Linear(hidden, hidden, bias=False)
        self.norm1 = nn.LayerNorm(hidden)  # the default eps 1e-5, not the tower's
        self.gate_proj = nn.Linear(hidden, ffn, bias=False)
        self.dense_h_to_4h = nn.Linear(hidden, ffn, bias=False)
        self.dense_4h_to_h = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.linear_proj(x)))
        return self.dense_4h_to_h(F.silu(self.gate_proj(x)) * self.dense_h_to_4h(x))


class VisionAdapter(nn.Module):
    """Patch tokens [n, grid*grid, C] -> [n, boi + (grid/2)^2 + eoi, hidden] / scaling_factor."""

    def __init__(self, arch: VisionSettings, hidden: int, ffn: int):
        super().__init__()
        self.conv = nn.Conv2d(arch.hidden_size, hidden, kernel_size=2, stride=2)
        self.linear_proj = GLU(hidden, ffn)
        self.boi = nn.Parameter(torch.zeros(1, 1, hidden))
        self.eoi = nn.Parameter(torch.zeros(1, 1, hidden))
        self.scaling_factor = float(arch.scaling_factor)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        n, length, channels = patches.shape
        side = int(length**0.5)
        x = patches.transpose(1, 2).reshape(n, channels, side, side)
        x = self.conv(x.to(self.conv.weight.dtype)).flatten(2).transpose(1, 2)
        x = self.linear_proj(x)
        x = torch.cat([self.boi.expand(n, -1, -1), x, self.eoi.expand(n, -1, -1)], dim=1)
        return x / self.scaling_factor


def image_positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, boi: int, eoi: int
                    ) -> torch.Tensor:
    """Position ids of a (possibly padded) batch whose image spans are boi, patch rows, eoi: every patch row
    takes the position after boi's, eoi the next one, so an image consumes three positions (as the released
    model numbers them); left padding starts each row at 0."""
    is_boi = input_ids == boi
    inside = (is_boi.long().cumsum(-1) - (input_ids == eoi).long().cumsum(-1)) > 0
    patch = inside & ~is_boi
    repeated = patch.clone()
    repeated[:, 0] = False
    repeated[:, 1:] &= patch[:, :-1]  # a patch row after a patch row: same position
    step = (~repeated).long()
    if attention_mask is not None:
        step = step * attention_mask.long()
    return (step.cumsum(-1) - 1).clamp(min=0)


class Glm4vOrigForCausalLM(nn.Module):
    def __init__(self, config: Glm4vOrigConfig):
        super().__init__()
        from transformers import GlmModel

        self.config = config
        text = config.text_config
        self.model = GlmModel(text)
        # the released embedding has no padding row: <|endoftext|> (pad and image placeholder) is a real row
        self.model.embed_tokens.padding_idx = None
        self.vision = EvaVisionTower(config.vision)
        self.projector = VisionAdapter(config.vision, int(text.hidden_size), int(text.intermediate_size))
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        std = float(config.initializer_range)
        # module by module, in named_parameters' order (the same random numbers as one loop over them); under
        # ZeRO-3's zero.Init each module's own tensors are gathered whole for the write, never a whole tower
        for tower in (self.vision, self.projector):
            for prefix, module in tower.named_modules():
                own = list(module.named_parameters(recurse=False))
                if not own:
                    continue
                with whole_for_init([p for _, p in own]):
                    for name, p in own:
                        if name.endswith("bias"):
                            nn.init.zeros_(p)
                        elif "norm" in f"{prefix}.{name}":
                            nn.init.ones_(p)
                        else:
                            nn.init.normal_(p, std=std)
        with whole_for_init([self.lm_head.weight]):
            nn.init.normal_(self.lm_head.weight, std=std)
        self.set_attn_implementation(getattr(text, "_attn_implementation", None) or "sdpa")

    def set_attn_implementation(self, name: str) -> None:
        """`eager` materialises the attention matrices (both towers); anything else is SDPA."""
        self.config.text_config._attn_implementation = "eager" if name == "eager" else "sdpa"
        for module in self.vision.modules():
            if isinstance(module, VisionAttention):
                module.attn_implementation = "eager" if name == "eager" else "sdpa"

    @staticmethod
    def _maybe_no_grad(module: nn.Module):
        frozen = not any(p.requires_grad for p in module.parameters())
        return torch.no_grad() if frozen else torch.enable_grad()

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """[n, 3, S, S] -> [n, image_tokens, hidden] (boi, patches, eoi; divided by the scaling factor)."""
        with self._maybe_no_grad(self.vision):
            patches = self.vision(pixel_values)
        return self.projector(patches)

    def embed(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        embeds = self.model.embed_tokens(input_ids)
        boi, eoi = self.config.boi_token_id, self.config.eoi_token_id
        n_images = int((input_ids == boi).sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_images:
                raise ValueError(f"{n_images} image span(s) in input_ids but no pixel_values were given")
            return embeds
        features = self.image_features(pixel_values)
        span = (input_ids == boi).long().cumsum(-1) - (input_ids == eoi).long().cumsum(-1) > 0
        span |= input_ids == eoi
        if features.shape[0] != n_images or features.shape[0] * features.shape[1] != int(span.sum()):
            raise ValueError(f"{n_images} image span(s) of {int(span.sum())} rows in input_ids, but "
                             f"{features.shape[0]} image(s) x {features.shape[1]} rows of features")
        return embeds.masked_scatter(span.unsqueeze(-1), features.to(embeds.dtype))

    def positions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return image_positions(input_ids, attention_mask, self.config.boi_token_id, self.config.eoi_token_id)

    def forward_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       pixel_values: torch.Tensor | None = None,
                       pack_segments: list[list[tuple[int, int]]] | None = None) -> torch.Tensor:
        """Final hidden states of a padded batch, or of packed rows (`pack_segments`: each row's sample lengths,
        data/packing.py): then each sample takes its own positions and attends only to itself."""
        embeds = self.embed(input_ids, pixel_values)
        if pack_segments is not None:
            positions, attention_mask = self.packed_positions_and_mask(input_ids, pack_segments)
        else:
            positions = self.positions(input_ids, attention_mask)
        return self.model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions,
                          use_cache=False).last_hidden_state

    def packed_positions_and_mask(self, input_ids: torch.Tensor, segments: list[list[tuple[int, int]]]
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Positions restarting per sample (its image patches sharing one, as in a padded batch) and the
        block-diagonal causal mask as a (rows, 1, L, L) boolean: the shared image positions repeat, so the
        samples' boundaries cannot be read back from the positions as transformers does for other models."""
        rows, length = input_ids.shape
        positions = torch.zeros_like(input_ids)
        mask = torch.zeros((rows, 1, length, length), dtype=torch.bool, device=input_ids.device)
        for r, row in enumerate(segments):
            start = 0
            for n in [n for n, _ in row] + [length - sum(n for n, _ in row)]:  # the samples, then the padding
                if n:
                    positions[r, start:start + n] = self.positions(input_ids[r:r + 1, start:start + n], None)[0]
                    mask[r, 0, start:start + n, start:start + n] = torch.ones((n, n), dtype=torch.bool,
                                                                              device=input_ids.device).tril()
                start += n
        return positions, mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, **_: Any) -> torch.Tensor:
        """Logits [batch, seq, vocab] (tests and export checks; training never builds full logits)."""
        return self.lm_head(self.forward_hidden(input_ids, attention_mask, pixel_values))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor | None = None,
                 max_new_tokens: int = 16, do_sample: bool = False, temperature: float = 1.0,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int = 0,
                 generator: torch.Generator | None = None, synced_gpus: bool = False, **_: Any) -> torch.Tensor:
        """Greedy (or sampled) decoding of a left-padded batch with the decoder's KV cache; new tokens take the
        position after the last one (the released model continues from the unexpanded count the same way).
        `synced_gpus`: every rank decodes until all are done (ZeRO-3 gathers parameters collectively)."""
        mask = attention_mask.clone()
        position = self.positions(input_ids, mask)
        out = self.model(inputs_embeds=self.embed(input_ids, pixel_values), attention_mask=mask,
                         position_ids=position, use_cache=True)
        step = cached_step(self.model, out.cache, mask, position[:, -1:], "cache")
        new = decode(out.last_hidden_state[:, -1], self.lm_head, step, max_new_tokens,
                     stop_ids(eos_token_id, input_ids.device), pad_token_id, do_sample, temperature, generator,
                     synced_gpus)
        return torch.cat([input_ids, new], dim=1)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None) -> None:
        """The decoder layers (transformers' flag) and the ViT layers (recomputed when the tower trains)."""
        import functools

        from torch.utils.checkpoint import checkpoint

        kwargs = dict(activation_checkpointing_kwargs or {"use_reentrant": False})
        self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        for layer in self.vision.transformer.layers:
            layer.gradient_checkpointing = True
            layer._gradient_checkpointing_func = functools.partial(checkpoint, **kwargs)

