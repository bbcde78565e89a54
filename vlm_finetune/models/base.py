"""The small interface every model family implements, so the training code never names a family."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from vlm_finetune.data.sample import Sample
from vlm_finetune.errors import ConfigError


class Part(str, enum.Enum):
    VISION = "vision"
    PROJECTOR = "projector"
    LLM = "llm"


class Mode(str, enum.Enum):
    FROZEN = "frozen"
    LORA = "lora"
    FULL = "full"


ALLOWED_MODES = {
    Part.VISION: (Mode.FROZEN, Mode.LORA, Mode.FULL),
    Part.PROJECTOR: (Mode.FROZEN, Mode.FULL),
    Part.LLM: (Mode.FROZEN, Mode.LORA, Mode.FULL),
}


def parse_trainability(train_cfg: Any) -> dict[Part, Mode]:
    """`train: {vision: frozen, projector: full, llm: lora}` -> {Part: Mode}, with a clear error."""
    result = {}
    for part in Part:
        raw = str(train_cfg.get(part.value, "frozen")).lower()
        try:
            mode = Mode(raw)
        except ValueError:
            raise ConfigError(
                f"train.{part.value}={raw!r} is not a trainability mode; use one of "
                f"{'|'.join(m.value for m in ALLOWED_MODES[part])}"
            ) from None
        if mode not in ALLOWED_MODES[part]:
            raise ConfigError(
                f"train.{part.value}={mode.value} is not supported; use one of "
                f"{'|'.join(m.value for m in ALLOWED_MODES[part])}"
            )
        result[part] = mode
    if all(m is Mode.FROZEN for m in result.values()):
        raise ConfigError("train.vision, train.projector and train.llm are all 'frozen': nothing would train. "
                          "Set e.g. train.llm=lora.")
    return result


class SampleTooLong(Exception):
    """Raised by a processor's `encode` when a sample exceeds max_length and cannot be truncated
    (policy `drop`, or the cut would go through an image span). The data module drops and counts it."""


@dataclass
class EncodedSample:
    """One tokenised sample: 1-D tensors plus the image tensors the family's forward needs."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # -100 where no loss is taken
    image_inputs: dict[str, torch.Tensor]  # e.g. pixel_values, image_grid_thw; empty without images
    num_supervised_tokens: int
    truncated: bool = False


def pad_encoded(encoded: list[EncodedSample], pad_token_id: int, padding_side: str = "right",
                ignore_index: int = -100) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of a batch, padded on `padding_side` (left for generation)."""
    length = max(e.input_ids.numel() for e in encoded)
    input_ids = torch.full((len(encoded), length), pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), length), ignore_index, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = e.input_ids.numel()
        span = slice(0, n) if padding_side == "right" else slice(length - n, length)
        input_ids[row, span], labels[row, span], attention_mask[row, span] = e.input_ids, e.labels, 1
    return input_ids, attention_mask, labels


class FamilyProcessor(Protocol):
    """Turns Samples into model inputs and generated ids back into text."""

    tokenizer: Any

    def encode(self, sample: Sample, max_length: int | None = None, for_generation: bool = False) -> EncodedSample:
        """Tokenise a sample. With `for_generation`, the last assistant message is left out of the ids
        (the prompt ends where the answer would begin)."""
        ...

    def collate(self, encoded: list[EncodedSample], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad and stack into a batch (`input_ids`, `attention_mask`, `labels`, image inputs, extras)."""
        ...

    def decode(self, token_ids: torch.Tensor) -> str:
        ...

    def save_pretrained(self, folder: str) -> None:
        ...


class ModelFamily(Protocol):
    """What a model family declares to the framework."""

    name: str
    #: batch keys the model's forward and generate take (the rest of a batch is for the loss and metrics)
    input_keys: tuple[str, ...]
    #: module classes of the LLM decoder layers and vision blocks (wrapping, checkpointing)
    decoder_layer_classes: tuple[type[nn.Module], ...]
    vision_block_classes: tuple[type[nn.Module], ...]

    def build_model(self, model_cfg: Any, dtype: torch.dtype) -> nn.Module:
        ...

    def load_processor(self, model_cfg: Any) -> FamilyProcessor:
        ...

    def part_module_names(self, model: nn.Module) -> dict[Part, list[str]]:
        """Qualified module names (in the unwrapped model) that make up each part."""
        ...

    def lora_target_pattern(self, part: Part, model_cfg: Any, lora_cfg: Any) -> str:
        """A regex over module names selecting the linear layers that take LoRA in this part."""
        ...

    def hidden_states(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states (batch, seq, hidden) before the output projection."""
        ...

    def output_embedding(self, model: nn.Module) -> nn.Module:
        """The output projection (lm_head) module of the unwrapped model."""
        ...

    def memory_dims(self, model_cfg: Any, image_size: int) -> dict[str, int]:
        """Architecture sizes for the memory planner (`python -m vlm_finetune.plan`), read from the config
        without building the model. `build_model(..., device="meta")` must also build without reading
        weights (the planner counts parameters on it). Keys (ints):
        - LLM: `hidden`, `layers` (decoder layers), `intermediate` (dense MLP width), `heads`, `kv_heads`,
          `head_dim`, `q_dim` (heads * head_dim), `kv_dim` (kv_heads * head_dim), `vocab`; optional
          `rotary_dim` (rotated dims per head, default head_dim)
        - MoE (only for MoE LLMs): `experts`, `experts_per_token`, `moe_intermediate`, `shared_experts`,
          `moe_layers` (how many of `layers` are MoE; the planner takes them to follow the dense ones)
        - vision tower: `vision_layers`, `vision_hidden`, `vision_intermediate` (MLP width), `vision_heads`
        - one square image of `image_size` pixels as the processor resizes it: `vision_patches_per_image`
          (patches the ViT runs on, all towers), `image_tokens_per_image` (tokens it becomes in the LLM)
        Families without it make the planner stop with a ConfigError naming this method."""
        ...


_REGISTRY: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    _REGISTRY[family.name] = family
    return family


def get_family(name: str) -> ModelFamily:
    # importing the families registers them
    import vlm_finetune.models  # noqa: F401

    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"model.family={name!r} is unknown; known families: {sorted(_REGISTRY)}") from None
