"""MGM (Mini-Gemini) family: dual vision towers (CLIP + ConvNeXt) with patch info mining over Gemma, Llama,
Mistral and Mixtral LLMs; released checkpoints load and export in their own layout."""
from vlm_finetune.models.mgm.family import MGM, MgmFamily
from vlm_finetune.models.mgm.modeling import MgmConfig, MgmForCausalLM
from vlm_finetune.models.mgm.processor import MgmProcessor

__all__ = ["MGM", "MgmConfig", "MgmFamily", "MgmForCausalLM", "MgmProcessor"]
