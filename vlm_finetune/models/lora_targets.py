"""Where LoRA goes, resolved the same way for every family: `lora.targets.<part>` (the user's own regex) wins, the
vision part takes the family's vision pattern, the projector none, and the LLM's choice follows `lora.llm_modules`,
checked against the scopes the family knows. A family supplies only its patterns."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable

from vlm_finetune.errors import ConfigError
from vlm_finetune.models.base import Part
from vlm_finetune.settings import LoraSettings

# the scopes that reach the MLP, and so an MoE model's fused experts
EXPERT_SCOPES = ("mlp", "experts", "all")


def custom_target(part: Part, lora: LoraSettings) -> str | None:
    """`lora.targets.<part>`: a regex the user set for this part, which replaces the family's choice."""
    return lora.target(part.value)


@dataclass(frozen=True)
class LoraTargets:
    family: str  # the family's name in error messages
    vision: str  # regex of the vision tower's linear layers
    scopes: tuple[str, ...]  # the values of lora.llm_modules this family accepts
    scope_help: str  # the error's advice for any other value

    def scope(self, lora: LoraSettings) -> str:
        """`lora.llm_modules`, checked against the scopes this family knows."""
        scope = lora.llm_modules
        if scope not in self.scopes:
            raise ConfigError(f"lora.llm_modules={scope!r}: {self.scope_help}")
        return scope

    def pattern(self, part: Part, lora: LoraSettings, llm: Callable[[str], str | None]) -> str | None:
        """The module regex of `part`; `llm(scope)` gives the LLM's for a checked `lora.llm_modules` scope."""
        custom = custom_target(part, lora)
        if custom:
            return str(custom)
        if part is Part.VISION:
            return self.vision
        if part is not Part.LLM:
            raise ConfigError(f"train.{part.value}=lora is not supported for {self.family}; use frozen or full")
        return llm(self.scope(lora))

    def expert_parameters(self, part: Part, lora: LoraSettings, is_moe: Callable[[], bool],
                          parameters: Iterable[str]) -> list[str]:
        """`parameters` (an MoE model's fused expert tensors) when the LLM's scope reaches the experts and no
        custom regex replaces the family's choice. `is_moe` is asked first: a dense model's scope is checked
        by `pattern`, not here."""
        if part is not Part.LLM or custom_target(part, lora):
            return []
        if is_moe() and self.scope(lora) in EXPERT_SCOPES:
            return list(parameters)
        return []
