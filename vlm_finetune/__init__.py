"""vlm_finetune: fine-tune vision-language models (GLM-4V, MGM) on the GPUs you have."""

__version__ = "0.1.0"
