"""The small interface every model family implements, so the training code never names a family: the
trainability vocabulary (Part, Mode), the processor protocol and the `Family` base class."""
from __future__ import annotations

import abc
import enum
from pathlib import Path
from typing import Any, Mapping, Protocol

import torch
from torch import nn

from vlm_finetune.data.sample import EncodedSample, Sample
from vlm_finetune.errors import ConfigError
from vlm_finetune.settings import LoraSettings, ModelSettings


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


def parse_trainability(values: Mapping[str, str]) -> dict[Part, Mode]:
    """`train: {vision: frozen, projector: full, llm: lora}` -> {Part: Mode}, with a clear error."""
    result = {}
    for part in Part:
        if part.value not in values:
            raise ConfigError(f"train.{part.value} is not set; use one of "
                              f"{'|'.join(m.value for m in ALLOWED_MODES[part])}")
        raw = str(values[part.value]).lower()
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


class Family(abc.ABC):
    """What a model family declares to the framework. Subclasses implement the abstract methods (a family
    missing one cannot be created); the optional hooks have working defaults here, so generic code calls
    them without probing."""

    name: str = ""
    #: batch keys the model's forward and generate take (the rest of a batch is for the loss and metrics)
    input_keys: tuple[str, ...] = ()

    # -- structure ----------------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def decoder_layer_classes(self) -> tuple[type[nn.Module], ...]:
        """Module classes of the LLM decoder layers (FSDP units, activation checkpointing)."""

    @property
    @abc.abstractmethod
    def vision_block_classes(self) -> tuple[type[nn.Module], ...]:
        """Module classes of the vision towers' blocks (FSDP units)."""

    @property
    def zero3_leaf_classes(self) -> tuple[type[nn.Module], ...]:
        """Modules DeepSpeed ZeRO-3 must gather whole (MoE blocks, whose experts fire data-dependently)."""
        return ()

    @abc.abstractmethod
    def part_module_names(self, model: nn.Module) -> dict[Part, list[str]]:
        """Qualified module names (in the unwrapped model) that make up each part."""

    @abc.abstractmethod
    def lora_target_pattern(self, part: Part, spec: ModelSettings, lora: LoraSettings) -> str | None:
        """A regex over module names selecting the linear layers that take LoRA in this part (None: no
        module takes LoRA, e.g. when only `lora_target_parameters` do)."""

    def lora_target_parameters(self, part: Part, spec: ModelSettings, lora: LoraSettings) -> list[str]:
        """Parameters that take LoRA directly (PEFT's target_parameters: fused MoE expert tensors)."""
        return []

    # -- builders -----------------------------------------------------------------------------------
    @abc.abstractmethod
    def build_model(self, spec: ModelSettings, dtype: torch.dtype = torch.float32, device: str | None = None,
                    quantization: str | None = None) -> nn.Module:
        """The model of `spec`: a checkpoint folder loaded, or built from its config with random
        weights. `device="meta"` builds the structure only (no weight file read: the planner counts on
        it); `quantization="nf4"` loads the LLM's linear layers in 4-bit. Activation checkpointing is not
        the builder's business (trainability.apply_activation_checkpointing)."""

    @abc.abstractmethod
    def load_processor(self, spec: ModelSettings, truncation: str) -> FamilyProcessor:
        """The processor that turns Samples into this family's inputs (`truncation`: data.truncation)."""

    # -- forward ------------------------------------------------------------------------------------
    @abc.abstractmethod
    def hidden_states(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states (batch, seq, hidden) before the output projection."""

    @abc.abstractmethod
    def output_embedding(self, model: nn.Module) -> nn.Module:
        """The output projection (lm_head) module of the unwrapped model."""

    # batch keys of image inputs: a micro-batch holding none of them is text-only
    image_keys: tuple[str, ...] = ()
    #: batch keys of video inputs (GLM-4.1V/4.5V): a micro-batch holding them runs the vision tower already
    video_keys: tuple[str, ...] = ()
    # whether the model's generate() runs the vision path before the first forward (transformers' multimodal
    # models) rather than inside it, after the token embedding
    images_encoded_before_generation: bool = False
    # whether build_model works inside DeepSpeed's zero.Init (ZeRO-3 then builds the model partitioned, in
    # VLMModule.configure_model, and streams a folder's tensors into each rank's partition); otherwise each rank
    # builds the whole model and DeepSpeed partitions it when its engine starts
    builds_partitioned: bool = False
    # whether precision=nf4 (QLoRA) loads this family's LLM in 4 bits; a family without it refuses nf4 in build_model
    # with a ConfigError, before any weight is read
    supports_nf4: bool = True

    def can_build_partitioned(self, spec: ModelSettings) -> bool:
        """`builds_partitioned` for this model configuration (a family may build some of its models whole)."""
        return self.builds_partitioned

    def quantises_while_loading(self, spec: ModelSettings) -> bool:
        """Whether precision=nf4 quantises this model's decoder layers one at a time as its folder is read, or
        as each is made when the model is built from its config (models/nf4_load.py), rather than holding the
        whole model in 16 bits first."""
        return False

    def image_features(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """The vision path (tower and projector) run on the image inputs of `batch` (`image_keys`): what takes
        the image positions' place in the LLM's input. None: the family has no vision path of its own."""
        return None

    def input_embedding(self, model: nn.Module) -> nn.Module:
        """The token embedding of the unwrapped model (it runs before the vision path in the forward)."""
        return model.get_input_embeddings()

    # -- planner and export -------------------------------------------------------------------------
    @staticmethod
    def user_folder(spec: ModelSettings, expected: str) -> Path | None:
        """`model.path` when set (a folder with a config.json; else a ConfigError naming `expected`, what such
        a folder holds), None when it is not set."""
        if not spec.path:
            return None
        folder = Path(spec.path).expanduser()
        if not (folder / "config.json").is_file():
            raise ConfigError(f"model.path={folder} has no config.json; point it at {expected}")
        return folder

    def checkpoint_folder(self, spec: ModelSettings) -> Path | None:
        """The folder the model loads from (`model.path`, or the family's generated tiny folder); None: the model
        is built from its config with random weights (the planner and the loaders ask)."""
        return self.user_folder(spec, "a checkpoint folder with a config.json")

    def memory_dims(self, spec: ModelSettings, image_size: int) -> dict[str, int]:
        """Architecture sizes for the memory planner (`python -m vlm_finetune.plan`), read from the config
        without building the model. Keys (ints):
        - LLM: `hidden`, `layers` (decoder layers), `intermediate` (dense MLP width), `heads`, `kv_heads`,
          `head_dim`, `q_dim` (heads * head_dim), `kv_dim` (kv_heads * head_dim), `vocab`; optional
          `rotary_dim` (rotated dims per head, default head_dim)
        - MoE (only for MoE LLMs): `experts`, `experts_per_token`, `moe_intermediate`, `shared_experts`,
          `moe_layers` (how many of `layers` are MoE; the planner takes them to follow the dense ones)
        - vision tower: `vision_layers`, `vision_hidden`, `vision_intermediate` (MLP width), `vision_heads`
        - one square image of `image_size` pixels as the processor resizes it: `vision_patches_per_image`
          (patches the ViT runs on, all towers), `image_tokens_per_image` (tokens it becomes in the LLM)
        - optional `vision_extra_saved_elements_per_image`: what trainable modules between the towers and
          the LLM save for backward per image, beyond the tokens
        The default stops the planner with a ConfigError naming this method."""
        raise ConfigError(f"model family {self.name!r} does not declare memory_dims(spec, image_size), which "
                          "the planner needs for activations; implement it in the family (see models/base.py)")

    def save_merged(self, model: nn.Module, folder: Path, processor: FamilyProcessor) -> None:
        """A merged model (LoRA folded in) written as a checkpoint folder of the family's released layout;
        by default a Hugging Face folder (save_pretrained)."""
        model.save_pretrained(str(folder), safe_serialization=True)
        processor.save_pretrained(str(folder))
