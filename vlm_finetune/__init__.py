"""vlm_finetune: fine-tune vision-language models (GLM-4V, MGM) on the GPUs you have. The package itself
imports nothing of its own (`config` registers the resolvers conf/train.yaml uses)."""

__version__ = "0.1.0"
