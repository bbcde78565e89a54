"""Model families. Importing this package registers every family with `get_family`."""
from vlm_finetune.models import glm4v, mgm  # noqa: F401
from vlm_finetune.models.base import ModelFamily, Mode, Part, get_family, parse_trainability

__all__ = ["ModelFamily", "Mode", "Part", "get_family", "parse_trainability"]
