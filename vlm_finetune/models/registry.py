"""The registry of model families: `get_family(model.family)` is how generic code finds one."""
from vlm_finetune.errors import ConfigError
from vlm_finetune.models.base import Family, Mode, Part, parse_trainability
from vlm_finetune.models.glm4v.family import GLM4V
from vlm_finetune.models.glm4v_orig.family import GLM4V_ORIG
from vlm_finetune.models.mgm.family import MGM

FAMILIES: dict[str, Family] = {family.name: family for family in (GLM4V, GLM4V_ORIG, MGM)}


def register_family(family: Family) -> Family:
    """Add a family (a plug-in, or a test's) under its name."""
    FAMILIES[family.name] = family
    return family


def get_family(name: str) -> Family:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ConfigError(f"model.family={name!r} is unknown; known families: {sorted(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "Mode", "Part", "get_family", "parse_trainability", "register_family"]
