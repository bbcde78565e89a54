"""vlm_finetune: fine-tune vision-language models (GLM-4V, MGM) on the GPUs you have. The package itself
imports nothing of its own but `quiet` (`config` registers the resolvers conf/train.yaml uses)."""

from vlm_finetune.quiet import quiet_start

quiet_start()  # before peft / transformers / bitsandbytes load: their start-up noise about hub kernels

__version__ = "0.1.0"
