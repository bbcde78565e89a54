"""Where LoRA goes, resolved the same way for every family: `lora.targets.<part>` (the user's own regex) wins, the
vision part takes the family's vision pattern, the projector none, and the LLM's choice follows `lora.llm_modules`,
checked against the scopes the family knows. A family supplies only its patterns."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable

from torch import nn

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


# the layer types PEFT's LoRA adapts (bitsandbytes' 4-bit linear is an nn.Linear)
LORA_LAYERS = (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _names(names: list[str], most: int = 6) -> str:
    return ", ".join(names[:most]) + (f" ... ({len(names)} in all)" if len(names) > most else "")


def check_lora_matches(model: nn.Module, part_modules: dict, patterns: dict, lora: LoraSettings) -> dict[Part, int]:
    """Each part's LoRA regex compiled and matched (as PEFT matches it: the whole module name) against the model
    (built on the meta device before any weight loads): a ConfigError listing what matched and what did not when
    a part's regex does not compile, matches no module of that part (PEFT would add no LoRA there, silently when
    another part's regex matches), or matches modules LoRA cannot adapt. Returns the adapted modules per part."""
    modules = dict(model.named_modules())
    adapted = {}
    for part, pattern in patterns.items():
        option = f"lora.targets.{part.value}" if custom_target(part, lora) else f"the {part.value} LoRA target"
        try:
            regex = re.compile(pattern)
        except re.error as err:
            raise ConfigError(f"{option}={pattern!r} is not a regular expression ({err}); it is matched against "
                              "whole module names, e.g. '.*\\.(q_proj|v_proj)'") from None
        roots = tuple(part_modules.get(part, ()))
        inside = [name for name in modules if any(name == r or name.startswith(r + ".") for r in roots)]
        matched = [name for name in inside if regex.fullmatch(name)]
        layers = [name for name in matched if isinstance(modules[name], LORA_LAYERS)]
        others = [name for name in matched if name not in layers]
        linear_kinds = sorted({name.rsplit(".", 1)[-1] for name in inside if isinstance(modules[name], nn.Linear)})
        if not layers or others:
            raise ConfigError(
                f"{option}={pattern!r} matched {len(layers)} layer(s) LoRA can adapt in the {part.value}"
                + (f" ({_names(layers)})" if layers else "")
                + (f" and {len(others)} module(s) it cannot ({_names(others)})" if others else "")
                + f"; not matched: {len(inside) - len(matched)} of the part's {len(inside)} modules. Its linear "
                f"layers end in: {', '.join(linear_kinds) or 'none'} (the regex must match a whole name, e.g. "
                f"'.*\\.({'|'.join(linear_kinds[:2]) or 'q_proj'})')")
        adapted[part] = len(layers)
    return adapted
