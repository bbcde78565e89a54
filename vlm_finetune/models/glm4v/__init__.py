"""GLM-4V family: GLM-4.1V / 4.5V from transformers, and the original GLM-4V-9B via trust_remote_code."""
from vlm_finetune.models.glm4v.family import GLM4V, Glm4vFamily
from vlm_finetune.models.glm4v.processor import Glm4vProcessor

__all__ = ["GLM4V", "Glm4vFamily", "Glm4vProcessor"]
